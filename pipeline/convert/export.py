"""Export: the student to `student.fp32.onnx` and `student.fp16.onnx`, with our metadata, and their parity check.

Both models take `lr` and give `sr`: float32 NCHW RGB in [0, 1], dynamic batch, height and width. The FP16 model
computes in FP16 and keeps FP32 input and output through a Cast at each end, which is what a strongly typed TensorRT
build turns into an FP16 engine and what ONNX Runtime's CPU provider still runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models import folded, read_torch_file
from pipeline.backends.ort_runner import FORMAT, read_meta
from pipeline.config import Config, parse_size
from pipeline.data.datasets import PairFolder
from pipeline.errors import GateFailed, UserError
from pipeline.rundir import ONNX, STUDENT, RunDir, atomic_path, sha256_file

log = logging.getLogger("pipeline")

INPUT, OUTPUT = "lr", "sr"


def export_fp32(model: Any, out: Path, meta: dict[str, str], simplify: bool = True) -> dict[str, Any]:
    """Export `model` to `out` in its deployed form (re-parameterized branches folded into plain Convs, `folded`);
    returns what was done (simplifier used, opset)."""
    import torch

    model = folded(model).eval().cpu()
    example = torch.rand(1, 3, 24, 20)
    dims = {"x": {0: torch.export.Dim("N"), 2: torch.export.Dim("H"), 3: torch.export.Dim("W")}}
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision notes
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecation notes, not the user's
        program = torch.onnx.export(model, (example,), input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes=dims, dynamo=True, verbose=False)
    proto = program.model_proto
    simplifier = "off"
    if simplify:
        proto, simplifier = _simplify(proto)
        del proto.metadata_props[:]  # the simplifier's own notes
    _name_convs(proto, model)
    _set_meta(proto, {**meta, "precision": "fp32"})
    save(proto, out)
    return {"simplifier": simplifier, "opset": _opset(proto), "convs": len(conv_nodes(proto))}


def _simplify(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """onnxsim, else onnxslim (pure Python) when onnxsim is missing or fails."""
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(proto)
        if ok:
            return simplified, "onnxsim"
        log.warning("onnxsim could not validate its result; trying onnxslim")
    except ImportError:
        log.info("onnxsim is not installed; simplifying with onnxslim")
    except Exception as e:  # noqa: BLE001 - onnxsim raises bare RuntimeErrors from C++
        log.warning("onnxsim failed (%s); trying onnxslim", str(e).splitlines()[0])
    try:
        import onnxslim
    except ImportError:
        raise UserError("neither onnxsim nor onnxslim is installed: pip install onnxsim, "
                        "or turn simplification off with --set export.simplify=false") from None
    return onnxslim.slim(proto), "onnxslim"


def _name_convs(proto: onnx.ModelProto, model: Any) -> None:
    """Name every Conv node after its PyTorch module ('body.0.conv1'), so tables and logs speak the model's names."""
    import torch

    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    nodes = conv_nodes(proto)
    weights = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    shapes_match = len(nodes) == len(modules) and all(
        weights.get(node.input[1]) == tuple(m.weight.shape) for node, (_, m) in zip(nodes, modules))
    if not shapes_match:
        raise RuntimeError(f"the exported graph's {len(nodes)} Conv nodes do not line up with the model's "
                           f"{len(modules)} Conv2d modules")
    for node, (name, _) in zip(nodes, modules):
        node.name = name


def conv_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.op_type == "Conv"]


