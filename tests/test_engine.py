"""TensorRT engines: the pure parts everywhere (profiles, config checks, precision assertion on recorded inspector
JSON, sidecar compatibility, lazy imports, the runner's sidecar handling), and real builds and runs of tiny FP16 /
INT8 / FP32 models compared with ONNX Runtime where TensorRT and a GPU are present (skipped elsewhere, with why)."""

import ctypes
import dataclasses
import hashlib
import importlib.util
import json
import logging
import re
import subprocess
import sys
import typing
from unittest import mock

import numpy as np
import pytest

from pipeline.backends import trt_engine as engine
from pipeline.backends import trt_runner
from pipeline.backends.base import latency
from pipeline.backends.trt_runner import TrtRunner
from pipeline.config import EngineSection, load_config, validate_engine_section
from pipeline.backends.trt_engine import (
    assert_engine_precision,
    build_engines,
    cuda_probe,
    input_profile,
    layer_dtypes,
    plan_incompatibility,
    profile_shapes,
    read_sidecar,
    sidecar_path,
    trt_status,
)
from pipeline.errors import UserError

TRT_OK, TRT_WHY = trt_status()
needs_trt = pytest.mark.skipif(not TRT_OK, reason=TRT_WHY)
no_tensorrt_installed = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                           reason="tensorrt is installed here")


# --- profiles and config ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("profile", "scale", "lr_hw"), [
    ("720p", 4, (180, 320)), ("720p", 3, (240, 427)), ("720p", 2, (360, 640)),
    ("1080p", 4, (270, 480)), ("1080p", 3, (360, 640)), ("1080p", 2, (540, 960)),
])
def test_output_presets_give_the_lr_size_that_covers_the_frame(profile, scale, lr_hw):
    shapes = profile_shapes(EngineSection(profile=profile), scale)
    assert shapes == {"min": (64, 64), "opt": lr_hw, "max": lr_hw}
    assert lr_hw[0] * scale >= int(profile[:-1]) and lr_hw[1] * scale >= {"720p": 1280, "1080p": 1920}[profile]


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_tile_preset_is_static(scale):
    assert profile_shapes(EngineSection(profile="tile", tile=128), scale) == dict.fromkeys(("min", "opt", "max"),
                                                                                         (128, 128))


def test_custom_profile_reads_width_x_height():
    sec = EngineSection(profile="custom", min_lr="32x16", opt_lr="320x180", max_lr="640x360")
    assert profile_shapes(sec, 4) == {"min": (16, 32), "opt": (180, 320), "max": (360, 640)}


