"""The stages of a run, in order. The only module that knows the order; each stage is artifacts in, artifacts out."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch.distributed as dist

from models import load_checkpoint
from pipeline.backends.base import BicubicRunner, Runner
from pipeline.backends.torch_runner import TorchRunner
from pipeline.config import METHODS, Config, parse_size
from pipeline.data.datasets import PairFolder
from pipeline.errors import GateFailed, UserError
from pipeline.evaluate import evaluate, mean_row
from pipeline.rundir import (CALIB, ONNX, PLANS, STUDENT, RunDir, atomic_path, sha256_file, write_json_atomic,
                             write_text_atomic)
from pipeline.score import format_table
from pipeline.modelio import load_model
from pipeline.distill import distill_student
from pipeline.engine import trt_status
from pipeline.train import train_teacher

log = logging.getLogger("pipeline")

TEACHER = "teacher.pt"
EVAL_JSON, EVAL_MD = "eval.json", "eval.md"
ABLATION_JSON, ABLATION_MD = "ablation.json", "ablation.md"
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
    if not force and not resume and run.is_current(stage, key):
        log.info("%s: up to date (same config and inputs, %s unchanged), skipping; --force redoes it", stage,
                 final_path)
        return final_path
    last = work / "last.pt"
    if last.exists() and not resume and not force:
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


def stage_teacher(cfg: Config, run: RunDir, *, resume: bool = False, force: bool = False,
                  progress: bool = True) -> Path:
    """Train the teacher into `<run>/teacher.pt` (resume state and log in `<run>/teacher/`)."""
    c = cfg.to_dict()
    config = {k: c[k] for k in ("scale", "seed", "data", "train")}
    config["model.teacher"] = cfg.model.teacher
    return _train_stage("teacher", run, TEACHER, config, [],
                        lambda work, final: train_teacher(cfg, work, final, resume=resume, progress=progress),
                        resume=resume, force=force)


def stage_distill(cfg: Config, run: RunDir, teacher: Path, *, final: str = STUDENT, resume: bool = False,
                  force: bool = False, progress: bool = True) -> Path:
    """Distil the student from `teacher` with `cfg.distill.method` into `<run>/<final>` (work files beside it)."""
    c = cfg.to_dict()
    config = {k: c[k] for k in ("scale", "seed", "data", "train", "distill", "facd")}
    config["model.student"] = cfg.model.student
    stage = "distill" if final == STUDENT else f"distill:{final}"
    return _train_stage(stage, run, final, config, [teacher],
                        lambda work, out: distill_student(cfg, load_model(teacher, cfg.scale), work, out,
                                                          resume=resume, progress=progress),
                        resume=resume, force=force)


def eval_rows(runner: Runner, data: str, scale: int, progress: bool = True) -> dict[str, Any]:
    pairs = PairFolder(data, scale)
    with runner:
        rows = evaluate(runner, pairs, scale, progress)
    return {"model": runner.name, "data": str(data), "scale": scale, "rows": rows, "mean": mean_row(rows)}


def _eval_models(cfg: Config, models: dict[str, Path], progress: bool) -> list[dict[str, Any]]:
    """Bicubic, then each named checkpoint, on the eval set."""
    results = [eval_rows(BicubicRunner(cfg.scale), cfg.data.eval, cfg.scale, progress)]
    for label, path in models.items():
        results.append(eval_rows(TorchRunner(load_model(path, cfg.scale)), cfg.data.eval, cfg.scale, progress))
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
    """Distil one student per method and seed from the same teacher with the same budget; table of the results.

    Students go to `<run>/ablate/<method>-seed<k>.pt`; the table (bicubic, teacher, every student, and per method the
    mean and spread over seeds) to `<run>/ablation.json` and `<run>/ablation.md`.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")
    students = {}
    for method in methods:
        for seed in seeds:
            one = dataclasses.replace(cfg, seed=seed, distill=dataclasses.replace(cfg.distill, method=method))
            students[f"{method} seed {seed}"] = stage_distill(one, run, teacher, final=f"ablate/{method}-seed{seed}.pt",
                                                             resume=resume, force=force, progress=progress)
    if not is_main_process():
        return run.path(ABLATION_JSON)
    results = _eval_models(cfg, {"teacher": teacher, **students}, progress)
    summary = []
    for method in methods:
        means = [r["mean"] for r in results if r["model"].startswith(f"{method} seed ")]
        psnrs, ssims = [m["psnr_y"] for m in means], [m["ssim_y"] for m in means]
        summary.append({"method": method, "seeds": seeds, "psnr_y_mean": statistics.fmean(psnrs),
                        "psnr_y_spread": max(psnrs) - min(psnrs), "ssim_y_mean": statistics.fmean(ssims)})
    write_json_atomic(run.path(ABLATION_JSON), {"config": cfg.to_dict(), "results": results, "summary": summary})
    lines = [f"Ablation on {cfg.data.eval}, x{cfg.scale}, {cfg.train.iters} iterations per student; mean over the eval "
             "images (Y channel, shave = scale).", "", "| model | Y-PSNR (dB) | Y-SSIM |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['mean']['psnr_y']:.3f} | {r['mean']['ssim_y']:.4f} |" for r in results]
    lines += ["", "| method | seeds | mean Y-PSNR (dB) | max - min over seeds (dB) | mean Y-SSIM |", "|---|---|---|---|---|"]
    lines += [f"| {s['method']} | {len(seeds)} | {s['psnr_y_mean']:.3f} | {s['psnr_y_spread']:.3f} | "
              f"{s['ssim_y_mean']:.4f} |" for s in summary]
    write_text_atomic(run.path(ABLATION_MD), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return run.path(ABLATION_JSON)


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
    from pipeline.backends.ort_runner import read_meta
    from pipeline.report import REPORT_FILES, format_rows, write_report

    needed = {STUDENT: "pipeline distill", FP32_ONNX: "pipeline export", FP16_ONNX: "pipeline export",
              INT8_ONNX: "pipeline quantize", INT8_CPU_ONNX: "pipeline quantize"}
    missing = [f"{name} (made by `{cmd}`)" for name, cmd in needed.items() if not run.path(name).exists()]
    if missing:
        raise UserError(f"cannot verify {run.root}: missing {', '.join(missing)}")
    for precision, name in ONNX.items():
        meta = read_meta(run.path(name))
        if meta["precision"] != precision:
            raise UserError(f"{run.path(name)} holds a {meta['precision']} model, expected {precision}")
    plans = [run.path(p) for p in PLANS.values() if run.path(p).exists()]
    inputs = [run.path(n) for n in needed] + plans
    config = {"scale": cfg.scale, "data.eval": cfg.data.eval, "verify": cfg.to_dict()["verify"],
              "require": sorted(require), "machine": verify.machine()}
    key = run.stage_key("verify", config, inputs)
    out = run.path(REPORT_JSON)
    if not force and run.is_current("verify", key):
        log.info("verify: up to date, skipping (%s)", out)
        report = json.loads(out.read_text())
    else:
        student = load_model(run.path(STUDENT), cfg.scale)
        report, crops = verify.verify(cfg, verify.candidates(run.root, student), list(require), progress)
        write_json_atomic(out, report)
        write_report(run.root, report, crops)
        run.record("verify", key, config, inputs, [REPORT_JSON, *REPORT_FILES])
    print(format_rows(report))
    print(f"report: {run.path('report.md')}")
    if not report["passed"]:
        raise GateFailed("verify failed:\n  " + "\n  ".join(verify.failing(report)))
    return out


def run_all(cfg: Config, run: RunDir, *, teacher: Path | None = None, resume: bool = False, force: bool = False,
            progress: bool = True) -> None:
    """teacher (unless given) -> distill (cfg.distill.method, facd by default) -> eval (with its gate) -> export ->
    quantize -> build (where TensorRT runs) -> verify (with its gates)."""
    if teacher is None:
        teacher = stage_teacher(cfg, run, resume=resume, force=force, progress=progress)
    else:
        load_model(teacher, cfg.scale)  # fail early on a wrong checkpoint
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
        log.info("all stages done; results in %s", run.root)
