"""Rebuild the embedded crops: ``embedded/train/`` (training), ``embedded/val/`` (validation), ``embedded/eval24/``.

All 46 crops are made from photographs in five Debian 12 "bookworm" packages (files in ``main``, ``_all.deb``):

- ``lomiri-wallpapers-16.04`` and ``lomiri-wallpapers-20.04`` 20.04.0-2: the 15 training photos (``data.val_count``
  of them are held out as part of the validation split);
- ``mate-backgrounds`` 1.26.0-1 (``mate/nature/``), ``lxqt-themes`` 1.2.0-1 (``lxqt/wallpapers/``) and
  ``plasma-workspace-wallpapers`` 4:5.27.5-2: 7 validation photos (the rest of the validation split; no training
  stage, the shipped teacher's included, ever saw them) and the 24 evaluation photos.

No photograph is in two sets.  Which photos went where: the 31 photos of the last three packages were ranked by
the mean absolute horizontal + vertical gradient of their grey-level evaluation crop; every 5th from the flattest
(ranks 0, 5, ..., 30) went to validation, so both sets span the range from flat bokeh to fine texture.  The
assignment is fixed in ``PHOTOS`` below, not recomputed.

The old 7-photo evaluation set (``embedded/eval/``, copied unchanged from the scikit-image, scikit-learn and
matplotlib wheels) is not made by this script; it stays as it is (dataset name ``embedded-eval7``).

Fetch the packages with apt (any Debian 12 machine; no root needed for ``download``)::

    apt-get update
    apt-get download lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 mate-backgrounds lxqt-themes \\
        plasma-workspace-wallpapers

(the plasma .deb is saved as ``plasma-workspace-wallpapers_4%3a5.27.5-2_all.deb``: apt writes the epoch's colon as
``%3a``) then rebuild, or check that the shipped crops are reproducible::

    python -m pipeline.data.build_embedded --debs DIR [--out EMBEDDED_DIR]
    python -m pipeline.data.build_embedded --debs DIR --check

``--out`` is the folder holding ``train/``, ``val/`` and ``eval24/`` (default: the package's ``embedded/``). Each
.deb and each photo is checked against the sha256 values below. Photos are read straight from the .deb (an ``ar``
archive holding ``data.tar.xz``) into memory; no path from the archive is ever written to disk.

Recipe per photo, the same for every set except the crop side S (``SIZES``: 512 for train and val, 360 for eval24;
360 is divisible by 2, 3 and 4, so no scale mod-crops an evaluation image), see ``crop_square``:
  1. ``Image.open(...).convert("RGB")`` (EXIF orientation is not applied; no source has an orientation other than
     upright; the greyscale ``Grey`` photo becomes R = G = B).
  2. Resize with ``Image.Resampling.LANCZOS`` (antialiased) so the SHORT side is exactly S px; the long side is
     ``round(long * S / short)`` with halves rounded up, computed in integers as
     ``(2 * long * S + short) // (2 * short)``.
  3. Centre-crop SxS: ``left = (w - S) // 2``, ``top = (h - S) // 2``.
  4. Save as 8-bit RGB PNG with ``optimize=True``, named as in ``PHOTOS`` (the lomiri crops keep the photo's stem;
     the others are ``<source>-<name>.png`` with source ``mate``, ``lxqt`` or ``plasma``).

The PNG bytes depend on the Pillow/zlib build; ``--check`` therefore also says whether a differing file still has
identical pixels.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.errors import UserError, report_internal_error

LOMIRI_16 = "lomiri-wallpapers-16.04_20.04.0-2_all.deb"
LOMIRI_20 = "lomiri-wallpapers-20.04_20.04.0-2_all.deb"
MATE = "mate-backgrounds_1.26.0-1_all.deb"
LXQT = "lxqt-themes_1.2.0-1_all.deb"
PLASMA = "plasma-workspace-wallpapers_4%3a5.27.5-2_all.deb"

DEB_SHA256 = {
    LOMIRI_16: "a99ff6a3bfe451e4cc0682ecb3cc82e71740626d59e4845ae34a0a0e45421eab",
    LOMIRI_20: "d44e89b8473aafe64a5b678f014862dc31335aaaf18665c544d985d854f1a709",
    MATE: "7bf4c2209f34b4f61ba6d24c8b58c28b361e82e4b943aae6d42c030169af9e04",
    LXQT: "d518df36b515b09d36cb00b12645dd8ce170bb82bb0966297741905ce3edc8e1",
    PLASMA: "32cd18b71c8c938a18b3b351f217c02ac590e323caa3cf322fbb875ce8892f8b",
}

TRAIN, VAL, EVAL = "train", "val", "eval24"
SIZES = {TRAIN: 512, VAL: 512, EVAL: 360}  # folder under embedded/ -> side of its square crops


@dataclass(frozen=True)
class Photo:
    path: str  # regular file inside the package's data.tar, without the leading "./"
    sha256: str  # of the photo as shipped in the .deb
    crop: str  # file name of the PNG crop
    split: str  # TRAIN, VAL or EVAL


def _lomiri(name: str, sha256: str) -> Photo:
    return Photo(f"usr/share/backgrounds/{name}", sha256, Path(name).stem + ".png", TRAIN)


def _mate(name: str, sha256: str, split: str) -> Photo:
    return Photo(f"usr/share/backgrounds/mate/nature/{name}.jpg", sha256, f"mate-{name}.png", split)


def _lxqt(name: str, sha256: str, split: str) -> Photo:
    return Photo(f"usr/share/lxqt/wallpapers/{name}", sha256, f"lxqt-{Path(name).stem}.png", split)


def _plasma(name: str, sha256: str, split: str) -> Photo:
    # Every size variant of these wallpapers is a symbolic link to the one regular file, 2560x1600.jpg.
    return Photo(f"usr/share/wallpapers/{name}/contents/images/2560x1600.jpg", sha256, f"plasma-{name}.png", split)


# .deb file name -> its photos
PHOTOS: dict[str, tuple[Photo, ...]] = {
    LOMIRI_16: (
        _lomiri("Bridge_by_Sander_Klootwijk.jpg", "bd86b081f9975e2b83527f71e49b9271a8ab40885428395969d9f7d834d7f050"),
        _lomiri("Dragonfly_by_Bolly.jpg", "af5af17841009732def24b09bb1e669a1b09d2b4bdeee7812c371101c30d2bb3"),
        _lomiri("Picture_0B_by_freespace.jpg", "c8c0ab18e48d9e0419fe42881112137f3afafc27dfddc29ec3a6d54c56d225ad"),
        _lomiri("Picture_1A_by_freespace.jpg", "89e86af38d04daaef975665dc2127e9fa76f0fd68f4eea105a2d0ae3390b010b"),
        _lomiri("Wine_by_Jakkub_Mede.jpg", "d2e96e6d4da40dd804b3d0ce295e94de04a2d7d9b6785d42cd9d92ba58bced74"),
        _lomiri("aitzgorri_by_Aitzol_Berasategi.jpg",
                "66268e7b48f8854d36a28765fac6e23ec1aee251daa6da1f64715f201020ad36"),
        _lomiri("analogpattern_by_Peter_Nerlich.jpg",
                "15372488a192b2be2eafc67bd3ed31cbfca19abe3929e925607fcbc9cb4d4202"),
        _lomiri("free_by_Peter_Nerlich.jpg", "85a5453c2fed514c75973016f3d862aca62eb7ca087618822469274ac1092373"),
        _lomiri("friends_by_Aitzol_Berasategi.jpg", "cc40e313c74e421edffe3403def413c16878ce14661cce7ec5915baeab35538d"),
        _lomiri("greentock_by_Peter_Nerlich.jpg", "e7b20e2db9dcd6e2b278ca55873c2110b35d89cd38b04d0b18728726888e6889"),
        _lomiri("life_by_Aitzol_Berasategi.jpg", "4c119350ead80201fe256850c3d316309ddfb4bdf10b235ce982dcde0c667c05"),
        _lomiri("picosdeeuropa_by_Aitzol_Berasategi.jpg",
                "414d0072b2f6f2c555deafeaef6e45c4fed6fa9ad26eba6560ca8803959cf97a"),
        _lomiri("seeding_by_Clements_Engelhardt.jpg",
                "a5634d1ab5e41a3568e92d4a894a500c92b891f9ff734e50bd224d6e185a605f"),
        _lomiri("sunset_by_Aitzol_Berasategi.jpg", "474dab6a4b9f94dc76c29dfe30e9f5db4af0fd2e33fe5d695f8152b371efca18"),
    ),
    LOMIRI_20: (
        _lomiri("Kleiber_by_Lukas_Baubkus.jpg", "6572410c09f4492c74ccadde133565a14c0161617d5917d4c820c66d65a44ba7"),
    ),
    MATE: (
        _mate("Aqua", "5c30118205982da441bf7e6a1ada636a8a0be879408140b3148280c665ed6bce", EVAL),
        _mate("Blinds", "f7aac0dcc2e06d0491643e84df3da1d9db7c4610f58806a880d56e074799f600", EVAL),
        _mate("Dune", "8a67c2cb0be8c46b70c237311a4fa4d2b4ac7d39568135384787801fa5cc9a91", VAL),
        _mate("FreshFlower", "972b0a0c4e5e3fa93f4f244fc84bc64b121a5eac3aaa5856f1308c1f38a02f8e", EVAL),
        _mate("Garden", "d3095ee09d425ef23d27155412136cf14fc3c9af76ca58b452f55e23da324e78", EVAL),
        _mate("GreenMeadow", "8fa0de0aa4089f7319c9fb7a6d006d4cab6023e8c8853731557cff53567b4832", EVAL),
        _mate("LadyBird", "e35a9a4126ef969c90b29c038058c5a575a20eadd84106a37bf1fa9931e7b61d", VAL),
        _mate("RainDrops", "3e4ea9671c28c90a86cf67b3db9daf18c4741587c596333a7529ca589aaa0c16", EVAL),
        _mate("Storm", "77ca53077831d3237f73393a91fc879158abc046d852941c26e90de336356957", EVAL),
        _mate("TwoWings", "665e5abf8a5399070a91a9a8e455fe071e5b61697ff78fdeda4e9843ef545aeb", EVAL),
        _mate("Wood", "19c78500ac00a622e19907ab9cc7d06d46fe08c4a6142759a84195696150ec07", VAL),
        _mate("YellowFlower", "254da96256acb7add685679775a04d1e4a5bc8cd13e5a5a3d61351ce198a5306", EVAL),
    ),
    LXQT: (
        _lxqt("after-the-rain.jpg", "e6cb8b3e09b904cc493ff17fddcd564d4e46a1761d05adf972c285a1fd878234", EVAL),
        _lxqt("appleflower.png", "bae8a8eb8274b29509f1cbbfe250081331c5704a1fea25d5052166a0451e67f3", EVAL),
        _lxqt("beam.png", "3d199194b048cb793c0ad558337cda3e16f14cd054168d1d813620e24a0a5659", VAL),
        _lxqt("butterfly.png", "13175434d99075e075de7321942e66169e3c99ac9416024dcf4123bd3b38749c", EVAL),
        _lxqt("drop.png", "3b726aea9a6f8af36431c6f1974f982f7f4c5a4443499500bda31be27e4ffde8", EVAL),
        _lxqt("flowers.png", "3a935d8be4d6c9784f9079ff2814acd2de2c8406e9fe584be03e90264f37c371", EVAL),
        _lxqt("fog.jpg", "a8235344ee6b5ab1b6de3ccef731bcc0e6509cf33ce832db87eae1eb75987083", EVAL),
        _lxqt("this-is-not-windows.jpg", "2d885e0438c0ab244f818d33d8f745a1cc486558462faf9bf3948675c68ac227", EVAL),
    ),
    PLASMA: (
        _plasma("BytheWater", "c272434ef39f2abf1ed48a15a8910088020f3165329a5092f3940ec9464bc05f", EVAL),
        _plasma("ColdRipple", "05bef6722fc0ed81292cceb3ed026c38d17e510f3c84be7d68610c2b1a723c3f", VAL),
        _plasma("ColorfulCups", "6e0f3a72feb5a4a9fec191b77e34874c3c69e2d93040deb3f07773e73385023d", EVAL),
        _plasma("DarkestHour", "8e3703fae3a3c217b1fc2b399b706cd3720584268d071ba153e4809daa55f1ce", VAL),
        _plasma("EveningGlow", "586682dcb362b9f620068f10138f87d0d3649939aef238adc5807cb951976a7a", EVAL),
        _plasma("FallenLeaf", "95603a6560c7e8d50e0e03b3f4adbe39c5258c72528e74e4ecaea1daf4e499de", EVAL),
        _plasma("Grey", "88c31d8944b7e6935d1b9a296654c692f0772cb512491713eb30a972a604c0ed", EVAL),
        _plasma("Kite", "bdca288ce296a981e80659c021cf707caddc702c0c8d4247e60bd618476d47f8", EVAL),
        _plasma("OneStandsOut", "cb507baf1dafdcae362264f3aba9483ed4be5f6c9fdd770f0ec0920c6d9e80fd", VAL),
        _plasma("Path", "7477457d7f17b736259f1b021864778ad4ba802cf3214e6728181ff29126bba8", EVAL),
        _plasma("summer_1am", "c868b50789591dd42910153c768053f1ba0a98cb36bbfc2b7a96a1045d0477f8", EVAL),
    ),
}

DEFAULT_OUT = Path(__file__).resolve().parent / "embedded"


def all_photos() -> list[tuple[str, Photo]]:
    """(deb name, photo) for every photo, in table order."""
    return [(deb, photo) for deb, photos in PHOTOS.items() for photo in photos]


def crops_of(split: str) -> dict[str, Photo]:
    """Crop file name -> photo, for one set."""
    return {photo.crop: photo for _deb, photo in all_photos() if photo.split == split}


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


def read_photos(deb: Path, wanted: tuple[Photo, ...]) -> dict[str, bytes]:
    """Read the wanted photos (regular files only) from a .deb into memory and check their sha256; path -> bytes."""
    paths = {photo.path for photo in wanted}
    found: dict[str, bytes] = {}
    with open_data_tar(deb) as tar:
        for member in tar:
            path = member.name.removeprefix("./")
            if member.isfile() and path in paths:
                found[path] = tar.extractfile(member).read()
    for photo in wanted:
        if photo.path not in found:
            raise UserError(f"{deb.name}: photo {photo.path} not found in the package (as a regular file)")
        actual = sha256_bytes(found[photo.path])
        if actual != photo.sha256:
            raise UserError(f"{deb.name}: {photo.path} has sha256 {actual}, expected {photo.sha256}")
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


def resized_size(w: int, h: int, short: int) -> tuple[int, int]:
    """Size with the short side == ``short`` and the long side rounded half-up (integer arithmetic)."""
    if w <= h:
        return short, (2 * h * short + w) // (2 * w)
    return (2 * w * short + h) // (2 * h), short


def crop_square(data: bytes, size: int) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Apply the recipe to one photo with crop side ``size``; returns (crop, source size, resized size)."""
    with Image.open(io.BytesIO(data)) as src:
        img = src.convert("RGB")
    w, h = resized_size(*img.size, size)
    small = img.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - size) // 2, (h - size) // 2
    return small.crop((left, top, left + size, top + size)), img.size, (w, h)


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
    """Check the .debs, extract and crop every photo, write ``out/<set>/<crop>``; returns the PNG paths."""
    debs = check_debs(debs_dir)
    for split in SIZES:
        (out / split).mkdir(parents=True, exist_ok=True)
    total = len(all_photos())
    written, i = [], 0
    for deb in debs:
        photos = read_photos(deb, PHOTOS[deb.name])
        for photo in PHOTOS[deb.name]:
            i += 1
            size = SIZES[photo.split]
            crop, src_size, mid_size = crop_square(photos[photo.path], size)
            dest = out / photo.split / photo.crop
            nbytes = write_png_atomic(crop, dest)
            print(f"[{i:2d}/{total}] {photo.path}: {src_size[0]}x{src_size[1]} -> {mid_size[0]}x{mid_size[1]}"
                  f" -> {size}x{size}  {photo.split}/{dest.name} ({nbytes} bytes)")
            written.append(dest)
    return written


