"""`pipeline export`, `quantize` and `verify` through the command line: artifacts, the report, the gates, and the
bad inputs that must end in one clear message with nothing overwritten."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from conftest import SMALL_CALIB
from pipeline.backends.openvino_runner import openvino_status
from pipeline.cli import main
from pipeline.backends.trt_engine import trt_status
from pipeline.convert.quantize import check_qdq
from pipeline.rundir import sha256_file

FAST = ["--set", "verify.repeats=2", "--set", "verify.warmup=0", "--set", 'verify.latency_sizes=["40x24"]']
ROW_KEYS = {"backend", "precision", "status", "reason", "psnr_y", "ssim_y", "delta_db", "psnr_vs_reference",
            "latency_ms_p50", "latency_ms_p95"}


@pytest.fixture(scope="module")
def run(exported_run, tmp_path_factory) -> Path:
    """This module's own copy: its tests write reports into it."""
    dst = tmp_path_factory.mktemp("verify") / "run"
    shutil.copytree(exported_run, dst)
    return dst


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def test_export_and_quantize_artifacts(run):
    for name in ("student.fp32.onnx", "student.fp16.onnx", "student.int8.onnx", "student.int8-cpu.onnx", "calib.npz",
                 "export.json", "quant.json", "quant.md"):
        assert (run / name).exists(), name
    assert check_qdq(onnx.load(str(run / "student.int8.onnx"))) == []
    parity = json.loads((run / "export.json").read_text())["parity"]
    assert {r["lr_size"] for r in parity["fp32"]} >= {"33x17", "64x48"}
    assert max(r["max_abs_err"] for r in parity["fp32"]) < 1e-4
    quant = json.loads((run / "quant.json").read_text())
    assert quant["calibration"] == 8 and quant["holdout"] == 4
    for model in ("tensorrt", "cpu"):
        q = quant[model]
        assert len(q["layers"]) == 11 and q["reached"] == (q["drop_db"] <= q["max_drop_db"])
        assert set(q["int8_layers"]) | set(q["float_layers"]) == {r["layer"] for r in q["layers"]}
    assert "QDQ rules checked" in (run / "quant.md").read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    assert {"student.fp32.onnx", "student.int8.onnx", "calib.npz"} <= set(manifest["artifacts"])


def test_verify_writes_the_report_and_passes(run, capsys):
    assert main(["verify", "--run-dir", str(run), *FAST]) == 0
    out = capsys.readouterr().out
    assert f"report: {run / 'report.md'}" in out
    report = json.loads((run / "report.json").read_text())
    rows = {(r["backend"], r["precision"]): r for r in report["rows"]}
    assert all(ROW_KEYS <= set(r) for r in report["rows"])
    ref = report["rows"][0]
    assert (ref["backend"], ref["precision"], ref["delta_db"]) == ("pytorch", "fp32", 0.0)
    assert ref["psnr_vs_reference"] == float("inf")
    for precision in ("fp32", "fp16", "int8", "int8-cpu"):
        row = rows[("onnxruntime-cpu", precision)]
        assert row["status"] == "pass" and row["delta_db"] == pytest.approx(row["psnr_y"] - ref["psnr_y"])
        assert row["latency_ms_p50"] > 0 and row["throughput"][0]["lr_size"] == "40x24"
    assert rows[("onnxruntime-cpu", "fp32")]["psnr_vs_reference"] > 60
    for int8 in ("int8", "int8-cpu"):
        assert 30 < rows[("onnxruntime-cpu", int8)]["psnr_vs_reference"] < rows[("onnxruntime-cpu", "fp16")][
            "psnr_vs_reference"]
        assert rows[("onnxruntime-cpu", int8)]["gate_db"] == report["gates"]["int8"]
    ok, why = openvino_status()
    for precision, model in (("fp32", "student.fp32.onnx"), ("int8-cpu", "student.int8-cpu.onnx")):
        row = rows[("openvino", precision)]
        assert row["model"] == model and row["gate_db"] == report["gates"][precision]
        if ok:  # the same model as ONNX Runtime's row, so nearly the same output
            assert row["status"] == "pass" and row["latency_ms_p50"] > 0
            assert row["psnr_vs_reference"] > (60 if precision == "fp32" else 30)
        else:
            assert (row["status"], row["reason"]) == ("skipped", why)
    skipped = [r for r in report["rows"] if r["status"] == "skipped"]
    assert all(r["reason"] and r["psnr_y"] is None for r in skipped)
    for name in ("report.md", "psnr.png", "latency.png", "crops.png"):
        assert (run / name).stat().st_size > 0
    assert main(["-q", "verify", "--run-dir", str(run), *FAST]) == 0
    assert "verify: up to date" in (run / "run.log").read_text()