@pytest.mark.parametrize(("changes", "key"), [
    ({"min_lr": "64"}, "engine.min_lr"),
    ({"min_lr": "0x64"}, "engine.min_lr"),
    ({"min_lr": "64x-1"}, "engine.min_lr"),
    ({"profile": "4k"}, "engine.profile"),
    ({"profile": "custom", "max_lr": "640x360"}, "engine.opt_lr"),
    ({"profile": "custom", "opt_lr": "320x180"}, "engine.max_lr"),
    ({"profile": "custom", "opt_lr": "320x180", "max_lr": "big"}, "engine.max_lr"),
    ({"opt_lr": "320x180"}, "engine.opt_lr"),
    ({"tile": 0}, "engine.tile"),
    ({"max_batch": 0}, "engine.max_batch"),
    ({"workspace_mb": 0}, "engine.workspace_mb"),
    ({"opt_level": 6}, "engine.opt_level"),
    ({"opt_level": -1}, "engine.opt_level"),
])
def test_bad_engine_values_name_the_key(changes, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(overrides=[f"engine.{k}={json.dumps(v)}" for k, v in changes.items()])


@pytest.mark.parametrize("sec", [
    EngineSection(min_lr="400x400"),  # larger than the 720p LR size at x4 (320x180)
    EngineSection(profile="custom", min_lr="64x64", opt_lr="640x360", max_lr="320x180"),
    EngineSection(profile="custom", min_lr="64x64", opt_lr="32x32", max_lr="320x180"),
])
def test_profile_must_be_ordered(sec):
    with pytest.raises(UserError, match="min <= opt <= max"):
        profile_shapes(sec, 4)


def test_defaults_are_valid_and_typed_for_the_config_loader():
    validate_engine_section(EngineSection())
    hints = typing.get_type_hints(EngineSection)
    assert typing.get_args(hints["profile"]) == ("720p", "1080p", "tile", "custom")
    assert hints["workspace_mb"] is int and hints["version_compatible"] is bool


def test_input_profile_fills_batch_and_lr_sizes():
    shapes = {"min": (64, 64), "opt": (180, 320), "max": (180, 320)}
    assert input_profile((-1, 3, -1, -1), shapes, 4) == {
        "min": (1, 3, 64, 64), "opt": (4, 3, 180, 320), "max": (4, 3, 180, 320)}
    assert input_profile((1, 3, -1, -1), shapes, 1)["opt"] == (1, 3, 180, 320)
    with pytest.raises(UserError, match="fixed batch"):
        input_profile((1, 3, -1, -1), shapes, 2)
    with pytest.raises(UserError, match="fixed size"):
        input_profile((-1, 3, 64, 64), shapes, 1)


# --- precision assertion on recorded inspector JSON ------------------------------------------------------------------

# A tensor type as the inspector names it: (TensorRT 10.x "Format/Datatype", TensorRT 11.x data type field).
FLOAT = ("Row major linear FP32", "Float")
HALF = ("Channel major FP16 format where channel % 8 == 0", "Half")
INT8_CHW32 = ("Thirty-two wide channel vectorized row major Int8 format.", "Int8")
# TensorRT 10.x; TensorRT 11.x as NVIDIA's samples read it ("Datatype") and as its documentation spells it ("DataType").
SCHEMAS = ("10.x", "11.x Datatype", "11.x DataType")


def _tensor(schema, name, dtype, dims=(1, 48, 180, 320)):
    tensor = {"Name": name, "Location": "Device", "Dimensions": list(dims)}
    if schema == "10.x":
        return {**tensor, "Format/Datatype": dtype[0]}
    return {**tensor, "Format": dtype[0], schema.split()[1]: dtype[1]}


def _layer(name, layer_type, inputs, outputs, **params):
    return {"Name": name, "LayerType": layer_type, "Inputs": inputs, "Outputs": outputs, **params}


def _io_tensors(schema):
    """10.x: "Bindings", a list of names; 11.x: "I/O Tensors", one object per tensor."""
    if schema == "10.x":
        return {"Bindings": ["lr", "sr"]}
    return {"I/O Tensors": [
        {"Name": name, "IOMode": mode, "DataType": "Float", "Dimensions": [-1, 3, -1, -1], "Location": "Device",
         "IsShapeInferenceIO": False} for name, mode in (("lr", "Input"), ("sr", "Output"))]}


def _engine_json(schema, act, conv_in, weights, io=(FLOAT, FLOAT)):
    """Layer information as IEngineInspector prints it (JSON, ProfilingVerbosity.DETAILED) in `schema` for a strongly
    typed EDSR-like student: input cast, head conv, body conv + ReLU, DepthToSpace, output cast."""
    def t(name, dtype, dims=(1, 48, 180, 320)):
        return _tensor(schema, name, dtype, dims)

    return {
        "Layers": [
            _layer("/cast_lr", "Reformat", [t("lr", io[0], (1, 3, 180, 320))],
                   [t("lr_fp16", act, (1, 3, 180, 320))], ParameterType="Reformat", Origin="CAST"),
            _layer("/head/Conv", "CaskConvolution", [t("lr_fp16", conv_in, (1, 3, 180, 320))],
                   [t("/head/Conv_output_0", act)], ParameterType="Convolution", Kernel=[3, 3],
                   Weights={"Type": weights, "Count": 1296}, Bias={"Type": weights, "Count": 48},
                   TacticName="sm80_xmma_fprop_implicit_gemm_tilesize64x32x64_stage5"),
            _layer("/body/0/Conv + /body/0/Relu", "CaskConvolution", [t("/head/Conv_output_0", conv_in)],
                   [t("/body/0/Relu_output_0", act)], ParameterType="Convolution", Kernel=[3, 3],
                   Weights={"Type": weights, "Count": 20736}, HasReLU=1),
            _layer("/tail/DepthToSpace", "Shuffle", [t("/body/0/Relu_output_0", act)],
                   [t("sr_fp16", act, (1, 3, 720, 1280))], ParameterType="Shuffle"),
            _layer("/cast_sr", "Cast", [t("sr_fp16", act, (1, 3, 720, 1280))],
                   [t("sr", io[1], (1, 3, 720, 1280))], ParameterType="Cast"),
        ],
        **_io_tensors(schema),
    }


def engines(schema):
    """Inspector output of each kind of engine in `schema`."""
    return {
        "fp32": _engine_json(schema, FLOAT, FLOAT, "Float"),
        "fp16": _engine_json(schema, HALF, HALF, "Half"),
        "int8": _engine_json(schema, HALF, INT8_CHW32, "Int8"),
        "int8 fp32 rest": _engine_json(schema, FLOAT, ("Int8", "Int8"), "Int8"),  # QDQ with the rest left FP32
        "myelin fp16": {"Layers": [
            _layer("__myl_CastConvAddRelu", "kgen", [_tensor(schema, "lr", ("Float", "Float"))],
                   [_tensor(schema, "feat", ("Half", "Half"))]),
            _layer("__myl_DepthToSpaceCast", "kgen", [_tensor(schema, "feat", ("Half", "Half"))],
                   [_tensor(schema, "sr", ("Float", "Float"))])]},
    }


@pytest.mark.parametrize("schema", SCHEMAS)
def test_layer_dtypes_reads_tensorrt_spellings(schema):
    found = engines(schema)
    assert layer_dtypes(found["fp16"]) == {"fp32": 2, "fp16": 8}
    assert layer_dtypes(json.dumps(found["int8"])) == {"fp32": 2, "fp16": 6, "int8": 2}
    assert layer_dtypes(found["myelin fp16"]) == {"fp32": 2, "fp16": 2}
    odd = {"Layers": [_layer("x", "kgen", [_tensor(schema, "a", ("BFloat16", "BFloat16"))],
                             [_tensor(schema, "b", ("FP8", "FP8"))])]}
    assert layer_dtypes(odd) == {"bf16": 1, "fp8": 1}


def test_tensorrt_11_data_type_field_wins_over_the_format():
    tensor = {"Name": "feat", "Format": "Row major linear FP32 format (kLINEAR)", "DataType": "Half"}
    assert layer_dtypes({"Layers": [_layer("x", "Shuffle", [tensor], [])]}) == {"fp16": 1}


@pytest.mark.parametrize("schema", SCHEMAS)
def test_fp16_engine_passes(schema):
    assert assert_engine_precision(json.dumps(engines(schema)["fp16"]), "fp16")["fp16"] == 8
    assert assert_engine_precision(engines(schema)["myelin fp16"], "fp16")


@pytest.mark.parametrize("schema", SCHEMAS)
def test_fp32_engine_labelled_fp16_fails(schema):
    with pytest.raises(UserError, match="FP16 engine has no FP16 layers"):
        assert_engine_precision(engines(schema)["fp32"], "fp16")


@pytest.mark.parametrize("schema", SCHEMAS)
def test_int8_plan_needs_int8_and_an_fp16_rest(schema):
    found = engines(schema)
    assert assert_engine_precision(found["int8"], "int8")["int8"] == 2
    with pytest.raises(UserError, match="INT8 engine has no INT8 layers"):
        assert_engine_precision(found["fp16"], "int8")
    with pytest.raises(UserError, match="INT8 engine has no FP16 layers"):
        assert_engine_precision(found["int8 fp32 rest"], "int8")


@pytest.mark.parametrize("schema", SCHEMAS)
def test_layer_names_only_cannot_confirm_precision(schema):
    with pytest.raises(UserError, match="DETAILED"):
        assert_engine_precision({"Layers": ["/head/Conv", "/tail/DepthToSpace"], **_io_tensors(schema)}, "fp16")


# --- sidecars --------------------------------------------------------------------------------------------------------

HERE = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7", "cuda_runtime": "12.6",
        "cuda_driver": "12.6"}


