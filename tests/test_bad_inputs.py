"""Bad input gets one `error:` line and exit 2, and nothing already there is lost: the reproductions of a probe
with about 200 bad inputs, run against copies of an exported run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from models import create_model, load_checkpoint, save_checkpoint
from pipeline.cli import main
from pipeline.data.imageio import write_rgb
from pipeline.rundir import sha256_file

from conftest import SMALL_CALIB

TINY = ["--set", "train.batch=4", "--set", "train.lr_patch=16", "--set", "train.eval_every=0", "--set",
        "train.log_every=2"]
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


# --- 4. one writer per run directory; inputs checked when a stage starts and when it records -------------------------

def test_a_second_writer_fails_naming_the_holder(exported_run, tmp_path, capsys, monkeypatch):
    from pipeline import rundir

    run = _copy(exported_run, tmp_path)
    before = _digests(run)
    monkeypatch.setattr(rundir, "LOCK_WAIT_S", 0.2)
    with rundir.RunDir(run).lock("export"):
        for cmd in (["quantize", "--force", *SMALL_CALIB], ["export", "--force"],
                    ["bundle", "--out", str(tmp_path / "b")]):
            assert main(["-q", cmd[0], "--run-dir", str(run), *cmd[1:]]) == 2
            err = _error(capsys)
            assert f"in use by pid {os.getpid()}" in err and "`pipeline export`" in err
    assert _digests(run) == {**before, ".lock": sha256_file(run / ".lock")}
    assert main(["-q", "export", "--run-dir", str(run)]) == 0  # free again: up to date, skipped


def test_an_input_changed_while_a_stage_runs_is_not_recorded(exported_run, tmp_path, capsys, monkeypatch):
    import onnx

    from pipeline.convert import quantize

    run = _copy(exported_run, tmp_path)
    stages_before = json.loads((run / "manifest.json").read_text())["stages"]
    real = quantize.activation_amax

    def and_another_export_lands(fp32, *args):
        out = real(fp32, *args)
        proto = onnx.load(str(run / "student.fp16.onnx"))
        proto.metadata_props.add(key="note", value="another student")
        onnx.save(proto, str(run / "student.fp16.onnx"))
        return out

    monkeypatch.setattr(quantize, "activation_amax", and_another_export_lands)
    assert main(["-q", "quantize", "--run-dir", str(run), "--force", *SMALL_CALIB]) == 2
    assert "changed while the stage ran" in _error(capsys)
    assert json.loads((run / "manifest.json").read_text())["stages"] == stages_before
    monkeypatch.setattr(quantize, "activation_amax", real)
    assert main(["-q", "quantize", "--run-dir", str(run), "--force", *SMALL_CALIB]) == 2  # checked at the start too
    assert "student.fp16.onnx" in (err := _error(capsys)) and "differ(s) from the sha256 in manifest.json" in err
    assert main(["-q", "bundle", "--run-dir", str(run), "--out", str(tmp_path / "b")]) == 2
    assert "differ(s) from the sha256" in _error(capsys)


# --- 5. a copied or moved run is the same run; a finished training is not an interrupted one ---------------------

def test_a_copied_finished_run_is_up_to_date_and_a_changed_config_retrains(tmp_path, capsys):
    args = [*TINY, "--set", "train.iters=4", "--set", "train.ckpt_every=2"]
    run = tmp_path / "run"
    assert main(["-q", "teacher", "--run-dir", str(run), *args]) == 0
    assert main(["-q", "distill", "--run-dir", str(run), *args]) == 0
    manifest = (run / "manifest.json").read_text()
    assert str(tmp_path) not in manifest  # no absolute path of the run in keys or records
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    shutil.rmtree(run)
    before = _digests(moved)
    capsys.readouterr()
    assert main(["teacher", "--run-dir", str(moved), *args]) == 0
    assert main(["distill", "--run-dir", str(moved), *args]) == 0
    logs = ("run.log", ".lock")
    assert {k: v for k, v in _digests(moved).items() if k not in logs} == {k: v for k, v in before.items()
                                                                           if k not in logs}
    assert (moved / "run.log").read_text().count("up to date") == 2  # teacher, distill
    assert main(["-q", "distill", "--run-dir", str(moved), *TINY, "--set", "train.iters=6"]) == 0  # redone, not refused
    assert load_checkpoint(moved / "student.pt")["config"]["train"]["iters"] == 6


# --- 6. exporting a checkpoint that is not the run's student ---------------------------------------------------------

def test_export_of_another_checkpoint_needs_force_and_verify_notices(exported_run, tmp_path, capsys):
    run = _copy(exported_run, tmp_path)
    teacher = save_checkpoint(tmp_path / "teacher.pt", create_model("tiny_teacher", scale=4), role="teacher",
                              preset="tiny_teacher")
    before = _digests(run)
    assert main(["-q", "export", "--run-dir", str(run), "--student", str(teacher)]) == 2
    err = _error(capsys)
    assert "not this run's student" in err and "it is a teacher" in err and "student.fp32.onnx" in err
    assert _digests(run) == {**before, ".lock": sha256_file(run / ".lock")}
    assert main(["-q", "export", "--run-dir", str(run), "--student", str(teacher), "--force"]) == 0
    assert "replacing student.fp32.onnx, student.fp16.onnx" in capsys.readouterr().err
    assert main(["-q", "verify", "--run-dir", str(run), *FAST]) == 2
    assert "exported from another checkpoint than" in _error(capsys)
    assert main(["-q", "bundle", "--run-dir", str(run), "--out", str(tmp_path / "deploy")]) == 2
    assert "exported from another checkpoint than" in _error(capsys)


# --- 9. --run-dir: a file, a typo, read-only ------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [["teacher"], ["export"], ["quantize"], ["verify"], ["bundle", "--out", "x"], ["all"]])
def test_run_dir_naming_a_file_is_refused(cmd, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert main(["-q", cmd[0], "--run-dir", str(afile), *cmd[1:]]) == 2
    assert "is a file, not a run directory" in _error(capsys)
    assert afile.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("cmd", [["verify"], ["bundle", "--out", "x"]])
def test_a_mistyped_run_dir_is_not_created(cmd, tmp_path, capsys):
    assert main(["-q", cmd[0], "--run-dir", str(tmp_path / "typo"), *cmd[1:]]) == 2
    assert "no run directory" in _error(capsys)
    assert not any(tmp_path.iterdir())


def _read_only(folder: Path, monkeypatch) -> None:
    for p in [folder, *folder.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    if os.geteuid() == 0:  # root may write anyway: let the check the code makes see what any other user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK and Path(p).resolve()
                            .is_relative_to(folder.resolve()) else real(p, mode, **kw))


def test_verify_and_bundle_work_on_a_read_only_run(exported_run, tmp_path, capsys, monkeypatch):
    run = _copy(exported_run, tmp_path)
    (run / ".lock").unlink(missing_ok=True)
    (run / "run.log").unlink(missing_ok=True)
    before = _digests(run)
    _read_only(run, monkeypatch)
    try:
        assert main(["-q", "bundle", "--run-dir", str(run), "--out", str(tmp_path / "deploy")]) == 0
        assert main(["verify", "--run-dir", str(run), *FAST]) == 0
        captured = capsys.readouterr()
        assert "read-only: the report is printed, not written" in captured.err and "onnxruntime-cpu" in captured.out
        assert _digests(run) == before
        assert main(["-q", "export", "--run-dir", str(run), "--force"]) == 2
        assert "cannot write the run directory" in _error(capsys)
    finally:
        for p in [run, *run.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)


# --- 16. what an interrupted export left is cleaned on the next start ----------------------------------------------

def test_temporaries_of_a_killed_writer_are_removed_on_the_next_start(exported_run, tmp_path):
    run = _copy(exported_run, tmp_path)
    (run / ".stage-k1ll3d").mkdir()
    (run / ".stage-k1ll3d" / "student.fp32.onnx").write_bytes(b"half")
    (run / ".student.int8.onnx.abc.tmp").write_bytes(b"half")
    (run / "student").mkdir()
    (run / "student" / ".last.pt.x.tmp").write_bytes(b"half")
    assert main(["-q", "export", "--run-dir", str(run)]) == 0
    assert not list(run.glob(".stage-*")) and not list(run.rglob("*.tmp"))


# --- 7. images too small for the scale or the SSIM window ---------------------------------------------------------

@pytest.mark.parametrize("wh", [(1, 1), (7, 5), (16, 16)])
def test_eval_data_with_a_tiny_image_names_it(wh, tmp_path, capsys):
    data = tmp_path / "data"
    rng = np.random.default_rng(2)
    write_rgb(data / "fine.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    write_rgb(data / "tiny.png", rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    assert main(["-q", "eval", "--model", "bicubic", "--data", str(data), "--scale", "4"]) == 2
    assert "tiny" in (err := _error(capsys)) and "too small" in err


def test_training_skips_images_too_small_to_degrade_and_eval_refuses_them(tmp_path, capsys):
    data = tmp_path / "train"
    rng = np.random.default_rng(3)
    write_rgb(data / "big.png", rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    write_rgb(data / "dot.png", rng.integers(0, 256, (1, 1, 3), dtype=np.uint8))
    run = tmp_path / "run"
    args = [*TINY, "--set", "train.iters=2", "--set", "train.ckpt_every=2", "--set", f'data.train="{data}"',
            "--set", "data.val_count=0"]
    assert main(["teacher", "--run-dir", str(run), *args]) == 0
    assert "dot" in capsys.readouterr().err  # the warning names the skipped image
    assert main(["-q", "teacher", "--run-dir", str(tmp_path / "run2"), *args, "--set", f'data.eval="{data}"']) == 2
    assert "dot.png" in _error(capsys)


# --- 8. files that load but are not checkpoints -----------------------------------------------------------------------

@pytest.mark.parametrize("content", ["list", "tensor", "int-keys", "list-state-dict", "none-model"])
def test_loadable_files_that_are_not_checkpoints(content, tmp_path, capsys):
    import torch

    from models.checkpoint import FORMAT

    good = create_model("tiny_student", scale=4)
    obj = {"list": [1, 2, 3], "tensor": torch.zeros(3), "int-keys": {1: torch.zeros(1), 2: torch.zeros(2)},
           "list-state-dict": {"format": FORMAT, "model": good.config, "state_dict": [torch.zeros(1)]},
           "none-model": {"format": FORMAT, "model": None, "state_dict": {}}}[content]
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    assert main(["-q", "eval", "--model", str(path)]) == 2
    assert str(path) in _error(capsys)


# --- 10. values the config check let through ------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [("train.lr=nan", "train.lr"), ("facd.tau=nan", "facd.tau"),
                                           ("train.lr=inf", "train.lr"),
                                           ("distill.lambda_out=inf", "distill.lambda_out"),
                                           ("quant.max_drop_db=-inf", "quant.max_drop_db"),
                                           ("distill.gate_margin=nan", "distill.gate_margin"),
                                           ("model.teacher=nope", "model.teacher"),
                                           ("model.student=edsr_studnet", "model.student")])
def test_config_refuses_non_finite_floats_and_unknown_model_presets(override, key, capsys):
    assert main(["config", "--set", override]) == 2
    assert f"'{key}'" in _error(capsys)


def test_config_naming_a_folder_is_refused(tmp_path, capsys):
    assert main(["config", "--config", str(tmp_path)]) == 2
    assert "is a folder" in _error(capsys)


# --- 12. quantize --calib that is truncated or has no held-out crops ------------------------------------------------

def test_quantize_with_a_truncated_or_holdout_free_calibration_set(exported_run, tmp_path, capsys):
    run = _copy(exported_run, tmp_path)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes((run / "calib.npz").read_bytes()[:5000])
    before = _digests(run)
    assert main(["-q", "quantize", "--run-dir", str(run), "--force", *SMALL_CALIB, "--calib", str(truncated)]) == 2
    assert "truncated.npz" in _error(capsys)
    with np.load(run / "calib.npz") as z:
        data = dict(z)
    data["holdout"][:] = False
    np.savez(tmp_path / "noholdout.npz", **data)
    assert main(["-q", "quantize", "--run-dir", str(run), "--force", *SMALL_CALIB, "--calib",
                 str(tmp_path / "noholdout.npz")]) == 2
    assert "held-out" in _error(capsys)
    data["holdout"][:] = True
    np.savez(tmp_path / "allholdout.npz", **data)
    assert main(["-q", "quantize", "--run-dir", str(run), "--force", *SMALL_CALIB, "--calib",
                 str(tmp_path / "allholdout.npz")]) == 2
    assert "calibrat" in _error(capsys)
    logs = ("run.log", ".lock")
    assert {k: v for k, v in _digests(run).items() if k not in logs} == {k: v for k, v in before.items()
                                                                         if k not in logs}


# --- 13. a full disk during a checkpoint write -----------------------------------------------------------------------

def test_a_full_disk_says_so_and_loses_nothing(tmp_path, capsys, monkeypatch):
    import errno

    run = tmp_path / "run"
    args = [*TINY, "--set", "train.iters=2", "--set", "train.ckpt_every=2"]
    assert main(["-q", "teacher", "--run-dir", str(run), *args]) == 0
    before = _digests(run)

    def full(fd):  # what fsync (or the write before it) reports when the disk fills up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert main(["-q", "teacher", "--run-dir", str(run), *args, "--force"]) == 2
    assert "disk is full" in _error(capsys)
    assert _digests(run)["teacher.pt"] == before["teacher.pt"] and not list(run.rglob("*.tmp"))


# --- 14. an ONNX file with our metadata but another graph ----------------------------------------------------------

def test_a_model_whose_output_size_contradicts_its_scale_is_refused(exported_run, photos, tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    meta = {p.key: p.value for p in onnx.load(str(exported_run / "student.fp32.onnx")).metadata_props}
    value = helper.make_tensor_value_info
    resize = helper.make_node("Resize", ["lr", "", "scales"], ["sr"], mode="nearest")
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    graph = helper.make_graph([resize], "x2", [value("lr", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [value("sr", TensorProto.FLOAT, ["N", 3, "H2", "W2"])], [scales])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    model = tmp_path / "x2.onnx"
    onnx.save(proto, str(model))
    for tile in ("0", "16"):
        out = tmp_path / f"out{tile}"
        assert main(["-q", "upscale", str(photos), "--out", str(out), "--model", str(model), "--tile", tile,
                     "--overlap", "4"]) == 2
        assert "not the x4" in (err := _error(capsys)) and "not what it claims" in err
        assert not out.exists() or not any(out.iterdir())


# --- 15. score: the scales the help names; identical images in JSON ---------------------------------------------

def test_score_scale_and_identical_images_in_json(tmp_path, capsys):
    hr = tmp_path / "hr"
    write_rgb(hr / "x.png", np.random.default_rng(4).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    for scale in ("1", "5"):
        assert main(["-q", "score", "--sr", str(hr), "--hr", str(hr), "--scale", scale]) == 2
        assert "scale must be one of 2, 3, 4" in _error(capsys)
    out = tmp_path / "s.json"
    assert main(["-q", "score", "--sr", str(hr), "--hr", str(hr), "--scale", "4", "--json", str(out)]) == 0
    rows = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert rows[0]["psnr_y"] is None and rows[0]["ssim_y"] == pytest.approx(1.0)


# --- 17. the edge runtime refuses bundle.json entries outside the bundle --------------------------------------------

@pytest.mark.parametrize("entry", ["../outside.txt", "/etc/hostname", "golden/../../outside.txt", "link.txt"])
def test_edge_refuses_files_outside_the_bundle(entry, tmp_path, capsys):
    from pipeline.deploy import edge

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    (bundle / "link.txt").symlink_to(outside)
    digest = sha256_file(Path("/etc/hostname")) if entry.startswith("/") else sha256_file(outside)
    info = {"format": edge.FORMAT, **{k: {} for k in edge.BUNDLE_KEYS}, "files": {entry: digest}}
    (bundle / "bundle.json").write_text(json.dumps(info))
    assert edge.main(["verify", "--bundle", str(bundle), "-q"]) == 2
    assert "outside the bundle" in _error(capsys)


# --- beyond the list -------------------------------------------------------------------------------------------------

def test_more_bad_paths_end_in_one_error_line(exported_run, photos, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert main(["-q", "models", "--scale", "5"]) == 2
    assert "--scale must be one of 2, 3, 4" in _error(capsys)
    assert main(["-q", "teacher", "--run-dir", str(afile / "run")]) == 2  # a file where a folder must be
    assert f"cannot write the run directory {afile / 'run'}: Not a directory" in _error(capsys)
    assert main(["-q", "upscale", str(photos), "--out", str(exported_run), "--run-dir", str(exported_run)]) == 2
    assert "is a run directory" in _error(capsys)
    assert afile.read_text() == "keep"
    before = _digests(exported_run)
    for inside in ("student", "deep/er"):
        out = exported_run / inside
        assert main(["-q", "upscale", str(photos), "--out", str(out), "--run-dir", str(exported_run)]) == 2
        assert "is inside the run directory" in _error(capsys)
        assert not out.exists()
    assert _digests(exported_run) == before


def test_a_manifest_of_the_wrong_shape_is_a_clear_error(exported_run, tmp_path, capsys):
    run = _copy(exported_run, tmp_path)
    (run / "manifest.json").write_text("[]")
    assert main(["-q", "export", "--run-dir", str(run)]) == 2
    assert "manifest.json is corrupt" in _error(capsys)


# --- no flag deletes what it did not make; crashes are named; modes follow the umask ---------------------------------

def test_budget_bundle_force_never_replaces_what_is_not_a_probe_folder(exported_run, tmp_path, capsys):
    run = _copy(exported_run, tmp_path)
    before = _digests(run)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    for target in (run, user):
        assert main(["-q", "budget", "--bundle", str(target), "--force"]) == 2
        assert "not a probe folder" in _error(capsys)
    assert _digests(run) == before and (user / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "run"]  # no staging folder left beside them


def test_replaceable_folder_is_recognised_by_its_marker_only(tmp_path):
    from pipeline.errors import UserError
    from pipeline.rundir import check_replaceable, is_own_folder

    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "m.json").write_text(json.dumps({"format": "f/1"}))
    assert is_own_folder(ours, "m.json", "f/1") and not is_own_folder(ours, "m.json", "f/2")
    link = tmp_path / "link"
    link.symlink_to(ours)
    assert not is_own_folder(link, "m.json", "f/1")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "m.json").write_text("[1, 2]")
    assert not is_own_folder(tmp_path / "bad", "m.json", "f/1")
    check_replaceable(ours, force=True, marker="m.json", fmt="f/1", what="x", option="--o")
    check_replaceable(tmp_path / "new", force=False, marker="m.json", fmt="f/1", what="x", option="--o")
    for folder, force, message in ((ours, False, "already exists"), (link, True, "not x"),
                                   (tmp_path / "bad", True, "not x")):
        with pytest.raises(UserError, match=message):
            check_replaceable(folder, force=force, marker="m.json", fmt="f/1", what="x", option="--o")


def test_an_unexpected_exception_is_named_logged_and_exits_70(tmp_path, monkeypatch, capsys):
    from pipeline import cli
    from pipeline.errors import INTERNAL_ERROR

    def broken(args):
        raise KeyError("boom")

    monkeypatch.setattr(cli, "_run", broken)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert main(["-q", "config", "--show"]) == INTERNAL_ERROR == 70
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("internal error: KeyError: 'boom'; please report it"), err
    (log,) = tmp_path.glob("facd-pipeline-error-*.log")
    assert str(log) in err[0] and "Traceback" in log.read_text() and "broken" in log.read_text()

    def unreadable(args):
        raise OSError(5, "Input/output error")  # not a full disk: ours to report, not exit 2

    monkeypatch.setattr(cli, "_run", unreadable)
    assert main(["-q", "config", "--show"]) == 70


def test_files_and_folders_written_get_the_umask_mode(tmp_path):
    from pipeline.rundir import RunDir, replace_folder, write_json_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        run = RunDir(tmp_path / "run")
        with run.staged() as tmp:
            (tmp / "b.txt").write_text("b")
            (tmp / "sub").mkdir()
            write_json_atomic(tmp / "sub" / "c.json", {})
        staged = tmp_path / "stage" / "folder"
        staged.mkdir(parents=True, mode=0o700)
        replace_folder(staged, tmp_path / "out")
        model = create_model("tiny_student", scale=2)
        save_checkpoint(tmp_path / "m.pt", model)
    finally:
        os.umask(old)
    modes = {p: p.stat().st_mode & 0o777 for p in (tmp_path / "a.json", run.root / "b.txt",
                                                   run.root / "sub" / "c.json", tmp_path / "m.pt")}
    assert set(modes.values()) == {0o644}, modes
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_a_stage_replaces_its_outputs_as_a_set_or_not_at_all(tmp_path):
    from pipeline.rundir import RunDir, write_json_atomic

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    (run.root / "report.json").write_text("old report")
    (run.root / "report.md").write_text("old table")
    with pytest.raises(OSError, match="No space"):
        with run.staged() as tmp:
            write_json_atomic(tmp / "report.json", {"new": True})
            raise OSError(28, "No space left on device")  # the disk fills while the second output is written
    assert (run.root / "report.json").read_text() == "old report"
    assert (run.root / "report.md").read_text() == "old table"
    assert sorted(p.name for p in run.root.iterdir()) == ["report.json", "report.md"]
    with run.staged() as tmp:
        write_json_atomic(tmp / "report.json", {"new": True})
        (tmp / "report.md").write_text("new table")
    assert json.loads((run.root / "report.json").read_text()) == {"new": True}
    assert (run.root / "report.md").read_text() == "new table"


MANIFEST_EDITS = {
    "artifact is a string": lambda m: m["artifacts"].update({"student.pt": "x"}),
    "artifact lacks sha256": lambda m: m["artifacts"]["student.fp32.onnx"].pop("sha256"),
    "sha256 not hex": lambda m: m["artifacts"]["student.fp32.onnx"].update({"sha256": 7}),
    "stage without a key": lambda m: m["stages"]["export"].pop("key"),
    "outputs null": lambda m: m["stages"]["export"].update({"outputs": None}),
    "output not an artifact": lambda m: m["stages"]["export"].update({"outputs": ["nowhere.onnx"]}),
    "stage a list": lambda m: m["stages"].update({"export": []}),
}


@pytest.mark.parametrize("edit", MANIFEST_EDITS)
def test_a_hand_edited_manifest_is_bad_input_naming_the_entry(exported_run, tmp_path, capsys, edit):
    run = _copy(exported_run, tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    MANIFEST_EDITS[edit](manifest)
    (run / "manifest.json").write_text(json.dumps(manifest))
    before = {k: v for k, v in _digests(run).items() if k != ".lock"}  # the lock file names its last holder
    for command in (["export", "--run-dir", str(run)], ["bundle", "--run-dir", str(run), "--out",
                                                         str(tmp_path / "deploy")]):
        assert main(["-q", *command]) == 2, command
        err = _error(capsys)
        assert "manifest.json" in err and ("artifacts." in err or "stages." in err), err
    assert {k: v for k, v in _digests(run).items() if k != ".lock"} == before and not (tmp_path / "deploy").exists()


@pytest.mark.parametrize("shape", [{"channels": 10**9}, {"channels": 200_000}, {"blocks": 10**6},
                                   {"channels": 1024, "blocks": 512}])
def test_a_checkpoint_config_too_large_to_build_is_refused_before_allocating(tmp_path, photos, capsys, shape):
    import torch

    path = tmp_path / "huge.pt"
    save_checkpoint(path, create_model("tiny_student", scale=4))
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"].update(shape)
    torch.save(ckpt, path)
    for command in (["export", "--run-dir", str(tmp_path / "run"), "--student", str(path)],
                    ["upscale", str(photos), "--out", str(tmp_path / "out"), "--model", str(path)]):
        assert main(["-q", *command]) == 2
        err = _error(capsys)
        assert "huge.pt" in err and ("channels" in err or "blocks" in err), err
    assert not (tmp_path / "out").exists()


def test_a_folder_given_as_the_student_is_bad_input(tmp_path, capsys):
    (tmp_path / "x.pt").mkdir()
    assert main(["-q", "export", "--run-dir", str(tmp_path / "run"), "--student", str(tmp_path / "x.pt")]) == 2
    assert "x.pt" in _error(capsys)


@pytest.mark.parametrize("command", [["ablate", "--seeds", "0", "0"], ["ablate", "--seeds", "1", "-1"],
                                     ["sweep", "--grid", "distill.lambda_fd=0.1", "--grid", "distill.lambda_fd=0.3"],
                                     ["sweep", "--grid", "distill.lambda_fd=0.1,0.1"],
                                     ["sweep", "--grid", "distill.lambda_fd=0.1,,0.3"],
                                     ["sweep", "--grid", "distill.lambda_fd=0.1", "--seeds", "2", "2"]])
def test_duplicate_seeds_and_grid_points_are_refused_before_any_training(tmp_path, capsys, command):
    assert main(["-q", *command, "--run-dir", str(tmp_path / "run")]) == 2
    err = _error(capsys)
    assert any(word in err for word in ("more than once", "twice", ">= 0", "KEY=V1")), err
    assert not (tmp_path / "run" / "ablate").exists() and not (tmp_path / "run" / "sweep").exists()


def test_a_full_disk_during_verify_force_leaves_every_old_output_and_says_so(exported_run, tmp_path, capsys,
                                                                             monkeypatch):
    import errno

    from pipeline.evaluation import report

    run = _copy(exported_run, tmp_path)
    assert main(["-q", "verify", "--run-dir", str(run), *FAST]) in (0, 1)
    capsys.readouterr()
    before = {k: v for k, v in _digests(run).items() if k != ".lock"}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "latency.png")

    monkeypatch.setattr(report, "_plot_latency", full)  # report.json and report.md are written by then
    assert main(["-q", "verify", "--run-dir", str(run), "--force", *FAST]) == 2
    assert "the disk is full" in _error(capsys)
    assert {k: v for k, v in _digests(run).items() if k != ".lock"} == before
    assert not list(run.glob(".stage-*"))
