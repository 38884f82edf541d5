"""Make a folder of LR images from a folder of HR images with the standard "BI" degradation."""

from __future__ import annotations

import os
from pathlib import Path

from tqdm import tqdm

from pipeline.data.imageio import list_images, read_rgb, write_rgb
from pipeline.data.imresize import degrade
from pipeline.errors import UserError

__all__ = ["SCALES", "degrade_folder"]

SCALES = (2, 3, 4)


def degrade_folder(hr_dir: str | os.PathLike, scale: int, out_dir: str | os.PathLike, *,
                   overwrite: bool = False) -> list[Path]:
    """Write `out_dir/<stem>.png` = MATLAB bicubic LR of every image in `hr_dir`; return the written paths.

    Always PNG (lossless). Every HR image is read and checked before anything is written; files of the same name
    already in `out_dir` are refused unless `overwrite` (each write is atomic).
    """
    if scale not in SCALES:
        raise UserError(f"scale must be one of {', '.join(map(str, SCALES))}, got {scale}")
    hr_dir, out_dir = Path(hr_dir), Path(out_dir)
    images = list_images(hr_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is not a folder; name a folder (it is created if missing)")
    if out_dir.resolve() == hr_dir.resolve():
        raise UserError(f"the output folder must differ from the HR folder: {out_dir}")
    stems = [p.stem for p in images]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise UserError(f"several HR images in {hr_dir} share a name, their LR would clash: {', '.join(clashes)}")
    outputs = [out_dir / f"{p.stem}.png" for p in images]
    existing = [str(p) for p in outputs if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise UserError(f"{len(existing)} output(s) exist already, e.g. {existing[0]}: pass --overwrite to replace "
                        "them, or choose another --out folder")
    for path in images:  # a bad image stops the run before anything is written; the pixels are read again below
        h, w = read_rgb(path).shape[:2]
        if min(h, w) < scale:
            raise UserError(f"{path} is too small ({w}x{h}) to degrade by x{scale}")

    written = []
    for path, out in zip(tqdm(images, desc=f"degrade x{scale}", unit="img"), outputs):
        _, lr = degrade(read_rgb(path), scale)
        write_rgb(out, lr)
        written.append(out)
    return written