def _sidecar(**changes):
    return {"precision": "fp16", "scale": 4, "max_batch": 2, "plan_sha256": "0" * 64,
            "profile": {"min": [64, 64], "opt": [180, 320], "max": [180, 320]},
            "version_compatible": False, **{k: HERE[k] for k in ("tensorrt", "gpu", "compute_capability")},
            **changes}


def test_same_device_is_compatible():
    assert plan_incompatibility(_sidecar(), HERE) is None


@pytest.mark.parametrize("changes", [{"gpu": "NVIDIA GeForce RTX 4090"}, {"compute_capability": "8.9"}])
def test_other_gpu_is_refused(changes):
    problem = plan_incompatibility(_sidecar(**changes), HERE)
    assert problem is not None and "Orin" in problem and "built on" in problem


def test_other_gpu_is_refused_even_when_version_compatible():
    assert plan_incompatibility(_sidecar(gpu="NVIDIA H100", version_compatible=True), HERE) is not None


def test_other_tensorrt_is_refused_unless_version_compatible_and_newer():
    problem = plan_incompatibility(_sidecar(tensorrt="10.1.0"), HERE)
    assert problem == "was built with TensorRT 10.1.0, this is TensorRT 10.3.0"
    assert plan_incompatibility(_sidecar(tensorrt="10.1.0", version_compatible=True), HERE) is None
    assert plan_incompatibility(_sidecar(tensorrt="10.3.0", version_compatible=True),
                                {**HERE, "tensorrt": "11.0.0"}) is None
    older = plan_incompatibility(_sidecar(tensorrt="10.13.0", version_compatible=True), HERE)
    assert older is not None and "TensorRT 10.13.0 or newer" in older


@pytest.mark.parametrize(("running", "runs"), [("11.1.0", True), ("11.9.2", True), ("12.0.0", False),
                                               ("13.1.0", False)])
def test_version_compatible_plan_runs_on_the_next_major_only(running, runs):
    problem = plan_incompatibility(_sidecar(tensorrt="10.3.0", version_compatible=True), {**HERE, "tensorrt": running})
    assert (problem is None) == runs
    if not runs:
        assert problem == (f"was built version-compatible with TensorRT 10.3.0, which only TensorRT 10.3.0 or newer "
                           f"up to TensorRT 11.x runs; this is TensorRT {running}")


def test_read_sidecar_errors_say_to_rebuild(tmp_path):
    plan = tmp_path / "student.fp16.plan"
    with pytest.raises(UserError, match="pipeline build"):
        read_sidecar(plan)
    plan.write_bytes(b"plan")
    with pytest.raises(UserError, match="no sidecar.*pipeline build"):
        read_sidecar(plan)
    sidecar_path(plan).write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        read_sidecar(plan)
    sidecar_path(plan).write_text(json.dumps(_sidecar()))
    assert read_sidecar(plan)["precision"] == "fp16"


