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
`edge_report.json`. It runs and hashes exactly the files `bundle.json` lists (regular files inside the bundle, no
symbolic links), `golden/golden.json` and every model a row runs among them.

Exit codes: 0 every row passed; 1 a gate failed (or `--require trt` without TensorRT); 2 bad input: a missing or
corrupt bundle, one line `error: <file>: <field> ...`; 70 an internal error (an unexpected exception: one line, the
traceback in a log file it names); 130 interrupted.

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
import stat
import statistics
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.backends.base import Runner, latency
from pipeline.config import EngineSection, is_json_int, is_json_number, parse_size, validate_engine_section
from pipeline.data.imageio import read_rgb
from pipeline.errors import GateFailed, UserError, report_internal_error
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
MAX_REPEATS = 10000  # of warmup and repeats


@dataclass(frozen=True)
class Bundle:
    """`bundle.json`, checked (`load_bundle`)."""

    scale: int  # 2, 3 or 4
    gates: dict[str, float]  # each of PRECISIONS -> the largest |Y-PSNR delta| (dB) to PyTorch FP32 it may have
    latency_sizes: list[str]  # LR WxH
    warmup: int
    repeats: int
    engine: EngineSection  # the TensorRT settings, the timing cache a path inside the bundle
    files: dict[str, str]  # every file checked: name relative to the bundle -> sha256


@dataclass
class Golden:
    name: str
    lr: np.ndarray
    sr: np.ndarray  # the PyTorch FP32 output
    hr: np.ndarray
    psnr_y: float  # of `sr` against `hr`


def load_bundle(root: Path) -> Bundle:
    """`bundle.json`, once every file it lists is a regular file inside the bundle with its sha256 (golden.json among
    them) and every field has its type and range; a UserError naming the file and the field if not."""
    path = root / BUNDLE_JSON
    if not path.is_file():
        raise UserError(f"{root} is not a bundle: it has no {BUNDLE_JSON} (make one with `pipeline bundle`)")
    info = _read_json(path)
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise UserError(f"{path}: format: not a {FORMAT} description; make the bundle again with `pipeline bundle`")
    missing_keys = [k for k in BUNDLE_KEYS if k not in info]
    if missing_keys:
        raise UserError(f"{path}: {', '.join(missing_keys)}: missing; make the bundle again with `pipeline bundle`")
    files = _checked_files(root, path, info["files"])
    gates, sizes = info["gates"], info["latency_sizes"]
    if not isinstance(gates, dict):
        raise UserError(f"{path}: gates: expected a table of precisions and dB, got {_show(gates)}")
    if not isinstance(sizes, list):
        raise UserError(f"{path}: latency_sizes: expected a list of LR sizes WxH, got {_show(sizes)}")
    for i, size in enumerate(sizes):
        if not isinstance(size, str):
            raise UserError(f"{path}: latency_sizes[{i}]: expected an LR size WxH, got {_show(size)}")
        parse_size(size, f"{path}: latency_sizes[{i}]")
    return Bundle(scale=_int(path, "scale", info["scale"], 2, 4),
                  gates={p: _number(path, f"gates.{p}", _get(path, gates, p, "gates.")) for p in PRECISIONS},
                  latency_sizes=sizes, warmup=_int(path, "warmup", info["warmup"], 0, MAX_REPEATS),
                  repeats=_int(path, "repeats", info["repeats"], 1, MAX_REPEATS),
                  engine=_engine_section(root, path, info["engine"]), files=files)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}); extract the bundle again") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, an integer of more than 4300 digits
        raise UserError(f"{path}: not JSON ({e}); extract the bundle again") from None


def _checked_files(root: Path, path: Path, files: object) -> dict[str, str]:
    """`files` of bundle.json, once each is a regular file inside the bundle with its sha256."""
    if not isinstance(files, dict):
        raise UserError(f"{path}: files: expected a table of names and sha256, got {_show(files)}; make the bundle "
                        "again")
    outside = [_show(name) for name in files if not _inside(root, name)]
    if outside:
        raise UserError(f"{path}: files: lists files outside the bundle ({', '.join(outside)}); refusing to read them")
    kinds = {name: _kind(root, name) for name in files}
    linked = [name for name, kind in kinds.items() if kind == "link"]
    if linked:
        raise UserError(f"{path}: files: {', '.join(linked)}: reached through a symbolic link; every file listed must "
                        "be a regular file of the bundle (extract it again)")
    missing = [name for name, kind in kinds.items() if kind == "missing"]
    changed = [name for name, digest in files.items() if name not in missing and sha256_file(root / name) != digest]
    if missing or changed:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"sha256 differs: {', '.join(changed)}"] if changed else [])
        raise UserError(f"{path}: files: the bundle is incomplete or corrupt ({'; '.join(problems)}); extract it again")
    if GOLDEN_JSON not in files:
        raise UserError(f"{path}: files: does not list {GOLDEN_JSON}; make the bundle again with `pipeline bundle`")
    return files


