"""The distillation losses, one small function each, and the adaptors.

Shapes: images (B, 3, H, W) in [0, 1]; features (B, C, h, w). Per-patch weights (B,) come from `adaptive_gate`: 1 where
the teacher's reconstruction of the patch beats the student's by more than a margin, else 0, so gated-off patches add
nothing to the distillation terms (the batch mean still divides by B).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels

Negatives = Literal["other-images", "all-positions"]


def tap_indices(num_blocks: int, taps: int) -> list[int]:
    """`taps` evenly spaced body blocks, the last one included: 16 blocks, 3 taps -> [4, 10, 15]."""
    if not 1 <= taps <= num_blocks:
        raise ValueError(f"distill.taps must be between 1 and the number of body blocks ({num_blocks}), got {taps}")
    return [round((j + 1) * num_blocks / taps) - 1 for j in range(taps)]


class Adaptors(nn.Module):
    """One 1x1 conv per tap, student channels -> teacher channels. Trained with the student, never exported."""

    def __init__(self, student_channels: int, teacher_channels: int, taps: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(student_channels, teacher_channels, 1) for _ in range(taps))

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        return [conv(f) for conv, f in zip(self.convs, feats, strict=True)]


def l1(sr: Tensor, hr: Tensor) -> Tensor:
    """Reconstruction loss: mean absolute error."""
    return F.l1_loss(sr, hr)


def _weighted_patch_mean(per_patch: Tensor, weight: Tensor | None) -> Tensor:
    return per_patch.mean() if weight is None else (weight * per_patch).mean()


def output_distill(sr_s: Tensor, sr_t: Tensor, weight: Tensor | None = None) -> Tensor:
    """L1(SR_S, SR_T) per patch, weighted by `weight` (B,), averaged over the batch."""
    return _weighted_patch_mean((sr_s - sr_t).abs().flatten(1).mean(1), weight)


def feature_distill(fs: Sequence[Tensor], ft: Sequence[Tensor], weight: Tensor | None = None) -> Tensor:
    """FD: L1 between adapted student features and teacher features, both on the [0, 1] image scale of the
    reconstruction L1 (each network's features divided by its `feature_range`), averaged over taps.

    For two EDSR-like networks (x255 features) this is the x255 L1 divided by 255, as in the EDSR-PyTorch-derived SR-KD
    codes (FAKD, CSD), where pixels and features are both on the 0-255 scale.
    """
    terms = [_weighted_patch_mean((s - t).abs().flatten(1).mean(1), weight) for s, t in zip(fs, ft, strict=True)]
    return torch.stack(terms).mean()


def facd_contrastive(
    fs: Sequence[Tensor],
    ft: Sequence[Tensor],
    *,
    tau: float,
    max_anchors: int = 0,
    negatives: Negatives = "other-images",
    weight: Tensor | None = None,
    generator: torch.Generator | None = None,
    impl: str = "auto",
) -> Tensor:
    """The feature-domain contrastive loss (InfoNCE over feature vectors), averaged over taps.

    At each tap the feature vector of every position of every patch is a row: anchors are the adapted student rows,
    the positive of an anchor is the teacher row at the same patch and position, the negatives are the teacher rows of
    the OTHER patches of the batch (`other-images`) or of every other position (`all-positions`); similarity is the
    cosine over `tau`. With `max_anchors` > 0 and more rows than that, the same random `max_anchors // B` positions
    are drawn in every patch, and those positions are both the anchors and their candidates (positive and negatives).
    """
    batch = fs[0].shape[0]
    if negatives == "other-images" and batch < 2:
        raise ValueError("FACD with negatives from other images needs a batch of at least 2 patches")
    terms = []
    for s, t in zip(fs, ft, strict=True):
        if s.shape != t.shape:
            raise ValueError(f"student features {tuple(s.shape)} and teacher features {tuple(t.shape)} differ")
        b, c, h, w = s.shape
        rows_s, rows_t = s.flatten(2).transpose(1, 2), t.flatten(2).transpose(1, 2)  # (B, hw, C), image-major rows
        per_image = h * w
        if max_anchors and b * per_image > max_anchors:
            per_image = max(max_anchors // b, 1)
            keep = torch.randperm(h * w, generator=generator)[:per_image].to(s.device)
            rows_s, rows_t = rows_s[:, keep], rows_t[:, keep]
        row_weight = None if weight is None else weight.repeat_interleave(per_image)
        terms.append(kernels.contrastive_loss(
            rows_s.reshape(-1, c).contiguous(), rows_t.reshape(-1, c).contiguous(), tau=tau,
            rows_per_image=per_image if negatives == "other-images" else None, weight=row_weight, impl=impl))
    return torch.stack(terms).mean()


@torch.no_grad()
def patch_psnr(sr: Tensor, hr: Tensor) -> Tensor:
    """PSNR (dB, RGB, on the clamped float output) of each patch: (B,). Only for the gate, not a reported metric."""
    mse = (sr.clamp(0, 1) - hr).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-12))


@torch.no_grad()
def adaptive_gate(sr_s: Tensor, sr_t: Tensor, hr: Tensor, margin: float = 0.0, fraction: float = 1.0) -> Tensor:
    """1.0 for the patches to distil, else 0.0: (B,).

    A patch is distilled where the teacher's advantage PSNR(SR_T, GT) - PSNR(SR_S, GT) exceeds `margin` dB and is
    among the `fraction` of the batch's patches (at least one) with the largest advantage.
    """
    return gate_from_advantage(patch_psnr(sr_t, hr) - patch_psnr(sr_s, hr), margin, fraction).to(sr_s.dtype)


def gate_from_advantage(advantage: Tensor, margin: float, fraction: float) -> Tensor:
    """The gate of `adaptive_gate` from per-patch teacher advantages (dB), as a bool tensor."""
    keep = advantage > margin
    k = max(1, round(fraction * advantage.numel()))
    if k < advantage.numel():
        top = torch.zeros_like(keep)
        top[advantage.topk(k).indices] = True
        keep &= top
    return keep
