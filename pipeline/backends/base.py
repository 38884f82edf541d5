"""The runner interface: LR uint8 RGB in, SR uint8 RGB out, for every backend.

A runner is a context manager: `activate` allocates (sessions, buffers), `forward` runs a float batch,
`deactivate` frees, so only one heavy backend is alive at a time. `infer` (one image) and `infer_many` (a list,
batched by size) are shared: they cut an image into overlapping tiles when it is larger than the backend takes in
one piece (`max_lr_hw`, e.g. a TensorRT profile) or than `tile` asks for, and blend the tiles back seamlessly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pipeline.config import parse_size
from pipeline.data.imresize import bicubic_upscale
from pipeline.errors import UserError
from pipeline.metrics import to_uint8


class Runner:
    name = "runner"
    backend = "runner"
    precision = "fp32"

    def __init__(self, scale: int, *, batch: int = 1, tile: int = 0, overlap: int = 32,
                 max_lr_hw: tuple[int, int] | None = None):
        """`tile`: LR tile side (0 = whole images where `max_lr_hw` allows); `overlap`: LR pixels shared by
        neighbouring tiles (the outer quarter of it is discarded, the middle half cross-faded)."""
        if tile < 0 or overlap < 0 or batch < 1:
            raise ValueError(f"tile and overlap must be >= 0 and batch >= 1, got {tile}, {overlap}, {batch}")
        if tile and tile <= overlap:
            raise ValueError(f"tile ({tile}) must be larger than overlap ({overlap})")
        self.scale, self.batch, self.tile, self.overlap, self.max_lr_hw = scale, batch, tile, overlap, max_lr_hw

    def activate(self) -> None:
        pass

    def deactivate(self) -> None:
        pass

    def forward(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, 3, h, w) in [0, 1] -> float32 (N, 3, h*s, w*s), not clamped."""
        raise NotImplementedError

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def infer(self, lr: np.ndarray) -> np.ndarray:
        """(h, w, 3) uint8 RGB -> (h*s, w*s, 3) uint8 RGB."""
        return self.infer_many([lr])[0]

    def infer_many(self, lrs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Images of equal size (untiled) go through `forward` together, `batch` at a time."""
        out: list[np.ndarray | None] = [None] * len(lrs)
        whole: dict[tuple[int, ...], list[int]] = {}
        for i, lr in enumerate(lrs):
            if lr.dtype != np.uint8 or lr.ndim != 3 or lr.shape[2] != 3:
                raise ValueError(f"expected an (h, w, 3) uint8 RGB image, got {lr.dtype} {lr.shape}")
            tiles = self._tile_grid(lr.shape[:2])
            if tiles is None:
                whole.setdefault(lr.shape, []).append(i)
            else:
                out[i] = self._infer_tiled(lr, *tiles)
        for group in whole.values():
            for start in range(0, len(group), self.batch):
                idx = group[start:start + self.batch]
                sr = self._forward_checked(np.stack([_to_chw(lrs[i]) for i in idx]))
                for i, img in zip(idx, sr):
                    out[i] = to_uint8(img.transpose(1, 2, 0))
        return out  # type: ignore[return-value]

    def _forward_checked(self, x: np.ndarray) -> np.ndarray:
        """`forward`, refusing an output that is not `scale` times the input (a model file whose metadata lies)."""
        sr = self.forward(x)
        n, _, h, w = x.shape
        s = self.scale
        if sr.shape != (n, 3, h * s, w * s):
            raise UserError(f"{self.name} gives {'x'.join(map(str, sr.shape))} for an input of {n}x3x{h}x{w}, not the "
                            f"x{s} ({n}x3x{h * s}x{w * s}) that its scale says: the model is not what it claims")
        return sr

    def _tile_grid(self, hw: tuple[int, int]) -> tuple[list[int], list[int], int, int] | None:
        """Tile origins along y and x and the tile size, or None when the image goes through whole."""
        h, w = hw
        th, tw = (self.tile, self.tile) if self.tile else (h, w)
        if self.max_lr_hw is not None:
            th, tw = min(th, self.max_lr_hw[0]), min(tw, self.max_lr_hw[1])
        th, tw = min(th, h), min(tw, w)
        if (th, tw) == (h, w):
            return None
        if min(th, tw) <= self.overlap:
            raise ValueError(f"tiles of {tw}x{th} are too small for an overlap of {self.overlap} LR pixels")
        return _origins(h, th, self.overlap), _origins(w, tw, self.overlap), th, tw

    def _infer_tiled(self, lr: np.ndarray, ys: list[int], xs: list[int], th: int, tw: int) -> np.ndarray:
        s, h, w = self.scale, lr.shape[0], lr.shape[1]
        acc = np.zeros((3, h * s, w * s), np.float64)
        weight = np.zeros((h * s, w * s), np.float64)
        origins = [(y, x) for y in ys for x in xs]
        for start in range(0, len(origins), self.batch):
            chunk = origins[start:start + self.batch]
            sr = self._forward_checked(np.stack([_to_chw(lr[y:y + th, x:x + tw]) for y, x in chunk]))
            for (y, x), tile in zip(chunk, sr):
                wy = _ramp(th * s, self.overlap * s, y > 0, y + th < h)
                wx = _ramp(tw * s, self.overlap * s, x > 0, x + tw < w)
                wt = np.outer(wy, wx)
                acc[:, y * s:(y + th) * s, x * s:(x + tw) * s] += tile * wt
                weight[y * s:(y + th) * s, x * s:(x + tw) * s] += wt
        return to_uint8((acc / weight).transpose(1, 2, 0))


def _to_chw(img: np.ndarray) -> np.ndarray:
    return img.transpose(2, 0, 1).astype(np.float32) / 255


def _origins(size: int, tile: int, overlap: int) -> list[int]:
    """Tile starts covering [0, size) with neighbours overlapping by at least `overlap`; the last one ends at `size`."""
    step = tile - overlap
    starts = list(range(0, size - tile, step)) + [size - tile]
    return sorted(set(starts))


def _ramp(n: int, overlap: int, fade_start: bool, fade_end: bool) -> np.ndarray:
    """Blend weights along one tile side: 0 in the outer quarter of the overlap (the part a tile border corrupts),
    a linear cross-fade over the middle half, 1 elsewhere and along image borders. Opposite ramps sum to 1."""
    d = np.arange(n) + 0.5
    w = np.ones(n)
    q = overlap / 4
    if fade_start:
        w = np.minimum(w, np.clip((d - q) / (2 * q), 0, 1))
    if fade_end:
        w = np.minimum(w, np.clip((n - d - q) / (2 * q), 0, 1))
    return w


def call_times_ms(call: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Wall times (ms) of `repeats` calls of `call`, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def latency(runner: Runner, size: str, warmup: int, repeats: int) -> dict[str, Any]:
    """p50/p95 of one call on a float32 batch of 1 at LR `size` (WxH), host to host, after `warmup` calls."""
    h, w = parse_size(size)
    limit = runner.max_lr_hw
    if limit is not None and (h > limit[0] or w > limit[1]):
        return {"lr_size": size, "skipped": f"above the plan's profile maximum {limit[1]}x{limit[0]}"}
    x = np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32)
    times = call_times_ms(lambda: runner.forward(x), warmup, repeats)
    p50, p95 = float(np.percentile(times, 50)), float(np.percentile(times, 95))
    result = {"lr_size": size, "p50_ms": p50, "p95_ms": p95, "images_per_s": 1e3 / p50}
    if hasattr(runner, "gpu_times_ms"):  # TensorRT: also the engine alone, between CUDA events
        result["gpu_p50_ms"] = float(np.percentile(runner.gpu_times_ms(x, repeats), 50))
    return result


class BicubicRunner(Runner):
    """The baseline every table starts with: MATLAB-exact bicubic upscaling."""

    name = backend = "bicubic"

    def infer_many(self, lrs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [bicubic_upscale(lr, self.scale) for lr in lrs]
