"""The standard SR metrics: PSNR and SSIM on the Y channel (BT.601 studio swing), as papers report them.

All metrics take uint8 images, so a model's float output goes through `to_uint8` first, exactly as the
published evaluation scripts quantise it. Grey (H, W) images are replicated to 3 channels first.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["psnr_rgb", "psnr_y", "rgb_to_y", "ssim_y", "to_uint8"]

SSIM_WINDOW = 11  # side of the Gaussian window: an image must be at least this large after shaving
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966])  # BT.601 for R, G, B in [0, 1]; Y in [16, 235]


def to_uint8(x: Any) -> np.ndarray:
    """Float image in [0, 1] -> (H, W, 3) uint8: clamp, round(x * 255).

    Accepts a numpy (H, W, 3) array or a torch (3, H, W) / (1, 3, H, W) tensor.
    """
    if hasattr(x, "detach"):  # a torch tensor; torch is not imported here
        t = x.detach().cpu().double()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) or (1, 3, H, W) tensor, got shape {tuple(x.shape)}")
        x = t.numpy().transpose(1, 2, 0)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) array, got shape {x.shape}")
    return np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> float64 (H, W) Y = 16 + 65.481 R + 128.553 G + 24.966 B (R, G, B in [0, 1]); not rounded."""
    return 16.0 + img.astype(np.float64) @ _Y_WEIGHTS / 255.0


def _prepare(sr: np.ndarray, hr: np.ndarray, shave: int) -> tuple[np.ndarray, np.ndarray]:
    """Check a pair, replicate grey to RGB, shave `shave` pixels from every border."""
    for name, img in (("sr", sr), ("hr", hr)):
        if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
            raise ValueError(f"{name} must be uint8 (H, W, 3) or (H, W), got {img.dtype} {img.shape}")
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr differ in shape: {sr.shape} vs {hr.shape}")
    if sr.ndim == 2:
        sr, hr = np.repeat(sr[:, :, None], 3, axis=2), np.repeat(hr[:, :, None], 3, axis=2)
    h, w = sr.shape[:2]
    if shave < 0 or 2 * shave >= min(h, w):
        raise ValueError(f"cannot shave {shave} pixels from every border of a {h}x{w} image")
    crop = (slice(shave, h - shave), slice(shave, w - shave))
    return sr[crop], hr[crop]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def psnr_y(sr: np.ndarray, hr: np.ndarray, shave: int) -> float:
    """PSNR (dB) on Y, float64, after shaving `shave` pixels per border. Identical images: inf."""
    sr, hr = _prepare(sr, hr, shave)
    return _psnr(rgb_to_y(sr), rgb_to_y(hr))


def psnr_rgb(sr: np.ndarray, hr: np.ndarray, shave: int) -> float:
    """PSNR (dB) over all three RGB channels (what training logs often show; about 2 dB below Y). Identical: inf."""
    sr, hr = _prepare(sr, hr, shave)
    return _psnr(sr.astype(np.float64), hr.astype(np.float64))


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = 1.5) -> np.ndarray:
    """1-D normalised Gaussian; its outer product with itself is MATLAB's fspecial('gaussian', 11, 1.5)."""
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of a 2-D array with the symmetric 1-D window `g` on both axes."""
    n = len(g)
    h, w = img.shape
    rows = sum(g[k] * img[k : h - n + 1 + k, :] for k in range(n))
    return sum(g[k] * rows[:, k : w - n + 1 + k] for k in range(n))


def ssim_y(sr: np.ndarray, hr: np.ndarray, shave: int) -> float:
    """SSIM on Y (Wang et al.): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, L 255, 'valid', mean of the map."""
    sr, hr = _prepare(sr, hr, shave)
    x, y = rgb_to_y(sr), rgb_to_y(hr)
    g = _gaussian_window()
    if min(x.shape) < len(g):
        raise ValueError(f"SSIM needs at least {len(g)}x{len(g)} pixels after shaving, got {x.shape}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
    var_x = _filter_valid(x * x, g) - mu_x**2  # population (co)variances: E[xy] - E[x]E[y]
    var_y = _filter_valid(y * y, g) - mu_y**2
    cov = _filter_valid(x * y, g) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())