def test_runner_takes_scale_precision_and_tiling_from_the_sidecar(tmp_path):
    plan = tmp_path / "student.fp16.plan"
    plan.write_bytes(b"plan")
    sidecar_path(plan).write_text(json.dumps(_sidecar()))
    runner = TrtRunner(plan)
    assert (runner.backend, runner.name, runner.precision) == ("tensorrt", "tensorrt-fp16", "fp16")
    assert (runner.scale, runner.batch, runner.max_lr_hw) == (4, 2, (180, 320))
    assert runner._tile_grid((360, 640)) is not None  # larger than the profile: tiled by the base class
    with pytest.raises(UserError, match="max batch 2"):
        TrtRunner(plan, batch=3)


# --- probing without TensorRT ----------------------------------------------------------------------------------------

def test_importing_engine_modules_loads_neither_tensorrt_nor_cuda_python():
    code = ("import sys, pipeline.backends.trt_engine, pipeline.backends.trt_runner, pipeline.doctor; "
            "print(sorted(m for m in sys.modules if m == 'tensorrt' or m == 'cuda' or m.startswith('cuda.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_trt_status_reports_a_missing_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert trt_status() == (False, "tensorrt is not installed")


def test_cuda_probe_reports_a_missing_cuda_python(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda", None)
    ok, why = cuda_probe()
    assert not ok and "cuda-python is not installed" in why


@no_tensorrt_installed
def test_trt_status_here_is_false_with_a_reason():
    assert trt_status() == (False, "tensorrt is not installed")


@no_tensorrt_installed
def test_build_and_run_need_tensorrt(tmp_path):
    onnx_path = tmp_path / "student.fp16.onnx"
    onnx_path.write_bytes(b"model")
    with pytest.raises(UserError, match="cannot build TensorRT engines here: tensorrt is not installed"):
        build_engines({"fp16": onnx_path}, tmp_path, EngineSection(), 4)
    plan = tmp_path / "student.fp16.plan"
    plan.write_bytes(b"plan")
    sidecar_path(plan).write_text(json.dumps(_sidecar()))
    with pytest.raises(UserError, match="tensorrt is not installed"):
        TrtRunner(plan).activate()


def test_build_checks_the_precision_before_tensorrt(tmp_path):
    with pytest.raises(UserError, match="unknown engine precision bf16"):
        build_engines({"bf16": tmp_path / "m.onnx"}, tmp_path, EngineSection(), 4)


# --- building with TensorRT replaced by a fake (its calls as the bindings define them) -------------------------------

GOOD_CACHE = b"TRT timing cache for this GPU"


def fake_tensorrt(layer_info, cache_problem=None):
    """A `tensorrt` module whose build succeeds with `layer_info` from the engine inspector. Timing caches as the
    bindings treat them: `create_timing_cache(bytes)` returns an ITimingCache (here: for b"" and GOOD_CACHE; for other
    bytes per `cache_problem`: "raises", "none", or "mismatch" = a cache that set_timing_cache(cache, False) refuses
    with False), `set_timing_cache(None, ...)` raises TypeError (pybind11: incompatible function arguments)."""
    trt = mock.MagicMock(name="tensorrt")
    builder = trt.Builder.return_value
    trt.OnnxParser.return_value.parse_from_file.return_value = True
    network = builder.create_network.return_value
    network.num_inputs = network.num_outputs = 1
    network.get_input.return_value.shape = (-1, 3, -1, -1)
    network.get_input.return_value.name = "lr"
    builder.build_serialized_network.return_value = b"serialized plan"
    inspector = trt.Runtime.return_value.deserialize_cuda_engine.return_value.create_engine_inspector.return_value
    inspector.get_engine_information.return_value = json.dumps(layer_info)
    config = builder.create_builder_config.return_value

    def create_timing_cache(blob):
        if blob in (b"", GOOD_CACHE):
            return mock.sentinel.fitting_cache if blob else mock.sentinel.empty_cache
        if cache_problem == "raises":
            raise RuntimeError("Failed to deserialize the timing cache")
        return None if cache_problem == "none" else mock.sentinel.foreign_cache

    def set_timing_cache(cache, ignore_mismatch):
        if cache is None:
            raise TypeError("set_timing_cache(): incompatible function arguments")
        return cache is not mock.sentinel.foreign_cache or ignore_mismatch

    config.create_timing_cache.side_effect = create_timing_cache
    config.set_timing_cache.side_effect = set_timing_cache
    config.get_timing_cache.return_value.serialize.return_value = b"the timing cache after this build"
    return trt


@pytest.fixture
def fake_device(monkeypatch):
    monkeypatch.setattr(engine, "trt_status", lambda: (True, "TensorRT 11.1.0 on a fake GPU"))
    monkeypatch.setattr(engine, "device_info", lambda: {**HERE, "tensorrt": "11.1.0"})


def _fake_build(monkeypatch, tmp_path, trt, cache_bytes=None):
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    onnx_path = tmp_path / "student.fp16.onnx"
    onnx_path.write_bytes(b"model")
    cache = tmp_path / "trt-timing.cache"
    if cache_bytes is not None:
        cache.write_bytes(cache_bytes)
    plans = build_engines({"fp16": onnx_path}, tmp_path, dataclasses.replace(SMALL, timing_cache=str(cache)), 2)
    return plans, cache


@pytest.mark.parametrize("schema", SCHEMAS)
def test_build_writes_the_plan_when_the_inspector_shows_fp16(fake_device, monkeypatch, tmp_path, schema):
    (plan,), _ = _fake_build(monkeypatch, tmp_path, fake_tensorrt(engines(schema)["fp16"]))
    assert plan.read_bytes() == b"serialized plan"
    assert read_sidecar(plan)["tensor_dtypes"] == {"fp32": 2, "fp16": 8}


@pytest.mark.parametrize("problem", ["raises", "none", "mismatch"])
def test_unusable_timing_cache_gives_an_empty_one_and_stays_as_it_is(fake_device, monkeypatch, tmp_path, caplog,
                                                                    problem):
    trt = fake_tensorrt(engines("10.x")["fp16"], cache_problem=problem)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        (plan,), cache = _fake_build(monkeypatch, tmp_path, trt, cache_bytes=b"\x00garbage\xff" * 10)
    assert plan.read_bytes() == b"serialized plan"
    config = trt.Builder.return_value.create_builder_config.return_value
    assert config.set_timing_cache.call_args == mock.call(mock.sentinel.empty_cache, False)
    assert "is unusable" in caplog.text and "leaves the file as it is" in caplog.text
    assert cache.read_bytes() == b"\x00garbage\xff" * 10


@pytest.mark.parametrize("cache_bytes", [None, GOOD_CACHE])
def test_usable_or_missing_timing_cache_is_saved_after_the_build(fake_device, monkeypatch, tmp_path, caplog,
                                                                 cache_bytes):
    trt = fake_tensorrt(engines("10.x")["fp16"], cache_problem="raises")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        _, cache = _fake_build(monkeypatch, tmp_path, trt, cache_bytes=cache_bytes)
    config = trt.Builder.return_value.create_builder_config.return_value
    used = mock.sentinel.fitting_cache if cache_bytes else mock.sentinel.empty_cache
    assert config.set_timing_cache.call_args_list == [mock.call(used, False)]
    assert cache.read_bytes() == b"the timing cache after this build" and "unusable" not in caplog.text


# --- running with TensorRT and cuda-python replaced by fakes ---------------------------------------------------------

class FakeCudart:
    """cuda-python's runtime calls the runner makes, `(error, *values)` as cuda-python returns them; "device" memory
    is host memory, so that copies are real."""

    class cudaError_t:  # noqa: N801 - cuda-python's names
        cudaSuccess = 0

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self):
        self.buffers = {}

    def cudaMalloc(self, nbytes):  # noqa: N802
        buffer = ctypes.create_string_buffer(nbytes)
        self.buffers[ctypes.addressof(buffer)] = buffer
        return 0, ctypes.addressof(buffer)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):  # noqa: N802
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaFree(self, pointer):  # noqa: N802
        del self.buffers[pointer]
        return (0,)

    def cudaStreamCreate(self):  # noqa: N802
        return 0, 7

    def cudaEventCreate(self):  # noqa: N802
        return 0, object()

    def cudaEventElapsedTime(self, start, end):  # noqa: N802
        return 0, 0.25

    def cudaGetErrorName(self, err):  # noqa: N802
        return 0, b"cudaErrorUnknown"

    def __getattr__(self, name):  # cudaStreamSynchronize, cudaStreamDestroy, cudaEventRecord, ...: succeed
        return lambda *args: (0,)


