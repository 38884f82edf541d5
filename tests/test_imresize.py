"""imresize against MATLAB's own output (the Set5 fixture) and against a slow dense oracle written from the formula."""

import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.imageio import read_rgb
from pipeline.data.imresize import bicubic_upscale, degrade, imresize, modcrop
from pipeline.data.degrade import degrade_folder
from pipeline.errors import UserError
from pipeline.metrics import psnr_y

SET5 = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "set5"
needs_set5 = pytest.mark.skipif(not SET5.is_dir(), reason=f"Set5 fixture not found at {SET5} (shared/ beside the checkout)")
NAMES = ["baby", "bird", "butterfly", "head", "woman"]


# ---- the oracle: MATLAB's definition, evaluated pixel by pixel as a dense matrix -------------------------------


def keys_cubic(x: float) -> float:
    x = abs(x)
    if x <= 1:
        return 1.5 * x**3 - 2.5 * x**2 + 1
    if x <= 2:
        return -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2
    return 0.0


def dense_matrix(in_len: int, out_len: int, scale: float) -> np.ndarray:
    """M (out_len x in_len): every integer j within the kernel's support contributes; j outside 1..in_len is
    replaced by the nearest border pixel; each output's weights are normalised to sum to 1."""
    m = np.zeros((out_len, in_len))
    stretch = min(scale, 1.0)  # antialiasing when shrinking: kernel k(stretch * d) * stretch, support 2 / stretch
    for i in range(out_len):
        u = (i + 1) / scale + 0.5 * (1 - 1 / scale)
        support = 2 / stretch
        row = {}
        for j in range(math.floor(u - support) - 1, math.ceil(u + support) + 2):
            w = stretch * keys_cubic(stretch * (u - j))
            if w != 0:
                row[j] = w
        total = sum(row.values())
        for j, w in row.items():
            m[i, min(max(j, 1), in_len) - 1] += w / total
    return m


def oracle(img: np.ndarray, out_shape: tuple[int, int], scales: tuple[float, float], uint8: bool) -> np.ndarray:
    """Dense resize; MATLAB resizes the dimension with the smaller scale first (rows first on a tie)."""
    x = img.astype(np.float64)
    for axis in ([0, 1] if scales[0] <= scales[1] else [1, 0]):
        m = dense_matrix(x.shape[axis], out_shape[axis], scales[axis])
        x = np.moveaxis(np.tensordot(m, np.moveaxis(x, axis, 0), axes=1), 0, axis)
        if uint8:
            x = np.clip(np.floor(x + 0.5), 0, 255)  # MATLAB round: half away from zero (negatives clip to 0)
    return x.astype(np.uint8) if uint8 else x


CASES = [  # (input shape, scale, output_shape)
    ((17, 23), 0.25, None),
    ((16, 12, 3), 0.5, None),
    ((15, 21, 3), 1 / 3, None),
    ((13, 11), 0.37, None),
    ((9, 7, 3), 2, None),
    ((6, 8), 3, None),
    ((7, 5, 2), 1.7, None),
    ((11, 9, 3), None, (7, 13)),  # rows shrink, columns enlarge: rows (the smaller scale) first
    ((8, 14), None, (19, 6)),  # columns shrink: columns first
    ((10, 10), None, (10, 10)),
]


def _expected_shape_and_scales(shape, scale, output_shape):
    if output_shape is None:
        return (math.ceil(shape[0] * scale), math.ceil(shape[1] * scale)), (scale, scale)
    return output_shape, (output_shape[0] / shape[0], output_shape[1] / shape[1])


@pytest.mark.parametrize("shape, scale, output_shape", CASES)
def test_float_path_matches_dense_oracle(shape, scale, output_shape):
    img = np.random.default_rng(0).random(shape) * 255
    out_shape, scales = _expected_shape_and_scales(shape, scale, output_shape)
    got = imresize(img, scale=scale, output_shape=output_shape)
    assert got.dtype == np.float64
    assert got.shape == out_shape + shape[2:]
    np.testing.assert_allclose(got, oracle(img, out_shape, scales, uint8=False), rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape, scale, output_shape", CASES)
def test_uint8_path_rounds_after_each_pass(shape, scale, output_shape):
    img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    out_shape, scales = _expected_shape_and_scales(shape, scale, output_shape)
    got = imresize(img, scale=scale, output_shape=output_shape)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, oracle(img, out_shape, scales, uint8=True))


