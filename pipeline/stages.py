"""The stages of a run, in order. The only module that knows the order; each stage is artifacts in, artifacts out."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch.distributed as dist

from models import count_flops, count_params, load_checkpoint, read_torch_file
from pipeline.backends.base import BicubicRunner, Runner, latency
from pipeline.backends.torch_runner import TorchRunner
from pipeline import study
from pipeline.config import METHODS, Config, apply_overrides, parse_size
from pipeline.data.datasets import PairFolder
from pipeline.errors import GateFailed, UserError
from pipeline.evaluate import evaluate, mean_row
from pipeline.rundir import (CALIB, ONNX, PLANS, STUDENT, RunDir, atomic_path, sha256_file, write_json_atomic,
                             write_text_atomic)
from pipeline.score import format_table
from pipeline.modelio import load_model
from pipeline.distill import distill_student
from pipeline.engine import trt_status
from pipeline.teachers import shipped_teacher
from pipeline.train import train_teacher

log = logging.getLogger("pipeline")

TEACHER = "teacher.pt"
EVAL_JSON, EVAL_MD = "eval.json", "eval.md"
ABLATION, SWEEP = "ablation", "sweep"  # .json, .md and .png of `ablate` and `sweep`
FP32_ONNX, FP16_ONNX, INT8_ONNX, INT8_CPU_ONNX = ONNX["fp32"], ONNX["fp16"], ONNX["int8"], ONNX["int8-cpu"]
EXPORT_JSON, QUANT_JSON, QUANT_MD = "export.json", "quant.json", "quant.md"
REPORT_JSON = "report.json"


def is_main_process() -> bool:
    """False on the ranks > 0 of a torchrun launch: they train, rank 0 alone records and evaluates."""
    return int(os.environ.get("RANK", "0")) == 0


def _train_stage(stage: str, run: RunDir, final: str, config: dict[str, Any], inputs: list[Path],
                 train: Callable[[Path, Path], dict[str, Any]], *,
                 resume: bool, force: bool) -> Path:
    """Run `train(work_dir, final_path)` unless the stage is up to date; refuse to overwrite a partial run."""
    key = run.stage_key(stage, config, inputs)
    final_path, work = run.path(final), run.path(final.removesuffix(".pt"))
    if not force and run.is_current(stage, key):
        log.info("%s: up to date (same config and inputs, %s unchanged), skipping; --force redoes it", stage,
                 final_path)
        return final_path
    last = work / "last.pt"
    if last.exists() and not resume and not force and not _finished(run, stage, final, last):
        done = load_checkpoint(last).get("iteration", "?")
        raise UserError(f"an earlier run left {last} (iteration {done}): pass --resume to continue it, "
                        "or --force to start over")
    result = train(work, final_path)
    if is_main_process():
        run.record(stage, key, config, inputs, [final, f"{work.relative_to(run.root)}/log.jsonl"])
        log.info("%s: %s (Y-PSNR %.3f dB on the eval set)", stage, final_path, result["psnr_y"])
    if dist.is_initialized():
        dist.barrier()  # the other ranks read what rank 0 has just written
    return final_path


def _finished(run: RunDir, stage: str, final: str, last: Path) -> bool:
    """`last` is the resume state of the finished run that made `final` (recorded in the manifest), not of an
    interrupted one: same config, and it reached that config's last iteration."""
    if not run.is_recorded(stage, final):
        return False
    state, made = load_checkpoint(last), load_checkpoint(run.path(final))
    config = state.get("config")
    return (isinstance(config, dict) and config == made.get("config")
            and state.get("iteration") == config.get("train", {}).get("iters"))


def stage_teacher(cfg: Config, run: RunDir, *, resume: bool = False, force: bool = False,
                  progress: bool = True) -> Path:
    """Train the teacher into `<run>/teacher.pt` (resume state and log in `<run>/teacher/`)."""
    c = cfg.to_dict()
    config = {k: c[k] for k in ("scale", "seed", "data", "train")}
    config["model.teacher"] = cfg.model.teacher
    return _train_stage("teacher", run, TEACHER, config, [],
                        lambda work, final: train_teacher(cfg, work, final, resume=resume, progress=progress),
                        resume=resume, force=force)


