"""Score a folder of super-resolved images against their HR originals (PSNR/SSIM on Y, PSNR on RGB)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.data.imageio import list_images, read_rgb
from pipeline.data.imresize import modcrop
from pipeline.data.degrade import SCALES
from pipeline.errors import UserError
from pipeline.metrics import SSIM_WINDOW, psnr_rgb, psnr_y, ssim_y

__all__ = ["format_table", "match_pairs", "score_folders"]

_COLUMNS = (("psnr_y", "PSNR-Y (dB)"), ("ssim_y", "SSIM-Y"), ("psnr_rgb", "PSNR-RGB (dB)"))


def _hr_stem_for(sr_stem: str, hr_stems: set[str]) -> str | None:
    """The HR stem an SR stem belongs to: itself, else the longest prefix that ends before a `_`.

    "baby_RCAN_x4" tries "baby_RCAN_x4", "baby_RCAN", then "baby"; so with HR stems "img" and "img_01",
    "img_01_x4" matches "img_01".
    """
    stem = sr_stem
    while True:
        if stem in hr_stems:
            return stem
        if "_" not in stem:
            return None
        stem = stem.rsplit("_", 1)[0]


def match_pairs(sr_dir: str | os.PathLike, hr_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """Pair every SR image with its HR image by file stem, sorted by HR name; see `_hr_stem_for` for the rule.

    An SR stem matches an HR stem if it is equal or is the HR stem plus a `_<anything>` suffix
    (`baby_RCAN_x4`, `baby_x4`, `baby_SR` all match `baby`). Any HR image without an SR image, SR image
    without an HR image, or HR image matched twice -> one UserError listing all of them.
    """
    sr_paths, hr_paths = list_images(sr_dir), list_images(hr_dir)
    hr_by_stem: dict[str, Path] = {}
    for p in hr_paths:
        if p.stem in hr_by_stem:
            raise UserError(f"two HR images share the name {p.stem!r}: {hr_by_stem[p.stem].name}, {p.name}")
        hr_by_stem[p.stem] = p

    sr_by_hr: dict[str, list[Path]] = {}
    unmatched_sr = []
    for p in sr_paths:
        stem = _hr_stem_for(p.stem, set(hr_by_stem))
        if stem is None:
            unmatched_sr.append(p)
        else:
            sr_by_hr.setdefault(stem, []).append(p)

    problems = []
    if unmatched_sr:
        problems.append(f"SR images in {sr_dir} with no HR image: {', '.join(p.name for p in unmatched_sr)}")
    missing = [p for stem, p in hr_by_stem.items() if stem not in sr_by_hr]
    if missing:
        problems.append(f"HR images in {hr_dir} with no SR image: {', '.join(p.name for p in missing)}")
    for stem, ps in sr_by_hr.items():
        if len(ps) > 1:
            problems.append(f"several SR images for HR {hr_by_stem[stem].name}: {', '.join(p.name for p in ps)}")
    if problems:
        raise UserError("cannot pair SR and HR images:\n  " + "\n  ".join(problems))
    return [(sr_by_hr[stem][0], hr_by_stem[stem]) for stem in sorted(hr_by_stem)]


def score_folders(sr_dir: str | os.PathLike, hr_dir: str | os.PathLike, scale: int) -> list[dict]:
    """One row per image: {"name", "psnr_y", "ssim_y", "psnr_rgb"}, shaving `scale` pixels per border.

    HR images are mod-cropped to multiples of `scale` here (the originals, not pre-cropped, are expected);
    the SR image must then have exactly the cropped HR size.
    """
    if scale not in SCALES:
        raise UserError(f"scale must be one of {', '.join(map(str, SCALES))}, got {scale}")
    rows = []
    for sr_path, hr_path in match_pairs(sr_dir, hr_dir):
        sr, hr = read_rgb(sr_path), modcrop(read_rgb(hr_path), scale)
        if sr.shape != hr.shape:
            raise UserError(
                f"{sr_path.name}: SR is {sr.shape[1]}x{sr.shape[0]} but HR {hr_path.name} mod-cropped to "
                f"multiples of {scale} is {hr.shape[1]}x{hr.shape[0]} (W x H)"
            )
        if min(hr.shape[:2]) - 2 * scale < SSIM_WINDOW:
            raise UserError(
                f"{hr_path.name} is too small to score: SSIM needs {SSIM_WINDOW}x{SSIM_WINDOW} pixels after "
                f"shaving {scale} from every border"
            )
        rows.append(
            {
                "name": hr_path.stem,
                "psnr_y": psnr_y(sr, hr, scale),
                "ssim_y": ssim_y(sr, hr, scale),
                "psnr_rgb": psnr_rgb(sr, hr, scale),
            }
        )
    return rows


def format_table(rows: list[dict], title: str) -> str:
    """Aligned per-image rows plus a "mean" row (the mean of the per-image values, as papers report)."""
    if not rows:
        raise ValueError("format_table needs at least one row")
    mean = {key: float(np.mean([r[key] for r in rows])) for key, _ in _COLUMNS}
    names = [r["name"] for r in rows] + ["mean"]
    name_w = max(len("image"), *map(len, names))
    widths = [max(len(label), 9) for _, label in _COLUMNS]

    def line(name: str, values: list[str]) -> str:
        return "  ".join([name.ljust(name_w)] + [v.rjust(w) for v, w in zip(values, widths)])

    def cells(r: dict) -> list[str]:
        return [f"{r[key]:.4f}" for key, _ in _COLUMNS]

    out = [title, line("image", [label for _, label in _COLUMNS])]
    out += [line(r["name"], cells(r)) for r in rows]
    out += [line("mean", cells(mean))]
    return "\n".join(out)
