import logging

import numpy as np
import pytest
import torch

from pipeline.backends.base import BicubicRunner
from pipeline.data.datasets import PairFolder, PatchSampler
from pipeline.data.imageio import read_rgb, write_rgb
from pipeline.data.imresize import degrade
from pipeline.errors import UserError
from pipeline.evaluation.evaluate import evaluate, mean_row


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_embedded_sets_are_shipped():
    eval_set, eval7, train_set = (PairFolder(n, 4) for n in ("embedded", "embedded-eval7", "embedded-train"))
    assert len(eval_set) == 24
    assert all(read_rgb(f).shape == (360, 360, 3) for f in eval_set.hr_files)
    assert [f.stem for f in eval7.hr_files] == sorted(
        ["astronaut", "chelsea", "china", "coffee", "flower", "grace_hopper", "rocket"])
    assert len(train_set) == 15 and len(PairFolder("embedded-val", 4)) == 7
    assert all(read_rgb(f).shape == (512, 512, 3) for f in train_set.hr_files)


@pytest.mark.parametrize(("data", "count", "scale", "expected"), [
    ("embedded", 24, 2, 37.326), ("embedded", 24, 3, 34.194), ("embedded", 24, 4, 32.334),
    ("embedded-eval7", 7, 2, 31.404), ("embedded-eval7", 7, 3, 29.077), ("embedded-eval7", 7, 4, 27.811),
])
def test_bicubic_baseline_on_the_embedded_eval_sets(data, count, scale, expected):
    """The bicubic figures of both eval sets; the 7-photo set's are those of earlier releases, unchanged."""
    rows = evaluate(BicubicRunner(scale), PairFolder(data, scale), scale, progress=False)
    assert len(rows) == count
    assert mean_row(rows)["psnr_y"] == pytest.approx(expected, abs=0.01)


def test_hr_only_folder_makes_lr_by_the_protocol(tmp_path):
    hr = _img(50, 41)
    write_rgb(tmp_path / "a.png", hr)
    (pair,) = list(PairFolder(tmp_path, 4))
    want_hr, want_lr = degrade(hr, 4)
    assert pair.name == "a" and pair.hr.shape == (48, 40, 3)
    assert np.array_equal(pair.hr, want_hr) and np.array_equal(pair.lr, want_lr)


@pytest.mark.parametrize("lr_name", ["0001x3.png", "0001.png", "0001_x3.bmp", "0001_LRBI_x3.png"])
def test_paired_layout(tmp_path, lr_name):
    hr, lr = _img(31, 32), _img(10, 10, seed=1)
    write_rgb(tmp_path / "HR" / "0001.png", hr)
    write_rgb(tmp_path / "LR_bicubic" / "X3" / lr_name, lr)
    (pair,) = list(PairFolder(tmp_path, 3))
    assert np.array_equal(pair.lr, lr) and np.array_equal(pair.hr, hr[:30, :30])


def test_paired_layout_errors(tmp_path):
    write_rgb(tmp_path / "HR" / "0001.png", _img(32, 32))
    with pytest.raises(UserError, match="no LR_bicubic/X4/"):
        PairFolder(tmp_path, 4)
    write_rgb(tmp_path / "LR_bicubic" / "X4" / "0002x4.png", _img(8, 8))
    with pytest.raises(UserError, match="no LR image for 0001.png"):
        list(PairFolder(tmp_path, 4))
    write_rgb(tmp_path / "LR_bicubic" / "X4" / "0001x4.png", _img(7, 8))
    with pytest.raises(UserError, match="LR size 8x7 times 4 does not match"):
        list(PairFolder(tmp_path, 4))


def test_missing_empty_and_bad_scale(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        PairFolder(tmp_path / "nope", 4)
    with pytest.raises(UserError):
        PairFolder(tmp_path, 4)  # no images
    with pytest.raises(UserError, match="scale must be one of 2, 3, 4"):
        PairFolder("embedded", 5)


def _blocky_pairs(scale, sizes):
    """HR = nearest-neighbour upscaling of LR, a relation every flip and rotation preserves."""
    pairs = []
    for i, (h, w) in enumerate(sizes):
        lr = _img(h, w, seed=i)
        pairs.append(type("P", (), {"name": f"im{i}", "lr": lr,
                                    "hr": lr.repeat(scale, 0).repeat(scale, 1)})())
    return pairs


def test_patches_are_aligned_and_deterministic():
    sampler = PatchSampler(_blocky_pairs(3, [(20, 30), (25, 17)]), lr_patch=8, scale=3)
    lr, hr = sampler.sample(32, torch.Generator().manual_seed(5))
    assert lr.shape == (32, 3, 8, 8) and hr.shape == (32, 3, 24, 24)
    assert lr.dtype == torch.float32 and 0 <= lr.min() and lr.max() <= 1
    assert torch.equal(hr, lr.repeat_interleave(3, 2).repeat_interleave(3, 3))
    lr2, hr2 = sampler.sample(32, torch.Generator().manual_seed(5))
    assert torch.equal(lr, lr2) and torch.equal(hr, hr2)
    lr3, _ = sampler.sample(32, torch.Generator().manual_seed(6))
    assert not torch.equal(lr, lr3)


def test_augmentations_cover_the_eight_symmetries():
    pairs = _blocky_pairs(2, [(4, 4)])
    sampler = PatchSampler(pairs, lr_patch=4, scale=2)
    lr, _ = sampler.sample(200, torch.Generator().manual_seed(0))
    assert len({tuple(x.flatten().tolist()) for x in lr}) == 8


def test_small_images_are_skipped_with_a_warning(caplog):
    pairs = _blocky_pairs(2, [(20, 20), (5, 30)])
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        sampler = PatchSampler(pairs, lr_patch=8, scale=2)
    assert len(sampler) == 1 and "im1" in caplog.text
    with pytest.raises(UserError, match="no training image is at least a 24x24 LR patch"):
        PatchSampler(pairs, lr_patch=24, scale=2)
