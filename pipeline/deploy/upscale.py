"""`pipeline upscale`: super-resolve the user's images with any backend, tiling what is too large for one pass."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.backends.base import Runner
from pipeline.data.imageio import IMAGE_SUFFIXES, list_images, read_rgb, write_rgb
from pipeline.errors import UserError
from pipeline.rundir import PLANS, REPORT_JSON, STUDENT

MODEL_SUFFIXES = (".pt", ".pth", ".onnx", ".plan")


def collect_inputs(inputs: list[Path], out: Path, overwrite: bool = False) -> list[tuple[Path, Path]]:
    """(input image, output path) pairs: files as given, folders' images (non-recursive); file names kept.
    Refuses non-images, an output folder that is an input folder, two inputs with the same name, and outputs that
    exist already (unless `overwrite`)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is not a folder; name a folder (it is created if missing)")
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


def choose_backend(precision: str | None, run_root: Path, model: Path | None) -> tuple[str, str]:
    """`--backend auto`: (backend, why), the fastest one that is installed here, can run the model and has not
    failed its gate in the run's `report.json`: a TensorRT plan, ONNX Runtime on a GPU provider, OpenVINO on the
    CPU (FP32 and the CPU INT8 model; faster than ONNX Runtime's CPU provider in benchmarks/results/export_cpu_avx2*),
    else ONNX Runtime on the CPU. A --model file's type decides for checkpoints and plans."""
    from pipeline.backends.openvino_runner import PRECISIONS as OPENVINO_PRECISIONS
    from pipeline.backends.openvino_runner import openvino_status
    from pipeline.backends.ort_runner import provider_status
    from pipeline.backends.trt_engine import trt_status

    if model is not None and model.suffix != ".onnx":
        return ("torch" if model.suffix in (".pt", ".pth") else "tensorrt"), f"the --model file is {model.suffix}"
    failed = set()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        report = json.loads((run_root / REPORT_JSON).read_text())
        failed = {(r["backend"], r["precision"]) for r in report["rows"] if r["status"] == "fail"}
    wanted = precision or "fp32"
    if model is None and wanted != "fp32" and trt_status()[0] and (run_root / PLANS[wanted]).is_file() \
            and ("tensorrt", wanted) not in failed:
        return "tensorrt", "TensorRT is usable and the run has the plan"
    gpu = next((d for d in ("tensorrt", "cuda") if provider_status(d)[0]), None)
    if gpu is not None:
        return "onnxruntime", f"ONNX Runtime has its {gpu.upper()} provider"
    ok, why = openvino_status()
    if ok:
        from pipeline.backends.ort_runner import read_meta

        runs = read_meta(model)["precision"] if model is not None else "int8-cpu" if wanted == "int8" else wanted
        if runs in OPENVINO_PRECISIONS and ("openvino", runs) not in failed:
            return "openvino", f"{why} is installed, the fastest CPU backend"
        why = f"OpenVINO does not run {runs} models" if runs not in OPENVINO_PRECISIONS else "OpenVINO failed its gate"
    return "onnxruntime", f"no GPU provider; {why}"


def make_runner(backend: str, precision: str | None, run_root: Path, model: Path | None,
                tiling: dict[str, Any]) -> Runner:
    """The runner for `backend` and `precision` on the model from `model` (a checkpoint, ONNX or plan file) or
    from the run directory; says which model it chose."""
    if model is not None and model.suffix not in MODEL_SUFFIXES:
        raise UserError(f"--model {model}: expected a checkpoint (.pt, .pth), an ONNX model (.onnx) or a TensorRT "
                        "plan (.plan)")
    if backend == "auto":
        backend, why = choose_backend(precision, run_root, model)
        print(f"upscale: backend {backend} ({why})")
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
    from pipeline.backends.ort_runner import onnx_for

    if backend == "onnxruntime":
        from pipeline.backends.ort_runner import OrtRunner, fastest_device

        device = fastest_device()
        path = _pick(model, run_root / onnx_for(precision or "fp32", device), (".onnx",), backend)
        runner = OrtRunner(path, device, **tiling)
        _check_precision(runner.precision, precision, path)
        print(f"upscale: ONNX Runtime {device.upper()} provider, {path} ({runner.precision})")
        return runner
    if backend == "openvino":
        from pipeline.backends.openvino_runner import OpenVinoRunner, openvino_status

        ok, why = openvino_status()
        if not ok:
            raise UserError(why)
        path = _pick(model, run_root / onnx_for(precision or "fp32", "cpu"), (".onnx",), backend)
        runner = OpenVinoRunner(path, **tiling)
        _check_precision(runner.precision, precision, path)
        print(f"upscale: OpenVINO CPU, {path} ({runner.precision})")
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