def test_uint8_rounds_exact_halves_away_from_zero():
    # Enlarging x2 uses weights that are multiples of 1/128, so outputs of integer inputs are exact and often
    # exactly k + 0.5: MATLAB rounds those up, numpy's round-half-even would not. The (N, 1) image makes the
    # column pass an exact identity (scale 1), so one rounding is all there is.
    col = np.random.default_rng(2).integers(0, 256, (5000, 1), dtype=np.uint8)
    exact = imresize(col.astype(np.float64), output_shape=(10000, 1))
    halves = exact - np.floor(exact) == 0.5
    assert halves.sum() > 0
    np.testing.assert_array_equal(imresize(col, output_shape=(10000, 1)), np.clip(np.floor(exact + 0.5), 0, 255))


@pytest.mark.parametrize("scale", [0.25, 0.5, 1 / 3, 2, 3])
def test_constant_image_stays_constant(scale):
    img = np.full((12, 18, 3), 77, dtype=np.uint8)
    assert (imresize(img, scale) == 77).all()
    np.testing.assert_allclose(imresize(img.astype(np.float32), scale), 77.0, rtol=0, atol=1e-12)


def test_3d_equals_each_channel_in_2d():
    img = np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = imresize(img, 0.25)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], imresize(img[:, :, c], 0.25))


def test_modcrop_keeps_top_left_multiples():
    img = np.arange(10 * 13 * 3).reshape(10, 13, 3)
    assert modcrop(img, 4).shape == (8, 12, 3)
    assert modcrop(img, 3).shape == (9, 12, 3)
    assert modcrop(img[:, :, 0], 2).shape == (10, 12)
    np.testing.assert_array_equal(modcrop(img, 4), img[:8, :12])


def test_degrade_crops_then_shrinks():
    hr = np.random.default_rng(4).integers(0, 256, (50, 37, 3), dtype=np.uint8)
    cropped, lr = degrade(hr, 4)
    assert cropped.shape == (48, 36, 3) and lr.shape == (12, 9, 3)
    np.testing.assert_array_equal(lr, imresize(hr[:48, :36], 0.25))


def test_bad_arguments():
    img = np.zeros((8, 8), dtype=np.uint8)
    with pytest.raises(ValueError):
        imresize(img)
    with pytest.raises(ValueError):
        imresize(img, 0.5, output_shape=(4, 4))
    with pytest.raises(ValueError):
        imresize(img.astype(np.int32), 0.5)


# ---- against MATLAB itself ---------------------------------------------------------------------------------


@needs_set5
@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("name", NAMES)
def test_degrade_reproduces_matlab_lr_exactly(name, scale):
    _, lr = degrade(read_rgb(SET5 / "hr" / f"{name}.bmp"), scale)
    matlab = read_rgb(SET5 / "lr_matlab_bicubic" / f"x{scale}" / f"{name}_LRBI_x{scale}.png")
    assert lr.shape == matlab.shape
    assert int((lr != matlab).sum()) == 0


@needs_set5
@pytest.mark.parametrize("scale, expected", [(2, 33.674), (3, 30.405), (4, 28.430)])
def test_bicubic_baseline_on_set5(scale, expected):
    # Set5 bicubic baseline (MATLAB LR, bicubic upscaling), from the protocol notes, given to 3 decimals.
    values = []
    for name in NAMES:
        hr = modcrop(read_rgb(SET5 / "hr" / f"{name}.bmp"), scale)
        lr = read_rgb(SET5 / "lr_matlab_bicubic" / f"x{scale}" / f"{name}_LRBI_x{scale}.png")
        values.append(psnr_y(bicubic_upscale(lr, scale), hr, scale))
    assert np.mean(values) == pytest.approx(expected, abs=6e-4)


@needs_set5
def test_degrade_folder_writes_matlab_lr(tmp_path):
    written = degrade_folder(SET5 / "hr", 3, tmp_path / "lr")
    assert [p.name for p in written] == [f"{n}.png" for n in NAMES]
    for name in NAMES:
        matlab = read_rgb(SET5 / "lr_matlab_bicubic" / "x3" / f"{name}_LRBI_x3.png")
        np.testing.assert_array_equal(read_rgb(tmp_path / "lr" / f"{name}.png"), matlab)


def test_degrade_folder_refuses_bad_scale_and_same_folder(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match="scale"):
        degrade_folder(tmp_path, 5, tmp_path / "out")
    with pytest.raises(UserError, match="differ"):
        degrade_folder(tmp_path, 2, tmp_path)
