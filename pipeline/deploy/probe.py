"""The latency probe: time candidate student models on the machine that will run them, without torch.

A probe folder (made by `pipeline budget --bundle DIR`, see pipeline/deploy/budget.py) holds candidate ONNX files
and `probe.json`; `python -m pipeline.budget probe --dir DIR` (its `make probe`) times each through the runner that
`pipeline upscale` would use, with upscale's tiling (uint8 in, uint8 out, p50 / p95 over the probe's repeats after
its warmup), and writes `latency.json`: the latency table that `--latency-table` reads back (`load_table`).

Imports numpy and, lazily, ONNX Runtime, OpenVINO or TensorRT; nothing else outside the standard library and the
runtime copy of this package.
"""

from __future__ import annotations

import argparse
import json
import re
import reprlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends.base import Runner, call_times_ms
from pipeline.config import BACKENDS, EngineSection, frame_lr_size, is_json_int, is_json_number
from pipeline.errors import UserError, report_internal_error
from pipeline.machine import machine
from pipeline.rundir import LATENCY_JSON, ONNX, versions, write_json_atomic

PROBE_FORMAT, LATENCY_FORMAT = "facd-pipeline-probe/1", "facd-pipeline-latency/1"
PROBE_JSON = "probe.json"
TABLE_KEYS = ("format", "scale", "frame", "lr_size", "backend", "runner", "precision", "machine", "candidates")
PRECISIONS = ("fp32", "fp16", "int8")
ROW_KEYS = ("name", "blocks", "channels", "params", "flops", "p50_ms", "p95_ms")


def resolve_backend(backend: str) -> str:
    """'tensorrt', 'openvino' or 'onnxruntime-<provider>' for 'auto' (TensorRT where usable, else ONNX Runtime),
    'tensorrt', 'openvino' or 'onnxruntime' (the provider `pipeline upscale` would pick)."""
    from pipeline.backends.ort_runner import fastest_device, provider_status
    from pipeline.backends.trt_engine import trt_status

    if backend == "openvino":
        from pipeline.backends.openvino_runner import openvino_status

        ok, why = openvino_status()
        if not ok:
            raise UserError(why)
        return "openvino"

    if backend in ("auto", "tensorrt"):
        ok, why = trt_status()
        if ok:
            return "tensorrt"
        if backend == "tensorrt":
            raise UserError(f"TensorRT is not usable here ({why}): time on the device with a probe folder "
                            "(pipeline budget --bundle DIR), or choose --backend onnxruntime")
    ok, why = provider_status("cpu")
    if not ok:
        raise UserError(why)
    return f"onnxruntime-{fastest_device()}"


def frame_latency(runner: Runner, lr_hw: tuple[int, int], warmup: int, repeats: int) -> dict[str, float]:
    """p50 / p95 (ms) of `runner.infer` on one random uint8 LR frame, as `pipeline upscale` calls it per image."""
    frame = np.random.default_rng(0).integers(0, 256, (*lr_hw, 3), dtype=np.uint8)
    times = call_times_ms(lambda: runner.infer(frame), warmup, repeats)
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95))}


def runner_for(where: str, precision: str, model: Callable[[str], Path], tiling: dict[str, int],
            lr_hw: tuple[int, int], scale: int, plans: Path) -> Runner:
    """The runner for one model: `model(kind)` is its ONNX file of that kind (fp32, fp16, int8, int8-cpu)."""
    if where == "tensorrt":
        from pipeline.backends.trt_runner import TrtRunner
        from pipeline.backends.trt_engine import build_engines

        size = f"{lr_hw[1]}x{lr_hw[0]}"  # a profile of exactly the frame: one pass, as upscale runs it
        sec = EngineSection(profile="custom", min_lr=size, opt_lr=size, max_lr=size, timing_cache="")
        (plan,) = build_engines({precision: model(kind_for(where, precision))}, plans, sec, scale)
        return TrtRunner(plan, tile=tiling["tile"], overlap=tiling["overlap"])
    if where == "openvino":
        from pipeline.backends.openvino_runner import OpenVinoRunner

        return OpenVinoRunner(model(kind_for(where, precision)), **tiling)
    from pipeline.backends.ort_runner import OrtRunner

    return OrtRunner(model(kind_for(where, precision)), where.removeprefix("onnxruntime-"), **tiling)


