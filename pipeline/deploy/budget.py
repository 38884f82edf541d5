"""A student sized to a latency budget, measured on the runner that will run it.

Every candidate shape (`budget.blocks` x `budget.channels`) of every student preset of `budget.students` (default:
`model.student`) is built with random weights,
exported with the export of a trained student and put through the precision recipe of the target (FP32; FP16;
INT8 calibrated on real LR crops with the quantizer of that runtime, every Conv INT8 but `budget.float_convs`),
then timed on one frame (`budget.frame`, the LR input frame / scale) through the runner `pipeline upscale` would
use, with its tiling: uint8 in, uint8 out, p50 / p95 over `budget.repeats` calls after `budget.warmup`. The table
is `latency.json`.

The choice for a budget: of the candidates whose p95 is at most (1 - `budget.margin`) x budget, those of the first
preferred preset that has any, and of them the one with the most parameters (ties: the most FLOPs). The margin
absorbs run-to-run noise and what random weights cannot show (which further Convs the trained student's INT8
sensitivity step keeps in float).

A device that cannot train gets a probe folder (`pipeline budget --bundle DIR`): the candidate ONNX files, this
package's torch-free runtime and a Makefile whose `make probe` runs `python -m pipeline.budget probe`
(pipeline/deploy/probe.py), which times them there and writes `latency.json` for `--latency-table`. Torch is
imported lazily, in the functions that build candidates.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.backends.base import Runner
from pipeline.config import DEFAULT_OVERLAP, DEFAULT_TILE, frame_lr_size
from pipeline.deploy.probe import (PROBE_FORMAT, PROBE_JSON, format_table, frame_latency, kind_for,
                                   resolve_backend, runner_for, time_probe)
from pipeline.deploy.runtime import copy_runtime
from pipeline.errors import UserError
from pipeline.machine import machine
from pipeline.plots import pyplot, save_figure
from pipeline.rundir import (BUDGET_JSON, BUDGET_PNG, LATENCY_JSON, ONNX, PLANS, atomic_path, check_replaceable,
                             replace_folder, versions, write_json_atomic)

log = logging.getLogger("pipeline")

CAPACITY = "parameters (ties: FLOPs)"
RANDOM_WEIGHTS = "random-init (torch seed 0): latency only"
# The ONNX files a precision needs on a device we do not know yet: INT8 is the TensorRT model and the CPU model.
PROBE_KINDS = {"fp32": ["fp32"], "fp16": ["fp16"], "int8": ["int8", "int8-cpu"]}

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

def students(cfg: Any) -> list[str]:
    """The student presets of the grid, in order of preference: `budget.students`, else `model.student`."""
    return list(dict.fromkeys(cfg.budget.students)) or [cfg.model.student]


def candidates(cfg: Any) -> list[dict[str, Any]]:
    """Every (blocks, channels) of the grid for every student preset, named `b<blocks>c<channels>` (prefixed with
    the preset, `anchor_m-b5c28`, for presets other than `model.student`)."""
    b = cfg.budget
    return [{"name": ("" if preset == cfg.model.student else f"{preset}-") + f"b{blocks}c{channels}",
             "preset": preset, "blocks": blocks, "channels": channels}
            for preset in students(cfg) for blocks in sorted(set(b.blocks)) for channels in sorted(set(b.channels))]


def upscale_tiling() -> dict[str, int]:
    """The tiling `pipeline upscale` uses by default."""
    return {"tile": DEFAULT_TILE, "overlap": DEFAULT_OVERLAP, "batch": 1}


def make_probe(cfg: Any, folder: Path, kinds: list[str], progress: bool = True) -> dict[str, Any]:
    """The ONNX files `kinds` of every candidate in `folder` (`<name>.<kind>.onnx`) and `probe.json`; two candidates
    are made at a time (one per core; each export and calibration runs on one thread)."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from pipeline.convert import quantize

    q, b = cfg.quant, cfg.budget
    lr_hw = frame_lr_size(b.frame, cfg.scale)
    calib = None
    if any(k.startswith("int8") for k in kinds):  # the calibration crops of `pipeline quantize`, shared
        data = quantize.calibration_set(cfg.data.train, cfg.scale, q.calib_count, q.calib_crop, q.calib_holdout,
                                        q.calib_seed)
        calib = data["lr"][~data["holdout"]]
    jobs = [(cfg.scale, c, kinds, folder, cfg.export.simplify, calib, q.method, q.percentile,
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
    from pipeline.convert import export, quantize

    scale, cand, kinds, folder, simplify, calib, method, percentile, float_convs, lr_hw = job
    preset = cand["preset"]
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
        kept = {{"first": names[0], "last": names[-1]}.get(n, n) for n in float_convs}
        unknown = sorted(kept - set(names))
        if unknown:
            raise UserError(f"budget.float_convs names {', '.join(unknown)}, not Convs of candidate {cand['name']} "
                            f"(its Convs: {', '.join(names)}; or first / last)")
        int8_convs = [n for n in names if n not in kept]
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
    out = Path(out).resolve()
    check_replaceable(out, force=force, marker=PROBE_JSON, fmt=PROBE_FORMAT, what="a probe folder",
                      option="--bundle folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        stage = Path(tmp) / out.name
        probe = make_probe(cfg, stage, PROBE_KINDS[cfg.budget.precision], progress)
        copy_runtime(stage / "runtime" / "pipeline")
        (stage / "Makefile").write_text(MAKEFILE)
        (stage / "README.md").write_text(README.format(count=len(probe["candidates"]), scale=cfg.scale,
                                                       frame=cfg.budget.frame, precision=cfg.budget.precision))
        replace_folder(stage, out)
    return out


# --- the latency table and the choice -------------------------------------------------------------------------------

def choose(table: dict[str, Any], budget_ms: float, margin: float, order: list[str] | None = None) -> dict[str, Any]:
    """Of the candidates whose p95 is at most (1 - margin) x budget_ms, those of the first preset in `order` (the
    preference; rows without a preset, from tables made before there were several, count as the first) that has
    any, and of them the one with the most parameters (ties: FLOPs): parameters compare shapes within a family, not
    across families. A UserError naming the fastest candidate when none fits."""
    limit = budget_ms * (1 - margin)
    fits = [r for r in table["candidates"] if r["p95_ms"] <= limit]
    if fits and order:
        def rank(row: dict[str, Any]) -> int:
            preset = row.get("preset") or order[0]
            return order.index(preset) if preset in order else len(order)

        best = min(map(rank, fits))
        fits = [r for r in fits if rank(r) == best]
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
    """`budget.json` (the table, the budget and the choice) and `budget.png` in `out_dir`, as a pair: neither
    replaces an earlier one unless both are written."""
    out = Path(out_dir) / BUDGET_JSON
    with atomic_path(out) as tmp_json, atomic_path(Path(out_dir) / BUDGET_PNG) as tmp_png:
        write_json_atomic(tmp_json, {"budget_ms": budget_ms or None, "margin": margin,
                                     "limit_ms": budget_ms * (1 - margin) if budget_ms else None,
                                     "capacity": CAPACITY, "choice": choice, "table": table})
        _plot(tmp_png, table, budget_ms, margin, choice)
    return out


def _plot(path: Path, table: dict[str, Any], budget_ms: float, margin: float, choice: dict[str, Any] | None) -> None:
    plt = pyplot()
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
    save_figure(fig, path)


# --- into the pipeline ----------------------------------------------------------------------------------------------

def measure(cfg: Any, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Make and time every candidate on this machine's runner for `cfg.budget`; `out_dir/latency.json`."""
    where = resolve_backend(cfg.budget.backend)
    precision = cfg.budget.precision
    if where == "openvino" and precision == "fp16":
        raise UserError("OpenVINO runs the FP32 and INT8 models, not FP16: choose --precision fp32 or int8")
    kinds = [kind_for(where, precision)]
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
        choice = choose(table, b.budget_ms, b.margin, students(cfg))
    except UserError:
        write_budget(out_dir, table, b.budget_ms, b.margin, None)
        raise
    write_budget(out_dir, table, b.budget_ms, b.margin, choice)
    print(format_table(table, choice))
    log.info("budget: %s (%d blocks x %d channels, %s params) has p95 %.1f ms, within %.1f ms (%g ms budget, %.0f%% "
             "margin)", choice["name"], choice["blocks"], choice["channels"], f"{choice['params']:,}",
             choice["p95_ms"], b.budget_ms * (1 - b.margin), b.budget_ms, 100 * b.margin)
    preset = choice.get("preset") or cfg.model.student
    return apply_overrides(cfg, [f"model.student={json.dumps(preset)}", f"model.student_blocks={choice['blocks']}",
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

        tiling = upscale_tiling()
        runner: Runner = TrtRunner(Path(run_root) / PLANS[b["precision"]], tile=tiling["tile"],
                                   overlap=tiling["overlap"])
    else:
        runner = runner_for(where, b["precision"], lambda kind: Path(run_root) / ONNX[kind], upscale_tiling(), lr_hw,
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

