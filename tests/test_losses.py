"""The distillation losses against hand computations and an explicit float64 InfoNCE written with loops."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.training.losses import (Adaptors, adaptive_gate, facd_contrastive, feature_distill, gate_from_advantage,
                                      l1, output_distill, patch_psnr, tap_indices)


def test_tap_indices_are_evenly_spaced_and_end_at_the_last_block():
    assert tap_indices(16, 3) == [4, 10, 15]
    assert tap_indices(6, 3) == [1, 3, 5]
    assert tap_indices(3, 3) == [0, 1, 2]
    assert tap_indices(10, 1) == [9]
    for bad in (0, 4):
        with pytest.raises(ValueError, match="distill.taps"):
            tap_indices(3, bad)


def test_l1_and_weighted_output_distillation_by_hand():
    a, b = torch.zeros(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    b[0] += 0.5
    b[1] += 0.25
    assert l1(a, b).item() == pytest.approx(0.375)
    assert output_distill(a, b).item() == pytest.approx(0.375)
    # Patch 0 gated off: (0 * 0.5 + 1 * 0.25) / 2 patches.
    assert output_distill(a, b, torch.tensor([0.0, 1.0])).item() == pytest.approx(0.125)


def test_feature_distillation_averages_taps():
    fs = [torch.zeros(2, 4, 3, 3), torch.zeros(2, 8, 1, 1)]
    ft = [torch.full((2, 4, 3, 3), 2.0), torch.full((2, 8, 1, 1), -1.0)]
    assert feature_distill(fs, ft).item() == pytest.approx(1.5)
    assert feature_distill(fs, ft, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.75)


def test_adaptors_map_channels_and_keep_the_grid():
    out = Adaptors(16, 32, 3)([torch.rand(2, 16, 5, 7)] * 3)
    assert [tuple(o.shape) for o in out] == [(2, 32, 5, 7)] * 3


def test_gate_follows_patch_psnr_and_margin():
    hr = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    good, bad = hr + 0.01, hr + 0.1  # PSNR 40 dB and 20 dB
    assert patch_psnr(good, hr).tolist() == pytest.approx([40.0] * 3, abs=0.3)
    sr_t = torch.stack([good[0], bad[1], good[2]])
    sr_s = torch.stack([bad[0], good[1], good[2]])
    assert adaptive_gate(sr_s, sr_t, hr).tolist() == [1.0, 0.0, 0.0]  # equal PSNR: the teacher does not help
    assert adaptive_gate(sr_s, sr_t, hr, margin=25.0).tolist() == [0.0, 0.0, 0.0]
    assert adaptive_gate(sr_s, sr_t, hr, margin=-1.0).tolist() == [1.0, 0.0, 1.0]


def test_gate_fraction_keeps_the_largest_advantages_that_pass_the_margin():
    advantage = torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0, 1.0])
    assert gate_from_advantage(advantage, 0.0, 1.0).tolist() == [True, False, True, True, False, True]
    assert gate_from_advantage(advantage, 0.0, 0.5).tolist() == [True, False, False, True, False, True]
    assert gate_from_advantage(advantage, 1.5, 0.5).tolist() == [True, False, False, True, False, False]
    assert gate_from_advantage(advantage, 0.0, 0.01).tolist() == [True, False, False, False, False, False]  # >= 1


def explicit_infonce(fs, ft, tau, negatives, weight=None, keep=None):
    """InfoNCE written out with loops in float64: anchor = student vector (b, p), positive = teacher (b, p)."""
    terms = []
    for s, t in zip(fs, ft):
        b, c, h, w = s.shape
        positions = list(range(h * w)) if keep is None else keep.tolist()
        s, t = s.double().flatten(2), t.double().flatten(2)
        total, count = 0.0, 0
        for i in range(b):
            for p in positions:
                sims = {}
                for j in range(b):
                    for q in positions:
                        if negatives == "other-images" and j == i and q != p:
                            continue
                        sims[(j, q)] = torch.nn.functional.cosine_similarity(s[i, :, p], t[j, :, q], dim=0).item() / tau
                lse = math.log(sum(math.exp(v) for v in sims.values()))
                wi = 1.0 if weight is None else float(weight[i])
                total += wi * (lse - sims[(i, p)])
                count += 1
        terms.append(total / count)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("negatives", ["other-images", "all-positions"])
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_facd_contrastive_is_infonce(negatives, impl):
    g = torch.Generator().manual_seed(1)
    fs = [torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    ft = [torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    weight = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    for w in (None, weight):
        got = facd_contrastive(fs, ft, tau=0.5, negatives=negatives, weight=w, impl=impl)
        assert got.item() == pytest.approx(explicit_infonce(fs, ft, 0.5, negatives, w), rel=1e-9, abs=1e-12)


def test_anchor_subset_draws_the_same_positions_in_every_patch():
    g = torch.Generator().manual_seed(2)
    fs = [torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)]
    ft = [torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)]
    got = facd_contrastive(fs, ft, tau=0.2, max_anchors=10, generator=torch.Generator().manual_seed(7), impl="naive")
    keep = torch.randperm(16, generator=torch.Generator().manual_seed(7))[:5]  # 10 anchors // 2 patches
    assert got.item() == pytest.approx(explicit_infonce(fs, ft, 0.2, "other-images", keep=keep), rel=1e-9)


def test_contrastive_gradient_reaches_the_student_only():
    s = torch.randn(2, 4, 3, 3, requires_grad=True)
    t = torch.randn(2, 4, 3, 3)
    facd_contrastive([s], [t], tau=0.1).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_one_patch_has_no_negatives_from_other_images():
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="at least 2 patches"):
        facd_contrastive([x], [x], tau=0.1)
    assert torch.isfinite(facd_contrastive([x], [x], tau=0.1, negatives="all-positions"))
