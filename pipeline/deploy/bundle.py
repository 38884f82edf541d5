"""`pipeline bundle`: a self-contained deploy folder `OUT/` and `OUT.tar.gz` for an edge device.

It holds the ONNX models (FP32, FP16, INT8 for TensorRT, INT8 for ONNX Runtime on CPUs), `calib.npz`, the run's
`manifest.json`, a golden set (LR crops of the first eval images with the PyTorch FP32 outputs and their HR),
`bundle.json` (scale, gates, latency sizes, engine settings, the sha256 of every file), the torch-free runtime
(`runtime/pipeline/`, this package's Python files), a Makefile whose `verify` target runs `python -m pipeline.edge
verify` (see pipeline/deploy/edge.py) and a README. The bundle is assembled in a temporary folder beside OUT; an
existing OUT or OUT.tar.gz is replaced only with `force`, only when it is an earlier bundle (never another folder or
file, never anything inside the run directory), and only once the new bundle is complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pipeline
from pipeline.backends.torch_runner import TorchRunner
from pipeline.config import Config
from pipeline.data.datasets import PairFolder
from pipeline.data.imageio import write_rgb
from pipeline.deploy.edge import BUNDLE_JSON, FORMAT, GOLDEN_JSON, PLANS_DIR
from pipeline.errors import UserError
from pipeline.metrics import psnr_y
from pipeline.modelio import load_model
from pipeline.rundir import (CALIB, MANIFEST, ONNX, STUDENT, check_replaceable, load_manifest, replace_folder,
                             sha256_file, umask_mode, versions)
from pipeline.convert.export import check_models_of_student
from pipeline.deploy.runtime import copy_runtime

log = logging.getLogger("pipeline")

# What a run must have, and the command that makes it.
REQUIRED = {STUDENT: "pipeline distill", ONNX["fp32"]: "pipeline export", ONNX["fp16"]: "pipeline export",
            ONNX["int8"]: "pipeline quantize", ONNX["int8-cpu"]: "pipeline quantize", CALIB: "pipeline quantize",
            MANIFEST: "any stage"}
GOLDEN_COUNT = 4  # the first eval images
GOLDEN_CROP = 96  # LR side at most: keeps the bundle small and the check fast on a CPU

MAKEFILE = """\
# Verify this bundle on the device that will run it (see README.md).
PYTHON ?= python3
REQUIRE ?=
BACKEND ?= auto

.PHONY: verify deps

verify:
\tPYTHONPATH=runtime $(PYTHON) -m pipeline.edge verify --bundle . --backend $(BACKEND) \\
\t\t$(if $(REQUIRE),--require $(REQUIRE))

# The ONNX Runtime route; TensorRT and cuda-python come with JetPack or NVIDIA's containers.
deps:
\t$(PYTHON) -m pip install numpy pillow onnxruntime
"""

README = """\
# Deploy bundle: x{scale} super-resolution student

Made by facd-pipeline {version} on {created} from the run `{run}`.
Everything needed to build and check the models on an edge device, without PyTorch.

## What is inside
| file | what |
|---|---|
| `student.fp32.onnx` | the FP32 model (the reference the others are measured against) |
| `student.fp16.onnx` | FP16 (FP32 input and output): for TensorRT, or ONNX Runtime on a GPU |
| `student.int8.onnx` | INT8 for **TensorRT / GPUs** (symmetric QDQ, calibrated; the rest FP16) |
| `student.int8-cpu.onnx` | INT8 for **ONNX Runtime on CPUs** (U8S8 QDQ; the rest FP32) |
| `calib.npz` | the LR crops the INT8 models were calibrated on |
| `golden/` | {golden_count} LR inputs (`lr/`), the PyTorch FP32 outputs (`sr_fp32/`), their HR (`hr/`), `golden.json` |
| `manifest.json` | how the run made each artifact (config, inputs, versions, sha256) |
| `bundle.json` | scale, gates, latency sizes, TensorRT engine settings, the sha256 of every file here |
| `runtime/pipeline/` | the pipeline's Python code; `make verify` imports only its torch-free part |
| `Makefile` | `make verify` (and `make deps`) |

## Requirements
Python 3.10 or later with numpy and Pillow, and either
- TensorRT (10.x or 11.x) with cuda-python (its major version matching CUDA: 12.x on JetPack 6): they come with
  JetPack or NVIDIA's containers; or
- ONNX Runtime (`make deps` installs numpy, Pillow and onnxruntime with pip; onnxruntime-gpu for its CUDA provider);
  and/or OpenVINO (`pip install openvino`), the fastest on CPUs.