class FakeContext:
    """An IExecutionContext of a x`scale` nearest-neighbour engine with input "lr" and output "sr": set_input_shape
    returns False outside the profile (or for a shape in `refuse`), set_tensor_address False when `refuse_address`."""

    def __init__(self, profile, scale, refuse=(), refuse_address=False):
        self.profile, self.scale, self.refuse, self.refuse_address = profile, scale, refuse, refuse_address
        self.shapes, self.addresses, self.shape = [], {}, None

    def set_input_shape(self, name, shape):
        shape = tuple(shape)
        self.shapes.append(shape)
        low, _, high = self.profile
        ok = name == "lr" and shape not in self.refuse and all(lo <= v <= hi for lo, v, hi in zip(low, shape, high))
        if ok:
            self.shape = shape
        return ok

    def get_tensor_shape(self, name):
        n, c, h, w = self.shape
        return self.shape if name == "lr" else (n, c, h * self.scale, w * self.scale)

    def set_tensor_address(self, name, pointer):
        self.addresses[name] = pointer
        return not self.refuse_address

    def execute_async_v3(self, stream):
        size = int(np.prod(self.shape))
        x = np.frombuffer((ctypes.c_float * size).from_address(self.addresses["lr"]), np.float32).reshape(self.shape)
        out = x.repeat(self.scale, axis=2).repeat(self.scale, axis=3)
        ctypes.memmove(self.addresses["sr"], out.ctypes.data, out.nbytes)
        return True


