"""Verify a deploy bundle (made by `pipeline bundle`) on the device that will run it, without torch:

    PYTHONPATH=runtime python3 -m pipeline.edge verify --bundle . [--require trt]
        [--backend auto|tensorrt|onnxruntime|openvino]

Every file listed in `bundle.json` must match its sha256. `auto` takes the fastest backend installed here: where
TensorRT is usable (`trt_status()`), the FP16 and INT8 plans are built into `plans/` (kept for the next run while the
ONNX, the settings, the GPU and TensorRT stay the same) and run; else ONNX Runtime's CUDA provider (FP32, FP16, INT8);
else OpenVINO (FP32 and INT8, on the CPU); else ONNX Runtime on the CPU (FP32, FP16, INT8). On the CPU the INT8 row
uses `student.int8-cpu.onnx`. Each precision runs the golden LR images: Y-PSNR
against the PyTorch FP32 outputs (parity) and against HR, whose difference to PyTorch's own Y-PSNR on HR must stay
within the bundle's gate; then latency at the bundle's LR sizes, one runner alive at a time. A table on stdout and
`edge_report.json`; exit 0 when every row passes, 1 on a failed gate (or `--require trt` without TensorRT), 2 on a
missing or corrupt bundle.

Imports numpy, Pillow and, lazily, onnxruntime or tensorrt + cuda-python; nothing else outside the standard library
(Python 3.10 and later, as on JetPack 6).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends.base import Runner, latency
from pipeline.config import EngineSection, validate_engine_section
from pipeline.data.imageio import read_rgb
from pipeline.errors import GateFailed, UserError
from pipeline.metrics import psnr_y
from pipeline.rundir import ONNX, sha256_file, versions, write_json_atomic

log = logging.getLogger("pipeline")

FORMAT = "facd-pipeline-bundle/1"  # bundle.json["format"]
BUNDLE_JSON, GOLDEN_JSON, REPORT_JSON = "bundle.json", "golden/golden.json", "edge_report.json"
PRECISIONS = ("fp32", "fp16", "int8")  # the rows; on the CPU provider INT8 runs the U8S8 CPU model
OPENVINO_PRECISIONS = ("fp32", "int8")  # OpenVINO's rows (INT8: the CPU model; it has no FP16 model)
PLANS_DIR = "plans"
TRT_PRECISIONS = ("fp16", "int8")
BUNDLE_KEYS = ("scale", "gates", "latency_sizes", "warmup", "repeats", "engine", "files")


@dataclass
class Golden:
    name: str
    lr: np.ndarray
    sr: np.ndarray  # the PyTorch FP32 output
    hr: np.ndarray
    psnr_y: float  # of `sr` against `hr`


def load_bundle(root: Path) -> dict[str, Any]:
    """`bundle.json`, once every file it lists is present with its sha256; a UserError naming what is not."""
    path = root / BUNDLE_JSON
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{root} is not a bundle: it has no {BUNDLE_JSON} (make one with `pipeline bundle`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e}); extract the bundle again") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} description; make the bundle again with `pipeline bundle`")
    missing_keys = [k for k in BUNDLE_KEYS if k not in info]
    if missing_keys:
        raise UserError(f"{path} lacks {', '.join(missing_keys)}; make the bundle again with `pipeline bundle`")
    if not isinstance(info["files"], dict):
        raise UserError(f"{path}: 'files' is not a table of names and sha256; make the bundle again")
    outside = [str(name) for name in info["files"] if not _inside(root, name)]
    if outside:
        raise UserError(f"{path} lists files outside the bundle ({', '.join(outside)}); refusing to read them")
    missing = [name for name in info["files"] if not (root / name).is_file()]
    changed = [name for name, digest in info["files"].items()
               if name not in missing and sha256_file(root / name) != digest]
    if missing or changed:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"sha256 differs: {', '.join(changed)}"] if changed else [])
        raise UserError(f"bundle {root} is incomplete or corrupt ({'; '.join(problems)}); extract it again")
    return info


def _inside(root: Path, name: object) -> bool:
    """`name` is a relative path that stays inside `root`, symbolic links resolved."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return False
    return (root / name).resolve().is_relative_to(root.resolve())


def load_golden(root: Path, files: dict[str, str]) -> list[Golden]:
    """The golden images; each one must be a file that `bundle.json` lists (and so was checked)."""
    golden = json.loads((root / GOLDEN_JSON).read_text())
    base = (root / GOLDEN_JSON).parent
    folder = Path(GOLDEN_JSON).parent.as_posix()
    unlisted = [str(g[k]) for g in golden["images"] for k in ("lr", "sr_fp32", "hr") if f"{folder}/{g[k]}" not in files]
    if unlisted:
        raise UserError(f"{root / GOLDEN_JSON} names files that {BUNDLE_JSON} does not list ({', '.join(unlisted)}); "
                        "extract the bundle again")
    return [Golden(g["name"], read_rgb(base / g["lr"]), read_rgb(base / g["sr_fp32"]), read_rgb(base / g["hr"]),
                   g["psnr_y"]) for g in golden["images"]]


