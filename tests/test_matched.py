"""The matched-compute study's helpers (benchmarks/matched_cpu.py, benchmarks/gate_margin.py): method labels, the
`none` group of matched wall clock, paired differences, and the gate margin against the training gate itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import create_model
from pipeline.config import load_config
from pipeline.data.datasets import PatchSampler, train_and_validation
from pipeline.training.losses import adaptive_gate
from conftest import load_script

matched = load_script("benchmarks/matched_cpu.py")
gate_margin = load_script("benchmarks/gate_margin.py")


def test_a_label_names_each_changed_weight_the_method_uses():
    distill = load_config().to_dict()["distill"]
    assert matched.variant({**distill, "method": "out"}) == "out"
    assert matched.variant({**distill, "method": "out", "lambda_out": 10.0}) == "out (lambda_out 10)"
    assert matched.variant({**distill, "method": "none", "lambda_out": 10.0}) == "none"  # none uses no weight
    assert matched.variant({**distill, "method": "facd", "gate_margin": 0.16}) == "facd (gate_margin 0.16)"
    assert matched.variant({**distill, "method": "fd", "gate_margin": 0.16}) == "fd"  # only facd has the gate


def test_the_matched_none_group_is_the_nearest_in_wall_clock_on_a_log_scale():
    def group(wall_s):
        return {0: {"wall_s": wall_s}, 1: {"wall_s": wall_s}}

    groups = {("none", 600): group(60.0), ("none", 2400): group(240.0), ("out", 600): group(500.0)}
    assert matched.matched_none(groups, 500.0) == 2400
    # 100 s is 1.67x 60 s and 2.4x below 240 s: nearer 600 iterations on a log scale (nearer 2400 on a linear one)
    assert matched.matched_none(groups, 100.0) == 600
    assert matched.matched_none({("out", 600): group(500.0)}, 500.0) is None


def test_paired_differences_use_the_common_seeds_only():
    def runs(values):
        return {seed: {"eval": {"per_image": per_image}} for seed, per_image in values.items()}

    this = runs({0: [30.0, 31.0], 1: [30.5, 31.5], 2: [30.2, 31.2]})
    ref = runs({1: [30.0, 31.0], 2: [30.0, 31.0], 3: [0.0, 0.0]})
    d = matched.paired(this, ref, "eval")
    assert d["seeds"] == [1, 2]
    assert d["diff"] == pytest.approx((0.5 + 0.5 + 0.2 + 0.2) / 4)
    assert d["t_low"] < d["diff"] < d["t_high"]
    assert matched.paired(this, runs({2: [1.0, 1.0]}), "eval") is None  # one common seed: no interval


def test_the_margin_closes_the_share_the_training_gate_closes():
    torch.manual_seed(0)
    teacher = create_model("tiny_teacher", scale=4).eval()
    student = create_model("tiny_student", scale=4).eval()
    cfg = load_config()
    train, _val = train_and_validation(cfg.data.train, cfg.data.val_count, cfg.data.val, cfg.scale)
    sampler = PatchSampler(list(train), 12, cfg.scale)
    adv = gate_margin.advantages(student, teacher, sampler, 128, seed=3)
    margin = float(np.quantile(adv, 0.25))
    lr, hr = sampler.sample(64, torch.Generator().manual_seed(3))  # the first batch advantages() drew
    with torch.no_grad():
        gate = adaptive_gate(student(lr), teacher(lr), hr, margin=margin)
    np.testing.assert_allclose(gate.numpy(), adv[:64] > margin)
    assert (adv > margin).mean() == pytest.approx(0.75, abs=1 / 128)


def test_recorded_runs_stand_in_only_for_missing_folders_and_only_for_the_same_eval_set(tmp_path):
    path = tmp_path / "earlier.json"
    records = [{"run": "runs/a/out-i600-seed0"}, {"run": "runs/a/out-i600-seed1"}]
    machine = {"cpu": "AMD EPYC", "cpu_flags": ["avx2"], "cores": 2, "platform": "Linux"}
    path.write_text(json.dumps({"eval_teacher_psnr_y": 33.5875, "machine": machine, "runs": records}))
    kept = matched.recorded_runs(path, {"runs/a/out-i600-seed1", "runs/a/none-i600-seed0"}, 33.5875)
    # a folder present is evaluated afresh, not taken from the file
    assert [r["run"] for r in kept] == ["runs/a/out-i600-seed0"]
    with pytest.raises(SystemExit, match="another eval set or teacher"):
        matched.recorded_runs(path, set(), 33.6)
    with pytest.raises(SystemExit, match="not a readable results file"):
        matched.recorded_runs(tmp_path / "missing.json", set(), 33.5875)
    (tmp_path / "cut.json").write_text(path.read_text()[:40])
    with pytest.raises(SystemExit, match="not a readable results file"):
        matched.recorded_runs(tmp_path / "cut.json", set(), 33.5875)


def test_wall_clocks_come_from_the_cpu_most_runs_trained_on(tmp_path):
    amd = {"cpu": "AMD EPYC", "cpu_flags": ["avx2"], "cores": 2}
    xeon = {"cpu": "Intel Xeon", "cpu_flags": ["avx2", "avx512f"], "cores": 2}
    folder = tmp_path / "facd-i2400-seed1"
    folder.mkdir()
    assert matched.run_machines(folder) == []  # not started by the lane script: no record
    started = [{**xeon, "platform": "Linux-a"}, {**xeon, "platform": "Linux-b"}, {**amd, "platform": "Linux-a"}]
    (folder / "machine.jsonl").write_text("".join(json.dumps(m) + "\n" for m in started))
    assert matched.run_machines(folder) == [xeon, amd]  # resumed on another CPU: both, the platform string aside

    runs = [{"machines": [amd]}, {"machines": [amd]}, {"machines": [xeon]}, {"machines": [xeon, amd]}]
    assert matched.main_machine(runs) == amd  # the run that resumed elsewhere counts for neither
    with pytest.raises(SystemExit, match="machine.jsonl"):
        matched.main_machine([{"machines": []}])
    group = {0: {"machines": [amd]}, 1: {"machines": [xeon]}, 2: {"machines": [xeon, amd]}}
    assert list(matched.timed_on(group, amd)) == [0]
    assert matched.timed_on({1: group[1]}, amd) == {1: group[1]}  # none on the main CPU: its own, named apart


def test_a_recorded_run_without_its_cpu_trained_on_the_files_machine(tmp_path):
    path = tmp_path / "earlier.json"
    amd = {"cpu": "AMD EPYC", "cpu_flags": ["avx2"], "cores": 2}
    xeon = {"cpu": "Intel Xeon", "cpu_flags": ["avx512f"], "cores": 2}
    records = [{"run": "runs/a/out-i600-seed0"}, {"run": "runs/a/out-i600-seed1", "machines": [xeon]}]
    path.write_text(json.dumps({"eval_teacher_psnr_y": 33.5, "machine": {**amd, "platform": "Linux"}, "runs": records}))
    kept = matched.recorded_runs(path, set(), 33.5)
    assert [r["machines"] for r in kept] == [[amd], [xeon]]
