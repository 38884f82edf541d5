"""The `anchor` family through every stage of the pipeline: distil (feature taps, adaptors), export (folded before
ONNX, parity against the branched PyTorch model), both INT8 models with their sensitivity step (the TensorRT QDQ
rules checked), verify (ONNX Runtime and OpenVINO rows), bundle and its torch-free edge check, upscale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import SMALL_CALIB
from models import create_model, folded, load_checkpoint, save_checkpoint
from pipeline.backends.openvino_runner import openvino_status
from pipeline.backends.ort_runner import OrtRunner
from pipeline.backends.torch_runner import TorchRunner
from pipeline.cli import main
from pipeline.data.imageio import read_rgb, write_rgb
from pipeline.deploy import edge
from pipeline.modelio import load_model
from pipeline.rundir import ONNX, QUANT_JSON, REPORT_JSON

FAST = ["--set", 'verify.latency_sizes=["40x24"]', "--set", "verify.repeats=2", "--set", "verify.warmup=0"]
STUDENT = ["--set", 'model.student="anchor_s"', "--set", "model.student_channels=8", "--set", "model.student_blocks=3"]
# Conv and its activation, the anchor (Split, Concat), the residual Add, the clamp, the pixel shuffle; Q/DQ in INT8.
GRAPH_OPS = {"Conv", "Relu", "Split", "Concat", "Add", "Clip", "DepthToSpace"}


@pytest.fixture(scope="module")
def anchor_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("anchor") / "run"
    torch.manual_seed(0)
    teacher = save_checkpoint(root.parent / "teacher.pt", create_model("tiny_teacher", scale=4))
    common = ["--run-dir", str(root), *STUDENT]
    assert main(["-q", "distill", *common, "--teacher", str(teacher), "--set", "train.iters=4",
                 "--set", "train.eval_every=0"]) == 0
    assert main(["-q", "export", *common]) == 0
    assert main(["-q", "quantize", *common, *SMALL_CALIB]) == 0
    return root


def test_the_student_trains_branched_and_exports_folded(anchor_run):
    ckpt = load_checkpoint(anchor_run / "student.pt")
    assert ckpt["model"]["arch"] == "anchor" and ckpt["model"]["folded"] is False
    fp32 = onnx.load(str(anchor_run / ONNX["fp32"]))
    assert {n.op_type for n in fp32.graph.node} <= GRAPH_OPS
    assert json.loads({p.key: p.value for p in fp32.metadata_props}["model_config"])["folded"] is True
    # 3 body convs and the last one: one Conv node each, named after the folded modules
    assert [n.name for n in fp32.graph.node if n.op_type == "Conv"] == ["body.0", "body.1", "body.2", "last"]
    model = load_model(anchor_run / "student.pt")
    lr = np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    with TorchRunner(model) as ref, TorchRunner(folded(model)) as plain, OrtRunner(anchor_run / ONNX["fp32"]) as ort:
        want = ref.infer(lr)
        assert np.abs(plain.infer(lr).astype(int) - want).max() <= 1
        assert np.abs(ort.infer(lr).astype(int) - want).max() <= 1


def test_both_int8_models_quantize_every_conv_family_alike(anchor_run):
    quant = json.loads((anchor_run / QUANT_JSON).read_text())
    assert quant["tensorrt"]["qdq_rules"].startswith("checked")
    for model in ("tensorrt", "cpu"):
        layers = {r["layer"] for r in quant[model]["layers"]}
        assert layers == {"body.0", "body.1", "body.2", "last"}
    for precision in ("int8", "int8-cpu"):
        ops = {n.op_type for n in onnx.load(str(anchor_run / ONNX[precision])).graph.node}
        assert ops - {"QuantizeLinear", "DequantizeLinear", "Cast"} <= GRAPH_OPS


def test_verify_bundle_and_upscale_run_the_anchor_student(anchor_run, tmp_path):
    assert main(["-q", "verify", "--run-dir", str(anchor_run), *STUDENT, *FAST]) in (0, 1)
    report = json.loads((anchor_run / REPORT_JSON).read_text())
    ran = {(r["backend"], r["precision"]) for r in report["rows"] if r["status"] != "skipped"}
    assert {("pytorch", "fp32"), ("onnxruntime-cpu", "fp32"), ("onnxruntime-cpu", "int8-cpu")} <= ran
    if openvino_status()[0]:
        assert {("openvino", "fp32"), ("openvino", "int8-cpu")} <= ran
    fp32 = next(r for r in report["rows"] if r["backend"] == "onnxruntime-cpu" and r["precision"] == "fp32")
    assert fp32["status"] == "pass"
    out = tmp_path / "deploy"
    assert main(["-q", "bundle", "--run-dir", str(anchor_run), *STUDENT, *FAST, "--out", str(out)]) == 0
    assert edge.main(["verify", "--bundle", str(out), "--backend", "onnxruntime", "-q"]) == 0
    photo = tmp_path / "in" / "a.png"
    write_rgb(photo, np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    assert main(["-q", "upscale", str(photo), "--out", str(tmp_path / "sr"), "--run-dir", str(anchor_run),
                 "--backend", "onnxruntime"]) == 0
    assert read_rgb(tmp_path / "sr" / "a.png").shape == (120, 160, 3)
