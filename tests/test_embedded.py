"""The images shipped in pipeline/data/embedded/: their checksums against ATTRIBUTION.md and the tables of
pipeline/data/build_embedded.py, the sets' names and sizes, no photo in two sets, the validation split, and the
package data that ships them."""

import fnmatch
import hashlib
import io
import os
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import build_embedded as be
from pipeline.config import Config
from pipeline.data.datasets import EMBEDDED, EMBEDDED_DIR, PairFolder, train_and_validation
from pipeline.data.imageio import read_rgb

ROOT = Path(__file__).resolve().parents[1]
ATTRIBUTION = EMBEDDED_DIR / "ATTRIBUTION.md"
EVAL7 = ["astronaut", "chelsea", "china", "coffee", "flower", "grace_hopper", "rocket"]
SETS = ("train", "val", "eval24", "eval")  # the folders of shipped images
TEACHER_HELD_OUT = {"Kleiber_by_Lukas_Baubkus", "analogpattern_by_Peter_Nerlich", "picosdeeuropa_by_Aitzol_Berasategi"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shipped() -> list[str]:
    """Every shipped image, as `<folder>/<name>`."""
    return sorted(f"{s}/{p.name}" for s in SETS for p in (EMBEDDED_DIR / s).iterdir()
                  if p.is_file() and not p.name.startswith("."))


def _checksum_rows() -> dict[str, list[list[str]]]:
    """ATTRIBUTION.md table rows that start with a shipped file and hold sha256 values: file -> [[sha256, ...], ...]."""
    rows: dict[str, list[list[str]]] = {}
    for line in ATTRIBUTION.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| `((?:train|val|eval24|eval)/[^`]+)` \|", line)
        hashes = re.findall(r"`([0-9a-f]{64})`", line)
        if m and hashes:
            rows.setdefault(m.group(1), []).append(hashes)
    return rows


def test_every_shipped_image_has_the_sha256_of_attribution_md_and_build_embedded():
    rows, shipped = _checksum_rows(), _shipped()
    assert sorted(rows) == shipped, "ATTRIBUTION.md must list every shipped image (and no other) with its sha256"
    photos = {f"{p.split}/{p.crop}": p for _deb, p in be.all_photos()}
    for name in shipped:
        (hashes,) = rows[name]  # one checksum row per file
        if name.startswith("eval/"):  # copied unchanged from the wheels: one sha256, of the file itself
            assert hashes == [_sha256(EMBEDDED_DIR / name)], name
        else:  # a crop: sha256 of the original photo, then of the crop
            assert hashes == [photos[name].sha256, _sha256(EMBEDDED_DIR / name)], name


def test_build_embedded_tables_match_the_shipped_folders():
    assert set(be.PHOTOS) == set(be.DEB_SHA256) and set(be.SIZES) == {"train", "val", "eval24"}
    photos = [p for _deb, p in be.all_photos()]
    assert len({p.sha256 for p in photos}) == len(photos), "a photo is listed twice"
    for split in be.SIZES:
        names = sorted(p.name for p in (EMBEDDED_DIR / split).glob("*.png"))
        assert sorted(be.crops_of(split)) == names, split
        assert all(read_rgb(EMBEDDED_DIR / split / n).shape == (be.SIZES[split], be.SIZES[split], 3) for n in names)


def test_recipe_rounds_the_long_side_half_up_and_crops_the_centre():
    assert be.resized_size(2560, 1600, 360) == (576, 360) and be.resized_size(1203, 1600, 360) == (360, 479)
    assert be.resized_size(3, 2, 1) == (2, 1)  # 1.5 rounds up
    img = Image.new("RGB", (300, 200), (10, 20, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    crop, src, mid = be.crop_square(buf.getvalue(), 64)
    assert crop.size == (64, 64) and src == (300, 200) and mid == (96, 64)


def test_the_sets_have_their_names_and_sizes():
    assert set(EMBEDDED) == {"embedded", "embedded-eval7", "embedded-train", "embedded-val"}
    eval_set, eval7, train, val = (PairFolder(n, 4) for n in ("embedded", "embedded-eval7", "embedded-train",
                                                               "embedded-val"))
    assert len(eval_set) >= 24 and eval_set.folder == EMBEDDED_DIR / "eval24"
    assert [f.stem for f in eval7.hr_files] == EVAL7 and eval7.folder == EMBEDDED_DIR / "eval"
    assert len(train) == 15 and len(val) == 7


def _thumb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BOX), dtype=np.float32)


@pytest.mark.parametrize(("first", "second"), [("train", "eval24"), ("val", "eval24"), ("train", "val")])
def test_no_photo_is_in_two_sets(first, second):
    a_crops, b_crops = be.crops_of(first), be.crops_of(second)
    assert not {p.sha256 for p in a_crops.values()} & {p.sha256 for p in b_crops.values()}
    assert not {Path(n).stem for n in a_crops} & {Path(n).stem for n in b_crops}
    # By content too: every recipe keeps the photo's whole centre square, so one photo in two sets would give two
    # near-identical 32x32 thumbnails (mean |difference| under 1 grey level); distinct photos differ by 19 or more.
    a = [_thumb(EMBEDDED_DIR / first / n) for n in a_crops]
    b = [_thumb(EMBEDDED_DIR / second / n) for n in b_crops]
    closest = min(float(np.abs(x - y).mean()) for x in a for y in b)
    assert closest > 5, closest


def test_the_default_validation_split_is_what_the_shipped_teacher_never_saw():
    """The 3 training images held out when the shipped teacher was trained (pipeline/data/teachers/README.md), then
    the 7 validation crops; the 12 others are the teacher's training images, and the students'."""
    d = Config().data
    train, val = train_and_validation(d.train, d.val_count, d.val, 4)
    assert [f.stem for f in train.hr_files if f.stem in TEACHER_HELD_OUT] == []
    assert len(train) == 12 and len(val) == 10
    assert [pair.name for pair in val][:3] == sorted(TEACHER_HELD_OUT)
    assert {pair.name for pair in val} & {f.stem for f in train.hr_files} == set()


def test_the_package_data_ships_every_embedded_image():
    """An installed (non-editable) package holds only what [tool.setuptools.package-data] names."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["pipeline.data"]
    missing = [f for f in ["ATTRIBUTION.md", *_shipped()]
               if not any(fnmatch.fnmatch(f"embedded/{f}", pat) for pat in patterns)]
    assert not missing, f"not in pyproject.toml's package-data for pipeline.data: {missing}"


@pytest.mark.skipif(not os.environ.get("FACD_DEBS"), reason="set FACD_DEBS to a folder holding the five .debs")
def test_build_embedded_check_reproduces_every_crop(capsys):
    assert be.main(["--debs", os.environ["FACD_DEBS"], "--check"]) == 0
    assert f"{len(be.all_photos())}/{len(be.all_photos())} identical" in capsys.readouterr().out
