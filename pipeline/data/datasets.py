"""Datasets: the embedded photos or a user's folder, as LR/HR pairs; random training patches.

A dataset is named by a string:
- ``embedded``: the 24 evaluation crops shipped in the package, 360x360 (``embedded/eval24/``; the default eval set);
- ``embedded-eval7``: the 7 evaluation photos of earlier releases, of mixed sizes (``embedded/eval/``; the default
  eval set before the 24 crops, kept so that earlier figures can be reproduced);
- ``embedded-train``: the 15 training crops shipped in the package, 512x512 (the default train set);
- ``embedded-val``: 7 more crops, 512x512, that no training stage sees (the shipped teacher's included): with the
  ``data.val_count`` training images held out, the validation split (``train_and_validation``).
  No photograph is in two of these sets; ``pipeline/data/build_embedded.py`` makes the crops from Debian packages,
  ``pipeline/data/embedded/ATTRIBUTION.md`` lists their sources, licences and checksums;
- a folder of HR images only: LR is made from each HR exactly as the benchmarks do (mod-crop, MATLAB bicubic);
- a paired folder ``HR/`` + ``LR_bicubic/X{s}/`` (the DIV2K / benchmark layout). The LR file of ``HR/name.png`` is
  ``LR_bicubic/X{s}/name{suffix}.<any image suffix>`` with suffix one of ``x{s}`` (DIV2K: ``0001x4.png``), ``''``,
  ``_x{s}``, ``_LRBI_x{s}``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data.imageio import IMAGE_SUFFIXES, list_images, read_rgb
from pipeline.data.imresize import degrade, modcrop
from pipeline.errors import UserError

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
EMBEDDED = {
    "embedded": EMBEDDED_DIR / "eval24",
    "embedded-eval7": EMBEDDED_DIR / "eval",
    "embedded-train": EMBEDDED_DIR / "train",
    "embedded-val": EMBEDDED_DIR / "val",
}
SCALES = (2, 3, 4)
log = logging.getLogger("pipeline")


@dataclass
class Pair:
    name: str
    lr: np.ndarray  # (h, w, 3) uint8
    hr: np.ndarray  # (h*s, w*s, 3) uint8, mod-cropped


class ImageTooSmall(UserError):
    """An HR image smaller than the scale: it has no LR image."""


def check_scale(scale: int) -> None:
    if scale not in SCALES:
        raise UserError(f"scale must be one of {', '.join(map(str, SCALES))}, got {scale}")


class PairFolder:
    """LR/HR pairs of one dataset, read lazily one image at a time."""

    def __init__(self, spec: str | Path, scale: int):
        check_scale(scale)
        self.scale = scale
        folder = EMBEDDED.get(str(spec), Path(spec))
        if not folder.is_dir():
            known = ", ".join(EMBEDDED)
            raise UserError(f"dataset {spec!s}: no such folder (and not an embedded set: {known})")
        self.folder = folder
        self.lr_dir: Path | None = None
        hr_dir = folder / "HR"
        if hr_dir.is_dir():
            self.lr_dir = folder / "LR_bicubic" / f"X{scale}"
            if not self.lr_dir.is_dir():
                raise UserError(f"dataset {folder}: has HR/ but no LR_bicubic/X{scale}/ for scale {scale}")
            self.hr_files = list_images(hr_dir)
        else:
            self.hr_files = list_images(folder)

    def __len__(self) -> int:
        return len(self.hr_files)

    def split(self, val_count: int) -> tuple[PairFolder, PairFolder]:
        """(train, validation): `val_count` images evenly spaced in name order are the validation split."""
        n = len(self.hr_files)
        if not 0 <= val_count < n:
            raise UserError(f"data.val_count = {val_count}: {self.folder} has {n} images; hold out 0 to {n - 1}")
        val_idx = {int((k + 0.5) * n / val_count) for k in range(val_count)}
        train, val = copy.copy(self), copy.copy(self)
        train.hr_files = [f for i, f in enumerate(self.hr_files) if i not in val_idx]
        val.hr_files = [f for i, f in enumerate(self.hr_files) if i in val_idx]
        return train, val

    def _lr_file(self, hr_file: Path) -> Path:
        assert self.lr_dir is not None
        s, stem = self.scale, hr_file.stem
        for suffix in (f"x{s}", "", f"_x{s}", f"_LRBI_x{s}"):
            for ext in IMAGE_SUFFIXES:
                for candidate in (self.lr_dir / f"{stem}{suffix}{ext}", self.lr_dir / f"{stem}{suffix}{ext.upper()}"):
                    if candidate.is_file():
                        return candidate
        raise UserError(f"dataset {self.folder}: no LR image for {hr_file.name} in {self.lr_dir}")

    def load(self, i: int) -> Pair:
        """The i-th pair; an HR image smaller than the scale is an ImageTooSmall error naming it."""
        hr_file = self.hr_files[i]
        hr = read_rgb(hr_file)
        if min(hr.shape[:2]) < self.scale:
            raise ImageTooSmall(f"{hr_file} is too small ({hr.shape[1]}x{hr.shape[0]}) for x{self.scale}")
        if self.lr_dir is None:
            hr, lr = degrade(hr, self.scale)
        else:
            lr_file = self._lr_file(hr_file)
            hr, lr = modcrop(hr, self.scale), read_rgb(lr_file)
            if (lr.shape[0] * self.scale, lr.shape[1] * self.scale) != hr.shape[:2]:
                raise UserError(
                    f"{lr_file}: LR size {lr.shape[1]}x{lr.shape[0]} times {self.scale} does not match the "
                    f"mod-cropped HR {hr_file.name} ({hr.shape[1]}x{hr.shape[0]})"
                )
        return Pair(hr_file.stem, lr, hr)

    def __iter__(self) -> Iterator[Pair]:
        return (self.load(i) for i in range(len(self)))


class PairSets:
    """Several datasets read as one, in order (the validation split: held-out training images and `data.val`)."""

    def __init__(self, parts: list[PairFolder]):
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def __iter__(self) -> Iterator[Pair]:
        return (pair for part in self.parts for pair in part)

    def __str__(self) -> str:
        return " + ".join(str(part.folder) for part in self.parts)


def train_and_validation(train: str, val_count: int, val: str, scale: int) -> tuple[PairFolder, PairSets]:
    """The training images, and the validation split: the `val_count` images of `train` held out (evenly spaced in
    name order), then every image of the dataset `val` ('' for none)."""
    kept, held_out = PairFolder(train, scale).split(val_count)
    parts = [held_out, *([PairFolder(val, scale)] if val else [])]
    return kept, PairSets([part for part in parts if len(part)])


class PatchSampler:
    """Random aligned LR/HR patches with flips and 90-degree rotations, drawn from a torch.Generator.

    The batch for a given generator state is always the same, so training is reproducible and resumable.
    """

    def __init__(self, pairs: list[Pair], lr_patch: int, scale: int):
        self.lr_patch, self.scale = lr_patch, scale
        kept = [p for p in pairs if min(p.lr.shape[:2]) >= lr_patch]
        skipped = [p.name for p in pairs if min(p.lr.shape[:2]) < lr_patch]
        if skipped:
            log.warning("skipping %d image(s) smaller than a %dx%d LR patch: %s", len(skipped), lr_patch, lr_patch,
                        ", ".join(skipped))
        if not kept:
            raise UserError(f"no training image is at least a {lr_patch}x{lr_patch} LR patch "
                            f"({lr_patch * scale} px HR); lower train.lr_patch or use larger images")
        self.lr = [torch.from_numpy(p.lr).permute(2, 0, 1).contiguous() for p in kept]
        self.hr = [torch.from_numpy(p.hr).permute(2, 0, 1).contiguous() for p in kept]

    def __len__(self) -> int:
        return len(self.lr)

    def sample(self, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        p, s = self.lr_patch, self.scale
        lrs, hrs = [], []
        for _ in range(batch):
            i = int(torch.randint(len(self.lr), (1,), generator=gen))
            lr_img, hr_img = self.lr[i], self.hr[i]
            y = int(torch.randint(lr_img.shape[1] - p + 1, (1,), generator=gen))
            x = int(torch.randint(lr_img.shape[2] - p + 1, (1,), generator=gen))
            aug = int(torch.randint(8, (1,), generator=gen))
            lr = lr_img[:, y : y + p, x : x + p]
            hr = hr_img[:, y * s : (y + p) * s, x * s : (x + p) * s]
            lrs.append(_augment(lr, aug))
            hrs.append(_augment(hr, aug))
        return torch.stack(lrs).float() / 255, torch.stack(hrs).float() / 255


def _augment(img: torch.Tensor, aug: int) -> torch.Tensor:
    """One of the 8 symmetries of the square: bit 0 horizontal flip, bit 1 vertical flip, bit 2 transpose."""
    if aug & 1:
        img = img.flip(2)
    if aug & 2:
        img = img.flip(1)
    if aug & 4:
        img = img.transpose(1, 2)
    return img.contiguous()
