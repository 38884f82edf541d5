"""The stages of a run, in order. The only module that knows the order; each stage is artifacts in, artifacts out."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from models import load_checkpoint
from pipeline.backends.base import BicubicRunner, Runner
from pipeline.backends.torch_runner import TorchRunner
from pipeline.config import METHODS, Config
from pipeline.data.datasets import PairFolder
from pipeline.errors import GateFailed, UserError
from pipeline.evaluate import evaluate, mean_row
from pipeline.rundir import RunDir, write_json_atomic, write_text_atomic
from pipeline.score import format_table
from pipeline.modelio import load_model
from pipeline.distill import distill_student
from pipeline.train import train_teacher

log = logging.getLogger("pipeline")

TEACHER, STUDENT = "teacher.pt", "student.pt"
EVAL_JSON, EVAL_MD = "eval.json", "eval.md"
ABLATION_JSON, ABLATION_MD = "ablation.json", "ablation.md"


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


def run_all(cfg: Config, run: RunDir, *, teacher: Path | None = None, resume: bool = False, force: bool = False,
            progress: bool = True) -> None:
    """teacher (unless given) -> distill (cfg.distill.method, facd by default) -> eval (with its gate)."""
    if teacher is None:
        teacher = stage_teacher(cfg, run, resume=resume, force=force, progress=progress)
    else:
        load_model(teacher, cfg.scale)  # fail early on a wrong checkpoint
    student = stage_distill(cfg, run, teacher, resume=resume, force=force, progress=progress)
    if is_main_process():
        stage_eval(cfg, run, teacher, student, force=force, progress=progress)
        log.info("all stages done; results in %s", run.root)
