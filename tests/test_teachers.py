"""Shipped teachers: found by preset and scale, refused when missing or altered, used by `all` by default."""

from __future__ import annotations

import json

import pytest
import torch

import pipeline.training.teachers as teachers
from models import count_params, create_model, load_checkpoint, save_checkpoint
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.modelio import load_model
from pipeline.rundir import sha256_file


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A stand-in package folder holding one shipped tiny_teacher at x4."""
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "tiny_teacher_x4.pt", create_model("tiny_teacher", scale=4), role="teacher")
    entry = {"preset": "tiny_teacher", "scale": 4, "file": ckpt.name, "sha256": sha256_file(ckpt)}
    (tmp_path / teachers.INDEX).write_text(json.dumps({"teachers": [entry]}))
    monkeypatch.setattr(teachers, "TEACHERS_DIR", tmp_path)
    return ckpt


def test_found_by_preset_and_scale(shipped):
    assert teachers.shipped_teacher("tiny_teacher", 4) == shipped
    assert teachers.shipped_teacher("tiny_teacher", 2) is None
    assert teachers.shipped_teacher("edsr_baseline", 4) is None


def test_missing_or_altered_file_is_one_clear_error_naming_it(shipped):
    data = bytearray(shipped.read_bytes())
    data[-100] ^= 0xFF
    shipped.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"shipped teacher {shipped} is altered: sha256"):
        teachers.shipped_teacher("tiny_teacher", 4)
    shipped.unlink()
    with pytest.raises(UserError, match=f"shipped teacher {shipped} is missing"):
        teachers.shipped_teacher("tiny_teacher", 4)


def test_distill_uses_the_shipped_teacher_unless_the_run_has_its_own(shipped, tmp_path, capsys):
    run = tmp_path / "run"
    small = [x for kv in ["train.batch=4", "train.lr_patch=12", "train.eval_every=0", "train.iters=1",
                          "train.ckpt_every=1", 'distill.method="out"', "model.teacher=tiny_teacher"]
             for x in ("--set", kv)]
    assert main(["distill", "--run-dir", str(run), *small]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert sha256_file(shipped) in manifest["artifacts"]["student.pt"]["inputs"].values()
    assert not (run / "teacher.pt").exists()
    shipped.unlink()
    assert main(["-q", "distill", "--run-dir", str(run), *small]) == 2
    assert "shipped teacher" in capsys.readouterr().err


def test_the_shipped_edsr_baseline_teacher_is_heavy_checked_and_the_default():
    """The real package data: an EDSR-baseline x4 (16 blocks x 64 channels) at least 10x the default student, its
    sha256 the index's, and the default config distils from it."""
    cfg = load_config()
    path = teachers.shipped_teacher(cfg.model.teacher, cfg.scale)
    assert cfg.model.teacher == "edsr_baseline" and path is not None
    [entry] = [e for e in teachers.shipped_teachers() if e["preset"] == "edsr_baseline"]
    assert sha256_file(path) == entry["sha256"] and entry["scale"] == 4
    ckpt = load_checkpoint(path)
    assert ckpt["preset"] == "edsr_baseline" and ckpt["role"] == "teacher" and "optimizer" not in ckpt
    teacher = load_model(path, scale=4)
    assert (teacher.config["blocks"], teacher.config["channels"]) == (16, 64)
    assert count_params(teacher) >= 10 * count_params(create_model(cfg.model.student, scale=4))