def choose_backend(backend: str, require_trt: bool) -> tuple[str, str]:
    """("tensorrt", "onnxruntime-cuda", "openvino" or "onnxruntime-cpu", the sentence that says so and why).
    GateFailed when TensorRT is required (`--require trt`, `--backend tensorrt`) but not usable."""
    from pipeline.backends.openvino_runner import openvino_status
    from pipeline.backends.ort_runner import PROVIDERS, provider_status
    from pipeline.backends.trt_engine import trt_status

    if require_trt and backend in ("onnxruntime", "openvino"):
        raise UserError(f"--require trt contradicts --backend {backend}")
    why_not = ""
    if backend in ("auto", "tensorrt"):
        ok, what = trt_status()
        if ok:
            return "tensorrt", f"verifying with {what}"
        if require_trt or backend == "tensorrt":
            raise GateFailed(f"TensorRT is required here but not usable: {what}")
        why_not = f"TensorRT not available ({what}): "
    if backend == "auto" and provider_status("cuda")[0]:
        return "onnxruntime-cuda", f"{why_not}verifying with ONNX Runtime ({PROVIDERS['cuda']})"
    if backend in ("auto", "openvino"):
        ok, what = openvino_status()
        if ok:
            return "openvino", f"{why_not}verifying with {what} on the CPU"
        if backend == "openvino":
            raise UserError(f"--backend openvino: {what}")
        why_not += f"{what}: "
    device = "cuda" if provider_status("cuda")[0] else "cpu"
    ok, why = provider_status(device)
    if not ok:
        raise UserError(f"{why_not}nothing here can run the models: {why} (README.md: Requirements)")
    return f"onnxruntime-{device}", f"{why_not}verifying with ONNX Runtime ({PROVIDERS[device]})"


def _engine_section(root: Path, info: dict[str, Any]) -> EngineSection:
    try:
        sec = EngineSection(**info["engine"])
    except TypeError as e:
        raise UserError(f"{root / BUNDLE_JSON}: bad engine section ({e})") from None
    validate_engine_section(sec)
    if sec.timing_cache:  # relative to the bundle, whatever the working directory, and inside it
        if not _inside(root, sec.timing_cache):
            raise UserError(f"{root / BUNDLE_JSON}: engine.timing_cache {sec.timing_cache!r} is outside the bundle")
        sec.timing_cache = str(root / sec.timing_cache)
    return sec


def candidates(root: Path, info: dict[str, Any], backend: str) -> list[tuple[str, str, Callable[[], Runner]]]:
    """(precision, model file, how to make its runner) for every row of `backend`."""
    if backend == "tensorrt":
        from pipeline.backends.trt_runner import TrtRunner
        from pipeline.backends.trt_engine import build_engines

        sec = _engine_section(root, info)

        def plan_runner(precision: str) -> Runner:
            log.info("%s: building or reusing the TensorRT plan in %s/ (minutes on a small device)", precision,
                     PLANS_DIR)
            (plan,) = build_engines({precision: root / ONNX[precision]}, root / PLANS_DIR, sec, int(info["scale"]))
            return TrtRunner(plan)

        return [(p, ONNX[p], lambda p=p: plan_runner(p)) for p in TRT_PRECISIONS]
    from pipeline.backends.ort_runner import OrtRunner, onnx_for

    if backend == "openvino":
        from pipeline.backends.openvino_runner import OpenVinoRunner

        names = {p: onnx_for(p, "cpu") for p in OPENVINO_PRECISIONS}
        return [(p, name, lambda m=root / name: OpenVinoRunner(m)) for p, name in names.items()]

    device = backend.removeprefix("onnxruntime-")
    names = {p: onnx_for(p, device) for p in PRECISIONS}
    return [(p, name, lambda m=root / name: OrtRunner(m, device)) for p, name in names.items()]