def kind_for(where: str, precision: str) -> str:
    """The kind of ONNX model (fp32, fp16, int8, int8-cpu) that `precision` runs as on `where` (a `resolve_backend`
    answer): TensorRT builds from its own; OpenVINO runs on the CPU (INT8: the U8S8 CPU model; it has no FP16 model)
    and ONNX Runtime takes the model of its provider."""
    from pipeline.backends.ort_runner import onnx_for

    if where == "tensorrt":
        return precision
    device = "cpu" if where == "openvino" else where.removeprefix("onnxruntime-")
    return next(k for k, name in ONNX.items() if name == onnx_for(precision, device))


def time_probe(folder: Path, backend: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Time every candidate of the probe folder on this machine; writes and returns `folder/latency.json`."""
    folder = Path(folder)
    try:
        probe = json.loads((folder / PROBE_JSON).read_text())
        if probe.get("format") != PROBE_FORMAT:
            raise ValueError(f"format is not {PROBE_FORMAT}")
    except (OSError, ValueError) as e:
        raise UserError(f"{folder} is not a probe folder ({folder / PROBE_JSON}: {e}); make one with "
                        "`pipeline budget --bundle DIR`") from None
    where = resolve_backend(backend)
    lr_hw = frame_lr_size(probe["frame"], int(probe["scale"]))
    print(f"timing {len(probe['candidates'])} candidates at {probe['frame']} (LR {probe['lr_size']}) on {where}, "
          f"{probe['precision']}", flush=True)
    rows = []
    for cand in probe["candidates"]:
        def model(kind: str, cand: dict[str, Any] = cand) -> Path:
            if kind not in cand["files"]:
                raise UserError(f"the probe folder has no {kind} model of {cand['name']} (made for "
                                f"{', '.join(cand['files'])})")
            return folder / cand["files"][kind]

        runner = runner_for(where, probe["precision"], model, probe["tiling"], lr_hw, int(probe["scale"]),
                         folder / "plans")
        with runner:
            timing = frame_latency(runner, lr_hw, int(probe["warmup"]), int(probe["repeats"]))
        rows.append({**{k: v for k, v in cand.items() if k != "files"}, "model": runner.name, **timing})
        if progress:
            print(f"  {cand['name']:8s} {cand['params']:>9,d} params  p50 {timing['p50_ms']:8.1f} ms  "
                  f"p95 {timing['p95_ms']:8.1f} ms", flush=True)
    table = {"format": LATENCY_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "scale": probe["scale"],
             "frame": probe["frame"], "lr_size": probe["lr_size"], "backend": where.split("-")[0],
             "runner": where, "precision": probe["precision"], "machine": machine(), "versions": versions(),
             "weights": probe["weights"], "recipe": probe["recipe"], "tiling": probe["tiling"],
             "timing": f"runner.infer on one uint8 {probe['lr_size']} LR frame (upscale's tiling "
                       f"{probe['tiling']}), p50/p95 over {probe['repeats']} calls after {probe['warmup']}",
             "candidates": rows}
    write_json_atomic(folder / LATENCY_JSON, table)
    return table


def load_table(path: Path, scale: int, frame: str, backend: str, precision: str) -> dict[str, Any]:
    """A latency.json, refused (naming every difference) when made for another scale, frame, runtime or precision
    than asked, and refused when malformed: every field that `pipeline budget` uses (the machine, the runner, each
    candidate's shape, preset and timings) is checked here, so no later use re-checks."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"latency table {path} does not exist") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, an int of > 4300 digits
        raise UserError(f"latency table {path} is not valid JSON ({type(e).__name__}: {e})") from None
    problem = _malformed(table)
    if problem:
        raise UserError(f"latency table {path} is malformed: {problem} (make it with `make probe` in a probe "
                        "folder, or `pipeline budget`)")
    asked = {"scale": scale, "frame": frame, "runtime": backend, "precision": precision}
    found = {"scale": table["scale"], "frame": table["frame"], "runtime": table["backend"],
             "precision": table["precision"]}
    differ = [f"{k} {found[k]} (this run: {asked[k]})" for k in asked if str(found[k]) != str(asked[k])]
    if differ:
        raise UserError(f"latency table {path} was measured for another setting: {'; '.join(differ)}")
    return table


def _malformed(table: Any) -> str:
    """What is wrong with a latency table (empty when nothing is)."""
    if not isinstance(table, dict):
        return "not a JSON object"
    if table.get("format") != LATENCY_FORMAT:
        return f"format is {reprlib.repr(table.get('format'))}, not {LATENCY_FORMAT!r}"
    missing = [k for k in TABLE_KEYS if k not in table]
    if missing:
        return f"missing {', '.join(missing)}"
    if not is_json_int(table["scale"], 2, 4):
        return f"scale is {reprlib.repr(table['scale'])}, not 2, 3 or 4"
    if not isinstance(table["frame"], str) or not isinstance(table["lr_size"], str):
        return f"frame {reprlib.repr(table['frame'])} and lr_size {reprlib.repr(table['lr_size'])} must be sizes WxH"
    if table["backend"] not in BACKENDS:
        return f"backend is {reprlib.repr(table['backend'])}, not one of {', '.join(BACKENDS)}"
    if not isinstance(table["runner"], str) or not re.fullmatch(rf"{table['backend']}(-[a-z]+)?", table["runner"]):
        return f"runner is {reprlib.repr(table['runner'])}, not {table['backend']} or {table['backend']}-<device>"
    if table["precision"] not in PRECISIONS:
        return f"precision is {reprlib.repr(table['precision'])}, not one of {', '.join(PRECISIONS)}"
    m = table["machine"]
    if not isinstance(m, dict) or not isinstance(m.get("cpu"), str):
        return f"machine is {reprlib.repr(m)}, not an object with the cpu's name (cpu), cpu_flags and cores"
    if not isinstance(m.get("cpu_flags"), list) or not all(isinstance(f, str) for f in m["cpu_flags"]):
        return f"machine.cpu_flags is {reprlib.repr(m.get('cpu_flags'))}, not a list of strings"
    # cores None: os.cpu_count() did not know
    if "cores" not in m or m["cores"] is not None and not is_json_int(m["cores"], 1):
        return f"machine.cores is {reprlib.repr(m.get('cores'))}, not an integer >= 1 (or null)"
    rows = table["candidates"]
    if not isinstance(rows, list) or not rows:
        return "no candidates"
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or any(k not in row for k in ROW_KEYS):
            return f"candidate {i} lacks one of {', '.join(ROW_KEYS)}"
        if not isinstance(row["name"], str) or not re.fullmatch(r"[\w.-]+", row["name"]):
            return f"candidate {i}: name is {reprlib.repr(row['name'])}, not letters, digits, _ . -"
        bad = [k for k in ("blocks", "channels") if not is_json_int(row[k], 1)]
        if bad:
            return f"candidate {row['name']}: {', '.join(bad)} not an integer >= 1"
        bad = [k for k in ROW_KEYS[3:] if not is_json_number(row[k])]
        if bad:
            return f"candidate {row['name']}: {', '.join(bad)} not a number >= 0"
        preset = row.get("preset")  # tables made before there were several presets have none
        if preset is not None:
            from models import PRESETS  # here: the probe folder's runtime has no torch

            if not isinstance(preset, str) or preset not in PRESETS:
                return f"candidate {row['name']}: preset {reprlib.repr(preset)} is not a model preset"
    return ""


def format_table(table: dict[str, Any], choice: dict[str, Any] | None = None) -> str:
    lines = ["| candidate | blocks | channels | params | GFLOPs | p50 ms | p95 ms | |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(table["candidates"], key=lambda r: r["params"]):
        mark = "chosen" if choice and r["name"] == choice["name"] else ""
        lines.append(f"| {r['name']} | {r['blocks']} | {r['channels']} | {r['params']:,} | {r['flops'] / 1e9:.2f} | "
                     f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {mark} |")
    m = table["machine"]
    lines.append(f"\n{table['runner']} {table['precision']}, frame {table['frame']} (LR {table['lr_size']}), x"
                 f"{table['scale']}; CPU {m['cpu']} ({m['cores']} cores; {', '.join(m['cpu_flags']) or 'no AVX-512'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.budget",
                                     description="time the candidate students of a probe folder on this device")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("probe", help="time every candidate; writes latency.json into the folder")
    p.add_argument("--dir", type=Path, default=Path("."), help="the probe folder (default: here)")
    p.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime", "openvino"], default="auto",
                   help="auto (default): TensorRT where it is usable, else ONNX Runtime")
    args = parser.parse_args(argv)
    try:
        table = time_probe(args.dir, args.backend)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - ours: named, logged, never exit 1 or 2
        return report_internal_error(e, args.dir if args.dir.is_dir() else None)
    print(format_table(table))
    print(f"wrote {args.dir / LATENCY_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
