"""Evaluation of any runner over a dataset: per-image Y-PSNR / Y-SSIM (and RGB PSNR, labelled) as in the protocol;
the eval set and the validation split (training images held out of every training stage) as datasets."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.backends.base import BicubicRunner, Runner
from pipeline.backends.torch_runner import TorchRunner
from pipeline.config import Config
from pipeline.data.datasets import Pair, PairFolder, PairSets, train_and_validation
from pipeline.errors import UserError
from pipeline.metrics import SSIM_WINDOW, psnr_rgb, psnr_y, ssim_y
from pipeline.modelio import load_model


def check_size(pair: Pair, scale: int) -> None:
    """A UserError naming an image too small to score: SSIM needs its window after shaving `scale` per border."""
    h, w = pair.hr.shape[:2]
    if min(h, w) - 2 * scale < SSIM_WINDOW:
        side = SSIM_WINDOW + 2 * scale
        raise UserError(f"eval image {pair.name!r} is too small ({w}x{h} HR after mod-crop): scoring at x{scale} "
                        f"needs at least {side}x{side} ({SSIM_WINDOW}x{SSIM_WINDOW} for SSIM after shaving {scale} "
                        "pixels per border); remove it from the eval data")


def evaluate(runner: Runner, pairs: Collection[Pair], scale: int, progress: bool = True,
             outputs: list[np.ndarray] | None = None) -> list[dict[str, Any]]:
    """One row per image; the SR images are appended to `outputs` when it is given."""
    rows = []
    s = scale
    for pair in tqdm(pairs, total=len(pairs), desc=f"eval {runner.name}", unit="img", disable=not progress, leave=False):
        check_size(pair, s)
        sr = runner.infer(pair.lr)
        rows.append({"name": pair.name, "psnr_y": psnr_y(sr, pair.hr, s), "ssim_y": ssim_y(sr, pair.hr, s),
                     "psnr_rgb": psnr_rgb(sr, pair.hr, s)})
        if outputs is not None:
            outputs.append(sr)
    return rows


def mean_row(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("psnr_y", "ssim_y", "psnr_rgb")}


def eval_rows(runner: Runner, data: str | PairFolder | PairSets, scale: int, progress: bool = True) -> dict[str, Any]:
    pairs = PairFolder(data, scale) if isinstance(data, str) else data
    with runner:
        rows = evaluate(runner, pairs, scale, progress)
    return {"model": runner.name, "data": str(data), "scale": scale, "rows": rows, "mean": mean_row(rows)}


def validation_split(cfg: Config) -> PairSets:
    """The images held out of every training stage (`data.val_count` training images, then `data.val`): where
    hyperparameters are chosen."""
    val = train_and_validation(cfg.data.train, cfg.data.val_count, cfg.data.val, cfg.scale)[1]
    if not len(val):
        raise UserError("data.val_count is 0 and data.val is empty: there is no validation split to choose "
                        "hyperparameters on")
    return val


def eval_models(cfg: Config, models: dict[str, Path], progress: bool,
                data: str | PairFolder | PairSets | None = None) -> list[dict[str, Any]]:
    """Bicubic, then each named checkpoint, on `data` (default: the eval set)."""
    data = cfg.data.eval if data is None else data
    results = [eval_rows(BicubicRunner(cfg.scale), data, cfg.scale, progress)]
    for label, path in models.items():
        results.append(eval_rows(TorchRunner(load_model(path, cfg.scale)), data, cfg.scale, progress))
        results[-1]["model"] = label
    return results
