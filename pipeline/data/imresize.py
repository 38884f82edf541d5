"""MATLAB-exact bicubic resizing (`imresize(..., 'bicubic')`) and the one HR -> LR degradation.

The formulas are those of MATLAB's `imresize`: Keys cubic kernel (a = -0.5), widened by 1/scale when
shrinking (antialiasing), taps clamped to the image (replicate border), one 1-D pass per dimension.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

__all__ = ["bicubic_upscale", "degrade", "imresize", "modcrop"]


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop H and W down to multiples of `scale` (bottom/right rows and columns go)."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic kernel, a = -0.5, written as in MATLAB's imresize."""
    absx = np.abs(x)
    absx2 = absx**2
    absx3 = absx**3
    return (1.5 * absx3 - 2.5 * absx2 + 1) * (absx <= 1) + (-0.5 * absx3 + 2.5 * absx2 - 4 * absx + 2) * (
        (1 < absx) & (absx <= 2)
    )


@lru_cache(maxsize=16)
def _contributions(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), both (out_len, taps): output i = sum_t weights[i, t] * input[indices[i, t]]."""
    kernel_width = 4.0
    if scale < 1:  # antialiasing: stretch the kernel to 4/scale input pixels
        kernel_width = kernel_width / scale
    x = np.arange(1, out_len + 1, dtype=np.float64)[:, None]
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - kernel_width / 2)
    taps = math.ceil(kernel_width) + 2
    indices = left + np.arange(taps)
    if scale < 1:
        weights = scale * _cubic(scale * (u - indices))
    else:
        weights = _cubic(u - indices)
    weights = weights / weights.sum(axis=1, keepdims=True)
    indices = np.clip(indices, 1, in_len).astype(np.intp) - 1  # replicate border, 0-based
    weights.flags.writeable = False
    indices.flags.writeable = False
    return indices, weights


def _round_to_uint8(x: np.ndarray) -> np.ndarray:
    """Round half away from zero (MATLAB), then clip to [0, 255].

    `floor(x + 0.5)` would be wrong for x = 0.49999999999999994 (the sum rounds up to 1.0);
    x - floor(x) is exact, so compare the fraction instead. Negatives all clip to 0 anyway.
    """
    f = np.floor(x)
    return np.clip(f + (x - f >= 0.5), 0, 255).astype(np.uint8)


def _resize_axis(img: np.ndarray, axis: int, out_len: int, scale: float) -> np.ndarray:
    """One float64 1-D pass along `axis` (0 = rows/height, 1 = columns/width)."""
    indices, weights = _contributions(img.shape[axis], out_len, scale)
    w_shape = [1] * img.ndim
    w_shape[axis] = out_len
    out = np.zeros(img.shape[:axis] + (out_len,) + img.shape[axis + 1 :], dtype=np.float64)
    for t in range(indices.shape[1]):  # banded: per tap a gather and a multiply-add, never an out x in matrix
        out += weights[:, t].reshape(w_shape) * np.take(img, indices[:, t], axis=axis)
    return out


def imresize(
    img: np.ndarray, scale: float | None = None, output_shape: tuple[int, int] | None = None
) -> np.ndarray:
    """MATLAB `imresize(img, scale_or_size, 'bicubic')`, bit-exact.

    Give exactly one of `scale` (out_len = ceil(in_len * scale) per dimension) or `output_shape` (h, w)
    (per-dimension scale = out / in). `img` is (H, W) or (H, W, C). uint8 in -> uint8 out, rounded and
    clipped after each 1-D pass as MATLAB does; float in -> float64 out, unrounded. Like MATLAB, the
    dimension with the smaller scale is resized first (rows first when equal).
    """
    if (scale is None) == (output_shape is None):
        raise ValueError("give exactly one of scale and output_shape")
    if img.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) array, got shape {img.shape}")
    is_uint8 = img.dtype == np.uint8
    if not (is_uint8 or np.issubdtype(img.dtype, np.floating)):
        raise ValueError(f"expected uint8 or float input, got {img.dtype}")
    in_shape = img.shape[:2]
    if output_shape is not None:
        out_shape = (int(output_shape[0]), int(output_shape[1]))
        scales = (out_shape[0] / in_shape[0], out_shape[1] / in_shape[1])
    else:
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        scales = (float(scale), float(scale))
        out_shape = (math.ceil(in_shape[0] * scale), math.ceil(in_shape[1] * scale))
    if min(out_shape) < 1:
        raise ValueError(f"output shape {out_shape} is empty")

    out = img if is_uint8 else img.astype(np.float64)
    for axis in sorted((0, 1), key=lambda a: scales[a]):  # stable sort, as MATLAB's sort(scale)
        out = _resize_axis(out, axis, out_shape[axis], scales[axis])
        if is_uint8:
            out = _round_to_uint8(out)
    return out


def degrade(hr: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """The standard "BI" degradation: (modcrop(hr), MATLAB bicubic of it by 1/scale). uint8 in and out."""
    hr = modcrop(hr, scale)
    return hr, imresize(hr, 1 / scale)


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    """The bicubic baseline: MATLAB bicubic enlargement by `scale`."""
    return imresize(lr, scale)