def resolve_teacher(cfg: Config, run: RunDir, given: Path | None, *, refresh_own: bool = False, resume: bool = False,
                    force: bool = False, progress: bool = True) -> Path:
    """The teacher to distil from: `given`; else the run's own, made by `pipeline teacher` (with `refresh_own`, as
    `all` does, the teacher stage first redoes it when its config changed; an interrupted one is resumed or refused by
    that stage); else the shipped teacher of `model.teacher` at this scale; else one trained now."""
    if given is not None:
        load_model(given, cfg.scale)  # fail early on a wrong checkpoint
        return given
    own, interrupted = run.path(TEACHER), (run.path(TEACHER.removesuffix(".pt")) / "last.pt").exists()
    if own.exists() and not refresh_own:
        return own
    if not own.exists() and not interrupted:
        shipped = shipped_teacher(cfg.model.teacher, cfg.scale)
        if shipped is not None:
            log.info("teacher: the shipped %s x%d teacher (%s)", cfg.model.teacher, cfg.scale, shipped)
            return shipped
        log.info("teacher: no %s teacher is shipped for x%d; training one into %s", cfg.model.teacher, cfg.scale,
                 own)
    return stage_teacher(cfg, run, resume=resume, force=force, progress=progress)


BUDGET_DIR = "budget"  # budget.json, budget.png, latency.json (when timed here)


def stage_budget(cfg: Config, run: RunDir, *, force: bool = False, progress: bool = True) -> Config:
    """The config with the student shaped for `budget.budget_ms`: the candidates' latencies from
    `budget.latency_table`, else timed here into `<run>/budget/latency.json` (skipped while up to date)."""
    from pipeline import budget

    b = cfg.budget
    out = run.path(BUDGET_DIR)
    if b.latency_table:
        table = budget.load_table(Path(b.latency_table), cfg.scale, b.frame, b.backend, b.precision)
    elif not is_main_process():
        raise UserError("under torchrun, time the candidates first (`pipeline budget`) and pass its latency.json "
                        "as --latency-table")
    else:
        c = cfg.to_dict()
        config = {"scale": cfg.scale, "model.student": cfg.model.student, "data.train": cfg.data.train,
                  "export": c["export"], "quant": c["quant"], "machine": budget.machine(),
                  "budget": {k: v for k, v in c["budget"].items() if k not in ("budget_ms", "margin", "latency_table")}}
        key = run.stage_key("budget", config, [])
        name = f"{BUDGET_DIR}/{budget.LATENCY_JSON}"
        if not force and run.is_current("budget", key):
            log.info("budget: up to date (same candidates, recipe and machine), reusing %s", run.path(name))
            table = json.loads(run.path(name).read_text())
        else:
            table = budget.measure(cfg, out, progress)
            run.record("budget", key, config, [], [name])
    return budget.student_for_budget(cfg, table, out)


def stage_distill(cfg: Config, run: RunDir, teacher: Path, *, final: str = STUDENT, resume: bool = False,
                  force: bool = False, progress: bool = True) -> Path:
    """Distil the student from `teacher` with `cfg.distill.method` into `<run>/<final>` (work files beside it)."""
    c = cfg.to_dict()
    config = {k: c[k] for k in ("scale", "seed", "data", "train", "distill", "facd")}
    config["model.student"] = cfg.model.student
    if cfg.model.student_shape():  # only when set, so the keys of runs without them stay the same
        config["model.student_shape"] = cfg.model.student_shape()
    if cfg.budget.budget_ms:  # the checkpoint's config carries the budget that verify gates against
        config["budget"] = c["budget"]
    stage = "distill" if final == STUDENT else f"distill:{final}"
    return _train_stage(stage, run, final, config, [teacher],
                        lambda work, out: distill_student(cfg, load_model(teacher, cfg.scale), work, out,
                                                          resume=resume, progress=progress),
                        resume=resume, force=force)


def eval_rows(runner: Runner, data: str | PairFolder, scale: int, progress: bool = True) -> dict[str, Any]:
    pairs = data if isinstance(data, PairFolder) else PairFolder(data, scale)
    with runner:
        rows = evaluate(runner, pairs, scale, progress)
    return {"model": runner.name, "data": str(data), "scale": scale, "rows": rows, "mean": mean_row(rows)}


def validation_split(cfg: Config) -> PairFolder:
    """The training images held out of every training stage (`data.val_count`): where hyperparameters are chosen."""
    if not cfg.data.val_count:
        raise UserError("data.val_count is 0: there is no validation split to choose hyperparameters on")
    return PairFolder(cfg.data.train, cfg.scale).split(cfg.data.val_count)[1]