def _inside(root: Path, name: object) -> bool:
    """`name` is a printable relative path that stays inside `root`, symbolic links resolved."""
    if (not isinstance(name, str) or not name or not name.isprintable() or Path(name).is_absolute()
            or ".." in Path(name).parts):
        return False
    try:
        return (root / name).resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symbolic link loop
        return False


def _kind(root: Path, name: str) -> str:
    """"file": a regular file with no symbolic link on the way from `root`; "link": one on the way; else "missing"."""
    path, mode = root, 0
    try:
        for part in Path(name).parts:
            path = path / part
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                return "link"
    except OSError:
        return "missing"
    return "file" if stat.S_ISREG(mode) else "missing"


def _engine_section(root: Path, path: Path, engine: object) -> EngineSection:
    """The TensorRT settings, of the config's types and ranges; the timing cache made a path inside the bundle."""
    if not isinstance(engine, dict):
        raise UserError(f"{path}: engine: expected a table of TensorRT settings, got {_show(engine)}")
    hints = typing.get_type_hints(EngineSection)
    for key, value in engine.items():
        if key not in hints:
            raise UserError(f"{path}: engine.{key}: not an engine setting (known: {', '.join(hints)})")
        tp, literal = hints[key], typing.get_origin(hints[key]) is Literal
        if value not in typing.get_args(tp) if literal else type(value) is not tp:
            expected = f"one of {list(typing.get_args(tp))}" if literal else tp.__name__
            raise UserError(f"{path}: engine.{key}: expected {expected}, got {_show(value)}")
    sec = EngineSection(**engine)
    try:
        validate_engine_section(sec)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    if sec.timing_cache:  # relative to the bundle, whatever the working directory, and inside it
        if not _inside(root, sec.timing_cache):
            raise UserError(f"{path}: engine.timing_cache: {sec.timing_cache!r} is outside the bundle")
        sec.timing_cache = str(root / sec.timing_cache)
    return sec


def _get(path: Path, table: dict[str, Any], key: str, where: str = "") -> Any:
    """`table[key]`; a UserError naming `where` + `key` where it is missing."""
    if key not in table:
        raise UserError(f"{path}: {where}{key}: missing")
    return table[key]


def _int(path: Path, key: str, value: object, low: int, high: int) -> int:
    """An integer (not a bool) from `low` to `high`."""
    if not is_json_int(value, low, high):
        raise UserError(f"{path}: {key}: expected an integer from {low} to {high}, got {_show(value)}")
    return value


def _number(path: Path, key: str, value: object) -> float:
    """A finite number >= 0."""
    if not is_json_number(value):
        raise UserError(f"{path}: {key}: expected a finite number >= 0, got {_show(value)}")
    return float(value)


