"""The distillation harness: every method's loss terms, exact resume, divergence, and DDP on 2 CPU processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pipeline.training.distill as distill_mod
from models import create_model, load_checkpoint, save_checkpoint
from pipeline.config import METHODS, load_config
from pipeline.training.distill import distill_student, make_loss
from pipeline.errors import TrainingDiverged, UserError
from pipeline.data.datasets import PairFolder, PatchSampler
from pipeline.training.losses import Adaptors, tap_indices
from pipeline.training.train import Trainee

REPO = Path(__file__).resolve().parents[1]
SMALL = ["train.batch=4", "train.lr_patch=12", "train.eval_every=0", "train.log_every=1", "train.threads=1"]


def small_config(*extra: str):
    return load_config("tiny", None, [*SMALL, *extra])


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("tiny_teacher", scale=4).eval().requires_grad_(False)


EXPECTED_PARTS = {
    "none": {"l1"},
    "out": {"l1", "out", "gate_rate"},
    "fd": {"l1", "out", "fd", "gate_rate"},
    "facd": {"l1", "out", "contrast", "gate_rate"},
    "facd-nogate": {"l1", "out", "contrast", "gate_rate"},
}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_has_its_terms_and_the_right_total(method, teacher):
    cfg = small_config(f'distill.method="{method}"')
    student = create_model("tiny_student", scale=4)
    taps = tap_indices(student.num_taps, 3) if method in ("fd", "facd", "facd-nogate") else []
    from pipeline.training.losses import Adaptors

    trainee = Trainee(student, taps, Adaptors(16, 32, len(taps)) if taps else None)
    loss_fn = make_loss(cfg, None if method == "none" else teacher, tap_indices(teacher.num_taps, 3))
    lr, hr = torch.rand(4, 3, 12, 12), torch.rand(4, 3, 48, 48)
    loss, parts = loss_fn(trainee, lr, hr, torch.Generator().manual_seed(0))
    assert set(parts) == EXPECTED_PARTS[method]
    d = cfg.distill
    gate = parts.get("gate_rate", 1.0)
    expected = parts["l1"] + d.lambda_out * parts.get("out", 0) + d.lambda_fd * parts.get("fd", 0) + \
        d.lambda_facd * parts.get("contrast", 0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert 0.0 <= gate <= 1.0
    loss.backward()
    assert all(p.grad is not None for p in trainee.parameters())  # adaptors included
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_of_another_scale_or_too_many_taps(tmp_path, teacher):
    with pytest.raises(UserError, match="scale 4"):
        distill_student(small_config("scale=2"), teacher, tmp_path / "w", tmp_path / "s.pt", resume=False,
                        progress=False)
    with pytest.raises(UserError, match="distill.taps"):
        distill_student(small_config("distill.taps=6", 'distill.method="facd"'), teacher, tmp_path / "w",
                        tmp_path / "s.pt", resume=False, progress=False)


def test_interrupted_distillation_resumes_exactly(tmp_path, teacher, monkeypatch):
    cfg = small_config("train.iters=6", "train.ckpt_every=2", 'distill.method="facd"', "facd.max_anchors=64")
    straight = tmp_path / "straight.pt"
    distill_student(cfg, teacher, tmp_path / "a", straight, resume=False, progress=False)

    real = distill_mod.make_loss

    def crash_at_five(*args):
        loss_fn, calls = real(*args), []

        def wrapped(*a):
            calls.append(1)
            if len(calls) == 5:
                raise KeyboardInterrupt
            return loss_fn(*a)

        return wrapped

    monkeypatch.setattr(distill_mod, "make_loss", crash_at_five)
    with pytest.raises(KeyboardInterrupt):
        distill_student(cfg, teacher, tmp_path / "b", tmp_path / "resumed.pt", resume=False, progress=False)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["iteration"] == 4
    monkeypatch.setattr(distill_mod, "make_loss", real)
    distill_student(cfg, teacher, tmp_path / "b", tmp_path / "resumed.pt", resume=True, progress=False)

    a, b = load_checkpoint(straight)["state_dict"], load_checkpoint(tmp_path / "resumed.pt")["state_dict"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    log = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all("gate_rate" in r and "contrast" in r for r in log if "loss" in r)


def test_non_finite_loss_stops_and_keeps_the_last_good_weights(tmp_path, teacher, monkeypatch):
    real = distill_mod.make_loss

    def nan_at_three(*args):
        loss_fn, calls = real(*args), []

        def wrapped(*a):
            calls.append(1)
            loss, parts = loss_fn(*a)
            return (loss * float("nan") if len(calls) == 3 else loss), parts

        return wrapped

    monkeypatch.setattr(distill_mod, "make_loss", nan_at_three)
    with pytest.raises(TrainingDiverged, match="at iteration 3"):
        distill_student(small_config("train.iters=5"), teacher, tmp_path / "w", tmp_path / "s.pt", resume=False,
                        progress=False)
    saved = load_checkpoint(tmp_path / "w" / "last.pt")
    assert saved["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def _torchrun(nproc: int, run_dir: Path, teacher_file: Path, method: str, iters: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           "-m", "pipeline", "-q", "distill", "--run-dir", str(run_dir), "--teacher", str(teacher_file),
           "--method", method, *(x for kv in SMALL for x in ("--set", kv)),
           "--set", f"train.iters={iters}", "--set", f"train.ckpt_every={iters}", "--set", "train.device=\"cpu\""]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    if out.returncode != 0 and "SIGABRT" in out.stderr:
        # Seen once in about 20 loaded CI-like runs: a rank aborted in process-group teardown at exit, after every
        # output was written ("terminate called without an active exception"). One retry, redoing the stage.
        out = subprocess.run([*cmd, "--force"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, teacher):
    teacher_file = save_checkpoint(tmp_path / "teacher.pt", teacher)
    # Output distillation has no interaction between patches, so the 2-process gradient (the mean of the two halves'
    # means) equals the 1-process one up to float rounding.
    _torchrun(1, tmp_path / "one", teacher_file, "out", 4)
    _torchrun(2, tmp_path / "two", teacher_file, "out", 4)
    a = load_checkpoint(tmp_path / "one" / "student.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "two" / "student.pt")["state_dict"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    log = [json.loads(x) for x in (tmp_path / "two" / "student" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if "loss" in r] == [1, 2, 3, 4]  # written once, by rank 0
    run_log = (tmp_path / "two" / "run.log").read_text()
    assert run_log.count("distill: ") == 1


def test_facd_runs_under_two_processes(tmp_path, teacher):
    teacher_file = save_checkpoint(tmp_path / "teacher.pt", teacher)
    _torchrun(2, tmp_path / "run", teacher_file, "facd", 2)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert "student.pt" in manifest["artifacts"]


def test_facd_with_one_patch_per_process_is_refused(tmp_path, teacher):
    with pytest.raises(UserError, match="at least 2 patches"):
        distill_student(small_config("train.batch=1", 'distill.method="facd"'), teacher, tmp_path / "w",
                        tmp_path / "s.pt", resume=False, progress=False)


def test_fd_terms_are_of_comparable_size_on_real_patches(teacher):
    """On real training patches at the default weights, no term of `fd` outweighs another by 10x (raw x255 body
    features made FD about 160 times the reconstruction L1)."""
    cfg = small_config('distill.method="fd"')
    pairs = list(PairFolder("embedded-train", 4))[:4]
    lr, hr = PatchSampler(pairs, 24, 4).sample(8, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    student = create_model("tiny_student", scale=4)
    taps = tap_indices(student.num_taps, 3)
    trainee = Trainee(student, taps, Adaptors(student.channels, teacher.channels, len(taps)))
    _, parts = make_loss(cfg, teacher, tap_indices(teacher.num_taps, 3))(trainee, lr, hr, torch.Generator())
    terms = {"l1": parts["l1"], "out": cfg.distill.lambda_out * parts["out"], "fd": cfg.distill.lambda_fd * parts["fd"]}
    assert max(terms.values()) < 10 * min(terms.values()), terms


def test_fd_keeps_an_anchor_students_tapped_layers_alive():
    """anchor_m distilled with `fd` from the shipped EDSR-baseline, 150 Adam steps on the embedded training patches:
    every tapped body layer keeps some ReLUs on. When FD compared the anchor student's image-scale features with the
    teacher's x255 ones, the adaptors could not reach the teacher's scale and the second tapped layer was entirely
    dead by step 150 (eval Y-PSNR 26.5 dB after 600 steps, 1.3 dB under bicubic)."""
    from pipeline.modelio import load_model
    from pipeline.training.teachers import shipped_teacher
    from pipeline.training.train import batch_generator, load_train_patches

    torch.set_num_threads(1)
    cfg = load_config(overrides=['distill.method="fd"'])
    teacher = load_model(shipped_teacher(cfg.model.teacher, 4), 4).eval().requires_grad_(False)
    patches = load_train_patches(cfg, progress=False)
    torch.manual_seed(0)
    student = create_model("anchor_m", scale=4)
    taps = tap_indices(student.num_taps, cfg.distill.taps)
    trainee = Trainee(student, taps, Adaptors(student.channels, teacher.channels, len(taps)))
    loss_fn = make_loss(cfg, teacher, tap_indices(teacher.num_taps, cfg.distill.taps))
    opt = torch.optim.Adam(trainee.parameters(), lr=cfg.train.lr)
    for it in range(150):
        lr, hr = patches.sample(cfg.train.batch, batch_generator(0, it))
        loss, _ = loss_fn(trainee, lr, hr, torch.Generator().manual_seed(it))
        opt.zero_grad()
        loss.backward()
        opt.step()
    lr, _ = patches.sample(16, batch_generator(1, 0))
    with torch.no_grad():
        _, feats = student.forward_features(lr, taps)
    alive = [float((f > 0).float().mean()) for f in feats]
    assert min(alive) > 0.02, alive


def test_resume_accepts_a_config_key_added_since_only_at_its_default():
    from pipeline.config import Config
    from pipeline.training.train import _diff

    now, default = Config().to_dict(), Config().to_dict()
    saved = json.loads(json.dumps(now))
    del saved["distill"]["gate_fraction"]  # a checkpoint written before the key existed
    assert _diff(saved, now, default) == ""
    now["distill"]["gate_fraction"] = 0.5
    assert _diff(saved, now, default) == "distill.gate_fraction: None -> 0.5"
    now["distill"]["gate_fraction"], now["train"]["lr"] = 1.0, 0.5
    assert _diff(saved, now, default) == "train.lr: 0.001 -> 0.5"
