"""The stages of a run, in order. The only module that knows the order; each stage is artifacts in, artifacts out."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch.distributed as dist

from models import load_checkpoint
from pipeline.backends.trt_engine import trt_status
from pipeline.config import METHODS, Config, apply_overrides
from pipeline.errors import GateFailed, UserError
from pipeline.evaluation.evaluate import eval_models, validation_split
from pipeline.evaluation.score import format_table
from pipeline.machine import machine
from pipeline.modelio import load_model
from pipeline.rundir import (ABLATION, BUDGET_DIR, CALIB, EVAL_JSON, EVAL_MD, EXPORT_JSON, LATENCY_JSON, ONNX, PLANS,
                             QUANT_JSON, QUANT_MD, REPORT_FILES, REPORT_JSON, STUDENT, SUMMARY_JSON, SWEEP, TEACHER,
                             RunDir, sha256_file, write_json_atomic, write_text_atomic)
from pipeline.training import study
from pipeline.training.distill import distill_student
from pipeline.training.teachers import shipped_teacher
from pipeline.training.train import train_teacher

log = logging.getLogger("pipeline")



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


def stage_budget(cfg: Config, run: RunDir, *, folder: str = BUDGET_DIR, force: bool = False,
                 progress: bool = True) -> Config:
    """The latency table of the student's candidate shapes: `budget.latency_table`, else timed here into
    `<run>/<folder>/latency.json` (skipped while up to date), with budget.json and budget.png beside it. Returns the
    config with the student shaped for `budget.budget_ms` (`pipeline all`), or as it is when no budget is set (the
    table alone, `pipeline budget`)."""
    from pipeline.deploy import budget
    from pipeline.deploy.probe import format_table, load_table

    b = cfg.budget
    out = run.path(folder)
    if b.latency_table:
        table = load_table(Path(b.latency_table), cfg.scale, b.frame, b.backend, b.precision)
    elif not is_main_process():
        raise UserError("under torchrun, time the candidates first (`pipeline budget`) and pass its latency.json "
                        "as --latency-table")
    else:
        c = cfg.to_dict()
        config = {"scale": cfg.scale, "model.student": cfg.model.student, "data.train": cfg.data.train,
                  "export": c["export"], "quant": c["quant"], "machine": machine(),
                  "budget": {k: v for k, v in c["budget"].items() if k not in ("budget_ms", "margin", "latency_table")}}
        key = run.stage_key("budget", config, [])
        name = PurePosixPath(folder, LATENCY_JSON).as_posix()
        if not force and run.is_current("budget", key):
            log.info("budget: up to date (same candidates, recipe and machine), reusing %s", run.path(name))
            table = json.loads(run.path(name).read_text())
        else:
            table = budget.measure(cfg, out, progress)
            run.record("budget", key, config, [], [name])
    if b.budget_ms:
        return budget.student_for_budget(cfg, table, out)
    budget.write_budget(out, table, 0.0, b.margin, None)
    print(format_table(table))
    return cfg


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
        results = eval_models(cfg, {f"teacher ({teacher.name})": teacher, f"student ({student.name})": student},
                               progress)
        tables = "\n\n".join(format_table(r["rows"], f"{r['model']} on {r['data']}, x{r['scale']}") for r in results)
        with run.staged() as tmp:
            write_json_atomic(tmp / EVAL_JSON, results)
            write_text_atomic(tmp / EVAL_MD, tables + "\n")
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


def stage_sweep(cfg: Config, run: RunDir, teacher: Path, axes: dict[str, list[str]], seeds: list[int], *,
                name: str = SWEEP, resume: bool = False, force: bool = False, progress: bool = True) -> Path:
    """Distil `cfg.distill.method` at every point of the grid `axes` (`study.parse_grid`; all combinations) and `none`,
    per seed, and compare them on the validation split (held out of training; never the eval set):
    `<run>/<name>.{json,md,png}`.

    Students go to `<run>/sweep/<key><value>-...-seed<k>.pt`.
    """
    variants = {study.BASELINE: dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, method="none"))}
    for values in itertools.product(*axes.values()):
        point = dict(zip(axes, values))
        variants[", ".join(f"{k}={v}" for k, v in point.items())] = apply_overrides(cfg, [f"{k}={v}" for k, v in
                                                                                       point.items()])
    if not name or Path(name).name != name:
        raise UserError(f"--name must be a plain file name, got {name!r}")
    val = validation_split(cfg)
    title = (f"Sweep of {cfg.distill.method} on the validation split ({len(val)} images: {val}), x{cfg.scale}, "
             f"{cfg.model.student} from {teacher.name}, {cfg.train.iters} iterations per student")
    return _study(cfg, run, teacher, variants, seeds, "sweep", name, title, val, resume=resume, force=force,
                  progress=progress)


def _study(cfg: Config, run: RunDir, teacher: Path, variants: dict[str, Config], seeds: list[int], folder: str,
           stem: str, title: str, data: Any, *, resume: bool, force: bool, progress: bool,
           target: str | None = None) -> Path:
    if not seeds:
        raise UserError("give at least one seed (--seeds 0 1 2)")
    if len(seeds) < 2:
        log.warning("%s: one seed, so no interval can be given (the interval resamples seeds): use --seeds 0 1 2",
                    folder)
    students: dict[str, dict[int, Path]] = {}
    for name, variant in variants.items():
        slug = study.variant_slug(name, variant.distill.method)
        for seed in seeds:
            final = f"{folder}/{slug}-seed{seed}.pt"
            interrupted = (run.path(final.removesuffix(".pt")) / "last.pt").exists()
            students.setdefault(name, {})[seed] = stage_distill(
                dataclasses.replace(variant, seed=seed), run, teacher, final=final, resume=resume and interrupted,
                force=force, progress=progress)
    if not is_main_process():
        return run.path(f"{stem}.json")
    results = eval_models(cfg, {"teacher": teacher, **{f"{name} seed {seed}": path for name, by_seed in
                                                        students.items() for seed, path in by_seed.items()}},
                          progress, data)
    described = {"config": cfg.to_dict(), "seeds": seeds, "variants": {n: v.to_dict() for n, v in variants.items()}}
    print(study.write_study(run, stem, title, described, students, results, f"teacher ({teacher.name})", target))
    return run.path(f"{stem}.json")


def stage_export(cfg: Config, run: RunDir, student: Path, *, force: bool = False) -> tuple[Path, Path]:
    """`student.fp32.onnx` and `student.fp16.onnx`, checked against PyTorch on the eval images (whole and cropped to
    `export.parity_sizes`) before they replace anything in the run directory; parity table in `export.json`."""
    from pipeline.convert import export

    fp32, fp16 = run.path(ONNX["fp32"]), run.path(ONNX["fp16"])
    config = {"scale": cfg.scale, "data.eval": cfg.data.eval, "export": cfg.to_dict()["export"]}
    key = run.stage_key("export", config, [student])
    outputs = [ONNX["fp32"], ONNX["fp16"], EXPORT_JSON]
    if not force and run.is_current("export", key, outputs):
        log.info("export: up to date, skipping (%s, %s)", fp32, fp16)
        return fp32, fp16
    model = load_model(student, cfg.scale)
    export.check_student_of_run(cfg, run, student, force)
    with run.staged() as tmp:
        result = export.export_checked(cfg, model, sha256_file(student), tmp)
        write_json_atomic(tmp / EXPORT_JSON, result)
    run.record("export", key, config, [student], outputs)
    log.info("export: %s, %s", fp32, fp16)
    return fp32, fp16


def stage_quantize(cfg: Config, run: RunDir, fp32: Path, fp16: Path, *, calib: Path | None = None,
                   force: bool = False, progress: bool = True) -> Path:
    """Two INT8 models from our calibration on real LR crops (`calib.npz`, or the one given), each with its own
    per-layer sensitivity choice (tables in `quant.json` / `quant.md`): `student.int8.onnx` for TensorRT (S8S8
    symmetric, FP16 rest, the QDQ rules checked) and `student.int8-cpu.onnx` for ONNX Runtime on CPUs (U8S8, FP32
    rest)."""
    from pipeline.convert import export, quantize

    q = cfg.quant
    config = {"scale": cfg.scale, "data.train": cfg.data.train, "quant": cfg.to_dict()["quant"],
              "cpu_weights": quantize.CPU_INT8_META["int8_cpu_weights"]}
    inputs = [fp32, fp16] + ([calib] if calib else [])
    key = run.stage_key("quantize", config, inputs)
    outputs = [ONNX["int8"], ONNX["int8-cpu"], CALIB, QUANT_JSON, QUANT_MD]
    if not force and run.is_current("quantize", key, outputs):
        log.info("quantize: up to date, skipping (%s, %s)", run.path(ONNX["int8"]), run.path(ONNX["int8-cpu"]))
        return run.path(ONNX["int8"])
    if calib is None:
        data = quantize.calibration_set(cfg.data.train, cfg.scale, q.calib_count, q.calib_crop, q.calib_holdout,
                                        q.calib_seed)
    else:
        data = quantize.load_calibration(calib, q.calib_count, q.calib_crop, cfg.scale)
    trt_proto, cpu_proto, result = quantize.int8_models(cfg, fp32, fp16, data, progress)
    with run.staged() as tmp:
        export.save(trt_proto, tmp / ONNX["int8"])
        export.save(cpu_proto, tmp / ONNX["int8-cpu"])
        if calib is None or calib.resolve() != run.path(CALIB).resolve():
            with open(tmp / CALIB, "wb") as f:
                np.savez(f, **data)
        write_json_atomic(tmp / QUANT_JSON, result)
        write_text_atomic(tmp / QUANT_MD, quantize.format_result(result))
    run.record("quantize", key, config, inputs, outputs)
    for r in (result["tensorrt"], result["cpu"]):
        (log.info if r["reached"] else log.warning)(
            "quantize: %s: %d of %d Convs INT8, %.3f dB below FP32 on %d held-out crops (all INT8: %.3f dB; "
            "target %.3f dB%s)", run.path(r["model"]), len(r["int8_layers"]), len(r["layers"]), r["drop_db"],
            r["holdout"], r["all_int8_drop_db"], q.max_drop_db, "" if r["reached"] else ", NOT reached")
    log.info("quantize: per-layer tables in %s", run.path(QUANT_MD))
    return run.path(ONNX["int8"])


def stage_build(cfg: Config, run: RunDir, precisions: list[str] = ("fp16", "int8"), *,
                force: bool = False) -> list[Path]:
    """TensorRT plans (and their JSON sidecars) from the FP16 / INT8 ONNX models, on this device."""
    from pipeline.backends.trt_engine import build_engines, sidecar_path

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
    from pipeline.convert.export import check_models_of_student
    from pipeline.deploy.budget import latency_gate
    from pipeline.evaluation import verify
    from pipeline.evaluation.report import format_budget, format_rows, write_report

    needed = {STUDENT: "pipeline distill", ONNX["fp32"]: "pipeline export", ONNX["fp16"]: "pipeline export",
              ONNX["int8"]: "pipeline quantize", ONNX["int8-cpu"]: "pipeline quantize"}
    missing = [f"{name} (made by `{cmd}`)" for name, cmd in needed.items() if not run.path(name).exists()]
    if missing:
        raise UserError(f"cannot verify {run.root}: missing {', '.join(missing)}")
    check_models_of_student(run.root)
    plans = [run.path(p) for p in PLANS.values() if run.path(p).exists()]
    inputs = [run.path(n) for n in needed] + plans
    config = {"scale": cfg.scale, "data.eval": cfg.data.eval, "verify": cfg.to_dict()["verify"],
              "require": sorted(require), "machine": verify.verify_machine()}
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
            with run.staged() as tmp:
                write_json_atomic(tmp / REPORT_JSON, report)
                write_report(tmp, report, crops)
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


def summarize(cfg: Config, run: RunDir, teacher: Path, student: Path) -> dict[str, Any]:
    """Teacher against student: parameters, FLOPs, eval-set Y-PSNR (from eval.json) and latency on one backend
    (PyTorch FP32 on this CPU, batch 1); printed and written to `<run>/summary.json`."""
    from pipeline.evaluation.summary import SUMMARY_LR, format_summary, teacher_vs_student

    config = {"scale": cfg.scale, "lr": SUMMARY_LR}
    inputs = [teacher, student, run.path(EVAL_JSON)]
    key = run.stage_key("summary", config, inputs)
    if run.is_current("summary", key):
        summary = json.loads(run.path(SUMMARY_JSON).read_text())
    else:
        summary = teacher_vs_student(cfg.scale, teacher, student, json.loads(run.path(EVAL_JSON).read_text()))
        write_json_atomic(run.path(SUMMARY_JSON), summary)
        run.record("summary", key, config, inputs, [SUMMARY_JSON])
    print(format_summary(summary, f"{cfg.data.eval}, x{cfg.scale}"))
    return summary


def run_all(cfg: Config, run: RunDir, *, teacher: Path | None = None, resume: bool = False, force: bool = False,
            progress: bool = True) -> None:
    """teacher (given, the run's own, shipped, or trained) -> distill (cfg.distill.method, facd by default) -> eval
    (with its gate) -> export -> quantize -> build (where TensorRT runs) -> verify (with its gates). With
    `budget.budget_ms`, the student's shape is chosen for the budget first, and verify gates its latency."""
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
