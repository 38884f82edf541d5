"""The stages of a run, in order. The only module that knows the order; each stage is artifacts in, artifacts out."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from models import load_checkpoint
from pipeline.backends.base import BicubicRunner, Runner
from pipeline.backends.torch_runner import TorchRunner
from pipeline.config import Config
from pipeline.data.datasets import PairFolder
from pipeline.errors import GateFailed, UserError
from pipeline.evaluate import evaluate, mean_row
from pipeline.rundir import RunDir, write_json_atomic, write_text_atomic
from pipeline.score import format_table
from pipeline.modelio import load_model
from pipeline.train import train_teacher

log = logging.getLogger("pipeline")

TEACHER = "teacher.pt"
EVAL_JSON, EVAL_MD = "eval.json", "eval.md"


def stage_teacher(cfg: Config, run: RunDir, *, resume: bool = False, force: bool = False,
                  progress: bool = True) -> Path:
    """Train the teacher into `<run>/teacher.pt` (resume state and logs in `<run>/teacher/`)."""
    c = cfg.to_dict()
    config = {"scale": cfg.scale, "seed": cfg.seed, "model.teacher": cfg.model.teacher, "data.train": cfg.data.train,
              "data.eval": cfg.data.eval, "train": c["train"]}
    key = run.stage_key("teacher", config, [])
    final, work = run.path(TEACHER), run.path("teacher")
    if not force and not resume and run.is_current("teacher", key):
        log.info("teacher: up to date (same config, %s unchanged), skipping; --force redoes it", final)
        return final
    last = work / "last.pt"
    if last.exists() and not resume and not force:
        raise_partial(last)
    result = train_teacher(cfg, work, final, resume=resume, progress=progress)
    run.record("teacher", key, config, [], [TEACHER, "teacher/log.jsonl"])
    log.info("teacher: %s (Y-PSNR %.3f dB on %s)", final, result["psnr_y"], cfg.data.eval)
    return final


def raise_partial(last: Path) -> None:
    done = load_checkpoint(last).get("iteration", "?")
    raise UserError(f"an earlier run left {last} (iteration {done}): pass --resume to continue it, "
                    "or --force to start over")


def eval_rows(runner: Runner, data: str, scale: int, progress: bool = True) -> dict[str, Any]:
    pairs = PairFolder(data, scale)
    with runner:
        rows = evaluate(runner, pairs, scale, progress)
    return {"model": runner.name, "data": str(data), "scale": scale, "rows": rows, "mean": mean_row(rows)}


def stage_eval(cfg: Config, run: RunDir, teacher: Path, *, force: bool = False, progress: bool = True) -> Path:
    """Evaluate bicubic and the teacher on the eval set: `<run>/eval.json` and a Markdown table `<run>/eval.md`.

    Gate: the teacher must beat bicubic on mean Y-PSNR, else GateFailed (after the results are written).
    """
    config = {"scale": cfg.scale, "data.eval": cfg.data.eval}
    key = run.stage_key("eval", config, [teacher])
    out = run.path(EVAL_JSON)
    if not force and run.is_current("eval", key):
        log.info("eval: up to date, skipping (%s)", out)
        results = json.loads(out.read_text())
        print(run.path(EVAL_MD).read_text())
    else:
        results = [
            eval_rows(BicubicRunner(cfg.scale), cfg.data.eval, cfg.scale, progress),
            eval_rows(TorchRunner(load_model(teacher, cfg.scale)), cfg.data.eval, cfg.scale, progress),
        ]
        results[1]["model"] = f"teacher ({teacher.name})"
        tables = "\n\n".join(format_table(r["rows"], f"{r['model']} on {r['data']}, x{r['scale']}") for r in results)
        write_json_atomic(out, results)
        write_text_atomic(run.path(EVAL_MD), tables + "\n")
        run.record("eval", key, config, [teacher], [EVAL_JSON, EVAL_MD])
        print(tables)
    bicubic, taught = (r["mean"]["psnr_y"] for r in results)
    if not taught > bicubic:
        raise GateFailed(f"gate failed: the teacher's mean Y-PSNR {taught:.3f} dB does not beat bicubic's "
                         f"{bicubic:.3f} dB on {cfg.data.eval} (train longer: --set train.iters=...)")
    log.info("eval gate passed: teacher %.3f dB > bicubic %.3f dB (mean Y-PSNR)", taught, bicubic)
    return out


def run_all(cfg: Config, run: RunDir, *, teacher: Path | None = None, resume: bool = False, force: bool = False,
            progress: bool = True) -> None:
    if teacher is None:
        teacher = stage_teacher(cfg, run, resume=resume, force=force, progress=progress)
    else:
        load_model(teacher, cfg.scale)  # fail early on a wrong checkpoint
    stage_eval(cfg, run, teacher, force=force, progress=progress)
    log.info("all stages done; results in %s", run.root)
