"""The OpenVINO backend: the same ONNX files as ONNX Runtime, against ONNX Runtime and PyTorch where OpenVINO is
installed; refused models; and a missing `openvino` that breaks nothing that does not ask for it."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import onnx
import pytest

from pipeline.deploy import edge
from pipeline.evaluation import verify
from pipeline.backends.openvino_runner import OpenVinoRunner, openvino_status
from pipeline.backends.ort_runner import OrtRunner
from pipeline.deploy.bundle import make_bundle
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data.datasets import PairFolder
from pipeline.data.imageio import write_rgb
from pipeline.errors import UserError
from pipeline.metrics import psnr_y

needs_openvino = pytest.mark.skipif(not openvino_status()[0], reason=openvino_status()[1])


@pytest.fixture
def no_openvino(monkeypatch):
    """`import openvino` fails, as where it is not installed."""
    monkeypatch.setitem(sys.modules, "openvino", None)


@pytest.fixture(scope="module")
def lr_images() -> list[np.ndarray]:
    return [p.lr[:48, :64] for p in list(PairFolder("embedded", 4))[:2]]


@needs_openvino
@pytest.mark.parametrize("precision", ["fp32", "int8-cpu"])
def test_openvino_matches_onnx_runtime_on_the_same_file(exported_run, lr_images, precision):
    model = exported_run / f"student.{precision}.onnx"
    with OpenVinoRunner(model) as ov, OrtRunner(model) as ort:
        assert (ov.name, ov.scale) == (f"openvino-{precision}", 4)
        pairs = [(ov.infer(lr), ort.infer(lr)) for lr in lr_images]
    # FP32: the same arithmetic up to float rounding. INT8: both run our QDQ model with integer kernels; the 7-bit
    # weights make both exact, so they differ only where a requantized activation rounds the other way.
    floor = 60 if precision == "fp32" else 40
    assert all(psnr_y(a, b, 4) > floor for a, b in pairs)


@needs_openvino
def test_models_openvino_does_not_run_right_are_refused(exported_run, tmp_path):
    for name in ("student.int8.onnx", "student.fp16.onnx"):  # the TensorRT INT8 model gives wrong output there
        with pytest.raises(UserError, match="OpenVINO runs fp32 and int8-cpu"):
            OpenVinoRunner(exported_run / name)
    foreign = onnx.load(str(exported_run / "student.fp32.onnx"))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    with pytest.raises(UserError, match="was not written by `pipeline export`"):
        OpenVinoRunner(tmp_path / "foreign.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="is not an ONNX model OpenVINO can read"):
        OpenVinoRunner(tmp_path / "broken.onnx")
    (tmp_path / "student.xml").write_text("<net/>")
    with pytest.raises(UserError, match="runs our ONNX models"):
        OpenVinoRunner(tmp_path / "student.xml")
    with pytest.raises(UserError, match="does not exist"):
        OpenVinoRunner(tmp_path / "missing.onnx")


def test_without_openvino_its_rows_are_skipped_with_the_reason(no_openvino, exported_run):
    ok, reason = openvino_status()
    assert not ok and "pip install openvino" in reason
    rows = [c for c in verify.candidates(exported_run, None) if c.backend == "openvino"]
    assert [(c.precision, c.model) for c in rows] == [("fp32", "student.fp32.onnx"),
                                                      ("int8-cpu", "student.int8-cpu.onnx")]
    assert all(c.make is None and c.reason == reason for c in rows)
    with pytest.raises(UserError, match="openvino is not installed"):
        OpenVinoRunner(exported_run / "student.fp32.onnx")


def test_without_openvino_upscale_and_edge_verify_take_onnx_runtime(no_openvino, exported_run, lr_images, tmp_path,
                                                                   capsys):
    write_rgb(tmp_path / "in.png", lr_images[0])
    run = ["--run-dir", str(exported_run)]
    assert main(["-q", "upscale", str(tmp_path / "in.png"), "--out", str(tmp_path / "a"), *run]) == 0
    out = capsys.readouterr().out
    assert "upscale: backend onnxruntime (no GPU provider; openvino is not installed" in out
    assert main(["-q", "upscale", str(tmp_path / "in.png"), "--out", str(tmp_path / "b"), *run,
                 "--backend", "openvino"]) == 2
    assert "error: openvino is not installed" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert edge.choose_backend("auto", False)[0] == "onnxruntime-cpu"
    with pytest.raises(UserError, match="--backend openvino: openvino is not installed"):
        edge.choose_backend("openvino", False)


@needs_openvino
def test_upscale_takes_openvino_by_default_and_says_so(exported_run, lr_images, tmp_path, capsys):
    write_rgb(tmp_path / "in.png", lr_images[0])
    run = ["--run-dir", str(exported_run)]
    assert main(["-q", "upscale", str(tmp_path / "in.png"), "--out", str(tmp_path / "a"), *run,
                 "--precision", "int8"]) == 0
    out = capsys.readouterr().out
    assert "upscale: backend openvino (OpenVINO " in out
    assert f"upscale: OpenVINO CPU, {exported_run / 'student.int8-cpu.onnx'} (int8-cpu)" in out
    # FP16 is not OpenVINO's: auto takes ONNX Runtime and says why; --backend openvino refuses it.
    assert main(["-q", "upscale", str(tmp_path / "in.png"), "--out", str(tmp_path / "b"), *run,
                 "--precision", "fp16"]) == 0
    assert "backend onnxruntime (no GPU provider; OpenVINO does not run fp16 models)" in capsys.readouterr().out
    assert main(["-q", "upscale", str(tmp_path / "in.png"), "--out", str(tmp_path / "c"),
                 "--model", str(exported_run / "student.int8.onnx"), "--backend", "openvino"]) == 2
    assert "OpenVINO runs fp32 and int8-cpu" in capsys.readouterr().err and not (tmp_path / "c").exists()


@needs_openvino
def test_upscale_auto_skips_openvino_where_it_failed_its_gate(exported_run, lr_images, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(exported_run, run)
    report = {"rows": [{"backend": "openvino", "precision": "fp32", "status": "fail"}]}
    (run / "report.json").write_text(json.dumps(report))
    write_rgb(tmp_path / "in.png", lr_images[0])
    assert main(["-q", "upscale", str(tmp_path / "in.png"), "--out", str(tmp_path / "a"), "--run-dir", str(run)]) == 0
    assert "backend onnxruntime (no GPU provider; OpenVINO failed its gate)" in capsys.readouterr().out


@needs_openvino
def test_edge_verify_runs_openvino_where_installed(exported_run, tmp_path, capsys):
    cfg = load_config(overrides=['verify.latency_sizes=["40x24"]', "verify.repeats=2", "verify.warmup=0"])
    make_bundle(cfg, exported_run, tmp_path / "deploy", progress=False)
    assert edge.main(["verify", "--bundle", str(tmp_path / "deploy"), "-q"]) == 0
    assert f"verifying with {openvino_status()[1]} on the CPU" in capsys.readouterr().out
    report = json.loads((tmp_path / "deploy" / edge.REPORT_JSON).read_text())
    assert report["backend"] == "openvino" and report["passed"]
    assert [(r["precision"], r["model"]) for r in report["rows"]] == [("fp32", "student.fp32.onnx"),
                                                                      ("int8", "student.int8-cpu.onnx")]
