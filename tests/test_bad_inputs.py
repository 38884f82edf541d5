"""Bad input gets one `error:` line and exit 2, and nothing already there is lost: the reproductions of a probe
with about 200 bad inputs, run against copies of an exported run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data.imageio import write_rgb
from pipeline.rundir import sha256_file

FAST = ["--set", 'verify.latency_sizes=["40x24"]', "--set", "verify.repeats=2", "--set", "verify.warmup=0"]


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture()
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_rgb(folder / f"{name}.png", rng.integers(0, 256, (32, 40, 3), dtype=np.uint8))
    return folder


# --- 1. bundle --force replaces only a previous bundle ---------------------------------------------------------------

def test_bundle_force_never_replaces_what_is_not_a_bundle(exported_run, tmp_path, capsys):
    run = _copy(exported_run, tmp_path)
    before = _digests(run)
    assert main(["-q", "bundle", "--run-dir", str(run), "--out", str(run / "student.pt"), "--force"]) == 2
    assert "inside the run directory" in _error(capsys)
    assert main(["-q", "bundle", "--run-dir", str(run), "--out", str(run / "deploy"), "--force"]) == 2
    assert "inside the run directory" in _error(capsys)
    assert _digests(run) == before and not (run / "deploy").exists()

    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    assert main(["-q", "bundle", "--run-dir", str(run), "--out", str(user), "--force"]) == 2
    assert "not a bundle" in _error(capsys)
    assert (user / "notes.txt").read_text() == "keep" and not (tmp_path / "mine.tar.gz").exists()

    plain = tmp_path / "plain"
    plain.write_text("keep")
    assert main(["-q", "bundle", "--run-dir", str(run), "--out", str(plain), "--force"]) == 2
    assert "not a bundle" in _error(capsys)
    assert plain.read_text() == "keep"

    tarball = tmp_path / "deploy.tar.gz"
    tarball.write_text("keep")
    assert main(["-q", "bundle", "--run-dir", str(run), "--out", str(tmp_path / "deploy"), "--force"]) == 2
    assert "not a bundle" in _error(capsys)
    assert tarball.read_text() == "keep" and not (tmp_path / "deploy").exists()

    tarball.unlink()
    assert main(["-q", "bundle", "--run-dir", str(run), "--out", str(tmp_path / "deploy")]) == 0
    assert main(["-q", "bundle", "--run-dir", str(run), "--out", str(tmp_path / "deploy"), "--force"]) == 0  # a bundle
    assert (tmp_path / "deploy" / "bundle.json").is_file() and _digests(run) == before


# --- 2 and 11. --json never replaces a file without --overwrite, and is no folder -------------------------------------

def test_json_outputs_refuse_an_existing_file_or_a_folder(tmp_path, capsys):
    hr = tmp_path / "hr"
    rng = np.random.default_rng(1)
    write_rgb(hr / "x.png", rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    ckpt = tmp_path / "student.pt"
    ckpt.write_bytes(b"precious")
    for cmd in (["score", "--sr", str(hr), "--hr", str(hr), "--scale", "4"],
                ["eval", "--model", "bicubic", "--data", str(hr), "--scale", "4"]):
        assert main(["-q", *cmd, "--json", str(ckpt)]) == 2
        assert "exists already" in _error(capsys) and ckpt.read_bytes() == b"precious"
        assert main(["-q", *cmd, "--json", str(tmp_path)]) == 2
        assert "is a folder" in _error(capsys)
        out = tmp_path / f"{cmd[0]}.json"
        assert main(["-q", *cmd, "--json", str(out)]) == 0
        assert main(["-q", *cmd, "--json", str(out), "--overwrite"]) == 0
        assert json.loads(out.read_text())


# --- 3 and 11. degrade checks every input first and never overwrites without --overwrite ---------------------------

def test_degrade_reads_everything_first_and_refuses_to_overwrite(photos, tmp_path, capsys):
    out = tmp_path / "lr"
    out.mkdir()
    (out / "b.png").write_bytes(b"mine")
    assert main(["-q", "degrade", "--hr", str(photos), "--scale", "4", "--out", str(out)]) == 2
    assert "--overwrite" in _error(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["b.png"] and (out / "b.png").read_bytes() == b"mine"

    (photos / "c.png").write_bytes(b"not a png")
    fresh = tmp_path / "fresh"
    assert main(["-q", "degrade", "--hr", str(photos), "--scale", "4", "--out", str(fresh)]) == 2
    assert "c.png" in _error(capsys)
    assert not fresh.exists() or not any(fresh.iterdir())
    (photos / "c.png").unlink()

    assert main(["-q", "degrade", "--hr", str(photos), "--scale", "4", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"] and (out / "b.png").read_bytes() != b"mine"

    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert main(["-q", "degrade", "--hr", str(photos), "--scale", "4", "--out", str(afile)]) == 2
    assert "not a folder" in _error(capsys)
    assert afile.read_text() == "keep"


def test_upscale_out_naming_a_file_is_refused(exported_run, photos, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert main(["-q", "upscale", str(photos), "--out", str(afile), "--run-dir", str(exported_run)]) == 2
    assert "not a folder" in _error(capsys)
    assert afile.read_text() == "keep"
