"""Reading, writing and listing images: conversions, 16-bit PNGs, broken files, atomic writes."""

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import imageio
from pipeline.data.imageio import list_images, read_rgb, write_rgb
from pipeline.errors import UserError


def rgb(seed=0, shape=(20, 30, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_raw_png(path: Path, values: np.ndarray, bit_depth: int, colour_type: int) -> None:
    """A minimal PNG written by hand (Pillow cannot write 16-bit colour): filter 0 on every row."""
    h, w = values.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + values[y].astype(dtype).tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# ---- round trips and conversions ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".PNG"])
def test_lossless_round_trip(tmp_path, suffix):
    img = rgb()
    write_rgb(tmp_path / f"a{suffix}", img)
    np.testing.assert_array_equal(read_rgb(tmp_path / f"a{suffix}"), img)


def test_jpeg_write_is_close(tmp_path):
    img = np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], 48, axis=0).repeat(3, axis=2)
    write_rgb(tmp_path / "a.jpg", img)
    back = read_rgb(tmp_path / "a.jpg")
    assert back.shape == img.shape and np.abs(back.astype(int) - img).mean() < 2
    assert Image.open(tmp_path / "a.jpg").format == "JPEG"


def test_grey_write_and_read_replicates_with_a_note(tmp_path, caplog):
    grey = rgb(1, (10, 12))
    write_rgb(tmp_path / "g.png", grey)
    assert Image.open(tmp_path / "g.png").mode == "L"
    with caplog.at_level(logging.INFO, logger="pipeline"):
        out = read_rgb(tmp_path / "g.png")
    np.testing.assert_array_equal(out, np.stack([grey] * 3, axis=2))
    assert any("g.png" in r.getMessage() and "RGB" in r.getMessage() for r in caplog.records)


def test_rgba_drops_alpha_with_a_note(tmp_path, caplog):
    rgba = rgb(2, (10, 12, 4))
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    with caplog.at_level(logging.INFO, logger="pipeline"):
        out = read_rgb(tmp_path / "a.png")
    np.testing.assert_array_equal(out, rgba[:, :, :3])  # colours kept as they are, not composited
    assert any("a.png" in r.getMessage() and "alpha dropped" in r.getMessage() for r in caplog.records)


def test_palette_becomes_its_colours(tmp_path, caplog):
    index = rgb(3, (6, 7)) % 4
    im = Image.fromarray(index.astype(np.uint8), "P")
    palette = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 99, 199]]
    im.putpalette([c for colour in palette for c in colour])
    im.save(tmp_path / "p.png")
    with caplog.at_level(logging.INFO, logger="pipeline"):
        out = read_rgb(tmp_path / "p.png")
    np.testing.assert_array_equal(out, np.array(palette, dtype=np.uint8)[index])
    assert any("p.png" in r.getMessage() for r in caplog.records)


def test_rgb_is_read_without_a_note(tmp_path, caplog):
    write_rgb(tmp_path / "a.png", rgb())
    with caplog.at_level(logging.INFO, logger="pipeline"):
        read_rgb(tmp_path / "a.png")
    assert caplog.records == []


# ---- 16-bit PNGs -------------------------------------------------------------------------------------------


def test_16bit_grey_png_is_rounded_to_8bit(tmp_path, caplog):
    # Edge cases of round(v / 257): 257 k + 128 -> k (k + 0.498), 257 k + 129 -> k + 1 (k + 0.502).
    v = np.array([[0, 128, 129, 257 * 7 + 128, 257 * 7 + 129, 65535], [1000, 30000, 257 * 200, 65407, 65408, 3]])
    write_raw_png(tmp_path / "g16.png", v, 16, 0)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        out = read_rgb(tmp_path / "g16.png")
    expected = (2 * v + 257) // 514  # round(v / 257) in integers (no ties exist)
    np.testing.assert_array_equal(out, np.stack([expected] * 3, axis=2))
    assert expected[0].tolist() == [0, 0, 1, 7, 8, 255]
    assert any("g16.png" in r.getMessage() and "16-bit" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("colour_type, channels", [(2, 3), (4, 2), (6, 4)])
def test_16bit_colour_png_is_refused(tmp_path, colour_type, channels):
    # Pillow would silently keep only the high byte of each value.
    v = np.random.default_rng(4).integers(0, 65536, (5, 6, channels))
    write_raw_png(tmp_path / "c16.png", v, 16, colour_type)
    with pytest.raises(UserError, match=r"c16\.png.*16-bit"):
        read_rgb(tmp_path / "c16.png")


def test_8bit_raw_png_helper_is_valid(tmp_path):
    # The hand-written PNG above is a real PNG: the same writer at 8 bits reads back exactly.
    img = rgb(5, (5, 6, 3))
    write_raw_png(tmp_path / "c8.png", img, 8, 2)
    np.testing.assert_array_equal(read_rgb(tmp_path / "c8.png"), img)


# ---- broken input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("BMP", ".bmp")])
def test_truncated_file_is_a_user_error(tmp_path, fmt, suffix):
    path = tmp_path / f"t{suffix}"
    Image.fromarray(rgb(6, (64, 64, 3))).save(path, fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(UserError, match=rf"t\{suffix}.*truncated"):
        read_rgb(path)


def test_non_image_is_a_user_error(tmp_path):
    (tmp_path / "notes.png").write_text("not an image\n")
    with pytest.raises(UserError, match=r"notes\.png: not an image"):
        read_rgb(tmp_path / "notes.png")


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"nope\.png: No such file"):
        read_rgb(tmp_path / "nope.png")


def test_decompression_bomb_is_a_user_error(tmp_path, monkeypatch):
    write_rgb(tmp_path / "big.png", rgb(7, (30, 30, 3)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 900 pixels > 2 x limit: Pillow raises
    with pytest.raises(UserError, match=r"big\.png.*exceeds limit"):
        read_rgb(tmp_path / "big.png")


# ---- writing -----------------------------------------------------------------------------------------------


def test_write_refuses_wrong_arrays(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_rgb(tmp_path / "a.png", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        write_rgb(tmp_path / "a.png", np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(UserError, match="suffix"):
        write_rgb(tmp_path / "a.tif", np.zeros((4, 4, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_write_creates_folders_and_leaves_no_temp_files(tmp_path):
    out = tmp_path / "x" / "y" / "a.png"
    write_rgb(out, rgb(8))
    write_rgb(out, rgb(9))  # replaces
    np.testing.assert_array_equal(read_rgb(out), rgb(9))
    assert [p.name for p in out.parent.iterdir()] == ["a.png"]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "a.png"
    write_rgb(out, rgb(10))

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_rgb(out, rgb(11))
    monkeypatch.undo()
    np.testing.assert_array_equal(read_rgb(out), rgb(10))
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


# ---- listing -----------------------------------------------------------------------------------------------


def test_list_images_sorted_flat_and_case_insensitive(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.JpEg", "d.bmp", "notes.txt", "._a.png", "e.png.tmp"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.png").write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.JpEg", "d.bmp"]
    assert imageio.IMAGE_SUFFIXES == (".png", ".jpg", ".jpeg", ".bmp")


def test_list_images_errors_name_the_folder(tmp_path):
    with pytest.raises(UserError, match="folder not found: .*missing"):
        list_images(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(UserError, match="not a folder: .*file.png"):
        list_images(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match="no images .* in folder .*empty"):
        list_images(tmp_path / "empty")
