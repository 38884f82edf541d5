"""A student sized to a latency budget, measured on the runner that will run it.

Every candidate shape of the student preset (`budget.blocks` x `budget.channels`) is built with random weights,
exported with the export of a trained student and put through the precision recipe of the target (FP32; FP16;
INT8 calibrated on real LR crops with the quantizer of that runtime, every Conv INT8 but `budget.float_convs`),
then timed on one frame (`budget.frame`, the LR input frame / scale) through the runner `pipeline upscale` would
use, with its tiling: uint8 in, uint8 out, p50 / p95 over `budget.repeats` calls after `budget.warmup`. The table
is `latency.json`.

The choice for a budget: of the candidates whose p95 is at most (1 - `budget.margin`) x budget, the one with the
most parameters (ties: the most FLOPs). The margin absorbs run-to-run noise and what random weights cannot show
(which further Convs the trained student's INT8 sensitivity step keeps in float).

A device that cannot train gets a probe folder (`pipeline budget --bundle DIR`): the candidate ONNX files, this
package's torch-free runtime and a Makefile whose `make probe` runs `python -m pipeline.budget probe`, which times
them with TensorRT where usable, else ONNX Runtime, and writes `latency.json` for `--latency-table`.

The timing half of this module (`time_probe`, `frame_latency`, `main`) imports numpy and onnxruntime or TensorRT
only; the half that builds candidates imports torch lazily.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends.base import Runner, call_times_ms
from pipeline.config import EngineSection, frame_lr_size
from pipeline.errors import UserError
from pipeline.rundir import ONNX, versions, write_json_atomic

log = logging.getLogger("pipeline")

PROBE_FORMAT, LATENCY_FORMAT = "facd-pipeline-probe/1", "facd-pipeline-latency/1"
PROBE_JSON, LATENCY_JSON, BUDGET_JSON, BUDGET_PNG = "probe.json", "latency.json", "budget.json", "budget.png"
CAPACITY = "parameters (ties: FLOPs)"
RANDOM_WEIGHTS = "random-init (torch seed 0): latency only"
# The ONNX files a precision needs on a device we do not know yet: INT8 is the TensorRT model and the CPU model.
PROBE_KINDS = {"fp32": ["fp32"], "fp16": ["fp16"], "int8": ["int8", "int8-cpu"]}
TABLE_KEYS = ("format", "scale", "frame", "backend", "precision", "machine", "candidates")
ROW_KEYS = ("name", "blocks", "channels", "params", "flops", "p50_ms", "p95_ms")

MAKEFILE = """\
# Time every candidate student on this device (see README.md); writes latency.json.
PYTHON ?= python3
BACKEND ?= auto

.PHONY: probe deps

probe:
\tPYTHONPATH=runtime $(PYTHON) -m pipeline.budget probe --dir . --backend $(BACKEND)

deps:
\t$(PYTHON) -m pip install numpy pillow onnxruntime
"""

README = """\
# Latency probe: {count} candidate x{scale} students at {frame} ({precision})

    make probe                      # TensorRT where it is usable, else ONNX Runtime (and it says which)
    make probe BACKEND=onnxruntime  # ONNX Runtime even where TensorRT is installed
    make probe PYTHON=/path/to/python

