"""`pipeline upscale`: super-resolve the user's images with any backend, tiling what is too large for one pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.backends.base import Runner
from pipeline.data.imageio import IMAGE_SUFFIXES, list_images, read_rgb, write_rgb
from pipeline.errors import UserError
from pipeline.rundir import PLANS, STUDENT

DEFAULT_TILE = 384  # LR side above which an image is tiled: bounds memory (an EDSR-baseline pass at 640x360 holds GBs)
MODEL_SUFFIXES = (".pt", ".pth", ".onnx", ".plan")


def collect_inputs(inputs: list[Path], out: Path, overwrite: bool = False) -> list[tuple[Path, Path]]:
    """(input image, output path) pairs: files as given, folders' images (non-recursive); file names kept.
    Refuses non-images, an output folder that is an input folder, two inputs with the same name, and outputs that
    exist already (unless `overwrite`)."""
    out_dir = out.resolve()
    pairs: dict[str, Path] = {}
    for item in inputs:
        if item.is_dir():
            if item.resolve() == out_dir:
                raise UserError(f"--out {out} is the input folder {item}: choose another folder, inputs are never "
                                "overwritten")
            files = list_images(item)
        elif item.is_file():
            if item.suffix.lower() not in IMAGE_SUFFIXES:
                raise UserError(f"{item} is not an image ({', '.join(IMAGE_SUFFIXES)})")
            files = [item]
        else:
            raise UserError(f"{item} does not exist")
        for f in files:
            if f.name in pairs and pairs[f.name].resolve() != f.resolve():
                raise UserError(f"two inputs are named {f.name} ({pairs[f.name]} and {f}); outputs keep the names")
            pairs[f.name] = f
    if not pairs:
        raise UserError(f"no images in {', '.join(map(str, inputs))}")
    result = [(f, out / name) for name, f in sorted(pairs.items())]
    for src, dst in result:
        if dst.resolve() == src.resolve():
            raise UserError(f"{dst} would overwrite its input: choose another --out folder")
    existing = [str(dst) for _, dst in result if dst.exists()]
    if existing and not overwrite:
        raise UserError(f"{len(existing)} output(s) exist already, e.g. {existing[0]}: pass --overwrite to replace "
                        "them, or choose another --out folder")
    return result


def upscale(runner: Runner, pairs: list[tuple[Path, Path]], progress: bool = True) -> list[Path]:
    """Read every input (so a bad one stops the run before anything is written), then super-resolve and write each
    image atomically."""
    images = [(read_rgb(src), dst) for src, dst in pairs]
    written = []
    with runner:
        for lr, dst in tqdm(images, desc=f"upscale ({runner.name})", unit="img", disable=not progress):
            write_rgb(dst, runner.infer(lr))
            written.append(dst)
    return written


def make_runner(backend: str, precision: str | None, run_root: Path, model: Path | None,
                tiling: dict[str, Any]) -> Runner:
    """The runner for `backend` and `precision` on the model from `model` (a checkpoint, ONNX or plan file) or
    from the run directory; says which model it chose."""
    if model is not None and model.suffix not in MODEL_SUFFIXES:
        raise UserError(f"--model {model}: expected a checkpoint (.pt, .pth), an ONNX model (.onnx) or a TensorRT "
                        "plan (.plan)")
    if backend == "torch":
        import torch

        from pipeline.backends.torch_runner import TorchRunner
        from pipeline.modelio import load_model

        if precision not in (None, "fp32"):
            raise UserError("the torch backend runs FP32; use --backend onnxruntime or tensorrt for fp16 / int8")
        path = _pick(model, run_root / STUDENT, (".pt", ".pth"), backend)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"upscale: PyTorch FP32 on {device}, {path}")
        return TorchRunner(load_model(path), device, **tiling)
    if backend == "onnxruntime":
        from pipeline.backends.ort_runner import OrtRunner, fastest_device, onnx_for

        device = fastest_device()
        path = _pick(model, run_root / onnx_for(precision or "fp32", device), (".onnx",), backend)
        runner = OrtRunner(path, device, **tiling)
        _check_precision(runner.precision, precision, path)
        print(f"upscale: ONNX Runtime {device.upper()} provider, {path} ({runner.precision})")
        return runner
    from pipeline.backends.trt_runner import TrtRunner

    path = _pick(model, run_root / PLANS[precision or "fp16"], (".plan",), backend)
    runner = TrtRunner(path, **tiling)
    _check_precision(runner.precision, precision, path)
    print(f"upscale: TensorRT, {path} ({runner.precision})")
    return runner


def _pick(model: Path | None, default: Path, suffixes: tuple[str, ...], backend: str) -> Path:
    path = model or default
    if path.suffix not in suffixes:
        raise UserError(f"--backend {backend} runs {' / '.join(suffixes)} files, not {path}")
    if not path.is_file():
        raise UserError(f"{path} does not exist: pass --model FILE, or make it with `pipeline all` "
                        "(or export / quantize / build)")
    return path


def _check_precision(found: str, wanted: str | None, path: Path) -> None:
    if wanted is not None and found.split("-")[0] != wanted:
        raise UserError(f"{path} is a {found} model, --precision asks for {wanted}")