def run_row(precision: str, model: str, make: Callable[[], Runner], golden: list[Golden],
            info: dict[str, Any]) -> dict[str, Any]:
    """One precision: outputs on the golden set, the gate, latency. A runner that cannot be made or run here (a plan
    TensorRT cannot build, say) is a failed row with its reason."""
    scale, gate = int(info["scale"]), float(info["gates"][precision])
    row: dict[str, Any] = {"precision": precision, "model": model, "status": "fail", "reason": "", "psnr_y": None,
                           "delta_db": None, "gate_db": gate, "psnr_vs_golden": None, "latency_ms_p50": None,
                           "latency_ms_p95": None, "per_image": [], "throughput": []}
    try:
        runner = make()
        log.info("%s: %s on %d golden images, then latency at %s", precision, runner.name, len(golden),
                 ", ".join(info["latency_sizes"]))
        with runner:
            outputs = [runner.infer(g.lr) for g in golden]
            row["throughput"] = [latency(runner, size, int(info["warmup"]), int(info["repeats"]))
                                 for size in info["latency_sizes"]]
    except UserError as e:
        row["reason"] = str(e)
        return row
    row["per_image"] = [{"name": g.name, "psnr_y": psnr_y(out, g.hr, scale),
                         "psnr_vs_golden": psnr_y(out, g.sr, scale)} for g, out in zip(golden, outputs)]
    row["psnr_y"] = statistics.fmean(r["psnr_y"] for r in row["per_image"])
    row["psnr_vs_golden"] = min(r["psnr_vs_golden"] for r in row["per_image"])
    row["delta_db"] = row["psnr_y"] - statistics.fmean(g.psnr_y for g in golden)
    timed = [t for t in row["throughput"] if "p50_ms" in t]
    if timed:
        row["latency_ms_p50"], row["latency_ms_p95"] = timed[-1]["p50_ms"], timed[-1]["p95_ms"]
    if abs(row["delta_db"]) <= gate:
        row["status"] = "pass"
    else:
        row["reason"] = f"|delta| {abs(row['delta_db']):.3f} dB > gate {gate} dB against PyTorch FP32 on the golden set"
    return row


def verify_bundle(root: Path, backend: str = "auto", require_trt: bool = False) -> dict[str, Any]:
    """Check, run and gate the bundle at `root`; writes `root/edge_report.json` and returns the report."""
    root = Path(root)
    info = load_bundle(root)
    golden = load_golden(root, info["files"])
    backend, note = choose_backend(backend, require_trt)
    print(note, flush=True)
    rows = [{"backend": backend, **run_row(p, model, make, golden, info)}
            for p, model, make in candidates(root, info, backend)]
    report = {"bundle": str(root.resolve()), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "backend": backend,
              "note": note, "machine": {"platform": platform.platform(), "cores": os.cpu_count()},
              "versions": versions(), "scale": info["scale"], "gates": info["gates"],
              "golden": {"images": [g.name for g in golden],
                         "psnr_y_pytorch": statistics.fmean(g.psnr_y for g in golden)},
              "latency_sizes": info["latency_sizes"],
              "latency": f"one call on a float32 batch of 1, host to host, after {info['warmup']} warm-up calls; "
                         f"p50/p95 over {info['repeats']} calls",
              "rows": rows, "passed": all(r["status"] == "pass" for r in rows)}
    write_json_atomic(root / REPORT_JSON, report)
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'backend':17s} {'precision':9s} {'model':22s} {'Y-PSNR':>7s} {'delta':>7s} {'gate':>5s} "
             f"{'vs golden':>9s} {'p50 ms':>8s}  status"]
    for r in report["rows"]:
        lines.append(f"{r['backend']:17s} {r['precision']:9s} {r['model']:22s} {_num(r['psnr_y'], '7.3f')} "
                     f"{_num(r['delta_db'], '+7.3f')} {r['gate_db']:5.2f} {_num(r['psnr_vs_golden'], '9.2f')} "
                     f"{_num(r['latency_ms_p50'], '8.2f')}  {r['status']}{': ' + r['reason'] if r['reason'] else ''}")
    last_size = (report["latency_sizes"] or ["-"])[-1]
    lines.append(f"Y-PSNR in dB (shave = scale) on {len(report['golden']['images'])} golden images, PyTorch FP32 "
                 f"{report['golden']['psnr_y_pytorch']:.3f}; delta: against PyTorch; vs golden: the worst image "
                 f"against PyTorch's output; p50: at LR {last_size} (every size in {REPORT_JSON})")
    return "\n".join(lines)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.edge", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("verify", help="check the bundle's models on this device against its golden outputs")
    p.add_argument("--bundle", type=Path, default=Path("."), help="the bundle folder (default: here)")
    p.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime", "openvino"], default="auto",
                   help="auto (default): TensorRT where it is usable, else ONNX Runtime's CUDA provider, else "
                        "OpenVINO where installed, else ONNX Runtime on the CPU")
    p.add_argument("--require", choices=["trt"], help="trt: fail (exit 1) when TensorRT is not usable here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        report = verify_bundle(args.bundle, args.backend, args.require == "trt")
        print(format_report(report))
        print(f"report: {args.bundle / REPORT_JSON}")
        if not report["passed"]:
            failed = [f"{r['backend']} {r['precision']}: {r['reason']}" for r in report["rows"]
                      if r["status"] != "pass"]
            raise GateFailed("edge verify failed:\n  " + "\n  ".join(failed))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except GateFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a read-only bundle: edge_report.json (and plans/) are written into it
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        print(f"error: cannot write into the bundle ({e.filename}: {e.strerror}); extract it where you can write",
              file=sys.stderr)
        return 2
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    print("edge verify passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
