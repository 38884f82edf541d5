"""The training loop (teacher now; the distillation stage reuses it with its own loss).

One loop, readable top to bottom. Exact resume: the batch of iteration i is drawn from a generator seeded with
(seed, i), the learning rate is a function of i, and the resume checkpoint holds the weights, the optimizer state and
i. So N iterations in one go and N/2 + kill + `--resume` give the same weights.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models import create_model, load_checkpoint, save_checkpoint
from pipeline.backends.torch_runner import TorchRunner
from pipeline.config import Config, TrainSection
from pipeline.data.datasets import PairFolder, PatchSampler
from pipeline.errors import UserError
from pipeline.evaluate import evaluate, mean_row

log = logging.getLogger("pipeline")
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


def lr_at(it: int, t: TrainSection) -> float:
    if it < t.warmup:
        return t.lr * (it + 1) / t.warmup
    if t.schedule == "cosine":
        return t.lr * 0.5 * (1 + math.cos(math.pi * it / t.iters))
    return t.lr * t.step_gamma ** sum(it >= m for m in t.step_milestones)


def batch_generator(seed: int, it: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + it)


def load_train_patches(cfg: Config, progress: bool) -> PatchSampler:
    data = PairFolder(cfg.data.train, cfg.scale)
    pairs = list(tqdm(data, total=len(data), desc=f"load {cfg.data.train}", unit="img", disable=not progress,
                      leave=False))
    return PatchSampler(pairs, cfg.train.lr_patch, cfg.scale)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, last_iter: int) -> None:
    """After a resume, drop log lines of iterations that were lost with the killed run."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if json.loads(line).get("iter", 0) <= last_iter]
        path.write_text("".join(line + "\n" for line in keep))


def fit(
    model: torch.nn.Module,
    loss_fn: LossFn,
    cfg: Config,
    out_dir: Path,
    *,
    resume: bool,
    progress: bool = True,
    label: str = "train",
) -> dict[str, Any]:
    """Train `model` in place with `loss_fn(lr, hr)`; write `out_dir/last.pt` (resume state) and `out_dir/log.jsonl`.

    Returns the final evaluation (mean Y-PSNR / SSIM on the eval set).
    """
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    last, log_path = out_dir / "last.pt", out_dir / "log.jsonl"
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, betas=(0.9, 0.999), eps=1e-8)

    start = 0
    if resume:
        if not last.exists():
            raise UserError(f"nothing to resume: {last} does not exist")
        state = load_checkpoint(last)
        if state.get("config") != cfg.to_dict():
            differ = _diff(state.get("config", {}), cfg.to_dict())
            raise UserError(f"cannot resume {last}: the config differs ({differ}); resume with the same config")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["iteration"]
        _truncate_log(log_path, start)
        log.info("%s: resuming from iteration %d (%s)", label, start, last)
    elif log_path.exists():
        log_path.unlink()

    sampler = load_train_patches(cfg, progress)
    eval_pairs = list(PairFolder(cfg.data.eval, cfg.scale))
    log.info("%s: %d training images, %d eval images, %d iterations of %d patches", label, len(sampler),
             len(eval_pairs), t.iters, t.batch)

    def run_eval(it: int) -> dict[str, float]:
        model.eval()
        with TorchRunner(model) as runner:
            mean = mean_row(evaluate(runner, eval_pairs, cfg.scale, progress=False))
        model.train()
        _append_jsonl(log_path, {"iter": it, "eval": mean})
        return mean

    model.train()
    bar = tqdm(range(start, t.iters), initial=start, total=t.iters, desc=label, unit="it", disable=not progress)
    window: list[float] = []
    tic = time.perf_counter()
    latest_eval: dict[str, float] | None = None
    for it in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, t)
        lr_batch, hr_batch = sampler.sample(t.batch, batch_generator(cfg.seed, it))
        loss, parts = loss_fn(lr_batch, hr_batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        done = it + 1
        window.append(loss.item())
        if done % t.log_every == 0 or done == t.iters:
            elapsed = time.perf_counter() - tic
            record = {"iter": done, "loss": sum(window) / len(window), "lr": lr_at(it, t),
                      "patches_per_s": len(window) * t.batch / elapsed, **parts}
            _append_jsonl(log_path, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            window, tic = [], time.perf_counter()
        if (t.eval_every and done % t.eval_every == 0) or done == t.iters:
            latest_eval = run_eval(done)
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr_y=f"{latest_eval['psnr_y']:.3f}")
        if done % t.ckpt_every == 0 or done == t.iters:
            save_checkpoint(last, model, optimizer=optimizer.state_dict(), iteration=done, config=cfg.to_dict())
    bar.close()
    if latest_eval is None:  # resumed a run that had already finished
        latest_eval = run_eval(t.iters)
    return latest_eval


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> str:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            sub = _diff(x, y, f"{prefix}{key}.")
            if sub:
                out.append(sub)
        elif x != y:
            out.append(f"{prefix}{key}: {x!r} -> {y!r}")
    return ", ".join(out)


def train_teacher(cfg: Config, out_dir: Path, final: Path, *, resume: bool, progress: bool = True) -> dict[str, Any]:
    """Train the teacher preset `cfg.model.teacher` with L1; write the model-only checkpoint `final`."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.teacher, scale=cfg.scale)

    def l1(lr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return torch.nn.functional.l1_loss(model(lr), hr), {}

    result = fit(model, l1, cfg, out_dir, resume=resume, progress=progress, label="teacher")
    save_checkpoint(final, model, role="teacher", preset=cfg.model.teacher, config=cfg.to_dict(), eval=result)
    return result
