"""The distillation study: the bootstrap interval against hand computation and exact enumeration, verdicts, paired
seeding, the gate statistics, the validation split, and `ablate` / `sweep` through the CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

import pipeline.training.distill as distill_mod
from models import create_model, save_checkpoint
from pipeline.training import study
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data.datasets import PairFolder, train_and_validation
from pipeline.training.distill import distill_student

SMALL = ["train.batch=4", "train.lr_patch=12", "train.eval_every=0", "train.log_every=1", "train.threads=1",
         "train.iters=2", "train.ckpt_every=2"]


def test_bootstrap_interval_by_hand():
    # Each of the 16 equally likely resamples has probability 1/16 > 2.5 %, so the 95 % interval runs from the
    # smallest resample mean (seed 0 twice, image 0 twice: 0.1) to the largest (seed 1 twice, image 1 twice: 0.6).
    diffs = np.array([[0.1, 0.3], [0.2, 0.6]])
    assert study.bootstrap_interval(diffs) == pytest.approx((0.1, 0.6))
    assert study.bootstrap_interval(np.full((3, 4), 0.25)) == pytest.approx((0.25, 0.25))


def test_bootstrap_interval_matches_exact_enumeration():
    diffs = np.array([[0.0, 0.2, 1.0], [0.3, -0.4, 0.5]])
    means = sorted(diffs[np.ix_(s, i)].mean() for s in itertools.product(range(2), repeat=2)
                   for i in itertools.product(range(3), repeat=3))  # 4 x 27 equally likely resamples
    exact = np.quantile(means, [0.025, 0.975], method="inverted_cdf")
    assert study.bootstrap_interval(diffs, resamples=40_000) == pytest.approx(tuple(exact), abs=1e-9)


def test_one_seed_gives_no_interval_and_verdicts_follow_the_interval():
    with pytest.raises(ValueError, match="2 seeds"):
        study.bootstrap_interval(np.zeros((1, 5)))
    rows = study.compare({"none": np.zeros((1, 3)), "facd": np.ones((1, 3))})
    assert rows[1]["diff"] == 1.0 and "ci_low" not in rows[1] and "verdict" not in rows[1]
    assert [study.verdict(*ci) for ci in [(0.01, 0.2), (-0.2, -0.01), (-0.1, 0.1)]] == \
        ["better", "worse", "indistinguishable"]


def test_compare_pairs_each_seed_and_image_with_the_baseline():
    base = np.array([[28.0, 30.0, 25.0], [28.2, 30.1, 25.3]])
    rows = study.compare({"none": base, "facd": base + 0.1, "out": base - np.array([[0.1], [0.3]])})
    facd, out = rows[1], rows[2]
    assert facd["diff"] == pytest.approx(0.1) and facd["verdict"] == "better"
    assert facd["ci_low"] == pytest.approx(0.1) and facd["ci_high"] == pytest.approx(0.1)
    assert out["diff"] == pytest.approx(-0.2) and out["ci_high"] < 0  # the bootstrap excludes 0, but over 2 seeds
    assert out["t_high"] > 0 and out["verdict"] == "indistinguishable"  # the seed-t interval does not
    assert rows[0]["psnr_y_per_seed"] == pytest.approx([base[0].mean(), base[1].mean()])


def test_contrasts_pair_the_target_with_every_other_method_but_none():
    base = np.array([[28.0, 30.0, 25.0], [28.2, 30.1, 25.3]])
    fd = base + np.array([[0.1, 0.0, 0.2], [0.0, 0.1, 0.3]])
    facd = fd + np.array([[0.1], [-0.3]])  # better than fd in seed 0, worse in seed 1
    pairs = study.contrasts({"none": base, "fd": fd, "facd": facd, "out": base + 3.0}, "facd")
    assert [(p["variant"], p["against"]) for p in pairs] == [("facd", "fd"), ("facd", "out")]
    by_hand = study.bootstrap_interval(facd - fd)
    assert by_hand == pytest.approx((-0.3, 0.1))  # seeds resampled: all of seed 1, all of seed 0
    assert pairs[0]["diff"] == pytest.approx(-0.1) and (pairs[0]["ci_low"], pairs[0]["ci_high"]) == by_hand
    assert pairs[0]["verdict"] == "indistinguishable" and pairs[1]["verdict"] == "worse"
    table = study.format_study("t", study.compare({"none": base, "facd": facd}), [], [0, 1], pairs=pairs)
    assert "| facd minus fd | -0.100 | [-2.641, +2.441] | [-0.300, +0.100] | indistinguishable |" in table


def test_methods_of_one_seed_start_from_the_same_weights_and_batches(tmp_path, monkeypatch):
    torch.manual_seed(0)
    teacher = create_model("tiny_teacher", scale=4).eval().requires_grad_(False)
    seen: dict[tuple[str, int], tuple[dict, torch.Tensor]] = {}
    real = distill_mod.make_loss

    def recording(cfg, *args):
        loss_fn = real(cfg, *args)

        def wrapped(model, lr, hr, gen):
            key = (cfg.distill.method, cfg.seed)
            if key not in seen:  # the first call: the weights before any step
                seen[key] = ({k: v.clone() for k, v in model.net.state_dict().items()}, lr.clone())
            return loss_fn(model, lr, hr, gen)

        return wrapped

    monkeypatch.setattr(distill_mod, "make_loss", recording)
    for method, seed in [("none", 0), ("facd", 0), ("fd", 0), ("none", 1)]:
        cfg = load_config("tiny", None, [*SMALL, f'distill.method="{method}"', f"seed={seed}"])
        distill_student(cfg, teacher, tmp_path / f"{method}{seed}", tmp_path / f"{method}{seed}.pt", resume=False,
                        progress=False)
    (w0, b0), (w1, b1), (w2, b2), (w3, b3) = (seen[k] for k in [("none", 0), ("facd", 0), ("fd", 0), ("none", 1)])
    for w, b in [(w1, b1), (w2, b2)]:
        assert torch.equal(b, b0)
        assert all(torch.equal(w[k], w0[k]) for k in w0)
    assert not torch.equal(b3, b0) and not all(torch.equal(w3[k], w0[k]) for k in w0)


def test_validation_split_is_held_out_and_evenly_spaced():
    data = PairFolder("embedded-train", 4)
    train, val = data.split(3)
    names = [f.name for f in data.hr_files]
    assert [f.name for f in val.hr_files] == [names[2], names[7], names[12]]
    assert len(train) == len(data) - 3 and not {f.name for f in train.hr_files} & {f.name for f in val.hr_files}
    assert len(data.split(0)[0]) == len(data)


def test_gate_statistics_on_training_and_validation_patches(tmp_path):
    torch.manual_seed(0)
    teacher = create_model("tiny_teacher", scale=4).eval().requires_grad_(False)
    cfg = load_config("tiny", None, [*SMALL, "train.eval_every=1", 'distill.method="facd"'])
    distill_student(cfg, teacher, tmp_path / "w", tmp_path / "s.pt", resume=False, progress=False)
    log = [json.loads(line) for line in (tmp_path / "w" / "log.jsonl").read_text().splitlines()]
    probes = [r["probe"] for r in log if "probe" in r]
    assert len(probes) == 2 and set(probes[0]) == {"val_gate_rate", "val_advantage_db"}
    stats = study.gate_stats(tmp_path / "w" / "log.jsonl")
    assert stats["train_gate_rate"] == pytest.approx(np.mean([r["gate_rate"] for r in log if "gate_rate" in r]))
    assert stats["val_gate_rate"] == probes[-1]["val_gate_rate"]
    assert 0 <= stats["train_gate_rate"] <= 1 and stats["val_gate_rate"] in {k / 64 for k in range(65)}


@pytest.fixture(scope="module")
def tiny_teacher_file(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("t") / "teacher.pt", create_model("tiny_teacher", scale=4))


def test_ablate_with_one_seed_says_no_interval_can_be_given(tmp_path, tiny_teacher_file, capsys):
    run = tmp_path / "run"
    args = ["-q", "ablate", "--run-dir", str(run), "--teacher", str(tiny_teacher_file), "--methods", "out",
            "--seeds", "0", *(x for kv in SMALL for x in ("--set", kv))]
    assert main(args) == 0
    table = (run / "ablation.md").read_text()
    assert "no interval can be given" in table and "| none |" in table and "| out |" in table
    report = json.loads((run / "ablation.json").read_text())
    assert [r["variant"] for r in report["rows"]] == ["none", "out"] and "ci_low" not in report["rows"][1]
    assert (run / "ablation.png").stat().st_size > 0
    # --resume on a study continues interrupted students, skips finished ones and starts missing ones.
    mtime = (run / "ablate" / "out-seed0.pt").stat().st_mtime_ns
    assert main([*args, "--resume", "--seeds", "0", "1"]) == 0
    assert (run / "ablate" / "out-seed0.pt").stat().st_mtime_ns == mtime and (run / "ablate" / "out-seed1.pt").exists()


def test_sweep_trains_every_grid_point_and_compares_on_the_validation_split(tmp_path, tiny_teacher_file):
    run = tmp_path / "run"
    base = ["-q", "sweep", "--run-dir", str(run), "--teacher", str(tiny_teacher_file), "--method", "out",
            "--seeds", "0", "1", *(x for kv in SMALL for x in ("--set", kv))]
    args = [*base, "--grid", "distill.lambda_out=0.5,2"]
    assert main(args) == 0
    report = json.loads((run / "sweep.json").read_text())
    assert [r["variant"] for r in report["rows"]] == ["none", "distill.lambda_out=0.5", "distill.lambda_out=2"]
    assert report["variants"]["distill.lambda_out=2"]["distill"]["lambda_out"] == 2.0
    assert all("ci_low" in r and r["verdict"] for r in report["rows"][1:])
    data = load_config().data
    val_names = {pair.name for pair in train_and_validation(data.train, data.val_count, data.val, 4)[1]}
    assert len(val_names) == 10
    assert {row["name"] for row in report["results"][0]["rows"]} == val_names
    assert sorted(p.name for p in (run / "sweep").glob("*.pt")) == [
        "none-seed0.pt", "none-seed1.pt", "out-lambda_out0.5-seed0.pt", "out-lambda_out0.5-seed1.pt",
        "out-lambda_out2-seed0.pt", "out-lambda_out2-seed1.pt"]
    # A second sweep reuses the students it shares with the first (here `none` and lambda_out=2).
    mtime = (run / "sweep" / "none-seed0.pt").stat().st_mtime_ns
    assert main([*base, "--grid", "distill.lambda_out=2,3", "--name", "more"]) == 0
    assert (run / "sweep" / "none-seed0.pt").stat().st_mtime_ns == mtime
    assert [r["variant"] for r in json.loads((run / "more.json").read_text())["rows"]][1:] == [
        "distill.lambda_out=2", "distill.lambda_out=3"]
    assert main([*args, "--grid", "distill.nope=1"]) == 2
    assert main([*args, "--name", "../x"]) == 2


def test_summary_compares_teacher_and_student_on_one_backend(tmp_path, capsys):
    from pipeline.rundir import RunDir
    from pipeline.rundir import EVAL_JSON
    from pipeline.stages import summarize

    torch.manual_seed(0)
    teacher = save_checkpoint(tmp_path / "t.pt", create_model("tiny_teacher", scale=4))
    student = save_checkpoint(tmp_path / "s.pt", create_model("tiny_student", scale=4))
    evals = [{"mean": {"psnr_y": v}} for v in (27.0, 28.0, 27.6)]  # bicubic, teacher, student
    (tmp_path / EVAL_JSON).write_text(json.dumps(evals))
    summary = summarize(load_config("tiny"), RunDir(tmp_path), teacher, student)
    assert summary["teacher"]["params"] == 195_971 and summary["student"]["params"] == 35_683
    assert summary["student_share_of_teacher_gain"] == pytest.approx(0.6)
    assert summary["teacher"]["latency_ms"] > 0 and summary["student"]["gflops"] == pytest.approx(8.01, abs=0.01)
    out = capsys.readouterr().out
    assert "5.5x" in out and "recovers 60% of the teacher's gain" in out
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    mtime = (tmp_path / "summary.json").stat().st_mtime_ns
    assert summarize(load_config("tiny"), RunDir(tmp_path), teacher, student) == summary  # up to date: not re-timed
    assert (tmp_path / "summary.json").stat().st_mtime_ns == mtime and "recovers 60%" in capsys.readouterr().out


def test_seed_t_interval_by_hand():
    # Per-seed mean differences 0.1, 0.2, 0.3 (each seed's images average to it): mean 0.2, sd 0.1, se 0.1 / sqrt 3,
    # t(2) = 4.303: 0.2 +- 0.248434.
    diffs = np.array([[0.0, 0.2], [0.1, 0.3], [0.3, 0.3]])
    lo, hi = study.seed_t_interval(diffs)
    assert (lo, hi) == pytest.approx((0.2 - 4.303 * 0.1 / np.sqrt(3), 0.2 + 4.303 * 0.1 / np.sqrt(3)), abs=1e-12)
    assert study.t95(2) == 4.303 and study.t95(30) == 2.042
    assert study.t95(31) == pytest.approx(2.0395, abs=1e-3) and study.t95(120) == pytest.approx(1.9799, abs=1e-3)
    with pytest.raises(ValueError):
        study.seed_t_interval(np.zeros((1, 3)))


@pytest.mark.parametrize("seeds", [3, 8])
def test_seed_t_interval_covers_the_true_mean_95_percent_of_the_time_where_the_bootstrap_does_not(seeds):
    """Simulated studies: per-seed effects N(mu, 0.03) plus per-image noise, 2000 draws. The seed-t interval covers mu
    in about 95 % of them (binomial SD 0.5 %); the bootstrap over 3 seeds, close to the seeds' range, far less."""
    rng = np.random.default_rng(0)
    mu, draws, images = 0.05, 2000, 7
    studies = [mu + rng.normal(0, 0.03, (seeds, 1)) + rng.normal(0, 0.01, (seeds, images)) for _ in range(draws)]
    covered = np.mean([lo <= mu <= hi for lo, hi in map(study.seed_t_interval, studies)])
    assert abs(covered - 0.95) < 0.015, covered
    if seeds == 3:  # the bootstrap is slower: 400 draws show it
        boot = np.mean([lo <= mu <= hi for lo, hi in (study.bootstrap_interval(d, resamples=2000)
                                                        for d in studies[:400])])
        assert boot < 0.85, boot


def test_the_verdict_takes_the_more_conservative_interval():
    # Three seeds whose mean differences are all positive but spread: the bootstrap (close to the seeds' range)
    # excludes 0, the seed-t interval does not, so the verdict is "indistinguishable".
    base = np.zeros((3, 4))
    variant = base + np.array([[0.02], [0.05], [0.12]])
    row = study.compare({"none": base, "facd": variant})[1]
    assert row["ci_low"] > 0 and row["t_low"] < 0 and row["verdict"] == "indistinguishable"
    row = study.compare({"none": base, "facd": base + np.array([[0.10], [0.11], [0.12]])})[1]
    assert row["ci_low"] > 0 and row["t_low"] > 0 and row["verdict"] == "better"