Needs Python 3.10+ with numpy and Pillow, and TensorRT with cuda-python or ONNX Runtime (`make deps`); no PyTorch.
The weights are random: the models are for timing only. Bring `latency.json` back and choose a student with
`pipeline all --budget-ms X --frame {frame} --backend B --precision {precision} --latency-table latency.json`.
"""


# --- the candidates (torch side) ------------------------------------------------------------------------------------

def candidates(cfg: Any) -> list[dict[str, Any]]:
    """Every (blocks, channels) of the grid, named `b<blocks>c<channels>`."""
    b = cfg.budget
    return [{"name": f"b{blocks}c{channels}", "blocks": blocks, "channels": channels}
            for blocks in sorted(set(b.blocks)) for channels in sorted(set(b.channels))]


def upscale_tiling() -> dict[str, int]:
    """The tiling `pipeline upscale` uses by default."""
    from pipeline.upscale import DEFAULT_TILE

    return {"tile": DEFAULT_TILE, "overlap": 32, "batch": 1}


def make_probe(cfg: Any, folder: Path, kinds: list[str], progress: bool = True) -> dict[str, Any]:
    """The ONNX files `kinds` of every candidate in `folder` (`<name>.<kind>.onnx`) and `probe.json`; two candidates
    are made at a time (one per core; each export and calibration runs on one thread)."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from pipeline import quantize

    q, b = cfg.quant, cfg.budget
    lr_hw = frame_lr_size(b.frame, cfg.scale)
    calib = None
    if any(k.startswith("int8") for k in kinds):  # the calibration crops of `pipeline quantize`, shared
        data = quantize.calibration_set(cfg.data.train, cfg.scale, q.calib_count, q.calib_crop, q.calib_holdout,
                                        q.calib_seed)
        calib = data["lr"][~data["holdout"]]
    jobs = [(cfg.model.student, cfg.scale, c, kinds, folder, cfg.export.simplify, calib, q.method, q.percentile,
             b.float_convs, lr_hw) for c in candidates(cfg)]
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    workers = max(1, min(2, os.cpu_count() or 1, len(jobs)))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = []
        for row in pool.map(_make_candidate, jobs):
            rows.append(row)
            if progress:
                log.info("budget: %s (%d blocks x %d channels, %s params) exported (%s)", row["name"],
                         row["blocks"], row["channels"], f"{row['params']:,}", ", ".join(kinds))
    probe = {"format": PROBE_FORMAT, "scale": cfg.scale, "frame": b.frame, "lr_size": f"{lr_hw[1]}x{lr_hw[0]}",
             "precision": b.precision, "student_preset": cfg.model.student, "weights": RANDOM_WEIGHTS,
             "recipe": _recipe(cfg, kinds), "tiling": upscale_tiling(), "warmup": b.warmup, "repeats": b.repeats,
             "made_with": versions(), "made_in_s": time.perf_counter() - start, "candidates": rows}
    write_json_atomic(folder / PROBE_JSON, probe)
    return probe


def _recipe(cfg: Any, kinds: list[str]) -> str:
    parts = [f"pipeline export (simplify {cfg.export.simplify})"]
    if any(k.startswith("int8") for k in kinds):
        q = cfg.quant
        parts.append(f"INT8 calibrated on {q.calib_count - q.calib_holdout} LR crops of {q.calib_crop} px from "
                     f"{cfg.data.train} ({q.method}, {q.percentile}), every Conv INT8 but "
                     f"{', '.join(cfg.budget.float_convs) or 'none'} (no sensitivity step)")
    return "; ".join(parts)


def _make_candidate(job: tuple) -> dict[str, Any]:
    """One candidate's ONNX files, in a worker process."""
    import onnx
    import torch

    from models import count_flops, count_params, create_model
    from pipeline import export, quantize

    preset, scale, cand, kinds, folder, simplify, calib, method, percentile, float_convs, lr_hw = job
    logging.getLogger().addHandler(logging.NullHandler())  # ONNX Runtime's quantizer advises through the root logger
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        model = create_model(preset, scale=scale, blocks=cand["blocks"], channels=cand["channels"])
    except ValueError as e:
        raise UserError(f"candidate {cand['name']} of student preset {preset!r}: {e}") from None
    protos = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export.export_fp32(model, fp32, export.model_meta(model, RANDOM_WEIGHTS, ""), simplify)
        fp32_proto = onnx.load(str(fp32))
        names = [n.name for n in export.conv_nodes(fp32_proto)]
        unknown = sorted(set(float_convs) - set(names))
        if unknown:
            raise UserError(f"budget.float_convs names {', '.join(unknown)}, not Convs of candidate {cand['name']} "
                            f"(its Convs: {', '.join(names)})")
        int8_convs = [n for n in names if n not in float_convs]
        if "fp32" in kinds:
            protos["fp32"] = fp32_proto
        if "fp16" in kinds or "int8" in kinds:
            fp16 = export.to_fp16(fp32_proto)
            if "fp16" in kinds:
                protos["fp16"] = fp16
            if "int8" in kinds:
                protos["int8"] = quantize.quantize(fp16, quantize.activation_amax(fp32, calib, method, percentile),
                                                   int8_convs)
        if "int8-cpu" in kinds:
            quantizer = quantize.cpu_twin_quantizer(fp32, calib, method, percentile, Path(tmp))
            protos["int8-cpu"] = quantizer(set(int8_convs))
    files = {}
    for kind, proto in protos.items():
        files[kind] = f"{cand['name']}.{kind}.onnx"
        export.save(proto, Path(folder) / files[kind])
    return {**cand, "params": count_params(model), "flops": count_flops(model, lr_hw), "files": files}


