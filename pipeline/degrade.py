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


def degrade_folder(hr_dir: str | os.PathLike, scale: int, out_dir: str | os.PathLike) -> list[Path]:
    """Write `out_dir/<stem>.png` = MATLAB bicubic LR of every image in `hr_dir`; return the written paths.

    Always PNG (lossless). Existing files of the same name are replaced (each write is atomic).
    """
    if scale not in SCALES:
        raise UserError(f"scale must be one of {', '.join(map(str, SCALES))}, got {scale}")
    hr_dir, out_dir = Path(hr_dir), Path(out_dir)
    images = list_images(hr_dir)
    if out_dir.resolve() == hr_dir.resolve():
        raise UserError(f"the output folder must differ from the HR folder: {out_dir}")
    stems = [p.stem for p in images]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise UserError(f"several HR images in {hr_dir} share a name, their LR would clash: {', '.join(clashes)}")

    written = []
    for path in tqdm(images, desc=f"degrade x{scale}", unit="img"):
        hr = read_rgb(path)
        if min(hr.shape[:2]) < scale:
            raise UserError(f"{path} is too small ({hr.shape[1]}x{hr.shape[0]}) to degrade by x{scale}")
        _, lr = degrade(hr, scale)
        out = out_dir / f"{path.stem}.png"
        write_rgb(out, lr)
        written.append(out)
    return written
