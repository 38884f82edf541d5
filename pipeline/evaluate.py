"""Evaluation of any runner over a dataset: per-image Y-PSNR / Y-SSIM (and RGB PSNR, labelled) as in the protocol."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.backends.base import Runner
from pipeline.data.datasets import Pair
from pipeline.metrics import psnr_rgb, psnr_y, ssim_y


def evaluate(runner: Runner, pairs: Collection[Pair], scale: int, progress: bool = True,
             outputs: list[np.ndarray] | None = None) -> list[dict[str, Any]]:
    """One row per image; the SR images are appended to `outputs` when it is given."""
    rows = []
    s = scale
    for pair in tqdm(pairs, total=len(pairs), desc=f"eval {runner.name}", unit="img", disable=not progress, leave=False):
        sr = runner.infer(pair.lr)
        rows.append({"name": pair.name, "psnr_y": psnr_y(sr, pair.hr, s), "ssim_y": ssim_y(sr, pair.hr, s),
                     "psnr_rgb": psnr_rgb(sr, pair.hr, s)})
        if outputs is not None:
            outputs.append(sr)
    return rows


def mean_row(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("psnr_y", "ssim_y", "psnr_rgb")}