def _eval_models(cfg: Config, models: dict[str, Path], progress: bool,
                 data: str | PairFolder | None = None) -> list[dict[str, Any]]:
    """Bicubic, then each named checkpoint, on `data` (default: the eval set)."""
    data = cfg.data.eval if data is None else data
    results = [eval_rows(BicubicRunner(cfg.scale), data, cfg.scale, progress)]
    for label, path in models.items():
        results.append(eval_rows(TorchRunner(load_model(path, cfg.scale)), data, cfg.scale, progress))
        results[-1]["model"] = label
    return results


def stage_eval(cfg: Config, run: RunDir, teacher: Path, student: Path, *, force: bool = False,
               progress: bool = True) -> Path:
    """Evaluate bicubic, the teacher and the student on the eval set: `<run>/eval.json` and `<run>/eval.md`.

    Gate: teacher and student must each beat bicubic on mean Y-PSNR, else GateFailed (after the results are written).
    """
    config = {"scale": cfg.scale, "data.eval": cfg.data.eval}
    key = run.stage_key("eval", config, [teacher, student])
    out = run.path(EVAL_JSON)
    if not force and run.is_current("eval", key):
        log.info("eval: up to date, skipping (%s)", out)
        results = json.loads(out.read_text())
        print(run.path(EVAL_MD).read_text())
    else:
        results = _eval_models(cfg, {f"teacher ({teacher.name})": teacher, f"student ({student.name})": student},
                               progress)
        tables = "\n\n".join(format_table(r["rows"], f"{r['model']} on {r['data']}, x{r['scale']}") for r in results)
        write_json_atomic(out, results)
        write_text_atomic(run.path(EVAL_MD), tables + "\n")
        run.record("eval", key, config, [teacher, student], [EVAL_JSON, EVAL_MD])
        print(tables)
    bicubic = results[0]["mean"]["psnr_y"]
    losers = [f"{r['model']} {r['mean']['psnr_y']:.3f} dB" for r in results[1:] if not r["mean"]["psnr_y"] > bicubic]
    if losers:
        raise GateFailed(f"gate failed: mean Y-PSNR of {', '.join(losers)} does not beat bicubic's {bicubic:.3f} dB "
                         f"on {cfg.data.eval} (train longer: --set train.iters=...)")
    log.info("eval gate passed: %s beat bicubic (%.3f dB mean Y-PSNR)",
             ", ".join(f"{r['model']} {r['mean']['psnr_y']:.3f} dB" for r in results[1:]), bicubic)
    return out