def check(debs_dir: Path, shipped: Path) -> int:
    """Rebuild into a temp folder and compare every PNG's sha256 with the shipped one; returns 0 if all match.

    Files in ``shipped/<set>/`` that the recipe does not make are EXTRA and fail the check too.
    """
    print(f"rebuilding into a temporary folder to compare with {shipped} (Pillow {Image.__version__})")
    bad, extra = 0, []
    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = build(debs_dir, Path(tmp))
        for new in rebuilt:
            rel = new.relative_to(tmp)
            old = shipped / rel
            if not old.is_file():
                print(f"MISSING   {rel}: not in {shipped}")
                bad += 1
            elif sha256_file(old) == sha256_file(new):
                print(f"identical {rel}")
            else:
                with Image.open(old) as a, Image.open(new) as b:
                    same_pixels = a.mode == b.mode and a.size == b.size and a.tobytes() == b.tobytes()
                why = "same pixels, different PNG encoding" if same_pixels else "pixels differ"
                print(f"DIFFERS   {rel}: {why}")
                bad += 1
        made = {new.relative_to(tmp).as_posix() for new in rebuilt}
        for split in SIZES:
            for path in sorted((shipped / split).glob("*")) if (shipped / split).is_dir() else []:
                if f"{split}/{path.name}" not in made and not path.name.startswith("."):
                    extra.append(f"{split}/{path.name}")
                    print(f"EXTRA     {split}/{path.name}: shipped but not produced by the recipe")
    n = len(rebuilt)
    print(f"{n - bad}/{n} identical" + (f", {len(extra)} extra" if extra else ""))
    return 0 if bad == 0 and not extra else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.data.build_embedded",
        description="Rebuild the embedded crops (train/ and val/: 512x512, eval24/: 360x360) from five Debian .debs.")
    parser.add_argument("--debs", type=Path, required=True,
                        help="folder holding the five .deb files (apt-get download lomiri-wallpapers-16.04 "
                             "lomiri-wallpapers-20.04 mate-backgrounds lxqt-themes plasma-workspace-wallpapers)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder holding train/, val/ and eval24/ (default: the package's embedded/, "
                             f"{DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true",
                        help="rebuild into a temp folder and compare against the PNGs in --out instead of writing")
    args = parser.parse_args(argv)
    try:
        if args.check:
            return check(args.debs, args.out)
        written = build(args.debs, args.out)
        print(f"wrote {len(written)} PNGs to {args.out}/{{{','.join(SIZES)}}}")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - ours: named, logged, never exit 1 or 2
        return report_internal_error(e)


if __name__ == "__main__":
    sys.exit(main())