@pytest.fixture
def fake_runner(monkeypatch, tmp_path):
    """A TrtRunner factory over fake TensorRT and cuda-python: a x2 engine with profile 1x3x16x16 .. 2x3x64x64."""
    profile = [(1, 3, 16, 16), (2, 3, 48, 48), (2, 3, 64, 64)]
    cudart = FakeCudart()
    monkeypatch.setattr(engine, "import_cudart", lambda: cudart)
    monkeypatch.setattr(trt_runner, "import_cudart", lambda: cudart)
    monkeypatch.setattr(trt_runner, "trt_status", lambda: (True, "TensorRT 10.3.0 on a fake GPU"))
    monkeypatch.setattr(trt_runner, "device_info", lambda: HERE)
    plan = tmp_path / "student.fp16.plan"
    plan.write_bytes(b"serialized plan")
    sidecar_path(plan).write_text(json.dumps(_sidecar(scale=2, plan_sha256=hashlib.sha256(b"serialized plan")
                                                      .hexdigest(), profile={"min": [16, 16], "opt": [48, 48],
                                                                             "max": [64, 64]})))

    def make(**context_options):
        trt = mock.MagicMock(name="tensorrt")
        trt.nptype.return_value = np.float32
        found = trt.Runtime.return_value.deserialize_cuda_engine.return_value
        found.num_io_tensors = 2
        found.get_tensor_name.side_effect = ["lr", "sr"].__getitem__
        found.get_tensor_mode.side_effect = lambda name: trt.TensorIOMode.INPUT if name == "lr" else "output"
        found.get_tensor_profile_shape.return_value = profile
        found.create_execution_context.return_value = FakeContext(profile, 2, **context_options)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        runner = TrtRunner(plan, buffers="cuda-python")
        runner.activate()
        return runner, found.create_execution_context.return_value

    return make


def test_fake_engine_runs_with_padding_below_the_profile_minimum(fake_runner):
    runner, context = fake_runner()
    x = np.random.default_rng(3).random((1, 3, 9, 12), dtype=np.float32)
    sr = runner.forward(x)
    np.testing.assert_array_equal(sr, x.repeat(2, axis=2).repeat(2, axis=3))
    assert context.shapes == [(2, 3, 64, 64), (1, 3, 16, 16)]  # the buffers' maximum, then the padded input
    runner.deactivate()


def test_gpu_times_prepare_the_input_as_forward_does(fake_runner):
    runner, context = fake_runner()
    assert runner.gpu_times_ms(np.zeros((1, 3, 9, 12), np.float32), iters=3) == [0.25] * 3
    assert context.shapes[1:] == [(1, 3, 16, 16)]
    with pytest.raises(ValueError, match="outside the engine profile"):
        runner.gpu_times_ms(np.zeros((1, 3, 65, 64), np.float32), iters=1)
    assert context.shapes[1:] == [(1, 3, 16, 16)]  # nothing set for the input outside the profile


def test_a_refused_input_shape_raises_naming_the_tensor_and_the_shape(fake_runner):
    runner, _ = fake_runner(refuse=[(1, 3, 20, 24)])
    with pytest.raises(RuntimeError, match=r"refused the shape \(1, 3, 20, 24\) for input 'lr' of student.fp16.plan"):
        runner.forward(np.zeros((1, 3, 20, 24), np.float32))
    with pytest.raises(RuntimeError, match=r"refused the shape \(1, 3, 20, 24\) for input 'lr'"):
        runner.gpu_times_ms(np.zeros((1, 3, 20, 24), np.float32), iters=1)


def test_a_refused_tensor_address_raises_naming_the_tensor(fake_runner):
    with pytest.raises(RuntimeError, match="refused the device address 0x[0-9a-f]+ for tensor 'lr' of student.fp16"):
        fake_runner(refuse_address=True)


# --- cuda-python against the driver ----------------------------------------------------------------------------------

class DriverCudart(FakeCudart):
    """cuda-python's runtime as it answers on a machine whose driver supports CUDA `driver` (12060 = 12.6; 0 = no
    driver) when its own runtime is CUDA `runtime` and cudaGetDeviceCount fails with `error`."""

    class cudaError_t:  # noqa: N801
        cudaSuccess, cudaErrorInsufficientDriver, cudaErrorNoDevice = 0, 35, 100

    def __init__(self, driver, runtime, error):
        super().__init__()
        self.driver, self.runtime, self.error = driver, runtime, error

    def cudaDriverGetVersion(self):  # noqa: N802
        return 0, self.driver

    def cudaRuntimeGetVersion(self):  # noqa: N802
        return 0, self.runtime

    def cudaGetDeviceCount(self):  # noqa: N802
        return self.error, None

    def cudaGetErrorName(self, err):  # noqa: N802
        return 0, {35: b"cudaErrorInsufficientDriver", 100: b"cudaErrorNoDevice"}[err]


