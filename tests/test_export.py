"""ONNX export: interface, metadata, symbolic sizes after simplification, FP16 typing, parity with PyTorch."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from models import create_model
from pipeline.convert import export
from pipeline.backends.ort_runner import read_meta
from pipeline.errors import UserError


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("tiny_student", scale=3).eval()


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("export")
    fp32, fp16 = out / "s.fp32.onnx", out / "s.fp16.onnx"
    export.export_fp32(student, fp32, export.model_meta(student, "c" * 64, "d" * 64))
    export.save(export.to_fp16(onnx.load(str(fp32))), fp16)
    return fp32, fp16


def _dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _torch(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def test_interface_metadata_and_names(exported, student):
    fp32, fp16 = exported
    proto = onnx.load(str(fp32))
    assert [i.name for i in proto.graph.input] == ["lr"] and [o.name for o in proto.graph.output] == ["sr"]
    n, c, h, w = _dims(proto.graph.input[0])
    assert c == 3 and all(isinstance(d, str) for d in (n, h, w))  # still symbolic after onnxsim
    meta = read_meta(fp32)
    assert meta["scale"] == "3" and meta["precision"] == "fp32" and meta["colour_order"] == "RGB"
    assert meta["value_range"] == "0,1" and meta["source_checkpoint_sha256"] == "c" * 64
    assert meta["config_hash"] == "d" * 64 and not any(k.startswith("onnxsim") for k in meta)
    assert read_meta(fp16)["precision"] == "fp16"
    convs = [n for n, m in student.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert [n.name for n in export.conv_nodes(proto)] == convs
    assert any(n.op_type == "DepthToSpace" for n in proto.graph.node)


@pytest.mark.parametrize("hw", [(17, 33), (1, 1), (40, 24)])
def test_fp32_matches_pytorch_at_odd_sizes(exported, student, hw):
    x = np.random.default_rng(1).random((2, 3, *hw), dtype=np.float32)
    out = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"]).run(None, {"lr": x})[0]
    assert out.shape == (2, 3, hw[0] * 3, hw[1] * 3)
    np.testing.assert_allclose(out, _torch(student, x), atol=1e-5)


def test_fp16_computes_in_fp16_with_fp32_io(exported, student):
    proto = onnx.load(str(exported[1]))
    types = {i.data_type for i in proto.graph.initializer}
    assert TensorProto.FLOAT16 in types and TensorProto.FLOAT not in types
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = np.random.default_rng(2).random((1, 3, 21, 13), dtype=np.float32)
    out = ort.InferenceSession(str(exported[1]), providers=["CPUExecutionProvider"]).run(None, {"lr": x})[0]
    err = np.abs(out - _torch(student, x))
    # FP16 rounding: well above FP32's 1e-6, well below one 8-bit grey level.
    assert 1e-5 < err.max() < 2e-3


def test_parity_reports_error_and_psnr(exported, student):
    rng = np.random.default_rng(3)
    images = [("odd", rng.integers(0, 256, (17, 33, 3), dtype=np.uint8)),
              ("square", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))]
    fp32 = export.parity(student, exported[0], images)
    fp16 = export.parity(student, exported[1], images)
    assert [r["lr_size"] for r in fp32] == ["33x17", "20x20"]
    assert all(r["max_abs_err"] < 1e-5 and r["psnr_vs_pytorch"] > 100 for r in fp32)
    assert all(1e-5 < r["max_abs_err"] < 2e-3 and 60 < r["psnr_vs_pytorch"] < 120 for r in fp16)


def test_onnxslim_fallback_and_no_simplification_keep_sizes_symbolic(student, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_onnxsim(name, *args, **kwargs):
        if name == "onnxsim":
            raise ImportError("onnxsim hidden by the test")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxsim)
    done = export.export_fp32(student, tmp_path / "slim.onnx", export.model_meta(student, "a", "b"))
    assert done["simplifier"] == "onnxslim"
    monkeypatch.undo()
    assert export.export_fp32(student, tmp_path / "raw.onnx", export.model_meta(student, "a", "b"),
                              simplify=False)["simplifier"] == "off"
    for name in ("slim.onnx", "raw.onnx"):
        proto = onnx.load(str(tmp_path / name))
        assert all(isinstance(d, str) for d in np.array(_dims(proto.graph.input[0]), dtype=object)[[0, 2, 3]])
        x = np.random.default_rng(4).random((1, 3, 9, 7), dtype=np.float32)
        out = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"]).run(None, {"lr": x})[0]
        np.testing.assert_allclose(out, _torch(student, x), atol=1e-5)


def test_check_refuses_a_fixed_height(exported):
    proto = onnx.load(str(exported[0]))
    proto.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 64
    with pytest.raises(RuntimeError, match="H"):
        export.check(proto)


def test_foreign_and_broken_onnx_files_are_refused(tmp_path):
    node = helper.make_node("Identity", ["lr"], ["sr"])
    value = helper.make_tensor_value_info
    graph = helper.make_graph([node], "g", [value("lr", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [value("sr", TensorProto.FLOAT, [1, 3, 4, 4])])
    onnx.save(helper.make_model(graph), str(tmp_path / "foreign.onnx"))
    with pytest.raises(UserError, match="not written by `pipeline export`"):
        read_meta(tmp_path / "foreign.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a protobuf" * 10)
    with pytest.raises(UserError, match="not an ONNX model"):
        read_meta(tmp_path / "junk.onnx")
    with pytest.raises(UserError, match="does not exist"):
        read_meta(tmp_path / "missing.onnx")
