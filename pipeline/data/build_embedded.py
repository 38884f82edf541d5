"""Rebuild the embedded training crops in ``pipeline/data/embedded/train/``.

The 15 training images are photographs from two Debian packages (Debian 12
"bookworm", version 20.04.0-2).  Fetch the packages with apt (any Debian 12
machine; no root needed for ``download``)::

    apt-get update
    apt-get download lomiri-wallpapers-16.04 lomiri-wallpapers-20.04

then rebuild, or check that the shipped crops are reproducible::

    python -m pipeline.data.build_embedded --debs DIR [--out DIR]
    python -m pipeline.data.build_embedded --debs DIR --check

Each .deb and each photo is checked against the sha256 values below.  Photos
are read straight from the .deb (an ``ar`` archive holding ``data.tar.xz``)
into memory; no path from the archive is ever written to disk.

Recipe per photo (see ``crop_512``):
  1. ``Image.open(...).convert("RGB")`` (EXIF orientation is not applied;
     all 15 sources are stored upright).
  2. Resize with ``Image.Resampling.LANCZOS`` (antialiased) so the SHORT side
     is exactly 512 px; the long side is ``round(long * 512 / short)`` with
     halves rounded up, computed in integers as
     ``(2 * long * 512 + short) // (2 * short)``.
  3. Centre-crop 512x512: ``left = (w - 512) // 2``, ``top = (h - 512) // 2``.
  4. Save as 8-bit RGB PNG with ``optimize=True``, named ``<original stem>.png``.

The PNG bytes depend on the Pillow/zlib build; ``--check`` therefore also says
whether a differing file still has identical pixels.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tarfile
import tempfile
from pathlib import Path

from PIL import Image

from pipeline.errors import UserError, report_internal_error

DEB_SHA256 = {
    "lomiri-wallpapers-16.04_20.04.0-2_all.deb":
        "a99ff6a3bfe451e4cc0682ecb3cc82e71740626d59e4845ae34a0a0e45421eab",
    "lomiri-wallpapers-20.04_20.04.0-2_all.deb":
        "d44e89b8473aafe64a5b678f014862dc31335aaaf18665c544d985d854f1a709",
}

# .deb file name -> {photo file name (in /usr/share/backgrounds/) -> sha256}
PHOTO_SHA256 = {
    "lomiri-wallpapers-16.04_20.04.0-2_all.deb": {
        "Bridge_by_Sander_Klootwijk.jpg": "bd86b081f9975e2b83527f71e49b9271a8ab40885428395969d9f7d834d7f050",
        "Dragonfly_by_Bolly.jpg": "af5af17841009732def24b09bb1e669a1b09d2b4bdeee7812c371101c30d2bb3",
        "Picture_0B_by_freespace.jpg": "c8c0ab18e48d9e0419fe42881112137f3afafc27dfddc29ec3a6d54c56d225ad",
        "Picture_1A_by_freespace.jpg": "89e86af38d04daaef975665dc2127e9fa76f0fd68f4eea105a2d0ae3390b010b",
        "Wine_by_Jakkub_Mede.jpg": "d2e96e6d4da40dd804b3d0ce295e94de04a2d7d9b6785d42cd9d92ba58bced74",
        "aitzgorri_by_Aitzol_Berasategi.jpg": "66268e7b48f8854d36a28765fac6e23ec1aee251daa6da1f64715f201020ad36",
        "analogpattern_by_Peter_Nerlich.jpg": "15372488a192b2be2eafc67bd3ed31cbfca19abe3929e925607fcbc9cb4d4202",
        "free_by_Peter_Nerlich.jpg": "85a5453c2fed514c75973016f3d862aca62eb7ca087618822469274ac1092373",
        "friends_by_Aitzol_Berasategi.jpg": "cc40e313c74e421edffe3403def413c16878ce14661cce7ec5915baeab35538d",
        "greentock_by_Peter_Nerlich.jpg": "e7b20e2db9dcd6e2b278ca55873c2110b35d89cd38b04d0b18728726888e6889",
        "life_by_Aitzol_Berasategi.jpg": "4c119350ead80201fe256850c3d316309ddfb4bdf10b235ce982dcde0c667c05",
        "picosdeeuropa_by_Aitzol_Berasategi.jpg": "414d0072b2f6f2c555deafeaef6e45c4fed6fa9ad26eba6560ca8803959cf97a",
        "seeding_by_Clements_Engelhardt.jpg": "a5634d1ab5e41a3568e92d4a894a500c92b891f9ff734e50bd224d6e185a605f",
        "sunset_by_Aitzol_Berasategi.jpg": "474dab6a4b9f94dc76c29dfe30e9f5db4af0fd2e33fe5d695f8152b371efca18",
    },
    "lomiri-wallpapers-20.04_20.04.0-2_all.deb": {
        "Kleiber_by_Lukas_Baubkus.jpg": "6572410c09f4492c74ccadde133565a14c0161617d5917d4c820c66d65a44ba7",
    },
}

PHOTO_DIR = "usr/share/backgrounds/"
SIZE = 512
DEFAULT_OUT = Path(__file__).resolve().parent / "embedded" / "train"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_ar_member(path: Path, wanted_prefix: str) -> tuple[str, bytes]:
    """Return (name, bytes) of the first member of the ``ar`` archive whose name starts with the prefix."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise UserError(f"{path}: not a .deb (no ar header)")
        while True:
            header = f.read(60)
            if len(header) < 60:
                raise UserError(f"{path}: no member named {wanted_prefix}* in the .deb")
            if header[58:60] != b"`\n":
                raise UserError(f"{path}: corrupt ar member header")
            name = header[0:16].decode("ascii", "replace").rstrip(" ").rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            if name.startswith(wanted_prefix):
                data = f.read(size)
                if len(data) != size:
                    raise UserError(f"{path}: truncated member {name}")
                return name, data
            f.seek(size + (size & 1), os.SEEK_CUR)  # members are 2-byte aligned