def make_probe_folder(cfg: Any, out: Path, *, force: bool = False, progress: bool = True) -> Path:
    """`pipeline budget --bundle OUT`: the probe folder for a device that cannot train; an existing OUT is replaced
    only with `force`, once the new folder is complete."""
    from pipeline.bundle import _copy_runtime

    out = Path(out).resolve()
    if out.exists() and not force:
        raise UserError(f"{out} already exists; choose another --bundle folder, or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        stage = Path(tmp) / out.name
        probe = make_probe(cfg, stage, PROBE_KINDS[cfg.budget.precision], progress)
        _copy_runtime(stage / "runtime" / "pipeline")
        (stage / "Makefile").write_text(MAKEFILE)
        (stage / "README.md").write_text(README.format(count=len(probe["candidates"]), scale=cfg.scale,
                                                       frame=cfg.budget.frame, precision=cfg.budget.precision))
        if out.exists():
            os.replace(out, Path(tmp) / "replaced")
        os.replace(stage, out)
    return out


# --- timing (torch-free) --------------------------------------------------------------------------------------------

def resolve_backend(backend: str) -> str:
    """'tensorrt' or 'onnxruntime-<provider>' for 'auto' (TensorRT where usable), 'tensorrt' or 'onnxruntime' (the
    provider `pipeline upscale` would pick)."""
    from pipeline.backends.ort_runner import fastest_device, provider_status
    from pipeline.engine import trt_status

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


def _runner(where: str, precision: str, model: Callable[[str], Path], tiling: dict[str, int],
            lr_hw: tuple[int, int], scale: int, plans: Path) -> Runner:
    """The runner for one model: `model(kind)` is its ONNX file of that kind (fp32, fp16, int8, int8-cpu)."""
    if where == "tensorrt":
        from pipeline.backends.trt_runner import TrtRunner
        from pipeline.engine import build_engines

        size = f"{lr_hw[1]}x{lr_hw[0]}"  # a profile of exactly the frame: one pass, as upscale runs it
        sec = EngineSection(profile="custom", min_lr=size, opt_lr=size, max_lr=size, timing_cache="")
        (plan,) = build_engines({precision: model(precision)}, plans, sec, scale)
        return TrtRunner(plan, tile=tiling["tile"], overlap=tiling["overlap"])
    from pipeline.backends.ort_runner import OrtRunner, onnx_for

    device = where.removeprefix("onnxruntime-")
    kind = next(k for k, name in ONNX.items() if name == onnx_for(precision, device))
    return OrtRunner(model(kind), device, **tiling)


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

        runner = _runner(where, probe["precision"], model, probe["tiling"], lr_hw, int(probe["scale"]),
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


def machine() -> dict[str, Any]:
    """lscpu's model name and the ISA flags that matter (AVX2, AVX-512, VNNI, AMX), the cores, the platform."""
    from pipeline.doctor import cpu_info

    cpu = cpu_info()
    return {"cpu": cpu["model"], "cpu_flags": cpu["flags"], "cores": cpu["cores"], "platform": platform.platform()}


# --- the latency table and the choice -------------------------------------------------------------------------------

def load_table(path: Path, scale: int, frame: str, backend: str, precision: str) -> dict[str, Any]:
    """A latency.json, refused (naming every difference) when made for another scale, frame, runtime or precision
    than asked, and refused when malformed."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"latency table {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"latency table {path} is not valid JSON ({e})") from None
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
    if not isinstance(table, dict):
        return "not a JSON object"
    if table.get("format") != LATENCY_FORMAT:
        return f"format is {table.get('format')!r}, not {LATENCY_FORMAT!r}"
    missing = [k for k in TABLE_KEYS if k not in table]
    if missing:
        return f"missing {', '.join(missing)}"
    rows = table["candidates"]
    if not isinstance(rows, list) or not rows:
        return "no candidates"
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or any(k not in row for k in ROW_KEYS):
            return f"candidate {i} lacks one of {', '.join(ROW_KEYS)}"
        bad = [k for k in ROW_KEYS[1:] if isinstance(row[k], bool) or not isinstance(row[k], (int, float))
               or not math.isfinite(row[k]) or row[k] < 0]
        if bad:
            return f"candidate {row['name']}: {', '.join(bad)} not a number >= 0"
    return ""


def choose(table: dict[str, Any], budget_ms: float, margin: float) -> dict[str, Any]:
    """The candidate with the most parameters (ties: FLOPs) whose p95 is at most (1 - margin) x budget_ms; a
    UserError naming the fastest candidate when none is."""
    limit = budget_ms * (1 - margin)
    fits = [r for r in table["candidates"] if r["p95_ms"] <= limit]
    if not fits:
        f = min(table["candidates"], key=lambda r: r["p95_ms"])
        raise UserError(f"no candidate meets a {budget_ms:g} ms budget (p95 at most {limit:.1f} ms with the "
                        f"{margin:.0%} margin) on {table['backend']} {table['precision']} at {table['frame']}: "
                        f"the fastest, {f['name']} ({f['blocks']} blocks x {f['channels']} channels), takes "
                        f"{f['p95_ms']:.1f} ms p95; raise --budget-ms or add smaller shapes to budget.blocks / "
                        "budget.channels")
    return max(fits, key=lambda r: (r["params"], r["flops"], -r["p95_ms"]))


def write_budget(out_dir: Path, table: dict[str, Any], budget_ms: float, margin: float,
                 choice: dict[str, Any] | None) -> Path:
    """`budget.json` (the table, the budget and the choice) and `budget.png` in `out_dir`."""
    out = Path(out_dir) / BUDGET_JSON
    write_json_atomic(out, {"budget_ms": budget_ms or None, "margin": margin,
                            "limit_ms": budget_ms * (1 - margin) if budget_ms else None, "capacity": CAPACITY,
                            "choice": choice, "table": table})
    _plot(Path(out_dir) / BUDGET_PNG, table, budget_ms, margin, choice)
    return out


def _plot(path: Path, table: dict[str, Any], budget_ms: float, margin: float, choice: dict[str, Any] | None) -> None:
    from pipeline.report import _pyplot, _save

    plt = _pyplot()
    rows = table["candidates"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([r["params"] for r in rows], [r["p95_ms"] for r in rows], color="tab:blue", label="candidate (p95)")
    for r in rows:
        ax.annotate(r["name"], (r["params"], r["p95_ms"]), fontsize="x-small", xytext=(3, 3),
                    textcoords="offset points")
    if budget_ms:
        ax.axhline(budget_ms, color="tab:red", label=f"budget {budget_ms:g} ms")
        ax.axhline(budget_ms * (1 - margin), color="tab:red", linestyle="--", label=f"with {margin:.0%} margin")
    if choice:
        ax.scatter([choice["params"]], [choice["p95_ms"]], s=160, facecolors="none", edgecolors="tab:green",
                   linewidths=2, label=f"choice {choice['name']}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("p95 latency of one frame (ms)")
    ax.set_title(f"x{table['scale']} students at {table['frame']}: {table['runner']} {table['precision']}",
                 fontsize="medium")
    ax.legend(fontsize="small")
    _save(fig, path)


def format_table(table: dict[str, Any], choice: dict[str, Any] | None = None) -> str:
    lines = ["| candidate | blocks | channels | params | GFLOPs | p50 ms | p95 ms | |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(table["candidates"], key=lambda r: r["params"]):
        mark = "chosen" if choice and r["name"] == choice["name"] else ""
        lines.append(f"| {r['name']} | {r['blocks']} | {r['channels']} | {r['params']:,} | {r['flops'] / 1e9:.2f} | "
                     f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {mark} |")
    m = table["machine"]
    lines.append(f"\n{table['runner']} {table['precision']}, frame {table['frame']} (LR {table['lr_size']}), x"
                 f"{table['scale']}; CPU {m['cpu']} ({m['cores']} cores; {', '.join(m['cpu_flags']) or 'no AVX-512'})")
    return "\n".join(lines)


# --- into the pipeline ----------------------------------------------------------------------------------------------

def measure(cfg: Any, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Make and time every candidate on this machine's runner for `cfg.budget`; `out_dir/latency.json`."""
    from pipeline.backends.ort_runner import onnx_for

    where = resolve_backend(cfg.budget.backend)
    precision = cfg.budget.precision
    onnx_name = ONNX[precision] if where == "tensorrt" else onnx_for(precision, where.removeprefix("onnxruntime-"))
    kinds = [k for k, name in ONNX.items() if name == onnx_name]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        probe = make_probe(cfg, Path(tmp), kinds, progress)
        table = time_probe(Path(tmp), cfg.budget.backend, progress)
    table["made_in_s"], table["measured_in_s"] = probe["made_in_s"], time.perf_counter() - start
    write_json_atomic(Path(out_dir) / LATENCY_JSON, table)
    log.info("budget: %d candidates made and timed in %.0f s (%.0f s export and precision recipe)",
             len(table["candidates"]), table["measured_in_s"], table["made_in_s"])
    return table


def student_for_budget(cfg: Any, table: dict[str, Any], out_dir: Path) -> Any:
    """The config with the student shaped for `cfg.budget.budget_ms` (budget.json and budget.png in `out_dir`);
    a UserError when no candidate fits (budget.json is written first)."""
    from pipeline.config import apply_overrides

    b = cfg.budget
    try:
        choice = choose(table, b.budget_ms, b.margin)
    except UserError:
        write_budget(out_dir, table, b.budget_ms, b.margin, None)
        raise
    write_budget(out_dir, table, b.budget_ms, b.margin, choice)
    print(format_table(table, choice))
    log.info("budget: %s (%d blocks x %d channels, %s params) has p95 %.1f ms, within %.1f ms (%g ms budget, %.0f%% "
             "margin)", choice["name"], choice["blocks"], choice["channels"], f"{choice['params']:,}",
             choice["p95_ms"], b.budget_ms * (1 - b.margin), b.budget_ms, 100 * b.margin)
    return apply_overrides(cfg, [f"model.student_blocks={choice['blocks']}",
                                 f"model.student_channels={choice['channels']}"])


def latency_gate(run_root: Path, checkpoint: dict[str, Any], progress: bool = True) -> dict[str, Any] | None:
    """The trained student's frame latency against the budget its checkpoint's config was sized for (None when it
    had none): measured here on the run's model for that backend and precision, with upscale's tiling."""
    config = checkpoint.get("config") or {}
    b = config.get("budget") or {}
    if not b.get("budget_ms"):
        return None
    scale = int(config["scale"])
    shape = checkpoint["model"]
    gate: dict[str, Any] = {"budget_ms": b["budget_ms"], "frame": b["frame"], "backend": b["backend"],
                            "precision": b["precision"],
                            "student": {"preset": config["model"]["student"], "blocks": shape["blocks"],
                                        "channels": shape["channels"]},
                            "status": "skipped", "reason": "", "p50_ms": None, "p95_ms": None, "machine": machine()}
    if b.get("latency_table"):
        try:
            table_machine = json.loads(Path(b["latency_table"]).read_text())["machine"]
        except (OSError, ValueError, KeyError, TypeError):
            table_machine = None
        if not table_machine or table_machine.get("cpu") != gate["machine"]["cpu"]:
            gate["reason"] = (f"the budget was measured on another machine ({(table_machine or {}).get('cpu')}): "
                              "time the trained student there")
            return gate
    try:
        where = resolve_backend(b["backend"])
    except UserError as e:
        gate["reason"] = str(e)
        return gate
    lr_hw = frame_lr_size(b["frame"], scale)
    if where == "tensorrt":
        from pipeline.backends.trt_runner import TrtRunner
        from pipeline.rundir import PLANS

        tiling = upscale_tiling()
        runner: Runner = TrtRunner(Path(run_root) / PLANS[b["precision"]], tile=tiling["tile"],
                                   overlap=tiling["overlap"])
    else:
        runner = _runner(where, b["precision"], lambda kind: Path(run_root) / ONNX[kind], upscale_tiling(), lr_hw,
                         scale, Path(run_root))
    with runner:
        gate.update(frame_latency(runner, lr_hw, int(b["warmup"]), int(b["repeats"])))
    gate.update(runner=runner.name, used=gate["p95_ms"] / b["budget_ms"])
    if gate["p95_ms"] <= b["budget_ms"]:
        gate["status"] = "pass"
    else:
        gate["status"] = "fail"
        gate["reason"] = (f"the trained student takes {gate['p95_ms']:.1f} ms p95 (p50 {gate['p50_ms']:.1f} ms) "
                          f"per {b['frame']} frame on {runner.name}, over the {b['budget_ms']:g} ms budget")
    if progress:
        log.info("latency budget: %s p95 %.1f ms of %g ms (%.0f%%): %s", runner.name, gate["p95_ms"],
                 b["budget_ms"], 100 * gate["used"], gate["status"])
    return gate


# --- `python -m pipeline.budget probe` ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.budget",
                                     description="time the candidate students of a probe folder on this device")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("probe", help="time every candidate; writes latency.json into the folder")
    p.add_argument("--dir", type=Path, default=Path("."), help="the probe folder (default: here)")
    p.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime"], default="auto",
                   help="auto (default): TensorRT where it is usable, else ONNX Runtime")
    args = parser.parse_args(argv)
    try:
        table = time_probe(args.dir, args.backend)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(table))
    print(f"wrote {args.dir / LATENCY_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