## Verify on the device
    make verify                       # the fastest backend installed here (and it says which)
    make verify REQUIRE=trt           # fail when TensorRT is not usable here
    make verify BACKEND=onnxruntime   # ONNX Runtime even where TensorRT is installed
    make verify BACKEND=openvino      # OpenVINO on the CPU (FP32 and INT8)
    make verify PYTHON=/path/to/python

First every file is checked against its sha256 in `bundle.json`. With TensorRT, the FP16 and INT8 plans are built
into `plans/` for this GPU and TensorRT version (minutes on a Jetson; reused while nothing changes) and run. Without
it, ONNX Runtime runs FP32, FP16 and INT8 on its CUDA provider where present, else OpenVINO where installed runs FP32
and INT8 on the CPU, else ONNX Runtime runs them on the CPU (INT8 on a CPU: `student.int8-cpu.onnx`). It prints which.
Each precision runs the golden LR images and must stay within its gate of PyTorch's Y-PSNR against HR
(FP32 {gate_fp32} dB, FP16 {gate_fp16} dB, INT8 {gate_int8} dB); then latency (p50/p95, batch 1) at LR {sizes}.

`edge_report.json` gets every row: backend, precision, model, Y-PSNR against HR and its delta to PyTorch, the gate,
Y-PSNR against the PyTorch outputs (per image and the worst), latency per size (TensorRT: also the engine alone),
the machine and the versions. Exit 0: every row passed; 1: a gate failed or TensorRT was required and is missing;
2: the bundle is incomplete or corrupt (the file and field are named), or nothing here can run the models; 70: an
internal error (the traceback is in the log file it names: please report it). make shows exit codes as its own
"Error N".

## Which INT8 model for which device
- `student.int8.onnx`: TensorRT (Jetson, NVIDIA GPUs). Signed symmetric, the form TensorRT takes.
- `student.int8-cpu.onnx`: ONNX Runtime on CPUs (unsigned activations, which its CPU kernels run fastest), and
  OpenVINO. 7-bit weights, so it computes the same on every x86 CPU, with or without VNNI. Not for TensorRT.
