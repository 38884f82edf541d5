"""Metrics against RCAN's published MATLAB evaluation and against values computed by hand; folder scoring."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import UserError
from pipeline.metrics import psnr_rgb, psnr_y, rgb_to_y, ssim_y, to_uint8
from pipeline.evaluation.score import format_table, match_pairs, score_folders

SET5 = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "set5"
needs_set5 = pytest.mark.skipif(not SET5.is_dir(), reason=f"Set5 fixture not found at {SET5} (shared/ beside the checkout)")

# RCAN's PSNR_SSIM_Results_BI_model.txt (MATLAB), copied from the fixture's README.
RCAN = {
    2: {"baby": (38.979958, 0.968184), "bird": (43.639850, 0.990903), "butterfly": (36.058756, 0.980312),
        "head": (36.075233, 0.892380), "woman": (36.617042, 0.975444), "mean": (38.274168, 0.961445)},
    3: {"baby": (35.803059, 0.931255), "bird": (38.794508, 0.974730), "butterfly": (31.812360, 0.956393),
        "head": (34.238129, 0.839170), "woman": (33.062721, 0.947882), "mean": (34.742155, 0.929886)},
    4: {"baby": (33.948246, 0.896239), "bird": (35.904838, 0.951746), "butterfly": (29.359312, 0.934269),
        "head": (33.010323, 0.799064), "woman": (30.945093, 0.919886), "mean": (32.633562, 0.900241)},
}  # fmt: skip


@needs_set5
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_score_folders_reproduces_rcan_table(scale):
    rows = score_folders(SET5 / "sr_rcan" / f"x{scale}", SET5 / "hr", scale)
    expected = RCAN[scale]
    assert [r["name"] for r in rows] == ["baby", "bird", "butterfly", "head", "woman"]
    for r in rows:
        assert r["psnr_y"] == pytest.approx(expected[r["name"]][0], abs=1e-4), r["name"]
        assert r["ssim_y"] == pytest.approx(expected[r["name"]][1], abs=1e-5), r["name"]
        assert r["psnr_rgb"] < r["psnr_y"] - 0.5  # RGB PSNR is a different, lower number
    assert np.mean([r["psnr_y"] for r in rows]) == pytest.approx(expected["mean"][0], abs=1e-4)
    assert np.mean([r["ssim_y"] for r in rows]) == pytest.approx(expected["mean"][1], abs=1e-5)


# ---- known values ------------------------------------------------------------------------------------------


def _grey(seed=0, shape=(32, 40)):
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)  # <= 254, so +1 cannot overflow


def test_rgb_to_y_known_values():
    img = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 0, 255]]], dtype=np.uint8)
    np.testing.assert_allclose(rgb_to_y(img), [[16, 235, 16 + 65.481, 16 + 24.966]], rtol=0, atol=1e-12)


def test_psnr_of_one_grey_level_offset():
    hr = _grey()
    sr = hr + 1  # grey: each channel +1, so Y moves by (65.481 + 128.553 + 24.966) / 255 = 219 / 255
    assert psnr_y(sr, hr, 0) == pytest.approx(20 * math.log10(255 / (219 / 255)), abs=1e-9)
    assert psnr_rgb(sr, hr, 0) == pytest.approx(20 * math.log10(255), abs=1e-9)


def test_psnr_of_red_channel_offset():
    hr = np.random.default_rng(1).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    sr = hr.copy()
    sr[:, :, 0] += 1  # Y moves by 65.481 / 255; the RGB MSE is 1/3
    assert psnr_y(sr, hr, 0) == pytest.approx(20 * math.log10(255 / (65.481 / 255)), abs=1e-9)
    assert psnr_rgb(sr, hr, 0) == pytest.approx(10 * math.log10(255**2 * 3), abs=1e-9)


def test_shave_removes_the_border():
    hr = _grey(2)
    sr = hr.copy()
    sr[:2, :] += 1
    sr[:, -2:] += 1
    assert psnr_y(sr, hr, 2) == math.inf  # identical once 2 pixels are shaved: documented as inf
    assert math.isfinite(psnr_y(sr, hr, 1))


def test_ssim_identical_is_one_and_different_is_less():
    hr = np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    assert ssim_y(hr, hr, 4) == pytest.approx(1.0, abs=1e-12)
    noisy = np.clip(hr + np.random.default_rng(4).integers(-20, 21, hr.shape), 0, 255).astype(np.uint8)
    assert ssim_y(noisy, hr, 4) < 0.99


def test_ssim_of_two_constant_images():
    # No variance anywhere, so SSIM = (2 a b + C1) / (a^2 + b^2 + C1) with a, b the two Y values.
    a, b = 16 + 219 * 100 / 255, 16 + 219 * 110 / 255
    c1 = (0.01 * 255) ** 2
    sr, hr = np.full((30, 30), 100, np.uint8), np.full((30, 30), 110, np.uint8)
    assert ssim_y(sr, hr, 0) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-12)


def test_ssim_matches_direct_windowed_computation():
    hr = np.random.default_rng(5).integers(0, 256, (24, 29, 3), dtype=np.uint8)
    sr = np.clip(hr + np.random.default_rng(6).integers(-30, 31, hr.shape), 0, 255).astype(np.uint8)
    x, y = rgb_to_y(sr[2:-2, 2:-2]), rgb_to_y(hr[2:-2, 2:-2])
    r = np.arange(11) - 5
    win = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    win /= win.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (win * px).sum(), (win * py).sum()
            vx, vy = (win * (px - mx) ** 2).sum(), (win * (py - my) ** 2).sum()
            cov = (win * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    assert ssim_y(sr, hr, 2) == pytest.approx(np.mean(values), abs=1e-10)


def test_metrics_refuse_bad_inputs():
    a = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="shape"):
        psnr_y(a, np.zeros((16, 17, 3), np.uint8), 0)
    with pytest.raises(ValueError, match="uint8"):
        ssim_y(a.astype(np.float32), a, 0)


def test_to_uint8_clamps_and_rounds():
    x = np.array([[[-0.2, 0.0, 0.5], [0.3 / 255, 0.6 / 255, 1.3]]])
    np.testing.assert_array_equal(to_uint8(x), [[[0, 0, 128], [0, 1, 255]]])


def test_to_uint8_accepts_torch_chw():
    torch = pytest.importorskip("torch")
    hwc = np.random.default_rng(7).random((5, 6, 3))
    t = torch.from_numpy(hwc.transpose(2, 0, 1)).float()[None]
    expected = np.round(hwc.astype(np.float32).astype(np.float64) * 255).astype(np.uint8)
    np.testing.assert_array_equal(to_uint8(t), expected)
    np.testing.assert_array_equal(to_uint8(t[0]), expected)


# ---- pairing and folders -----------------------------------------------------------------------------------


def _write(folder: Path, names, size=(8, 8)):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", size, (10, 20, 30)).save(folder / n)


def test_match_pairs_rule(tmp_path):
    _write(tmp_path / "hr", ["baby.png", "bird.bmp", "img.png", "img_01.png", "woman.png"])
    _write(tmp_path / "sr", ["baby_RCAN_x4.png", "bird_x4.png", "img_x4.png", "img_01_SR.png", "woman.png"])
    pairs = {hr.name: sr.name for sr, hr in match_pairs(tmp_path / "sr", tmp_path / "hr")}
    assert pairs == {
        "baby.png": "baby_RCAN_x4.png",
        "bird.bmp": "bird_x4.png",
        "img.png": "img_x4.png",
        "img_01.png": "img_01_SR.png",  # the longest HR stem wins
        "woman.png": "woman.png",
    }


def test_match_pairs_lists_every_unmatched_file(tmp_path):
    _write(tmp_path / "hr", ["baby.png", "bird.png", "head.png"])
    _write(tmp_path / "sr", ["baby_x2.png", "babyx2.png", "zebra_x2.png"])
    with pytest.raises(UserError) as e:
        match_pairs(tmp_path / "sr", tmp_path / "hr")
    msg = str(e.value)
    for name in ["babyx2.png", "zebra_x2.png", "bird.png", "head.png"]:
        assert name in msg
    assert "baby.png" not in msg


def test_match_pairs_refuses_two_sr_for_one_hr(tmp_path):
    _write(tmp_path / "hr", ["baby.png"])
    _write(tmp_path / "sr", ["baby_x2.png", "baby_x4.png"])
    with pytest.raises(UserError, match="baby_x2.png, baby_x4.png"):
        match_pairs(tmp_path / "sr", tmp_path / "hr")


def test_score_folders_mod_crops_hr_and_reports_size_mismatch(tmp_path):
    _write(tmp_path / "hr", ["a.png"], size=(42, 35))  # W x H; mod-crop x4 -> 40 x 32
    _write(tmp_path / "sr_ok", ["a_x4.png"], size=(40, 32))
    rows = score_folders(tmp_path / "sr_ok", tmp_path / "hr", 4)
    assert [r["name"] for r in rows] == ["a"] and rows[0]["psnr_y"] == math.inf
    _write(tmp_path / "sr_bad", ["a_x4.png"], size=(42, 35))
    with pytest.raises(UserError, match=r"a_x4\.png.*42x35.*40x32"):
        score_folders(tmp_path / "sr_bad", tmp_path / "hr", 4)


def test_score_folders_refuses_images_too_small_for_ssim(tmp_path):
    _write(tmp_path / "hr", ["a.png"], size=(18, 18))  # 10 x 10 left after shaving 4
    _write(tmp_path / "sr", ["a.png"], size=(16, 16))
    with pytest.raises(UserError, match="a.png is too small"):
        score_folders(tmp_path / "sr", tmp_path / "hr", 4)


def test_format_table():
    rows = [
        {"name": "baby", "psnr_y": 30.0, "ssim_y": 0.9, "psnr_rgb": 28.0},
        {"name": "butterfly", "psnr_y": 33.0, "ssim_y": 0.8, "psnr_rgb": 29.5},
    ]
    text = format_table(rows, "Set5 x4")
    lines = text.splitlines()
    assert lines[0] == "Set5 x4"
    for label in ("PSNR-Y (dB)", "SSIM-Y", "PSNR-RGB (dB)"):
        assert label in lines[1]
    assert len({len(line) for line in lines[1:]}) == 1  # aligned
    mean = re.split(r"\s+", lines[-1])
    assert mean[0] == "mean" and [float(v) for v in mean[1:]] == [31.5, 0.85, 28.75]