def open_data_tar(deb: Path) -> tarfile.TarFile:
    """Open the .deb's data.tar.* as a streaming tar reader (nothing is extracted to disk)."""
    name, data = read_ar_member(deb, "data.tar")
    raw = io.BytesIO(data)
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{deb.name}: {name} is zstd-compressed; install the 'zstandard' module to read it") from None
        return tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(raw), mode="r|")
    modes = {".xz": "r|xz", ".gz": "r|gz", ".bz2": "r|bz2", ".tar": "r|"}
    for suffix, mode in modes.items():
        if name.endswith(suffix):
            return tarfile.open(fileobj=raw, mode=mode)
    raise UserError(f"{deb.name}: unsupported data member {name}")


def read_photos(deb: Path, wanted: dict[str, str]) -> dict[str, bytes]:
    """Read the wanted photos (name -> sha256) from a .deb into memory and check their sha256."""
    found: dict[str, bytes] = {}
    with open_data_tar(deb) as tar:
        for member in tar:
            path = member.name[2:] if member.name.startswith("./") else member.name
            if not (member.isfile() and path.startswith(PHOTO_DIR)):
                continue
            name = path[len(PHOTO_DIR):]
            if name in wanted:
                found[name] = tar.extractfile(member).read()
    for name, expected in wanted.items():
        if name not in found:
            raise UserError(f"{deb.name}: photo {name} not found in the package")
        actual = sha256_bytes(found[name])
        if actual != expected:
            raise UserError(f"{deb.name}: {name} has sha256 {actual}, expected {expected}")
    return found


def check_debs(debs_dir: Path) -> list[Path]:
    paths = []
    for name, expected in DEB_SHA256.items():
        path = debs_dir / name
        if not path.is_file():
            raise UserError(f"missing {path} (get it with: apt-get download {name.split('_')[0]})")
        actual = sha256_file(path)
        if actual != expected:
            raise UserError(f"{path}: sha256 {actual} differs from the expected {expected}")
        print(f"ok  {name}  sha256 {actual[:16]}...")
        paths.append(path)
    return paths