"""

def make_bundle(cfg: Config, run_root: Path, out: Path, *, force: bool = False, progress: bool = True) -> Path:
    """Write the bundle of the run at `run_root` to `out/` and `out.tar.gz`; returns the tarball's path.

    A UserError, with nothing written, when the run lacks an artifact (named), when an artifact differs from its
    record in the manifest, or when `out` or its tarball exists and `force` is not set."""
    run_root, out = Path(run_root), Path(out).resolve()
    say = log.info if progress else log.debug
    _check_run(run_root)
    tarball = out.with_name(out.name + ".tar.gz")
    if out == run_root.resolve() or out in run_root.resolve().parents:
        raise UserError(f"--out {out} would replace the run directory {run_root}; choose another folder")
    if out.is_relative_to(run_root.resolve()):
        raise UserError(f"--out {out} is inside the run directory {run_root}; choose a folder outside it")
    check_replaceable(out, force=force, marker=BUNDLE_JSON, fmt=FORMAT, what="a bundle", option="--out")
    if tarball.exists() or tarball.is_symlink():
        if not force:
            raise UserError(f"{tarball} already exists; choose another --out, or pass --force to replace it")
        if not _is_bundle_tarball(tarball):
            raise UserError(f"{tarball}: not a bundle (no {BUNDLE_JSON} of {FORMAT}); --force replaces only an "
                            "earlier bundle, never other files: choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        stage, packed = Path(tmp) / out.name, Path(tmp) / tarball.name
        _fill(cfg, run_root, stage, say)
        say("bundle: packing %s", tarball)
        with tarfile.open(packed, "w:gz") as tar:
            tar.add(stage, arcname=out.name)
        replace_folder(stage, out)
        os.replace(packed, tarball)
        os.chmod(tarball, umask_mode())
    say("bundle: %s and %s (%.1f MB)", out, tarball, tarball.stat().st_size / 1e6)
    return tarball


def _is_bundle_tarball(path: Path) -> bool:
    """A tarball that an earlier `make_bundle` wrote: `<name>/bundle.json` of our format inside a gzipped tar."""
    name = path.name.removesuffix(".tar.gz")
    try:
        with tarfile.open(path, "r:gz") as tar:
            member = tar.extractfile(f"{name}/{BUNDLE_JSON}")
            return member is not None and json.loads(member.read()).get("format") == FORMAT
    except (OSError, tarfile.TarError, KeyError, ValueError, AttributeError):
        return False


def _check_run(run_root: Path) -> None:
    missing = [f"{name} (made by `{cmd}`)" for name, cmd in REQUIRED.items() if not (run_root / name).is_file()]
    if missing:
        raise UserError(f"cannot bundle {run_root}: missing {', '.join(missing)}")
    recorded = load_manifest(run_root / MANIFEST)["artifacts"]
    changed = [name for name in REQUIRED if name in recorded and (run_root / name).is_file()
               and sha256_file(run_root / name) != recorded[name]["sha256"]]
    if changed:
        raise UserError(f"cannot bundle {run_root}: {', '.join(changed)} differ(s) from the sha256 in {MANIFEST} "
                        "(changed after the stage that made it?); redo that stage")
    check_models_of_student(run_root)


def _fill(cfg: Config, run_root: Path, stage: Path, say: Callable[..., None]) -> None:
    """Everything but the tarball, into the new folder `stage`."""
    stage.mkdir()
    for name in (*ONNX.values(), CALIB, MANIFEST):
        shutil.copyfile(run_root / name, stage / name)
    say("bundle: golden set (%d eval images of %s, LR crops of at most %dx%d)", GOLDEN_COUNT, cfg.data.eval,
        GOLDEN_CROP, GOLDEN_CROP)
    _write_golden(cfg, run_root / STUDENT, stage)
    copy_runtime(stage / "runtime" / "pipeline")
    (stage / "Makefile").write_text(MAKEFILE)
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    v = cfg.verify
    (stage / "README.md").write_text(README.format(
        scale=cfg.scale, version=pipeline.__version__, created=created, run=run_root, golden_count=GOLDEN_COUNT,
        gate_fp32=v.gate_fp32_db, gate_fp16=v.gate_fp16_db, gate_int8=v.gate_int8_db,
        sizes=", ".join(v.latency_sizes) or "no size"))
    engine = {**cfg.to_dict()["engine"], "timing_cache": f"{PLANS_DIR}/trt-timing.cache"}
    files = {p.relative_to(stage).as_posix(): sha256_file(p) for p in sorted(stage.rglob("*")) if p.is_file()}
    _write_json(stage / BUNDLE_JSON, {
        "format": FORMAT, "facd_pipeline": pipeline.__version__, "created": created, "run": str(run_root),
        "made_with": versions(), "scale": cfg.scale, "models": ONNX,
        "gates": {"fp32": v.gate_fp32_db, "fp16": v.gate_fp16_db, "int8": v.gate_int8_db},
        "latency_sizes": v.latency_sizes, "warmup": v.warmup, "repeats": v.repeats, "engine": engine, "files": files})


def _write_json(path: Path, data: Any) -> None:
    """Plain writes inside the bundle: the whole folder is temporary until it is renamed into place."""
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_golden(cfg: Config, student: Path, stage: Path) -> None:
    """The first GOLDEN_COUNT eval images, centre-cropped to at most GOLDEN_CROP LR pixels a side, with the PyTorch
    FP32 outputs and their Y-PSNR against HR."""
    s = cfg.scale
    pairs = PairFolder(cfg.data.eval, s)
    folder = (stage / GOLDEN_JSON).parent
    images = []
    with TorchRunner(load_model(student, s)) as runner:
        for i in range(min(GOLDEN_COUNT, len(pairs))):
            pair = pairs.load(i)
            h, w = (min(GOLDEN_CROP, n) for n in pair.lr.shape[:2])
            y, x = (pair.lr.shape[0] - h) // 2, (pair.lr.shape[1] - w) // 2
            lr, hr = pair.lr[y:y + h, x:x + w], pair.hr[y * s:(y + h) * s, x * s:(x + w) * s]
            sr = runner.infer(lr)
            entry: dict[str, Any] = {"name": pair.name}
            for kind, img in (("lr", lr), ("sr_fp32", sr), ("hr", hr)):
                entry[kind] = f"{kind}/{pair.name}.png"
                write_rgb(folder / entry[kind], img)
            images.append({**entry, "psnr_y": psnr_y(sr, hr, s)})
    _write_json(stage / GOLDEN_JSON, {
        "scale": s, "shave": s, "data": cfg.data.eval, "crop": f"centre, at most {GOLDEN_CROP}x{GOLDEN_CROP} LR",
        "psnr_y": "Y-PSNR (dB) of the PyTorch FP32 output against HR", "images": images})