def stage_ablate(cfg: Config, run: RunDir, teacher: Path, methods: list[str], seeds: list[int], *,
                 resume: bool = False, force: bool = False, progress: bool = True) -> Path:
    """Distil one student per method and seed from the same teacher with the same budget, and compare each method
    with `none` on the eval set, paired per image and seed: `<run>/ablation.{json,md,png}`.

    Students go to `<run>/ablate/<method>-seed<k>.pt`.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")
    methods = [study.BASELINE] + [m for m in dict.fromkeys(methods) if m != study.BASELINE]
    variants = {m: dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, method=m)) for m in methods}
    title = (f"Ablation on {cfg.data.eval} (eval set), x{cfg.scale}, {cfg.model.student} from {teacher.name}, "
             f"{cfg.train.iters} iterations per student")
    return _study(cfg, run, teacher, variants, seeds, "ablate", ABLATION, title, None, resume=resume, force=force,
                  progress=progress, target=cfg.distill.method)


def parse_grid(grid: list[str]) -> dict[str, list[str]]:
    """`["facd.tau=0.07,0.15"]` -> {"facd.tau": ["0.07", "0.15"]} (values as TOML text, checked by the config)."""
    out: dict[str, list[str]] = {}
    for text in grid:
        key, sep, values = text.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise UserError(f"--grid expects KEY=V1,V2,..., got {text!r}")
        out[key.strip()] = [v.strip() for v in values.split(",")]
    return out


def stage_sweep(cfg: Config, run: RunDir, teacher: Path, grid: list[str], seeds: list[int], *, name: str = SWEEP,
                resume: bool = False, force: bool = False, progress: bool = True) -> Path:
    """Distil `cfg.distill.method` at every point of `grid` (all combinations) and `none`, per seed, and compare them
    on the validation split (held out of training; never the eval set): `<run>/<name>.{json,md,png}`.

    Students go to `<run>/sweep/<key><value>-...-seed<k>.pt`.
    """
    axes = parse_grid(grid)
    variants = {study.BASELINE: dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, method="none"))}
    for values in itertools.product(*axes.values()):
        point = dict(zip(axes, values))
        variants[", ".join(f"{k}={v}" for k, v in point.items())] = apply_overrides(cfg, [f"{k}={v}" for k, v in
                                                                                       point.items()])
    title = (f"Sweep of {cfg.distill.method} on the validation split ({cfg.data.val_count} training images held "
             f"out), x{cfg.scale}, {cfg.model.student} from {teacher.name}, {cfg.train.iters} iterations per student")
    if not name or Path(name).name != name:
        raise UserError(f"--name must be a plain file name, got {name!r}")
    return _study(cfg, run, teacher, variants, seeds, "sweep", name, title, validation_split(cfg), resume=resume,
                  force=force, progress=progress)


def _study(cfg: Config, run: RunDir, teacher: Path, variants: dict[str, Config], seeds: list[int], folder: str,
           stem: str, title: str, data: PairFolder | None, *, resume: bool, force: bool, progress: bool,
           target: str | None = None) -> Path:
    if not seeds:
        raise UserError("give at least one seed (--seeds 0 1 2)")
    if len(seeds) < 2:
        log.warning("%s: one seed, so no interval can be given (the interval resamples seeds): use --seeds 0 1 2",
                    folder)
    students: dict[str, dict[int, Path]] = {}
    for name, variant in variants.items():
        slug = _slug(name, variant.distill.method)
        for seed in seeds:
            final = f"{folder}/{slug}-seed{seed}.pt"
            interrupted = (run.path(final.removesuffix(".pt")) / "last.pt").exists()
            students.setdefault(name, {})[seed] = stage_distill(
                dataclasses.replace(variant, seed=seed), run, teacher, final=final, resume=resume and interrupted,
                force=force, progress=progress)
    if not is_main_process():
        return run.path(f"{stem}.json")
    results = _eval_models(cfg, {"teacher": teacher, **{f"{name} seed {seed}": path for name, by_seed in
                                                         students.items() for seed, path in by_seed.items()}},
                           progress, data)
    by_label = {r["model"]: r for r in results}
    psnr = {name: np.array([[row["psnr_y"] for row in by_label[f"{name} seed {seed}"]["rows"]] for seed in seeds])
            for name in variants}
    rows = study.compare(psnr)
    for row in rows:
        stats = [study.gate_stats(students[row["variant"]][seed].with_suffix("") / "log.jsonl") for seed in seeds]
        for key in ("train_gate_rate", "val_gate_rate", "val_advantage_db"):
            if all(key in st for st in stats):
                row[key] = float(np.mean([st[key] for st in stats]))
    pairs = study.contrasts(psnr, target) if target in psnr and target != study.BASELINE else []
    fixed = [("bicubic", results[0]["mean"]["psnr_y"]), (f"teacher ({teacher.name})", results[1]["mean"]["psnr_y"])]
    write_json_atomic(run.path(f"{stem}.json"), {"title": title, "config": cfg.to_dict(), "seeds": seeds,
                                                 "variants": {n: v.to_dict() for n, v in variants.items()},
                                                 "fixed": dict(fixed), "rows": rows, "pairs": pairs,
                                                 "results": results})
    table = study.format_study(title, rows, fixed, seeds, pairs=pairs)
    write_text_atomic(run.path(f"{stem}.md"), table)
    with atomic_path(run.path(f"{stem}.png")) as tmp:
        study.plot_study(tmp, rows, title.split(",")[0])
    print(table)
    return run.path(f"{stem}.json")


def _slug(name: str, method: str) -> str:
    """A file name for a variant: its method (ablate), or its method and grid point (sweep: `facd-tau0.07`)."""
    if name in METHODS:
        return name
    return "-".join([method] + [key.split(".")[-1] + value for key, value in (part.split("=", 1)
                                                                              for part in name.split(", "))])


def stage_export(cfg: Config, run: RunDir, student: Path, *, force: bool = False) -> tuple[Path, Path]:
    """`student.fp32.onnx` and `student.fp16.onnx`, checked against PyTorch on the eval images (whole and cropped to
    `export.parity_sizes`) before they replace anything in the run directory; parity table in `export.json`."""
    from pipeline import export

    c = cfg.to_dict()
    config = {"scale": cfg.scale, "data.eval": cfg.data.eval, "export": c["export"]}
    key = run.stage_key("export", config, [student])
    outputs = [FP32_ONNX, FP16_ONNX, EXPORT_JSON]
    if not force and run.is_current("export", key, outputs):
        log.info("export: up to date, skipping (%s, %s)", run.path(FP32_ONNX), run.path(FP16_ONNX))
        return run.path(FP32_ONNX), run.path(FP16_ONNX)
    model = load_model(student, cfg.scale)
    _check_student(cfg, run, student, force)
    meta = export.model_meta(model, sha256_file(student), _config_hash(c))
    images = []
    for pair in PairFolder(cfg.data.eval, cfg.scale):
        images.append((pair.name, pair.lr))
        for size in cfg.export.parity_sizes:
            h, w = parse_size(size)
            images.append((f"{pair.name}[:{h}, :{w}]", pair.lr[:h, :w]))
    run.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=run.root, prefix=".export-") as tmp:
        fp32, fp16 = Path(tmp) / FP32_ONNX, Path(tmp) / FP16_ONNX
        done = export.export_fp32(model, fp32, meta, cfg.export.simplify)
        export.save(export.to_fp16(onnx.load(str(fp32))), fp16)
        result = {**done, "parity": {"fp32": export.parity(model, fp32, images),
                                     "fp16": export.parity(model, fp16, images)}}
        worst = {p: max(r["max_abs_err"] for r in rows) for p, rows in result["parity"].items()}
        low = {p: min(r["psnr_vs_pytorch"] for r in rows) for p, rows in result["parity"].items()}
        log.info("export: ONNX Runtime vs PyTorch on %d images: FP32 max |err| %.2g (PSNR >= %.1f dB), "
                 "FP16 max |err| %.2g (PSNR >= %.1f dB); simplified with %s", len(images), worst["fp32"],
                 low["fp32"], worst["fp16"], low["fp16"], done["simplifier"])
        if worst["fp32"] > cfg.export.max_abs_err:
            raise GateFailed(f"export parity failed: ONNX Runtime FP32 differs from PyTorch by up to "
                             f"{worst['fp32']:.3g} (export.max_abs_err {cfg.export.max_abs_err}); nothing was replaced")
        for name in (FP32_ONNX, FP16_ONNX):
            os.replace(Path(tmp) / name, run.path(name))
    write_json_atomic(run.path(EXPORT_JSON), result)
    run.record("export", key, config, [student], outputs)
    log.info("export: %s, %s", run.path(FP32_ONNX), run.path(FP16_ONNX))
    return run.path(FP32_ONNX), run.path(FP16_ONNX)


def _check_student(cfg: Config, run: RunDir, student: Path, force: bool) -> None:
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
    replaced = [n for n in (FP32_ONNX, FP16_ONNX) if run.path(n).exists()]
    what = f"{', '.join(replaced)} of {run.root}" if replaced else f"the ONNX models of {run.root}"
    if not force:
        raise UserError(f"--student {student} is not this run's student ({'; '.join(why)}); its export would replace "
                        f"{what}: pass --force to do that")
    log.warning("export: replacing %s with the export of %s (%s)", what, student, "; ".join(why))


def _config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def stage_quantize(cfg: Config, run: RunDir, fp32: Path, fp16: Path, *, calib: Path | None = None,
                   force: bool = False, progress: bool = True) -> Path:
    """Two INT8 models from our calibration on real LR crops (`calib.npz`, or the one given), each with its own
    per-layer sensitivity choice (tables in `quant.json` / `quant.md`): `student.int8.onnx` for TensorRT (S8S8
    symmetric, FP16 rest, the QDQ rules checked) and `student.int8-cpu.onnx` for ONNX Runtime on CPUs (U8S8, FP32
    rest)."""
    from pipeline import export, quantize

    q = cfg.quant
    config = {"scale": cfg.scale, "data.train": cfg.data.train, "quant": cfg.to_dict()["quant"],
              "cpu_weights": quantize.CPU_INT8_META["int8_cpu_weights"]}
    inputs = [fp32, fp16] + ([calib] if calib else [])
    key = run.stage_key("quantize", config, inputs)
    outputs = [INT8_ONNX, INT8_CPU_ONNX, CALIB, QUANT_JSON, QUANT_MD]
    if not force and run.is_current("quantize", key, outputs):
        log.info("quantize: up to date, skipping (%s, %s)", run.path(INT8_ONNX), run.path(INT8_CPU_ONNX))
        return run.path(INT8_ONNX)
    if calib is None:
        data = quantize.calibration_set(cfg.data.train, cfg.scale, q.calib_count, q.calib_crop, q.calib_holdout,
                                        q.calib_seed)
    else:
        data = quantize.load_calibration(calib, q.calib_count, q.calib_crop, cfg.scale)
    hold = data["holdout"]
    calib_lr, hold_lr, hold_hr = data["lr"][~hold], data["lr"][hold], data["hr"][hold]
    fp16_proto = onnx.load(str(fp16))
    names = [n.name for n in export.conv_nodes(fp16_proto)]
    amax = quantize.activation_amax(fp32, calib_lr, q.method, q.percentile)
    trt = quantize.choose_layers(names, lambda layers: quantize.quantize(fp16_proto, amax, layers), fp32, hold_lr,
                                 hold_hr, cfg.scale, q.max_drop_db, progress, " (TensorRT model)")
    trt_proto = quantize.quantize(fp16_proto, amax, trt["int8_layers"])
    broken = quantize.check_qdq(trt_proto)
    if broken:
        raise RuntimeError(f"{INT8_ONNX} breaks the TensorRT QDQ rules:\n" + "\n".join(broken))
    with tempfile.TemporaryDirectory() as tmp:
        twin = quantize.cpu_twin_quantizer(fp32, calib_lr, q.method, q.percentile, Path(tmp))
        cpu = quantize.choose_layers(names, twin, fp32, hold_lr, hold_hr, cfg.scale, q.max_drop_db, progress,
                                     " (CPU model)")
        cpu_proto = twin(set(cpu["int8_layers"]))
    # The drop measured above is this CPU's integer kernels; the same model with exact integer arithmetic (VNNI,
    # AMX) must lose the same, which is what makes it portable (its 7-bit weights never saturate on AVX2).
    cpu["drop_db_exact_arithmetic"] = cpu["fp32_psnr_y"] - quantize.holdout_psnr(cpu_proto, hold_lr, hold_hr,
                                                                                 cfg.scale, exact_arithmetic=True)
    export.save(trt_proto, run.path(INT8_ONNX))
    export.save(cpu_proto, run.path(INT8_CPU_ONNX))
    if calib is None or calib.resolve() != run.path(CALIB).resolve():
        with atomic_path(run.path(CALIB)) as tmp_calib, open(tmp_calib, "wb") as f:
            np.savez(f, **data)
    counts = {"method": q.method, "calibration": len(calib_lr), "holdout": len(hold_lr)}
    result = {**counts, "tensorrt": {**counts, **trt, "model": INT8_ONNX, "act_amax": amax,
                                     "qdq_rules": "checked (TensorRT model only)"},
              "cpu": {**counts, **cpu, "model": INT8_CPU_ONNX}}
    write_json_atomic(run.path(QUANT_JSON), result)
    write_text_atomic(run.path(QUANT_MD), "\n".join([
        quantize.format_table(result["tensorrt"], f"{INT8_ONNX} (TensorRT: S8S8 symmetric, FP16 rest, QDQ rules "
                                                  "checked)", "FP16"),
        quantize.format_table(result["cpu"], f"{INT8_CPU_ONNX} (ONNX Runtime on CPUs: U8S8 with 7-bit weights, "
                                             "FP32 rest; not for TensorRT, the QDQ rules do not apply)", "FP32"),
        f"The chosen CPU model with exact integer arithmetic (VNNI, AMX; Q/DQ run as float ops): "
        f"-{cpu['drop_db_exact_arithmetic']:.3f} dB.\n"]))
    run.record("quantize", key, config, inputs, outputs)
    for name, r in ((INT8_ONNX, trt), (INT8_CPU_ONNX, cpu)):
        (log.info if r["reached"] else log.warning)(
            "quantize: %s: %d of %d Convs INT8, %.3f dB below FP32 on %d held-out crops (all INT8: %.3f dB; "
            "target %.3f dB%s)", run.path(name), len(r["int8_layers"]), len(names), r["drop_db"], len(hold_lr),
            r["all_int8_drop_db"], q.max_drop_db, "" if r["reached"] else ", NOT reached")
    log.info("quantize: per-layer tables in %s", run.path(QUANT_MD))
    return run.path(INT8_ONNX)


def stage_build(cfg: Config, run: RunDir, precisions: list[str] = ("fp16", "int8"), *,
                force: bool = False) -> list[Path]:
    """TensorRT plans (and their JSON sidecars) from the FP16 / INT8 ONNX models, on this device."""
    from pipeline.engine import build_engines, sidecar_path

    models = {p: run.path(ONNX[p]) for p in precisions}
    missing = [str(m) for m in models.values() if not m.exists()]
    if missing:
        raise UserError(f"cannot build: missing {', '.join(missing)} (run `pipeline export` and `pipeline quantize`)")
    plans = build_engines(models, run.root, cfg.engine, cfg.scale, force)
    config = {"scale": cfg.scale, "engine": cfg.to_dict()["engine"]}
    outputs = [name for plan in plans for name in (plan.name, sidecar_path(plan).name)]
    run.record("build", run.stage_key("build", config, list(models.values())), config, list(models.values()), outputs)
    log.info("build: %s", ", ".join(str(p) for p in plans))
    return plans


def stage_verify(cfg: Config, run: RunDir, *, require: list[str] = (), force: bool = False,
                 progress: bool = True) -> Path:
    """Every backend x precision against the PyTorch FP32 reference: `report.json`, `report.md`, plots; GateFailed
    when a gate fails (after the report is written) or a backend in `require` could not run."""
    from pipeline import verify
    from pipeline.budget import latency_gate
    from pipeline.report import REPORT_FILES, format_budget, format_rows, write_report

    needed = {STUDENT: "pipeline distill", FP32_ONNX: "pipeline export", FP16_ONNX: "pipeline export",
              INT8_ONNX: "pipeline quantize", INT8_CPU_ONNX: "pipeline quantize"}
    missing = [f"{name} (made by `{cmd}`)" for name, cmd in needed.items() if not run.path(name).exists()]
    if missing:
        raise UserError(f"cannot verify {run.root}: missing {', '.join(missing)}")
    check_models_of_student(run.root)
    plans = [run.path(p) for p in PLANS.values() if run.path(p).exists()]
    inputs = [run.path(n) for n in needed] + plans
    config = {"scale": cfg.scale, "data.eval": cfg.data.eval, "verify": cfg.to_dict()["verify"],
              "require": sorted(require), "machine": verify.machine()}
    key = run.stage_key("verify", config, inputs)
    out = run.path(REPORT_JSON)
    written = not force and run.is_current("verify", key)
    if written:
        log.info("verify: up to date, skipping (%s)", out)
        report = json.loads(out.read_text())
    else:
        student = load_model(run.path(STUDENT), cfg.scale)
        report, crops = verify.verify(cfg, verify.candidates(run.root, student), list(require), progress)
        gate = latency_gate(run.root, load_checkpoint(run.path(STUDENT)), progress)
        if gate is not None:
            report["latency_budget"] = gate
            report["passed"] = report["passed"] and gate["status"] != "fail"
        written = run.writable()
        if written:
            write_json_atomic(out, report)
            write_report(run.root, report, crops)
            run.record("verify", key, config, inputs, [REPORT_JSON, *REPORT_FILES])
        else:
            log.warning("verify: %s is read-only: the report is printed, not written", run.root)
    print(format_rows(report))
    if "latency_budget" in report:
        print(format_budget(report))
    if written:
        print(f"report: {run.path('report.md')}")
    if not report["passed"]:
        raise GateFailed("verify failed:\n  " + "\n  ".join(verify.failing(report)))
    return out


SUMMARY_JSON = "summary.json"
SUMMARY_LR = "320x180"  # LR size of the summary's FLOPs and latency


def summarize(cfg: Config, run: RunDir, teacher: Path, student: Path) -> dict[str, Any]:
    """Teacher against student: parameters, FLOPs, eval-set Y-PSNR (from eval.json) and latency on one backend
    (PyTorch FP32 on this CPU, batch 1); printed and written to `<run>/summary.json`."""
    config = {"scale": cfg.scale, "lr": SUMMARY_LR}
    inputs = [teacher, student, run.path(EVAL_JSON)]
    key = run.stage_key("summary", config, inputs)
    if run.is_current("summary", key):
        summary = json.loads(run.path(SUMMARY_JSON).read_text())
        print(format_summary(summary, f"{cfg.data.eval}, x{cfg.scale}"))
        return summary
    evals = json.loads(run.path(EVAL_JSON).read_text())
    bicubic = evals[0]["mean"]["psnr_y"]
    rows = {}
    for role, path, result in (("teacher", teacher, evals[1]), ("student", student, evals[2])):
        model = load_model(path, cfg.scale)
        with TorchRunner(model) as runner:
            timing = latency(runner, SUMMARY_LR, warmup=1, repeats=3)
        rows[role] = {"file": str(path), "model": model.config, "params": count_params(model),
                      "gflops": count_flops(model, parse_size(SUMMARY_LR)) / 1e9, "psnr_y": result["mean"]["psnr_y"],
                      "latency_ms": timing["p50_ms"]}
    t, s = rows["teacher"], rows["student"]
    gain = t["psnr_y"] - bicubic
    summary = {"backend": f"pytorch-fp32 cpu, LR {SUMMARY_LR}, batch 1, p50 of 3", "bicubic_psnr_y": bicubic, **rows,
               "student_share_of_teacher_gain": (s["psnr_y"] - bicubic) / gain if gain > 0 else None}
    write_json_atomic(run.path(SUMMARY_JSON), summary)
    run.record("summary", key, config, inputs, [SUMMARY_JSON])
    print(format_summary(summary, f"{cfg.data.eval}, x{cfg.scale}"))
    return summary


def format_summary(summary: dict[str, Any], data: str) -> str:
    t, s, bicubic = summary["teacher"], summary["student"], summary["bicubic_psnr_y"]
    share = summary["student_share_of_teacher_gain"]
    return "\n".join([
        f"| {data} | teacher | student | teacher / student |", "|---|---|---|---|",
        f"| parameters | {t['params']:,} | {s['params']:,} | {t['params'] / s['params']:.1f}x |",
        f"| GFLOPs at LR {SUMMARY_LR} | {t['gflops']:.1f} | {s['gflops']:.1f} | {t['gflops'] / s['gflops']:.1f}x |",
        f"| Y-PSNR (dB; bicubic {bicubic:.3f}) | {t['psnr_y']:.3f} | {s['psnr_y']:.3f} | "
        f"{t['psnr_y'] - s['psnr_y']:+.3f} dB |",
        f"| latency, {summary['backend']} | {t['latency_ms']:.0f} ms | {s['latency_ms']:.0f} ms | "
        f"{t['latency_ms'] / s['latency_ms']:.1f}x |",
        "", "the student recovers " + (f"{share:.0%}" if share is not None else "n/a (the teacher does not beat "
                                       "bicubic)") + " of the teacher's gain over bicubic"])


def check_models_of_student(root: Path) -> None:
    """Every ONNX model of the run holds its precision and was exported from the run's `student.pt`; else a
    UserError (verify and the bundle's golden set compare the models with that student)."""
    from pipeline.backends.ort_runner import read_meta

    student_sha = sha256_file(root / STUDENT)
    for precision, name in ONNX.items():
        meta = read_meta(root / name)
        if meta["precision"] != precision:
            raise UserError(f"{root / name} holds a {meta['precision']} model, expected {precision}")
        if meta["source_checkpoint_sha256"] != student_sha:
            raise UserError(f"{root / name} was exported from another checkpoint than {root / STUDENT}: redo "
                            "`pipeline export` and `pipeline quantize` from it")


def run_all(cfg: Config, run: RunDir, *, teacher: Path | None = None, resume: bool = False, force: bool = False,
            progress: bool = True) -> None:
    """teacher (given, the run's own, shipped, or trained) -> distill (cfg.distill.method, facd by default) -> eval (with its gate) -> export ->
    quantize -> build (where TensorRT runs) -> verify (with its gates). With `budget.budget_ms`, the student's
    shape is chosen for the budget first, and verify gates its latency."""
    if cfg.budget.budget_ms:
        cfg = stage_budget(cfg, run, force=force, progress=progress)
    teacher = resolve_teacher(cfg, run, teacher, refresh_own=True, resume=resume, force=force, progress=progress)
    student = stage_distill(cfg, run, teacher, resume=resume, force=force, progress=progress)
    if is_main_process():
        stage_eval(cfg, run, teacher, student, force=force, progress=progress)
        fp32, fp16 = stage_export(cfg, run, student, force=force)
        stage_quantize(cfg, run, fp32, fp16, force=force, progress=progress)
        trt_ok, why = trt_status()
        if trt_ok:
            stage_build(cfg, run, force=force)
        else:
            log.info("build: skipped, no TensorRT engines on this machine (%s); verify runs ONNX Runtime", why)
        stage_verify(cfg, run, force=force, progress=progress)
        summarize(cfg, run, teacher, student)
        log.info("all stages done; results in %s", run.root)
