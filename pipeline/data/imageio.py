"""Reading and writing 8-bit RGB images (PNG, JPEG, BMP) with Pillow.

Everything in the pipeline works on (H, W, 3) uint8 RGB arrays; `read_rgb` is where other inputs
(greyscale, palette, alpha, 16-bit) are turned into that, with a logged note when it changes something.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import UserError

__all__ = ["IMAGE_SUFFIXES", "list_images", "read_rgb", "write_rgb"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

_log = logging.getLogger("pipeline")
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}
_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_PNG_COLOUR_TYPES = {2: "RGB", 4: "grey + alpha", 6: "RGBA"}
# Errors Pillow raises for unreadable, corrupt or truncated files (a broken PNG can raise SyntaxError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB; any problem with the file -> UserError.

    Greyscale and palette images become RGB. Alpha (RGBA, LA, palette transparency) is DROPPED, not
    composited: the colour channels are kept as they are. 16-bit greyscale PNGs become 8-bit with
    round(v / 257). 16-bit colour PNGs are refused: Pillow decodes them to their high bytes only.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode everything now, so a truncated file fails here
            return _to_rgb(im, path)
    except _DECODE_ERRORS as e:
        raise UserError(f"cannot read image {path}: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image file Pillow can read"
    if isinstance(e, OSError) and e.strerror:  # FileNotFoundError etc., without repeating the path
        return e.strerror
    return str(e) or type(e).__name__


def _to_rgb(im: Image.Image, path: Path) -> np.ndarray:
    if im.format == "PNG":
        _refuse_16bit_colour_png(path)
    if im.mode == "RGB":
        return np.asarray(im).copy()
    if im.mode in _SIXTEEN_BIT_GREY:
        v = np.asarray(im)
        if v.min() < 0 or v.max() > 65535:
            raise UserError(f"cannot read image {path}: mode {im.mode} values outside 0..65535")
        grey = np.round(v / 257).astype(np.uint8)
        _log.info("%s: 16-bit greyscale (%s), converted to 8-bit with round(v / 257) and to RGB", path, im.mode)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode == "F":
        raise UserError(f"cannot read image {path}: floating-point images are not supported")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        # Via RGBA so that palette transparency is handled without a Pillow warning.
        rgb = im.convert("RGBA").convert("RGB")
        _log.info("%s: %s image with transparency, alpha dropped (not composited), converted to RGB", path, im.mode)
    else:
        rgb = im.convert("RGB")
        _log.info("%s: %s image converted to RGB", path, im.mode)
    return np.asarray(rgb).copy()


def _refuse_16bit_colour_png(path: Path) -> None:
    """Pillow opens 16-bit RGB / RGBA / grey+alpha PNGs as 8-bit, keeping only the high byte: refuse them."""
    with open(path, "rb") as f:
        header = f.read(26)  # 8-byte signature, then IHDR (always first): ..., bit depth @24, colour type @25
    bit_depth, colour_type = header[24], header[25]
    if bit_depth == 16 and colour_type in _PNG_COLOUR_TYPES:
        raise UserError(
            f"cannot read image {path}: 16-bit {_PNG_COLOUR_TYPES[colour_type]} PNG is not supported "
            "(Pillow keeps only the high byte of each value); convert it to 8-bit first"
        )


def write_rgb(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write (H, W, 3) RGB or (H, W) grey uint8 as PNG, JPEG (quality 95) or BMP, chosen by suffix.

    Atomic: written to a temporary file in the same folder, then renamed over `path`. Parent folders are
    created. A wrong array is a programming error (ValueError); an unsupported suffix is a UserError.
    """
    path = Path(path)
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        raise ValueError(f"write_rgb needs a uint8 array, got {getattr(img, 'dtype', type(img))}")
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"write_rgb needs an (H, W, 3) or (H, W) array, got shape {img.shape}")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"cannot write {path}: unsupported suffix (use one of {', '.join(IMAGE_SUFFIXES)})")
    options = {"quality": 95} if fmt == "JPEG" else {}

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # plain open, so the file gets the usual umask permissions
            Image.fromarray(np.ascontiguousarray(img)).save(f, format=fmt, **options)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files (by suffix, any case) directly in `folder`, sorted by name; hidden files are skipped.

    Hidden files are skipped because macOS leaves `._name.png` metadata files beside real images.
    """
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"folder not found: {folder}")
    if not folder.is_dir():
        raise UserError(f"not a folder: {folder}")
    images = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    if not images:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {folder}")
    return images
