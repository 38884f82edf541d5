"""A student sized to a latency budget: the choice on recorded tables (known answers), the refusals (another setting,
a malformed table, an impossible budget, a bad frame size), timing here and in a torch-free probe folder, the
chosen shape reaching the distilled checkpoint, and verify's latency gate failing on purpose."""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from models import create_model, load_checkpoint, save_checkpoint
from pipeline.deploy import budget
from pipeline.backends.openvino_runner import openvino_status
from pipeline.deploy.probe import LATENCY_FORMAT, load_table
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.rundir import RunDir
from conftest import SMALL_CALIB

# tiny_student's grid (not the default student's): the tests below count its parameters and name its head.
SMALL_GRID = ["--set", 'model.student="tiny_student"', "--set", "budget.blocks=[1]", "--set", "budget.channels=[4, 8]",
              "--set", "budget.repeats=2", "--set", "budget.warmup=0", "--frame", "64x48"]


def _row(name: str, blocks: int, channels: int, params: int, p95: float) -> dict:
    return {"name": name, "blocks": blocks, "channels": channels, "params": params, "flops": params * 1000,
            "p50_ms": p95 * 0.9, "p95_ms": p95}


# A recorded table: latency is not monotone in parameters (b12c8 is deeper and slower than b2c16 with fewer params).
TABLE = {"format": LATENCY_FORMAT, "scale": 4, "frame": "1280x720", "lr_size": "320x180",
         "backend": "onnxruntime", "runner": "onnxruntime-cpu", "precision": "int8",
         "machine": {"cpu": "recorded CPU", "cpu_flags": ["avx2"], "cores": 2, "platform": "linux"},
         "candidates": [_row("b1c8", 1, 8, 6867, 30.0), _row("b12c8", 12, 8, 21099, 95.0),
                        _row("b2c16", 2, 16, 25000, 60.0), _row("b4c16", 4, 16, 35000, 80.0),
                        _row("b8c32", 8, 32, 190000, 300.0)]}


@pytest.fixture
def table_file(tmp_path) -> Path:
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(TABLE))
    return path


def test_the_choice_on_a_recorded_table_is_the_known_answer(table_file, tmp_path, capsys):
    out = tmp_path / "out"
    # 100 ms with a 10 % margin: p95 <= 90 ms fits b1c8, b2c16, b4c16 and b12c8 (95 > 90: not); most params: b4c16.
    assert main(["budget", "--latency-table", str(table_file), "--budget-ms", "100", "--out", str(out)]) == 0
    result = json.loads((out / "budget.json").read_text())
    assert result["choice"]["name"] == "b4c16" and result["limit_ms"] == pytest.approx(90.0)
    assert (out / "budget.png").stat().st_size > 0
    assert "| b4c16 | 4 | 16 | 35,000 |" in capsys.readouterr().out


@pytest.mark.parametrize(("budget_ms", "expected"), [
    (80 / 0.9, "b4c16"),  # the limit is exactly b4c16's p95: it fits
    (80 / 0.9 - 0.01, "b2c16"),  # just below: the next one down
    (95 / 0.9, "b4c16"),  # b12c8 fits too, but b4c16 has more parameters
    (60 / 0.9, "b2c16"),
    (1000, "b8c32"),
])
def test_a_budget_between_two_candidates_picks_the_one_that_fits_with_the_most_parameters(budget_ms, expected):
    assert budget.choose(TABLE, budget_ms, 0.1)["name"] == expected


def test_capacity_ties_go_to_the_most_flops():
    table = copy.deepcopy(TABLE)
    table["candidates"][0].update(params=35000, flops=99_000_000)
    assert budget.choose(table, 100, 0.1)["name"] == "b1c8"