JETPACK6_WITH_CUDA_PYTHON_13 = ("the driver supports CUDA 12.6; cuda-python 13.0.3 needs CUDA 13: install "
                                "cuda-python<13 (cudaGetDeviceCount: cudaErrorInsufficientDriver)")


@pytest.fixture
def cuda_python_13_on_a_cuda_12_driver(monkeypatch):
    cudart = DriverCudart(12060, 13000, 35)
    monkeypatch.setattr(engine, "import_cudart", lambda: cudart)
    monkeypatch.setattr(engine, "cuda_python_version", lambda: "13.0.3")


def test_cuda_python_newer_than_the_driver_says_which_to_install(cuda_python_13_on_a_cuda_12_driver, monkeypatch):
    assert cuda_probe() == (False, JETPACK6_WITH_CUDA_PYTHON_13)
    monkeypatch.setitem(sys.modules, "tensorrt", mock.MagicMock(name="tensorrt"))
    assert trt_status() == (False, JETPACK6_WITH_CUDA_PYTHON_13)


def test_doctor_names_the_cuda_python_and_driver_mismatch(cuda_python_13_on_a_cuda_12_driver, monkeypatch):
    from pipeline.doctor import doctor_report, format_doctor

    monkeypatch.setitem(sys.modules, "tensorrt", mock.MagicMock(name="tensorrt", __version__="10.3.0"))
    report = doctor_report()
    assert report["cuda_python"] == {"version": "13.0.3", "usable": False, "detail": JETPACK6_WITH_CUDA_PYTHON_13}
    assert re.search(rf"\n  cuda-python +13\.0\.3 \({re.escape(JETPACK6_WITH_CUDA_PYTHON_13)}\)\n", format_doctor(report))
    assert report["enables"]["TensorRT engines"] == f"no ({JETPACK6_WITH_CUDA_PYTHON_13}) -> verify uses ONNX Runtime"


@pytest.mark.parametrize(("driver", "runtime", "error", "why"), [
    (0, 13000, 35, "no NVIDIA driver (cudaGetDeviceCount: cudaErrorInsufficientDriver)"),
    (12060, 12090, 100, "no CUDA device (cudaGetDeviceCount: cudaErrorNoDevice)"),
    (13000, 12060, 100, "no CUDA device (cudaGetDeviceCount: cudaErrorNoDevice)"),
])
def test_other_cuda_failures_keep_their_reason(monkeypatch, driver, runtime, error, why):
    cudart = DriverCudart(driver, runtime, error)
    monkeypatch.setattr(engine, "import_cudart", lambda: cudart)
    assert cuda_probe() == (False, why)


# --- TensorRT on a GPU -----------------------------------------------------------------------------------------------