def resized_size(w: int, h: int, short: int = SIZE) -> tuple[int, int]:
    """Size with the short side == ``short`` and the long side rounded half-up (integer arithmetic)."""
    if w <= h:
        return short, (2 * h * short + w) // (2 * w)
    return (2 * w * short + h) // (2 * h), short


def crop_512(jpeg: bytes) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Apply the recipe to one photo; returns (crop, source size, resized size)."""
    with Image.open(io.BytesIO(jpeg)) as src:
        img = src.convert("RGB")
    w, h = resized_size(*img.size)
    small = img.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - SIZE) // 2, (h - SIZE) // 2
    return small.crop((left, top, left + SIZE, top + SIZE)), img.size, (w, h)


def write_png_atomic(img: Image.Image, dest: Path) -> int:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(buf.getvalue())


def build(debs_dir: Path, out: Path) -> list[Path]:
    """Check the .debs, extract and crop the 15 photos, write them into ``out``; returns the PNG paths."""
    debs = check_debs(debs_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(len(v) for v in PHOTO_SHA256.values())
    written, i = [], 0
    for deb in debs:
        photos = read_photos(deb, PHOTO_SHA256[deb.name])
        for name in sorted(photos):
            i += 1
            crop, src_size, mid_size = crop_512(photos[name])
            dest = out / (Path(name).stem + ".png")
            nbytes = write_png_atomic(crop, dest)
            print(f"[{i:2d}/{total}] {name}: {src_size[0]}x{src_size[1]} -> {mid_size[0]}x{mid_size[1]}"
                  f" -> {SIZE}x{SIZE}  {dest.name} ({nbytes} bytes)")
            written.append(dest)
    return written


def check(debs_dir: Path, shipped: Path) -> int:
    """Rebuild into a temp folder and compare every PNG's sha256 with the shipped one; returns 0 if all match."""
    print(f"rebuilding into a temporary folder to compare with {shipped} (Pillow {Image.__version__})")
    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = build(debs_dir, Path(tmp))
        bad = 0
        for new in rebuilt:
            old = shipped / new.name
            if not old.is_file():
                print(f"MISSING   {new.name}: not in {shipped}")
                bad += 1
            elif sha256_file(old) == sha256_file(new):
                print(f"identical {new.name}")
            else:
                with Image.open(old) as a, Image.open(new) as b:
                    same_pixels = a.mode == b.mode and a.size == b.size and a.tobytes() == b.tobytes()
                why = "same pixels, different PNG encoding" if same_pixels else "pixels differ"
                print(f"DIFFERS   {new.name}: {why}")
                bad += 1
        extra = sorted({p.name for p in shipped.glob("*.png")} - {p.name for p in rebuilt})
        for name in extra:
            print(f"EXTRA     {name}: shipped but not produced by the recipe")
    n = len(rebuilt)
    print(f"{n - bad}/{n} identical" + (f", {len(extra)} extra" if extra else ""))
    return 0 if bad == 0 and not extra else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.data.build_embedded",
        description="Rebuild the embedded 512x512 training crops from the lomiri-wallpapers .debs.")
    parser.add_argument("--debs", type=Path, required=True,
                        help="folder holding the two .deb files (apt-get download lomiri-wallpapers-16.04 "
                             "lomiri-wallpapers-20.04)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output folder (default: the package's embedded/train, {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true",
                        help="rebuild into a temp folder and compare against the PNGs in --out instead of writing")
    args = parser.parse_args(argv)
    try:
        if args.check:
            return check(args.debs, args.out)
        written = build(args.debs, args.out)
        print(f"wrote {len(written)} PNGs to {args.out}")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - ours: named, logged, never exit 1 or 2
        return report_internal_error(e)


if __name__ == "__main__":
    sys.exit(main())
