"""The training loop, shared by the teacher and the distillation stage (each brings its own loss).

One loop, readable top to bottom. Exact resume: the global batch of iteration i is drawn from a generator seeded with
(seed, i), the learning rate is a function of i, and the resume checkpoint holds the weights (network and adaptors),
the optimizer state and i. So N iterations in one go and N/2 + kill + `--resume` give the same weights.

Several processes (`torchrun --nproc_per_node=N -m pipeline ...`): DistributedDataParallel, NCCL on GPUs and gloo on
CPUs. Every rank draws the same global batch and trains on its own contiguous share of it (the distributed sampler),
so the data order does not depend on the number of processes; gradients are averaged over ranks. Rank 0 alone writes
checkpoints and logs and runs the periodic evaluation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from models import SRNet, create_model, load_checkpoint, save_checkpoint
from pipeline.backends.torch_runner import TorchRunner
from pipeline.config import Config, TrainSection
from pipeline.data.datasets import ImageTooSmall, PairFolder, PatchSampler, train_and_validation
from pipeline.errors import TrainingDiverged, UserError
from pipeline.evaluation.evaluate import check_size, evaluate, mean_row

log = logging.getLogger("pipeline")


class Trainee(nn.Module):
    """What a training step updates: the network and, for distillation, the adaptors of its feature taps.

    `forward(lr)` returns (SR, adapted features at `taps`, on the [0, 1] image scale: divided by the network's
    `feature_range`); without taps the feature list is empty and the network runs its plain forward.
    """

    def __init__(self, net: SRNet, taps: list[int] | None = None, adaptors: nn.Module | None = None):
        super().__init__()
        self.net, self.taps = net, list(taps or [])
        self.adaptors = adaptors if adaptors is not None else nn.ModuleList()

    def forward(self, lr: Tensor) -> tuple[Tensor, list[Tensor]]:
        if not self.taps:
            return self.net(lr), []
        sr, feats = self.net.forward_features(lr, self.taps)
        return sr, [f / self.net.feature_range for f in self.adaptors(feats)]


# loss_fn(trainee, lr, hr, generator) -> (loss, {name: float}); `trainee` may be the DDP wrapper of the Trainee, and
# `generator` continues the batch's generator, for any randomness the loss needs (anchor sampling).
LossFn = Callable[[nn.Module, Tensor, Tensor, torch.Generator], tuple[Tensor, dict[str, float]]]


@dataclass
class Context:
    """Where this process trains: its device, and its rank among `world` processes."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_context(t: TrainSection) -> Context:
    """The device and, under torchrun (WORLD_SIZE > 1), the process group."""
    want_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA device is available (torch.cuda.is_available() is False)")
    if want_cuda:  # exact resume needs reproducible steps: no cuDNN algorithms that reduce with atomics
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context(torch.device("cuda" if want_cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    device = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    return Context(device, dist.get_rank(), dist.get_world_size())


def lr_at(it: int, t: TrainSection) -> float:
    if it < t.warmup:
        return t.lr * (it + 1) / t.warmup
    if t.schedule == "cosine":
        return t.lr * 0.5 * (1 + math.cos(math.pi * it / t.iters))
    return t.lr * t.step_gamma ** sum(it >= m for m in t.step_milestones)


def batch_generator(seed: int, it: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + it)


def load_train_patches(cfg: Config, progress: bool) -> PatchSampler:
    data, _val = train_and_validation(cfg.data.train, cfg.data.val_count, cfg.data.val, cfg.scale)
    pairs = []
    for i in tqdm(range(len(data)), desc=f"load {cfg.data.train}", unit="img", disable=not progress, leave=False):
        try:
            pairs.append(data.load(i))
        except ImageTooSmall as e:
            log.warning("skipping a training image: %s", e)
    return PatchSampler(pairs, cfg.train.lr_patch, cfg.scale)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, last_iter: int) -> None:
    """After a resume, drop log lines of iterations that were lost with the killed run."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if json.loads(line).get("iter", 0) <= last_iter]
        path.write_text("".join(line + "\n" for line in keep))


def _autocast(t: TrainSection, device: torch.device) -> contextlib.AbstractContextManager:
    if t.amp == "off" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if t.amp == "bf16" else torch.float16)


def fit(
    trainee: Trainee,
    loss_fn: LossFn,
    cfg: Config,
    out_dir: Path,
    *,
    resume: bool,
    progress: bool = True,
    label: str = "train",
    ctx: Context | None = None,
    probe: Callable[[nn.Module], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Train `trainee` in place; write `out_dir/last.pt` (resume state) and `out_dir/log.jsonl` (rank 0).

    `probe(net)`, if given, runs at every evaluation and its figures go into the log record as "probe".

    Returns the final evaluation (mean Y-PSNR / SSIM on the eval set). A non-finite loss stops the run with
    TrainingDiverged, after saving the weights of the last good iteration.
    """
    t = cfg.train
    ctx = ctx or setup_context(t)
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.batch % ctx.world:
        raise UserError(f"train.batch ({t.batch}) must be a multiple of the number of processes ({ctx.world})")
    out_dir.mkdir(parents=True, exist_ok=True)
    last, log_path = out_dir / "last.pt", out_dir / "log.jsonl"
    channels_last = t.channels_last and ctx.device.type == "cuda"
    # On the device before the optimizer exists, so that a resumed optimizer state lands beside its parameters.
    trainee.to(ctx.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    params = [p for p in trainee.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=t.lr, betas=(0.9, 0.999), eps=1e-8)

    start = 0
    if resume:
        if not last.exists():
            raise UserError(f"nothing to resume: {last} does not exist")
        state = load_checkpoint(last)
        differ = _diff(state.get("config", {}), cfg.to_dict(), Config().to_dict())
        if differ:
            raise UserError(f"cannot resume {last}: the config differs ({differ}); resume with the same config")
        trainee.net.load_state_dict(state["state_dict"])
        trainee.adaptors.load_state_dict(state["adaptors"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["iteration"]
        if ctx.is_main:
            _truncate_log(log_path, start)
        log.info("%s: resuming from iteration %d (%s)", label, start, last)
    elif log_path.exists() and ctx.is_main:
        log_path.unlink()

    sampler = load_train_patches(cfg, progress and ctx.is_main)
    eval_pairs = list(PairFolder(cfg.data.eval, cfg.scale)) if ctx.is_main else []
    for pair in eval_pairs:  # before training, not at its first evaluation
        check_size(pair, cfg.scale)
    log.info("%s: %d training images, %d eval images, %d iterations of %d patches on %s x %d", label, len(sampler),
             len(eval_pairs), t.iters, t.batch, ctx.device, ctx.world)

    model: nn.Module = trainee
    if ctx.world > 1:
        model = nn.parallel.DistributedDataParallel(trainee, device_ids=[ctx.device.index] if ctx.device.index is
                                                    not None else None)
    scaler = torch.amp.GradScaler("cuda", enabled=t.amp == "fp16" and ctx.device.type == "cuda")

    def save(done: int) -> None:
        if ctx.is_main:
            save_checkpoint(last, trainee.net, adaptors=trainee.adaptors.state_dict(),
                            optimizer=optimizer.state_dict(), iteration=done, config=cfg.to_dict())

    def run_eval(it: int) -> dict[str, float]:
        trainee.eval()
        with TorchRunner(trainee.net, ctx.device) as runner:
            mean = mean_row(evaluate(runner, eval_pairs, cfg.scale, progress=False))
        record = {"iter": it, "eval": mean}
        if probe is not None:
            record["probe"] = probe(trainee.net)
        trainee.train()
        _append_jsonl(log_path, record)
        return mean

    trainee.train()
    bar = tqdm(range(start, t.iters), initial=start, total=t.iters, desc=label, unit="it",
               disable=not (progress and ctx.is_main))
    window: list[float] = []
    parts_sum: dict[str, float] = {}
    tic = time.perf_counter()
    latest_eval: dict[str, float] | None = None
    share = t.batch // ctx.world
    for it in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, t)
        gen = batch_generator(cfg.seed, it)
        lr_batch, hr_batch = sampler.sample(t.batch, gen)
        mine = slice(ctx.rank * share, (ctx.rank + 1) * share)
        lr_batch, hr_batch = (x[mine].to(ctx.device, non_blocking=True) for x in (lr_batch, hr_batch))
        if channels_last:
            lr_batch = lr_batch.contiguous(memory_format=torch.channels_last)
        with _autocast(t, ctx.device):
            loss, parts = loss_fn(model, lr_batch, hr_batch, gen)
        if not torch.isfinite(loss):
            save(it)
            raise TrainingDiverged(f"{label}: the loss is {loss.item()} at iteration {it + 1}; stopped, the weights "
                                   f"of iteration {it} are saved in {last}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        done = it + 1
        window.append(loss.item())
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v
        if ctx.is_main and (done % t.log_every == 0 or done == t.iters):
            elapsed = time.perf_counter() - tic
            record = {"iter": done, "loss": sum(window) / len(window), "lr": lr_at(it, t),
                      "patches_per_s": len(window) * t.batch / elapsed,
                      **{k: v / len(window) for k, v in parts_sum.items()}}
            _append_jsonl(log_path, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            window, parts_sum, tic = [], {}, time.perf_counter()
        if ctx.is_main and ((t.eval_every and done % t.eval_every == 0) or done == t.iters):
            latest_eval = run_eval(done)
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr_y=f"{latest_eval['psnr_y']:.3f}")
        if done % t.ckpt_every == 0 or done == t.iters:
            save(done)
    bar.close()
    if ctx.is_main and latest_eval is None:  # resumed a run that had already finished
        latest_eval = run_eval(t.iters)
    if ctx.world > 1:
        dist.barrier()
    return latest_eval or {}


def _diff(saved: dict[str, Any], now: dict[str, Any], default: dict[str, Any], prefix: str = "") -> str:
    """The keys whose values differ; a key the saved config predates counts as equal while it is at its default."""
    out = []
    for key in sorted(set(saved) | set(now)):
        x, y, d = saved.get(key), now.get(key), default.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            sub = _diff(x, y, d if isinstance(d, dict) else {}, f"{prefix}{key}.")
            if sub:
                out.append(sub)
        elif x != y and not (key not in saved and y == d):
            out.append(f"{prefix}{key}: {x!r} -> {y!r}")
    return ", ".join(out)


def train_teacher(cfg: Config, out_dir: Path, final: Path, *, resume: bool, progress: bool = True) -> dict[str, Any]:
    """Train the teacher preset `cfg.model.teacher` with L1; write the model-only checkpoint `final`."""
    torch.manual_seed(cfg.seed)
    trainee = Trainee(create_model(cfg.model.teacher, scale=cfg.scale))

    def l1(model: nn.Module, lr: Tensor, hr: Tensor, _gen: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        return torch.nn.functional.l1_loss(model(lr)[0], hr), {}

    ctx = setup_context(cfg.train)
    result = fit(trainee, l1, cfg, out_dir, resume=resume, progress=progress, label="teacher", ctx=ctx)
    if ctx.is_main:
        save_checkpoint(final, trainee.net.cpu(), role="teacher", preset=cfg.model.teacher, config=cfg.to_dict(),
                        eval=result)
    return result