def to_fp16(fp32: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with FP16 weights and activations; FP32 `lr` in and `sr` out through Casts."""
    proto = onnx.ModelProto()
    proto.CopyFrom(fp32)
    g = proto.graph
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    if any(n.op_type == "Constant" for n in g.node):
        raise RuntimeError("the graph has Constant nodes; export folds them into initializers")
    for node in g.node:
        node.input[:] = [f"{INPUT}_fp16" if v == INPUT else v for v in node.input]
        node.output[:] = [f"{OUTPUT}_fp16" if v == OUTPUT else v for v in node.output]
    g.node.insert(0, helper.make_node("Cast", [INPUT], [f"{INPUT}_fp16"], to=TensorProto.FLOAT16, name="cast_lr"))
    g.node.append(helper.make_node("Cast", [f"{OUTPUT}_fp16"], [OUTPUT], to=TensorProto.FLOAT, name="cast_sr"))
    del g.value_info[:]
    _set_meta(proto, {"precision": "fp16"})
    return proto


def check(proto: onnx.ModelProto) -> None:
    """onnx.checker (full, with shape inference) and the interface: `lr` -> `sr`, float32, N/H/W symbolic."""
    onnx.checker.check_model(proto, full_check=True)
    for value, name in ((proto.graph.input, INPUT), (proto.graph.output, OUTPUT)):
        if [v.name for v in value] != [name]:
            raise RuntimeError(f"expected the single tensor {name!r}, got {[v.name for v in value]}")
        t = value[0].type.tensor_type
        dims = t.shape.dim
        if t.elem_type != TensorProto.FLOAT or len(dims) != 4 or dims[1].dim_value != 3:
            raise RuntimeError(f"{name} must be float32 (N, 3, H, W)")
        fixed = [("N", "H", "W")[i] for i, d in enumerate((dims[0], dims[2], dims[3])) if not d.dim_param]
        if fixed:
            raise RuntimeError(f"{name}: dimension(s) {', '.join(fixed)} became fixed; they must stay symbolic")


def _set_meta(proto: onnx.ModelProto, meta: dict[str, str]) -> None:
    current = {p.key: p.value for p in proto.metadata_props}
    current.update({"format": FORMAT, **meta})
    del proto.metadata_props[:]
    for key, value in sorted(current.items()):
        proto.metadata_props.add(key=key, value=str(value))


def model_meta(model: Any, checkpoint_sha256: str, config_hash: str) -> dict[str, str]:
    return {"scale": str(model.scale), "value_range": "0,1", "colour_order": "RGB", "layout": "NCHW",
            "model_config": json.dumps(model.config, sort_keys=True), "source_checkpoint_sha256": checkpoint_sha256,
            "config_hash": config_hash}


def save(proto: onnx.ModelProto, out: Path) -> None:
    """Check, then write atomically."""
    check(proto)
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))


def _opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def parity(model: Any, onnx_path: Path, images: list[tuple[str, np.ndarray]]) -> list[dict[str, Any]]:
    """ONNX Runtime (CPU) against PyTorch on each (name, LR uint8) image: max abs error and PSNR (RGB, peak 1)
    of the ONNX output against the PyTorch output, both as floats."""
    import torch

    from pipeline.backends.ort_runner import OrtRunner

    rows = []
    with OrtRunner(onnx_path, "cpu") as ort_runner, torch.inference_mode():
        for name, lr in images:
            x = lr.transpose(2, 0, 1)[None].astype(np.float32) / 255
            ref = model.eval()(torch.from_numpy(x)).numpy()
            out = ort_runner.forward(x)
            mse = float(np.mean((out.astype(np.float64) - ref) ** 2))
            rows.append({"image": name, "lr_size": f"{lr.shape[1]}x{lr.shape[0]}",
                         "max_abs_err": float(np.max(np.abs(out - ref))),
                         "psnr_vs_pytorch": math.inf if mse == 0 else 10 * math.log10(1 / mse)})
    return rows


def parity_images(cfg: Config) -> list[tuple[str, np.ndarray]]:
    """The eval images' LR, whole and cropped to each of `export.parity_sizes`."""
    images = []
    for pair in PairFolder(cfg.data.eval, cfg.scale):
        images.append((pair.name, pair.lr))
        for size in cfg.export.parity_sizes:
            h, w = parse_size(size)
            images.append((f"{pair.name}[:{h}, :{w}]", pair.lr[:h, :w]))
    return images


def export_checked(cfg: Config, model: Any, student_sha256: str, folder: Path) -> dict[str, Any]:
    """The FP32 and FP16 models of `model` in `folder` (their run-directory names), each checked against PyTorch (the
    model as trained, before any folding) on `parity_images`; GateFailed when FP32 differs by more than
    `export.max_abs_err` (the caller replaces nothing)."""
    config_hash = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()
    images = parity_images(cfg)
    fp32, fp16 = folder / ONNX["fp32"], folder / ONNX["fp16"]
    deployed = folded(model)
    done = export_fp32(deployed, fp32, model_meta(deployed, student_sha256, config_hash), cfg.export.simplify)
    save(to_fp16(onnx.load(str(fp32))), fp16)
    result = {**done, "parity": {"fp32": parity(model, fp32, images), "fp16": parity(model, fp16, images)}}
    worst = {p: max(r["max_abs_err"] for r in rows) for p, rows in result["parity"].items()}
    low = {p: min(r["psnr_vs_pytorch"] for r in rows) for p, rows in result["parity"].items()}
    log.info("export: ONNX Runtime vs PyTorch on %d images: FP32 max |err| %.2g (PSNR >= %.1f dB), "
             "FP16 max |err| %.2g (PSNR >= %.1f dB); simplified with %s", len(images), worst["fp32"],
             low["fp32"], worst["fp16"], low["fp16"], done["simplifier"])
    if worst["fp32"] > cfg.export.max_abs_err:
        raise GateFailed(f"export parity failed: ONNX Runtime FP32 differs from PyTorch by up to "
                         f"{worst['fp32']:.3g} (export.max_abs_err {cfg.export.max_abs_err}); nothing was replaced")
    return result


def check_student_of_run(cfg: Config, run: RunDir, student: Path, force: bool) -> None:
    """Exporting a checkpoint that is not the run's student replaces the run's models: only with `force`, and said."""
    own = run.path(STUDENT)
    if student.resolve() == own.resolve():
        return
    raw = read_torch_file(student)
    info = raw if isinstance(raw, dict) else {}
    why = []
    if info.get("role") not in (None, "student"):
        why.append(f"it is a {info['role']}")
    if info.get("preset") not in (None, cfg.model.student):
        why.append(f"its preset is {info['preset']!r}, the config's student is {cfg.model.student!r}")
    recorded = run.recorded_sha256(STUDENT) or (sha256_file(own) if own.is_file() else None)
    if recorded is not None and sha256_file(student) != recorded:
        why.append(f"its sha256 differs from the run's {STUDENT}")
    if not why:
        return
    replaced = [n for n in (ONNX["fp32"], ONNX["fp16"]) if run.path(n).exists()]
    what = f"{', '.join(replaced)} of {run.root}" if replaced else f"the ONNX models of {run.root}"
    if not force:
        raise UserError(f"--student {student} is not this run's student ({'; '.join(why)}); its export would replace "
                        f"{what}: pass --force to do that")
    log.warning("export: replacing %s with the export of %s (%s)", what, student, "; ".join(why))


def check_models_of_student(root: Path) -> None:
    """Every ONNX model of the run holds its precision and was exported from the run's `student.pt`; else a
    UserError (verify and the bundle's golden set compare the models with that student)."""
    student_sha = sha256_file(root / STUDENT)
    for precision, name in ONNX.items():
        meta = read_meta(root / name)
        if meta["precision"] != precision:
            raise UserError(f"{root / name} holds a {meta['precision']} model, expected {precision}")
        if meta["source_checkpoint_sha256"] != student_sha:
            raise UserError(f"{root / name} was exported from another checkpoint than {root / STUDENT}: redo "
                            "`pipeline export` and `pipeline quantize` from it")
