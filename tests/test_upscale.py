"""`pipeline upscale`: every backend that runs here, names kept, tiling within 0.05 dB of whole images, and the bad
inputs that must stop it before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data.datasets import PairFolder
from pipeline.data.imageio import read_rgb, write_rgb
from pipeline.metrics import psnr_y


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """Two LR photos of different sizes in a folder, with their HR images."""
    folder = tmp_path_factory.mktemp("photos")
    hr = {}
    for i, pair in enumerate(list(PairFolder("embedded", 4))[:2]):
        lr = pair.lr[: 60 + 10 * i, : 80 + 6 * i]
        write_rgb(folder / f"{pair.name}.png", lr)
        hr[f"{pair.name}.png"] = pair.hr[: lr.shape[0] * 4, : lr.shape[1] * 4]
    return folder, hr


def _up(*args: str) -> int:
    return main(["-q", "upscale", *args])


def test_backends_keep_names_and_agree(exported_run, photos, tmp_path, capsys):
    folder, hr = photos
    outs = {}
    for backend, precision in (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16")):
        out = tmp_path / f"{backend}-{precision}"
        assert _up(str(folder), "--out", str(out), "--run-dir", str(exported_run), "--backend", backend,
                   "--precision", precision) == 0
        assert sorted(p.name for p in out.iterdir()) == sorted(hr)
        outs[backend, precision] = {name: read_rgb(out / name) for name in hr}
    for name, ref in outs["torch", "fp32"].items():
        assert ref.shape == hr[name].shape
        assert psnr_y(outs["onnxruntime", "fp32"][name], ref, 4) > 60
        assert psnr_y(outs["onnxruntime", "fp16"][name], ref, 4) > 45
    assert "ONNX Runtime CPU provider" in capsys.readouterr().out


def test_int8_on_the_cpu_takes_the_cpu_model_and_says_so(exported_run, photos, tmp_path, capsys):
    folder, _ = photos
    assert _up(str(folder), "--out", str(tmp_path / "o"), "--run-dir", str(exported_run), "--precision", "int8",
               "--backend", "onnxruntime") == 0
    assert f"CPU provider, {exported_run / 'student.int8-cpu.onnx'} (int8-cpu)" in capsys.readouterr().out


def test_tiled_equals_untiled_within_0_05_db(exported_run, photos, tmp_path):
    folder, hr = photos
    for tile in ("0", "40"):
        assert _up(str(folder), "--out", str(tmp_path / tile), "--run-dir", str(exported_run), "--tile", tile,
                   "--overlap", "16", "--batch", "3") == 0
    for name, ref in hr.items():
        whole, tiled = read_rgb(tmp_path / "0" / name), read_rgb(tmp_path / "40" / name)
        assert abs(psnr_y(tiled, ref, 4) - psnr_y(whole, ref, 4)) <= 0.05
        assert psnr_y(tiled, whole, 4) > 50


def test_model_file_instead_of_a_run(exported_run, photos, tmp_path):
    folder, hr = photos
    one = folder / sorted(hr)[0]
    assert _up(str(one), "--out", str(tmp_path / "o"), "--model", str(exported_run / "student.fp16.onnx")) == 0
    assert [p.name for p in (tmp_path / "o").iterdir()] == [one.name]
    assert _up(str(one), "--out", str(tmp_path / "p"), "--model", str(exported_run / "student.fp16.onnx"),
               "--precision", "int8") == 2


def test_bad_inputs_stop_before_anything_is_written(exported_run, photos, tmp_path, capsys):
    folder, hr = photos
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    (mixed / "notes.txt").write_text("not an image")
    run = ["--run-dir", str(exported_run)]

    assert _up(str(mixed / "notes.txt"), "--out", str(tmp_path / "a"), *run) == 2
    assert "is not an image" in capsys.readouterr().err
    (mixed / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert _up(str(mixed), "--out", str(tmp_path / "b"), *run) == 2
    assert "broken.png" in capsys.readouterr().err and not (tmp_path / "b").exists()
    (mixed / "broken.png").unlink()

    before = {p.name: p.read_bytes() for p in mixed.iterdir()}
    assert _up(str(mixed), "--out", str(mixed), *run) == 2
    assert "is the input folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in mixed.iterdir()} == before

    out = tmp_path / "out"
    assert _up(str(folder), "--out", str(out), *run) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert _up(str(folder), "--out", str(out), *run, "--tile", "40", "--overlap", "16") == 2
    assert "exist already" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert _up(str(folder), "--out", str(out), *run, "--overwrite") == 0

    assert _up(str(folder), "--out", str(tmp_path / "c"), "--model", str(mixed / "notes.txt")) == 2
    assert "expected a checkpoint" in capsys.readouterr().err


def test_a_plan_that_cannot_run_here_is_refused(exported_run, photos, tmp_path, capsys):
    folder, _ = photos
    plan = tmp_path / "student.fp16.plan"
    plan.write_bytes(b"plan bytes")
    sidecar = {"precision": "fp16", "scale": 4, "max_batch": 1, "profile": {"min": [64, 64], "opt": [180, 320],
               "max": [180, 320]}, "gpu": "NVIDIA A100", "compute_capability": "8.0", "tensorrt": "10.3.0",
               "version_compatible": False, "plan_sha256": "0" * 64}
    (tmp_path / "student.fp16.plan.json").write_text(json.dumps(sidecar))
    assert _up(str(folder), "--out", str(tmp_path / "o"), "--model", str(plan), "--backend", "tensorrt") == 2
    err = capsys.readouterr().err
    assert "student.fp16.plan" in err and not (tmp_path / "o").exists()