def test_an_impossible_budget_is_one_clear_error_naming_the_fastest(table_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["budget", "--latency-table", str(table_file), "--budget-ms", "20", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("error:") == 1 and "b1c8" in err and "30.0 ms p95" in err and "20 ms budget" in err
    assert json.loads((out / "budget.json").read_text())["choice"] is None  # the table is kept


@pytest.mark.parametrize(("args", "named"), [
    (["--set", "scale=2"], "scale 4 (this run: 2)"),
    (["--frame", "1920x1080"], "frame 1280x720 (this run: 1920x1080)"),
    (["--backend", "tensorrt"], "runtime onnxruntime (this run: tensorrt)"),
    (["--precision", "fp16"], "precision int8 (this run: fp16)"),
])
def test_a_table_for_another_setting_is_refused_naming_the_difference(table_file, tmp_path, capsys, args, named):
    out = tmp_path / "out"
    assert main(["budget", "--latency-table", str(table_file), "--budget-ms", "100", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "another setting" in err and named in err
    assert not out.exists()


@pytest.mark.parametrize(("content", "named"), [
    ("{not json", "not valid JSON"),
    (json.dumps([1, 2]), "not a JSON object"),
    (json.dumps({**TABLE, "format": "other/1"}), "format is 'other/1'"),
    (json.dumps({k: v for k, v in TABLE.items() if k != "machine"}), "missing machine"),
    (json.dumps({**TABLE, "candidates": []}), "no candidates"),
    (json.dumps({**TABLE, "candidates": [{"name": "x"}]}), "candidate 0 lacks"),
    (json.dumps({**TABLE, "candidates": [{**TABLE["candidates"][0], "p95_ms": "fast"}]}), "b1c8: p95_ms"),
])
def test_a_malformed_table_is_one_clear_error(tmp_path, capsys, content, named):
    path = tmp_path / "latency.json"
    path.write_text(content)
    assert main(["budget", "--latency-table", str(path), "--budget-ms", "100", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and named in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("frame", ["0x720", "1280x", "-1280x720", "big", "1281x720"])
@pytest.mark.parametrize("command", ["budget", "all"])
def test_a_bad_frame_size_is_rejected_before_anything_runs(tmp_path, capsys, frame, command):
    where = ["--out", str(tmp_path / "o")] if command == "budget" else ["--run-dir", str(tmp_path / "o")]
    assert main([command, "--budget-ms", "100", f"--frame={frame}", *where]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "frame size" in err
    assert not (tmp_path / "o").exists()


def test_timing_here_writes_latency_for_every_candidate_with_the_machine(tmp_path):
    out = tmp_path / "out"
    assert main(["-q", "budget", "--precision", "fp32", "--out", str(out), *SMALL_GRID]) == 0
    table = load_table(out / "latency.json", 4, "64x48", "onnxruntime", "fp32")
    assert [r["name"] for r in table["candidates"]] == ["b1c4", "b1c8"]
    for row in table["candidates"]:
        model = create_model("tiny_student", scale=4, blocks=row["blocks"], channels=row["channels"])
        assert row["params"] == sum(p.numel() for p in model.parameters())
        assert 0 < row["p50_ms"] <= row["p95_ms"] and row["model"] == "onnxruntime-cpu-fp32"
    assert table["machine"]["cpu"] and "cpu_flags" in table["machine"] and "onnxruntime" in table["versions"]
    assert table["tiling"] == {"tile": 384, "overlap": 32, "batch": 1}
    assert json.loads((out / "budget.json").read_text())["choice"] is None


def test_the_probe_folder_times_its_candidates_without_torch(tmp_path):
    folder = tmp_path / "probe"
    assert main(["-q", "budget", "--bundle", str(folder), *SMALL_GRID]) == 0
    probe = json.loads((folder / "probe.json").read_text())
    assert {k for c in probe["candidates"] for k in c["files"]} == {"int8", "int8-cpu"}
    for kind in ("int8", "int8-cpu"):  # every Conv INT8 but budget.float_convs, as the trained students keep them
        proto = onnx.load(str(folder / probe["candidates"][0]["files"][kind]))
        made_by = {out: node.op_type for node in proto.graph.node for out in node.output}
        weight_from = {n.name: made_by.get(n.input[1], "initializer") for n in proto.graph.node if n.op_type == "Conv"}
        assert {n for n, src in weight_from.items() if src != "DequantizeLinear"} == {"head", "last"}, weight_from
    assert main(["-q", "budget", "--bundle", str(folder), *SMALL_GRID]) == 2  # an existing folder is kept

    blocker = tmp_path / "no_torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not available on this device')\n")
    python = tmp_path / "python-without-torch"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="$PYTHONPATH:{blocker.parent}" exec {sys.executable} "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    check = subprocess.run(["make", "-s", "probe", f"PYTHON={python}", "BACKEND=onnxruntime"], cwd=folder,
                           capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stderr
    blocked = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True, env=env)
    assert blocked.returncode != 0 and "not available" in blocked.stderr  # the probe really ran without torch
    table = load_table(folder / "latency.json", 4, "64x48", "onnxruntime", "int8")
    assert [r["model"] for r in table["candidates"]] == ["onnxruntime-cpu-int8-cpu"] * 2
    assert main(["budget", "--latency-table", str(folder / "latency.json"), "--frame", "64x48", "--budget-ms",
                 "100000", "--out", str(tmp_path / "o")]) == 0


def test_the_chosen_shape_is_what_distill_trains_and_records(tmp_path, table_file):
    cfg = load_config(overrides=["budget.budget_ms=100", f'budget.latency_table="{table_file}"', "train.iters=1",
                                 "train.batch=2", "train.lr_patch=12", "train.eval_every=0", "train.threads=1",
                                 'distill.method="none"'])
    from pipeline import stages

    run = RunDir(tmp_path / "run")
    shaped = stages.stage_budget(cfg, run, progress=False)
    assert shaped.model.student_shape() == {"blocks": 4, "channels": 16}
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "teacher.pt", create_model("tiny_teacher", scale=4))
    student = stages.stage_distill(shaped, run, tmp_path / "teacher.pt", progress=False)
    ckpt = load_checkpoint(student)
    assert (ckpt["model"]["blocks"], ckpt["model"]["channels"]) == (4, 16)
    assert ckpt["config"]["budget"]["budget_ms"] == 100
    assert json.loads(run.path("budget/budget.json").read_text())["choice"]["name"] == "b4c16"


def _run_with_budget(exported_run: Path, dest: Path, budget_ms: float) -> Path:
    """A run whose student was distilled for `budget_ms`, exported and quantized as the pipeline does."""
    run = dest / "run"
    cfg = load_config(overrides=[f"budget.budget_ms={budget_ms}", 'budget.frame="64x48"', "budget.repeats=3",
                                 'budget.precision="fp32"'])
    model = create_model("tiny_student", scale=4)
    model.load_state_dict(load_checkpoint(exported_run / "student.pt")["state_dict"])
    save_checkpoint(run / "student.pt", model, config=cfg.to_dict())
    shutil.copy(exported_run / "calib.npz", run / "calib.npz")
    assert main(["-q", "export", "--run-dir", str(run)]) == 0
    assert main(["-q", "quantize", "--run-dir", str(run), "--calib", str(run / "calib.npz"), *SMALL_CALIB]) == 0
    return run


FAST_VERIFY = ["--set", 'verify.latency_sizes=["40x24"]', "--set", "verify.repeats=2", "--set", "verify.warmup=0"]


def test_the_latency_gate_fails_on_purpose_with_a_tiny_budget(exported_run, tmp_path, capsys):
    run = _run_with_budget(exported_run, tmp_path, budget_ms=0.001)
    assert main(["-q", "verify", "--run-dir", str(run), *FAST_VERIFY]) == 1
    err = capsys.readouterr().err
    assert "latency budget: the trained student takes" in err and "over the 0.001 ms budget" in err
    gate = json.loads((run / "report.json").read_text())["latency_budget"]
    assert gate["status"] == "fail" and gate["p95_ms"] > 0.001 and gate["runner"] == "onnxruntime-cpu-fp32"
    assert "## Latency budget" in (run / "report.md").read_text()


def test_the_latency_gate_passes_within_a_generous_budget(exported_run, tmp_path, capsys):
    run = _run_with_budget(exported_run, tmp_path, budget_ms=100_000)
    assert main(["-q", "verify", "--run-dir", str(run), *FAST_VERIFY]) == 0
    report = json.loads((run / "report.json").read_text())
    gate = report["latency_budget"]
    assert gate["status"] == "pass" and 0 < gate["p95_ms"] <= 100_000 and report["passed"]
    printed = capsys.readouterr().out
    assert "64x48" in printed and "onnxruntime-cpu-fp32" in printed and "3 blocks x 16 channels" in printed


def test_a_run_without_a_budget_has_no_gate():
    assert budget.latency_gate(Path("."), {"config": load_config().to_dict()}) is None


def test_the_grid_spans_below_and_above_the_default_student():
    cfg = load_config()
    grid = budget.candidates(cfg)
    params = {c["name"]: sum(p.numel() for p in create_model("tiny_student", scale=4, blocks=c["blocks"],
                                                             channels=c["channels"]).parameters()) for c in grid}
    default = sum(p.numel() for p in create_model("tiny_student", scale=4).parameters())
    assert len(grid) >= 12 and min(params.values()) < default / 3 and max(params.values()) > 5 * default
    with pytest.raises(UserError, match="budget.channels"):
        load_config(overrides=["budget.channels=[]"])


def _family_table() -> dict:
    """TABLE's EDSR rows (tiny_student) and three anchor rows."""
    table = copy.deepcopy(TABLE)
    for row in table["candidates"]:
        row["preset"] = "tiny_student"
    for name, blocks, channels, params, p95 in (("anchor_m-b3c8", 3, 8, 2000, 20.0),
                                                ("anchor_m-b5c28", 5, 28, 41000, 70.0),
                                                ("anchor_m-b7c32", 7, 32, 70000, 150.0)):
        table["candidates"].append({**_row(name, blocks, channels, params, p95), "preset": "anchor_m"})
    return table


@pytest.mark.parametrize(("order", "budget_ms", "expected"), [
    (["anchor_m", "tiny_student"], 100, "anchor_m-b5c28"),  # the preferred family's largest fitting shape ...
    (["anchor_m", "tiny_student"], 400, "anchor_m-b7c32"),  # ... although b8c32 fits too and has more parameters
    (["tiny_student", "anchor_m"], 100, "b4c16"),
    (["anchor_m", "tiny_student"], 25, "anchor_m-b3c8"),
    (None, 1000, "b8c32"),  # no order: the most parameters overall, as before families
])
def test_between_families_the_first_preferred_family_that_fits_decides(order, budget_ms, expected):
    assert budget.choose(_family_table(), budget_ms, 0.1, order)["name"] == expected


def test_rows_without_a_preset_count_as_the_first_preferred_family():
    """A table made before there were several families: its rows are the config's student's shapes."""
    assert budget.choose(TABLE, 100, 0.1, ["tiny_student", "anchor_m"])["name"] == "b4c16"
    assert budget.choose(TABLE, 100, 0.1, ["anchor_m", "tiny_student"])["name"] == "b4c16"


def test_with_no_shape_of_the_preferred_family_fitting_the_next_family_is_chosen():
    table = _family_table()
    for row in table["candidates"]:
        if row.get("preset") == "anchor_m":
            row["p95_ms"] = 500.0
    assert budget.choose(table, 100, 0.1, ["anchor_m", "tiny_student"])["name"] == "b4c16"


def test_the_grid_covers_every_student_family_and_the_choice_sets_the_preset(tmp_path):
    cfg = load_config(overrides=['budget.students=["anchor_m", "tiny_student"]', "budget.blocks=[3]",
                                 "budget.channels=[8]", "budget.budget_ms=100"])
    assert [(c["name"], c["preset"]) for c in budget.candidates(cfg)] == [("b3c8", "anchor_m"),  # the default's
                                                                           ("tiny_student-b3c8", "tiny_student")]
    chosen = budget.student_for_budget(cfg, _family_table(), tmp_path)
    assert (chosen.model.student, chosen.model.student_blocks, chosen.model.student_channels) == ("anchor_m", 5, 28)
    with pytest.raises(UserError, match=r"budget.students\[1\]"):
        load_config(overrides=['budget.students=["anchor_m", "no_such_student"]'])


@pytest.mark.skipif(not openvino_status()[0], reason="OpenVINO is not installed")
def test_openvino_is_a_budget_runtime_for_both_families(tmp_path, capsys):
    out = tmp_path / "out"
    grid = [*SMALL_GRID, "--set", 'budget.students=["anchor_s", "tiny_student"]', "--set", "budget.channels=[8]"]
    assert main(["-q", "budget", "--backend", "openvino", "--precision", "int8", "--out", str(out), *grid]) == 0
    table = load_table(out / "latency.json", 4, "64x48", "openvino", "int8")
    assert [(r["name"], r["preset"]) for r in table["candidates"]] == [("anchor_s-b1c8", "anchor_s"),
                                                                       ("b1c8", "tiny_student")]
    assert all(r["model"].startswith("openvino") and r["p95_ms"] > 0 for r in table["candidates"])
    capsys.readouterr()
    assert main(["-q", "budget", "--backend", "openvino", "--precision", "fp16", "--out", str(tmp_path / "o"),
                 *grid]) == 2
    assert "OpenVINO runs the FP32 and INT8 models" in capsys.readouterr().err