def tiny_sr_onnx(path, precision, scale=2, seed=0):
    """A one-conv x`scale` SR model `lr` -> `sr` (float32 NCHW, dynamic N/H/W) typed like our exports: fp32; fp16
    inside with Casts at the ends; int8 = that fp16 model with symmetric Q/DQ on the conv input and weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c = 3 * scale * scale
    weight = (rng.standard_normal((c, 3, 3, 3)) * 0.2).astype(np.float32)
    bias = rng.uniform(0.2, 0.6, c).astype(np.float32)
    ftype = np.float32 if precision == "fp32" else np.float16
    inits = [numpy_helper.from_array(weight.astype(ftype), "w"), numpy_helper.from_array(bias.astype(ftype), "b")]
    x, w, nodes = "lr", "w", []
    if precision != "fp32":
        nodes.append(helper.make_node("Cast", ["lr"], ["lr16"], to=TensorProto.FLOAT16))
        x = "lr16"
    if precision == "int8":
        inits += [numpy_helper.from_array(np.array(1 / 127, np.float16), "x_s"),
                  numpy_helper.from_array(np.array(0, np.int8), "x_z"),
                  numpy_helper.from_array((np.abs(weight).reshape(c, -1).max(1) / 127).astype(np.float16), "w_s"),
                  numpy_helper.from_array(np.zeros(c, np.int8), "w_z")]
        nodes += [helper.make_node("QuantizeLinear", [x, "x_s", "x_z"], ["x_q"]),
                  helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_dq"]),
                  helper.make_node("QuantizeLinear", ["w", "w_s", "w_z"], ["w_q"], axis=0),
                  helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w_dq"], axis=0)]
        x, w = "x_dq", "w_dq"
    y = "sr" if precision == "fp32" else "sr16"
    nodes += [helper.make_node("Conv", [x, w, "b"], ["feat"], pads=[1, 1, 1, 1]),
              helper.make_node("DepthToSpace", ["feat"], [y], blocksize=scale, mode="CRD")]
    if precision != "fp32":
        nodes.append(helper.make_node("Cast", ["sr16"], ["sr"], to=TensorProto.FLOAT))
    graph = helper.make_graph(nodes, f"tiny_{precision}",
                              [helper.make_tensor_value_info("lr", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("sr", TensorProto.FLOAT, ["N", 3, "SH", "SW"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _ort(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"lr": x})[0]


SMALL = EngineSection(profile="custom", min_lr="16x16", opt_lr="48x48", max_lr="64x64", max_batch=2, workspace_mb=256,
                      opt_level=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    sec = dataclasses.replace(SMALL, timing_cache=str(root / "trt-timing.cache"))
    models = {p: tiny_sr_onnx(root / f"student.{p}.onnx", p) for p in ("fp16", "int8")}
    return root, sec, models, build_engines(models, root, sec, 2)


@needs_trt
def test_plans_sidecars_and_timing_cache_are_written(built):
    root, sec, models, plans = built
    assert [p.name for p in plans] == ["student.fp16.plan", "student.int8.plan"]
    for precision, plan in zip(("fp16", "int8"), plans):
        side = read_sidecar(plan)
        assert side["precision"] == precision and side["scale"] == 2 and side["max_batch"] == 2
        assert side["profile"] == {"min": [16, 16], "opt": [48, 48], "max": [64, 64]}
        assert {"tensorrt", "gpu", "compute_capability", "cuda_runtime", "cuda_driver", "onnx_sha256",
                "build_seconds", "version_compatible"} <= side.keys()
        assert "fp16" in side["tensor_dtypes"] and (precision != "int8" or "int8" in side["tensor_dtypes"])
    assert (root / "trt-timing.cache").stat().st_size > 0
    before = [p.stat().st_mtime_ns for p in plans]
    assert build_engines(models, root, sec, 2) == plans
    assert [p.stat().st_mtime_ns for p in plans] == before  # up to date: not rebuilt


@needs_trt
@pytest.mark.parametrize(("precision", "atol"), [("fp16", 1e-2), ("int8", 3e-2)])
@pytest.mark.parametrize("buffers", ["cuda-python", "torch"])
def test_engine_matches_onnxruntime(built, precision, atol, buffers):
    if buffers == "torch":
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("torch has no CUDA")
    root, _, models, _ = built
    x = np.random.default_rng(1).random((2, 3, 40, 56), dtype=np.float32)
    with TrtRunner(root / f"student.{precision}.plan", buffers=buffers) as runner:
        sr = runner.forward(x)
        small = runner.forward(x[:1, :, :9, :12])  # below the profile minimum: padded, then cropped
    assert sr.shape == (2, 3, 80, 112) and small.shape == (1, 3, 18, 24)
    np.testing.assert_allclose(sr, _ort(models[precision], x), atol=atol)


@needs_trt
def test_images_larger_than_the_profile_are_tiled(built):
    root, _, models, _ = built
    lr = np.random.default_rng(2).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    with TrtRunner(root / "student.fp16.plan") as runner:
        sr = runner.infer(lr)
    whole = _ort(models["fp16"], lr.transpose(2, 0, 1)[None].astype(np.float32) / 255)[0].transpose(1, 2, 0)
    expected = np.clip(np.round(whole * 255), 0, 255)
    assert sr.shape == (180, 300, 3)
    assert np.abs(sr.astype(int) - expected).max() <= 3


@needs_trt
def test_latency_measurement(built):
    root = built[0]
    with TrtRunner(root / "student.fp16.plan") as runner:
        gpu = runner.gpu_times_ms(np.zeros((1, 3, 48, 48), np.float32), iters=5)
        timed = latency(runner, "48x48", warmup=2, repeats=5)
    assert len(gpu) == 5 and all(t > 0 for t in gpu)
    assert 0 < timed["gpu_p50_ms"] <= timed["p50_ms"]  # the engine alone is part of a call with its copies


@needs_trt
@pytest.mark.parametrize("changes", [{"gpu": "Another GPU"}, {"tensorrt": "9.0.0"}])
def test_runner_refuses_a_plan_built_elsewhere(built, tmp_path, changes):
    root = built[0]
    plan = tmp_path / "student.fp16.plan"
    plan.write_bytes((root / "student.fp16.plan").read_bytes())
    sidecar_path(plan).write_text(json.dumps({**read_sidecar(root / "student.fp16.plan"), **changes}))
    with pytest.raises(UserError, match="rebuild it from the ONNX on this device"):
        TrtRunner(plan).activate()


@needs_trt
def test_fp32_model_labelled_fp16_fails_and_keeps_the_old_plan(tmp_path):
    onnx_path = tiny_sr_onnx(tmp_path / "student.fp16.onnx", "fp32")
    plan = tmp_path / "student.fp16.plan"
    plan.write_bytes(b"the previous plan")
    with pytest.raises(UserError, match="FP16 engine has no FP16 layers"):
        build_engines({"fp16": onnx_path}, tmp_path, dataclasses.replace(SMALL, timing_cache=""), 2, force=True)
    assert plan.read_bytes() == b"the previous plan" and not sidecar_path(plan).exists()