def _show(value: object) -> str:
    """`value` as JSON on one line, cut at 60 characters."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_golden(root: Path, bundle: Bundle) -> list[Golden]:
    """The golden images of golden.json: each one a file that `bundle.json` lists (and so was checked), the PyTorch
    output and HR exactly `bundle.scale` x the LR; a UserError naming the file and the field if not."""
    path = root / GOLDEN_JSON
    golden = _read_json(path)
    if not isinstance(golden, dict):
        raise UserError(f"{path}: expected a table with the golden images, got {_show(golden)}; extract the bundle "
                        "again")
    images = _get(path, golden, "images")
    if not isinstance(images, list) or not images:
        raise UserError(f"{path}: images: expected a list of golden images, got {_show(images)}")
    return [_golden(root, bundle, f"images[{i}]", entry) for i, entry in enumerate(images)]


def _golden(root: Path, bundle: Bundle, where: str, entry: object) -> Golden:
    path, folder = root / GOLDEN_JSON, Path(GOLDEN_JSON).parent
    if not isinstance(entry, dict):
        raise UserError(f"{path}: {where}: expected a table of name, lr, sr_fp32, hr and psnr_y, got {_show(entry)}")
    name = _get(path, entry, "name", f"{where}.")
    if not isinstance(name, str) or not name:
        raise UserError(f"{path}: {where}.name: expected a name, got {_show(name)}")
    psnr = _number(path, f"{where}.psnr_y", _get(path, entry, "psnr_y", f"{where}."))
    images = []
    for key in ("lr", "sr_fp32", "hr"):
        file = _get(path, entry, key, f"{where}.")
        listed = (folder / file).as_posix() if isinstance(file, str) else None
        if listed not in bundle.files:
            raise UserError(f"{path}: {where}.{key}: {_show(file)} is not a file that {BUNDLE_JSON} lists")
        try:
            images.append(read_rgb(root / listed))
        except UserError as e:
            raise UserError(f"{path}: {where}.{key}: {e}") from None
    lr, sr, hr = images
    (h, w), s = lr.shape[:2], bundle.scale
    if not sr.shape == hr.shape == (h * s, w * s, 3):
        k = hr.shape[0] // h
        if k in (2, 3, 4) and sr.shape == hr.shape == (h * k, w * k, 3):
            raise UserError(f"{root / BUNDLE_JSON}: scale: {s}, but the golden images are x{k} ({where} of "
                            f"{GOLDEN_JSON}: LR {w}x{h}, HR {hr.shape[1]}x{hr.shape[0]}); make the bundle again")
        raise UserError(f"{path}: {where}: LR {w}x{h}, PyTorch output {sr.shape[1]}x{sr.shape[0]}, HR "
                        f"{hr.shape[1]}x{hr.shape[0]}: the output and the HR must be exactly {s} x the LR (the scale "
                        f"in {BUNDLE_JSON})")
    if min(h, w) < 3:
        raise UserError(f"{path}: {where}.lr: {w}x{h} is too small for a Y-PSNR (3x3 at least)")
    return Golden(name, lr, sr, hr, psnr)


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


def candidates(root: Path, bundle: Bundle, backend: str) -> list[tuple[str, str, Callable[[], Runner]]]:
    """(precision, model file, how to make its runner) for every row of `backend`."""
    if backend == "tensorrt":
        from pipeline.backends.trt_runner import TrtRunner
        from pipeline.backends.trt_engine import build_engines

        def plan_runner(precision: str) -> Runner:
            log.info("%s: building or reusing the TensorRT plan in %s/ (minutes on a small device)", precision,
                     PLANS_DIR)
            (plan,) = build_engines({precision: root / ONNX[precision]}, root / PLANS_DIR, bundle.engine, bundle.scale)
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
            bundle: Bundle) -> dict[str, Any]:
    """One precision: outputs on the golden set, the gate, latency. A runner that cannot be made or run here (a plan
    TensorRT cannot build, say) is a failed row with its reason."""
    scale, gate = bundle.scale, bundle.gates[precision]
    row: dict[str, Any] = {"precision": precision, "model": model, "status": "fail", "reason": "", "psnr_y": None,
                           "delta_db": None, "gate_db": gate, "psnr_vs_golden": None, "latency_ms_p50": None,
                           "latency_ms_p95": None, "per_image": [], "throughput": []}
    try:
        runner = make()
        log.info("%s: %s on %d golden images, then latency at %s", precision, runner.name, len(golden),
                 ", ".join(bundle.latency_sizes))
        with runner:
            outputs = [runner.infer(g.lr) for g in golden]
            row["throughput"] = [latency(runner, size, bundle.warmup, bundle.repeats) for size in bundle.latency_sizes]
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
    bundle = load_bundle(root)
    golden = load_golden(root, bundle)
    backend, note = choose_backend(backend, require_trt)
    print(note, flush=True)
    rows = candidates(root, bundle, backend)
    unlisted = [model for _, model, _ in rows if model not in bundle.files]
    if unlisted:
        raise UserError(f"{root / BUNDLE_JSON}: files: does not list {', '.join(unlisted)}, which {backend} runs; "
                        "refusing to run unchecked models (make the bundle again with `pipeline bundle`)")
    rows = [{"backend": backend, **run_row(p, model, make, golden, bundle)} for p, model, make in rows]
    report = {"bundle": str(root.resolve()), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "backend": backend,
              "note": note, "machine": {"platform": platform.platform(), "cores": os.cpu_count()},
              "versions": versions(), "scale": bundle.scale, "gates": bundle.gates,
              "golden": {"images": [g.name for g in golden],
                         "psnr_y_pytorch": statistics.fmean(g.psnr_y for g in golden)},
              "latency_sizes": bundle.latency_sizes,
              "latency": f"one call on a float32 batch of 1, host to host, after {bundle.warmup} warm-up calls; "
                         f"p50/p95 over {bundle.repeats} calls",
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
            return report_internal_error(e, args.bundle if args.bundle.is_dir() else None)
        print(f"error: cannot write into the bundle ({e.filename}: {e.strerror}); extract it where you can write",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug
        return report_internal_error(e, args.bundle if args.bundle.is_dir() else None)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    print("edge verify passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
