"""The command line end to end: a tiny `pipeline all`, skipping, exact resume after a real kill, user errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models import load_checkpoint, save_checkpoint, create_model
from pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]
# Small enough for seconds on 2 cores; a real (shortened) run of the default preset.
TINY = ["--set", "train.batch=4", "--set", "train.lr_patch=16", "--set", "train.eval_every=0",
        "--set", "train.log_every=2"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "-q", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_all_distils_from_the_shipped_teacher_evaluates_gates_and_then_skips(tmp_path, capsys):
    run = tmp_path / "run"
    args = [*TINY, "--set", "train.iters=40", "--set", "train.ckpt_every=20"]
    code = main(["-q", "all", "--run-dir", str(run), *args])
    results = json.loads((run / "eval.json").read_text())
    bicubic, teacher, student = results
    assert bicubic["model"] == "bicubic" and len(bicubic["rows"]) == 24
    assert bicubic["mean"]["psnr_y"] == pytest.approx(32.334, abs=0.01)  # the protocol's x4 bicubic figure
    assert teacher["model"] == "teacher (edsr_baseline_x4.pt)" and student["model"] == "student (student.pt)"
    # The gate: exit 0 exactly when teacher and student both beat bicubic on mean Y-PSNR, 1 otherwise.
    beat = min(teacher["mean"]["psnr_y"], student["mean"]["psnr_y"]) > bicubic["mean"]["psnr_y"]
    assert code == (0 if beat else 1)
    assert not (run / "teacher.pt").exists()

    manifest = json.loads((run / "manifest.json").read_text())
    for name in ("student.pt", "eval.json", "eval.md", "student/log.jsonl"):
        art = manifest["artifacts"][name]
        assert art["size"] == (run / name).stat().st_size and len(art["sha256"]) == 64
        assert "torch" in art["versions"]
    log = [json.loads(line) for line in (run / "student" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if "loss" in r] == list(range(2, 41, 2))

    mtime = (run / "student.pt").stat().st_mtime_ns
    capsys.readouterr()
    main(["all", "--run-dir", str(run), *args])
    assert (run / "student.pt").stat().st_mtime_ns == mtime  # skipped, not redone
    assert "up to date" in (run / "run.log").read_text()


def test_all_trains_a_teacher_where_none_is_shipped(tmp_path):
    run = tmp_path / "run"
    main(["-q", "all", "--run-dir", str(run), *TINY, "--set", "train.iters=20", "--set", "model.teacher=tiny_teacher"])
    assert json.loads((run / "eval.json").read_text())[1]["model"] == "teacher (teacher.pt)"
    log = [json.loads(line) for line in (run / "teacher" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if "loss" in r] == list(range(2, 21, 2))
    assert "no tiny_teacher teacher is shipped for x4; training one" in (run / "run.log").read_text()


def test_resume_after_kill_gives_the_same_weights(tmp_path):
    args = [*TINY, "--set", "train.iters=12", "--set", "train.ckpt_every=3"]
    straight = tmp_path / "straight"
    assert run_cli("teacher", "--run-dir", str(straight), *args).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "-q", "teacher", "--run-dir", str(killed), *args],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "teacher" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    done = load_checkpoint(last)["iteration"]
    assert done < 12 and not (killed / "teacher.pt").exists()

    refused = run_cli("teacher", "--run-dir", str(killed), *args)  # neither --resume nor --force: refuse, keep it
    assert refused.returncode == 2 and "--resume" in refused.stderr
    assert load_checkpoint(last)["iteration"] == done
    resumed = run_cli("teacher", "--run-dir", str(killed), *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr

    a = load_checkpoint(straight / "teacher.pt")["state_dict"]
    b = load_checkpoint(killed / "teacher.pt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_resume_with_another_config_is_refused(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "--set", "train.iters=4", "--set", "train.ckpt_every=2"]
    assert run_cli("teacher", "--run-dir", str(run), *args).returncode == 0
    other = run_cli("teacher", "--run-dir", str(run), *args, "--set", "train.lr=0.5", "--resume")
    assert other.returncode == 2 and "train.lr" in other.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--model", "missing.pt"], "no such file"),
        (["eval", "--model", "bicubic", "--scale", "5"], "scale must be one of 2, 3, 4"),
        (["eval", "--model", "bicubic", "--data", "no/such/folder"], "no such folder"),
        (["config", "--set", "train.iters=abc"], "'train.iters'"),
        (["config", "--set", "train.nope=1"], "unknown config key 'train.nope'"),
        (["config", "--preset", "huge"], "unknown preset 'huge'"),
        (["models", "--lr-size", "big"], "WxH"),
        (["degrade", "--hr", "no/such", "--scale", "4", "--out", "x"], "folder not found"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_checkpoint_of_another_scale_or_corrupt(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "x2.pt", create_model("tiny_teacher", scale=2))
    assert main(["eval", "--model", str(ckpt), "--scale", "4"]) == 2
    assert "scale=2" in capsys.readouterr().err
    broken = tmp_path / "broken.pt"
    broken.write_bytes(ckpt.read_bytes()[:1000])
    assert main(["eval", "--model", str(broken)]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_eval_of_a_checkpoint_writes_json(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "t.pt", create_model("tiny_teacher", scale=3))
    out = tmp_path / "eval.json"
    assert main(["-q", "eval", "--model", str(ckpt), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["scale"] == 3 and len(result["rows"]) == 24
    assert "mean" in capsys.readouterr().out


def test_every_command_has_help_with_an_example(capsys):
    from pipeline.cli import EPILOG

    for command in EPILOG:
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        assert "example: pipeline " + command in capsys.readouterr().out


def test_version_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "pipeline", "--version"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and "facd-pipeline 0.1.0" in out.stdout and "torch" in out.stdout


def test_kernels_build_without_nvcc_is_a_clear_error(monkeypatch, tmp_path, capsys):
    import kernels.build

    def no_nvcc() -> str:
        raise kernels.build.KernelUnavailable("nvcc not found (set CUDA_HOME or put nvcc on PATH)")

    monkeypatch.setattr(kernels.build, "find_nvcc", no_nvcc)
    monkeypatch.setenv("FACD_KERNEL_CACHE", str(tmp_path))
    assert main(["kernels", "build", "--force"]) == 2
    assert "error: nvcc not found" in capsys.readouterr().err


def test_a_run_that_cannot_be_written_stops_before_it_starts(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["all", "--run-dir", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write the run directory {blocker / 'run'}: Not a directory" in err
    assert "Traceback" not in err and sorted(tmp_path.iterdir()) == [blocker]


def test_in_the_image_a_run_outside_a_mounted_volume_is_refused(monkeypatch, capsys):
    """The Docker image names its runs volume; a run on the container's own file system (no -v) would vanish."""
    monkeypatch.setenv("PIPELINE_RUNS_VOLUME", "/work/runs")
    on_root_fs = Path("/facd-no-volume-here") / "run"  # no file system is mounted there: it lies on "/"
    assert main(["all", "--run-dir", str(on_root_fs)]) == 2
    err = capsys.readouterr().err
    assert f"error: no volume is mounted for {on_root_fs}" in err and "-v \"$PWD/runs:/work/runs\"" in err
    assert not on_root_fs.parent.exists()