def test_a_failed_gate_exits_1_and_names_the_rows(run, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    code = main(["-q", "verify", "--run-dir", str(copy), *FAST, "--set", "verify.gate_int8_db=0.0",
                 "--set", "verify.gate_fp16_db=0.0"])
    report = json.loads((copy / "report.json").read_text())
    failed = [r for r in report["rows"] if r["status"] == "fail"]
    assert code == 1 and failed and not report["passed"]
    assert all(abs(r["delta_db"]) > 0 for r in failed)
    err = capsys.readouterr().err
    assert all(f"{r['backend']} {r['precision']}" in err for r in failed)


def test_a_required_backend_that_cannot_run_fails(run, tmp_path, capsys):
    report = json.loads((run / "report.json").read_text())
    missing = next((r["backend"] for r in report["rows"] if r["status"] == "skipped"), None)
    if missing is None:
        pytest.skip("every backend runs on this machine")
    copy = _copy(run, tmp_path)
    assert main(["-q", "verify", "--run-dir", str(copy), *FAST, "--require", missing]) == 1
    assert "required but skipped" in capsys.readouterr().err
    assert main(["-q", "verify", "--run-dir", str(copy), *FAST, "--require", "nonsense"]) == 2


def test_bad_inputs_end_in_one_message_and_overwrite_nothing(run, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    before = {p.name: sha256_file(p) for p in copy.iterdir() if p.is_file() and p.name not in ("run.log", ".lock")}

    assert main(["-q", "verify", "--run-dir", str(copy), "--set", "verify.gate_fp16_db=-0.1"]) == 2
    assert "'verify.gate_fp16_db' must be >= 0" in capsys.readouterr().err

    assert main(["-q", "quantize", "--run-dir", str(copy), *SMALL_CALIB, "--set", "quant.calib_count=40",
                 "--calib", str(copy / "calib.npz")]) == 2
    assert "holds 12 crops, quant.calib_count asks for 40" in capsys.readouterr().err

    ckpt = torch.load(copy / "student.pt", weights_only=True)
    ckpt["model"]["arch"] = "swinir"
    torch.save(ckpt, tmp_path / "unknown.pt")
    assert main(["-q", "export", "--run-dir", str(copy), "--student", str(tmp_path / "unknown.pt")]) == 2
    assert "swinir" in capsys.readouterr().err

    value = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Identity", ["lr"], ["sr"])], "g",
                              [value("lr", TensorProto.FLOAT, [1, 3, 4, 4])], [value("sr", TensorProto.FLOAT, [1, 3, 4, 4])])
    onnx.save(helper.make_model(graph), str(copy / "student.fp16.onnx"))
    before["student.fp16.onnx"] = sha256_file(copy / "student.fp16.onnx")
    assert main(["-q", "verify", "--run-dir", str(copy), *FAST]) == 2
    assert "not written by `pipeline export`" in capsys.readouterr().err

    assert {p.name: sha256_file(p) for p in copy.iterdir() if p.is_file() and p.name in before} == before

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(copy / "student.pt", empty / "student.pt")
    assert main(["-q", "verify", "--run-dir", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "student.fp32.onnx (made by `pipeline export`)" in err and "student.int8.onnx" in err


def test_tensorrt_rows_say_why_they_are_skipped_and_require_trt_fails(run, tmp_path, capsys):
    ok, why = trt_status()
    if ok:
        pytest.skip("TensorRT runs here: its rows are real")
    report = json.loads((run / "report.json").read_text())
    rows = [r for r in report["rows"] if r["backend"] == "tensorrt"]
    assert [(r["precision"], r["model"], r["status"], r["reason"]) for r in rows] == [
        ("fp16", "student.fp16.plan", "skipped", why), ("int8", "student.int8.plan", "skipped", why)]
    copy = _copy(run, tmp_path)
    assert main(["-q", "verify", "--run-dir", str(copy), *FAST, "--require", "trt"]) == 1
    err = capsys.readouterr().err
    assert "tensorrt fp16 (student.fp16.plan): required but skipped" in err and "tensorrt int8" in err
    assert main(["-q", "build", "--run-dir", str(copy)]) == 2
    assert f"cannot build TensorRT engines here: {why}" in capsys.readouterr().err
