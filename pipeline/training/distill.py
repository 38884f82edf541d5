"""Distillation of the student from a frozen teacher: every method in one harness (same data order, seed, budget).

    none         L1(SR_S, GT)
    out          L1 + lambda_out * L1(SR_S, SR_T)
    fd           L1 + lambda_out * L1(SR_S, SR_T) + lambda_fd * FD         (conventional feature distillation)
    facd         L1 + lambda_out * gate * L1(SR_S, SR_T) + lambda_facd * gate * L_contrast
    facd-nogate  the same without the gate (every patch distilled): differs from `fd` only in the feature term

Wherever a teacher runs, the log also records the rate at which the gate would open on the training patches
(`gate_rate`), and each evaluation records it on fixed patches of the validation split, which the teacher never saw.

The teacher runs in eval mode without gradients. Taps: `distill.taps` evenly spaced body blocks of each network,
matched by relative depth; the student's taps pass through 1x1 adaptors (trained with it, never exported). Under
several processes the contrastive negatives are the patches of the local batch (each rank's share).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models import SRNet, create_model, save_checkpoint
from pipeline.config import Config
from pipeline.data.datasets import PatchSampler, train_and_validation
from pipeline.errors import UserError
from pipeline.training.losses import (Adaptors, adaptive_gate, facd_contrastive, feature_distill, l1, output_distill,
                                      patch_psnr, tap_indices)
from pipeline.training.train import LossFn, Trainee, fit, setup_context

log = logging.getLogger("pipeline")
_USES_FEATURES = ("fd", "facd", "facd-nogate")


def make_loss(cfg: Config, teacher: SRNet | None, teacher_taps: list[int]) -> LossFn:
    """The loss of `cfg.distill.method`; its parts (each term, the gate rate) go to the training log."""
    d, f, method = cfg.distill, cfg.facd, cfg.distill.method

    def loss_fn(model: nn.Module, lr: Tensor, hr: Tensor, gen: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        sr, fs = model(lr)
        loss = l1(sr, hr)
        parts = {"l1": loss.item()}
        if teacher is None:
            return loss, parts
        with torch.no_grad():
            sr_t, ft = teacher.forward_features(lr, teacher_taps)
            ft = [t / teacher.feature_range for t in ft]  # on the [0, 1] image scale, like the student's (Trainee)
        gate = adaptive_gate(sr, sr_t, hr, d.gate_margin, d.gate_fraction)
        parts["gate_rate"] = gate.mean().item()
        weight = gate if method == "facd" else None
        term = output_distill(sr, sr_t, weight)
        loss = loss + d.lambda_out * term
        parts["out"] = term.item()
        if method == "fd":
            term = feature_distill(fs, ft)
            loss = loss + d.lambda_fd * term
            parts["fd"] = term.item()
        if method in ("facd", "facd-nogate"):
            term = facd_contrastive(fs, ft, tau=f.tau, max_anchors=f.max_anchors, negatives=f.negatives,
                                    weight=weight, generator=gen, impl=f.impl)
            loss = loss + d.lambda_facd * term
            parts["contrast"] = term.item()
        return loss, parts

    return loss_fn


PROBE_PATCHES = 64  # validation patches on which the gate is measured at every evaluation


def validation_gate_probe(cfg: Config, teacher: SRNet, device: torch.device) -> Callable[[nn.Module], dict[str, float]]:
    """The gate on fixed patches of the validation split (held out of every training stage, so the teacher never
    saw them): the share of patches with an advantage above `distill.gate_margin` and the mean advantage (dB)."""
    _train, val = train_and_validation(cfg.data.train, cfg.data.val_count, cfg.data.val, cfg.scale)
    lr, hr = PatchSampler(list(val), cfg.train.lr_patch, cfg.scale).sample(PROBE_PATCHES,
                                                                            torch.Generator().manual_seed(0))
    lr, hr = lr.to(device), hr.to(device)
    with torch.no_grad():
        psnr_t = patch_psnr(teacher(lr), hr)

    def probe(net: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            advantage = psnr_t - patch_psnr(net(lr), hr)
        return {"val_gate_rate": (advantage > cfg.distill.gate_margin).float().mean().item(),
                "val_advantage_db": advantage.mean().item()}

    return probe


def distill_student(cfg: Config, teacher: SRNet, out_dir: Path, final: Path, *, resume: bool,
                    progress: bool = True) -> dict[str, Any]:
    """Train the student preset `cfg.model.student` (shaped by `model.student_blocks` / `student_channels`) from
    `teacher` with `cfg.distill.method`; write `final`."""
    method = cfg.distill.method
    if teacher.scale != cfg.scale:
        raise UserError(f"the teacher is for scale {teacher.scale}, the config for scale {cfg.scale}")
    ctx = setup_context(cfg.train)
    if method in ("facd", "facd-nogate") and cfg.facd.negatives == "other-images" and cfg.train.batch // ctx.world < 2:
        raise UserError(f"FACD with negatives from other images needs at least 2 patches per process; train.batch is "
                        f"{cfg.train.batch} on {ctx.world} process(es) (raise it, or set facd.negatives=\"all-positions\")")
    torch.manual_seed(cfg.seed)
    student = create_model(cfg.model.student, scale=cfg.scale, **cfg.model.student_shape())
    trainee, teacher_taps = Trainee(student), []
    if method in _USES_FEATURES:
        try:
            student_taps = tap_indices(student.num_taps, cfg.distill.taps)
            teacher_taps = tap_indices(teacher.num_taps, cfg.distill.taps)
        except ValueError as e:
            raise UserError(str(e)) from None
        trainee = Trainee(student, student_taps, Adaptors(student.channels, teacher.channels, len(student_taps)))
        log.info("distill: student taps %s, teacher taps %s", student_taps, teacher_taps)
    frozen = teacher.to(ctx.device).eval().requires_grad_(False)
    has_val = cfg.data.val_count or cfg.data.val
    probe = validation_gate_probe(cfg, frozen, ctx.device) if has_val and ctx.is_main else None
    result = fit(trainee, make_loss(cfg, None if method == "none" else frozen, teacher_taps), cfg, out_dir,
                 resume=resume, progress=progress, label=f"distill {method}", ctx=ctx, probe=probe)
    if ctx.is_main:
        save_checkpoint(final, student.cpu(), role="student", preset=cfg.model.student, method=method,
                        config=cfg.to_dict(), eval=result)
    return result
