"""TensorRT engines: `student.fp16.plan` / `student.int8.plan` built from the ONNX models on the device that runs them.

One code path for TensorRT 10.x and 11.x: a strongly typed network (the precision comes from the ONNX tensor types),
one optimization profile over the LR size (config section `engine`, `profile_shapes`), a workspace limit, the builder
optimization level, a persistent timing cache and optionally a version-compatible plan. After a build the engine's
layer information must show the precision the plan is named for (`assert_engine_precision`); only then are the plan
and its sidecar `<plan>.json` (TensorRT, GPU, CUDA, precision, profile, ONNX sha256) written, atomically.
`plan_incompatibility` decides from a sidecar whether a plan can run on this device.

TensorRT and cuda-python are imported lazily, so this module imports without them. `trt_status()` probes the GPU
with cuda-python's `cudaGetDeviceCount` (which fails cleanly) before anything constructs a TensorRT object (which
can crash the process without a working CUDA device).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import EngineSection, parse_size
from pipeline.errors import UserError
from pipeline.rundir import atomic_path, sha256_file, write_json_atomic

if TYPE_CHECKING:  # the type stubs only; TensorRT itself is imported where it is used
    import tensorrt as trt

log = logging.getLogger("pipeline")

_NO_CUDA_PYTHON = ("cuda-python is not installed (pip install 'cuda-python>=12,<13' for a CUDA 12 driver, e.g. "
                   "JetPack 6; 'cuda-python>=13,<14' for CUDA 13)")
PRESET_OUTPUT_HW = {"720p": (720, 1280), "1080p": (1080, 1920)}
# The data types an engine of each precision must show: the INT8 plan is INT8 convolutions with an FP16 rest.
REQUIRED_DTYPES = {"fp32": {"fp32"}, "fp16": {"fp16"}, "int8": {"int8", "fp16"}}
# Where the inspector names a layer tensor's data type: TensorRT 10.x in "Format/Datatype" ("Half", "Int8", "Float",
# "Row major linear FP32", "Channel major FP16 format where channel % 8 == 0", "Thirty-two wide channel vectorized
# row major Int8 format."); TensorRT 11.x split that field into "Format" and a data type field, spelled "Datatype" in
# NVIDIA's samples and "DataType" in the documentation ("Half", "Float", "Int8").
_DTYPE_FIELDS = ("Format/Datatype", "Datatype", "DataType")
_DTYPE_WORDS = {
    "int8": r"\bint8\b",
    "fp16": r"\b(half|fp16)\b",
    "bf16": r"\b(bf16|bfloat16)\b",
    "fp8": r"\bfp8\b",
    "fp32": r"\b(float|fp32)\b",
}


def profile_shapes(sec: EngineSection, scale: int) -> dict[str, tuple[int, int]]:
    """LR (h, w) of the profile's min, opt and max. 720p/1080p: opt = max = the LR size whose x`scale` output covers
    the frame (x4 720p -> 180x320, x3 720p -> 240x427), min = min_lr; tile: all three tile x tile."""
    if sec.profile == "tile":
        return {"min": (sec.tile, sec.tile), "opt": (sec.tile, sec.tile), "max": (sec.tile, sec.tile)}
    low = parse_size(sec.min_lr, "engine.min_lr")
    if sec.profile == "custom":
        opt, high = parse_size(sec.opt_lr, "engine.opt_lr"), parse_size(sec.max_lr, "engine.max_lr")
    else:
        out_h, out_w = PRESET_OUTPUT_HW[sec.profile]
        opt = high = (math.ceil(out_h / scale), math.ceil(out_w / scale))
    if not all(low[i] <= opt[i] <= high[i] for i in (0, 1)):
        raise UserError(f"engine profile {sec.profile!r} at x{scale} needs min <= opt <= max in width and height, "
                        f"got min {low[1]}x{low[0]}, opt {opt[1]}x{opt[0]}, max {high[1]}x{high[0]} "
                        "(engine.min_lr/opt_lr/max_lr)")
    return {"min": low, "opt": opt, "max": high}


def input_profile(input_shape: tuple[int, ...], shapes: dict[str, tuple[int, int]],
                  max_batch: int) -> dict[str, tuple[int, int, int, int]]:
    """NCHW min/opt/max for a network input of `input_shape` (-1 = dynamic): LR sizes from `shapes`, batch
    1..max_batch (tuned for max_batch), or the model's fixed batch."""
    if len(input_shape) != 4:
        raise UserError(f"the model input must be NCHW, got shape {tuple(input_shape)}")
    n, c, h, w = input_shape
    if h >= 0 or w >= 0:
        raise UserError(f"the model input has a fixed size {tuple(input_shape)}; export it with dynamic H and W")
    if n >= 0 and n != max_batch:
        raise UserError(f"the model input has a fixed batch of {n}; set engine.max_batch = {n} or export it with a "
                        "dynamic batch")
    batch = {"min": 1, "opt": max_batch, "max": max_batch} if n < 0 else dict.fromkeys(("min", "opt", "max"), n)
    return {k: (batch[k], c, *shapes[k]) for k in ("min", "opt", "max")}


def layer_dtypes(layer_info: str | dict[str, Any]) -> dict[str, int]:
    """How many layer inputs and outputs of each data type (fp32, fp16, bf16, fp8, int8) the engine inspector's
    JSON lists, in the schema of TensorRT 10.x or 11.x (it names them only when the engine was built with
    ProfilingVerbosity.DETAILED)."""
    info = json.loads(layer_info or "{}") if isinstance(layer_info, str) else layer_info
    counts: dict[str, int] = {}
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):
            continue
        for tensor in layer.get("Inputs", []) + layer.get("Outputs", []):
            text = next((str(tensor[field]) for field in _DTYPE_FIELDS if field in tensor), "")
            dtype = next((name for name, word in _DTYPE_WORDS.items() if re.search(word, text, re.IGNORECASE)), None)
            if dtype is not None:
                counts[dtype] = counts.get(dtype, 0) + 1
    return counts


def assert_engine_precision(layer_info: str | dict[str, Any], precision: str) -> dict[str, int]:
    """The engine's tensor counts by data type; a UserError when they lack what `precision` needs (FP16 for an FP16
    plan, INT8 and FP16 for an INT8 plan): a strongly typed build of an FP32 ONNX is silently an FP32 engine."""
    counts = layer_dtypes(layer_info)
    if not counts:
        raise UserError("the engine's layer information names no data types (was it built with "
                        "ProfilingVerbosity.DETAILED?); cannot confirm its precision")
    missing = REQUIRED_DTYPES[precision] - counts.keys()
    if missing:
        found = ", ".join(f"{n} {k.upper()}" for k, n in sorted(counts.items()))
        raise UserError(f"the {precision.upper()} engine has no {' or '.join(sorted(m.upper() for m in missing))} "
                        f"layers (its layer tensors: {found}): TensorRT computes in the types the ONNX model has, so "
                        f"this ONNX model is not {precision.upper()}; export/quantize it again")
    return counts


def sidecar_path(plan: Path) -> Path:
    return plan.with_name(plan.name + ".json")


def read_sidecar(plan: Path) -> dict[str, Any]:
    """The sidecar of `plan`; a UserError when the plan or its sidecar is missing or unreadable."""
    side = sidecar_path(plan)
    if not plan.is_file():
        raise UserError(f"{plan} does not exist; build it on this device with `pipeline build`")
    try:
        return json.loads(side.read_text())
    except FileNotFoundError:
        raise UserError(f"{plan} has no sidecar {side.name}; rebuild it on this device with `pipeline build`") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{side} is corrupt ({e}); rebuild the plan with `pipeline build`") from None


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:4])


def plan_incompatibility(sidecar: dict[str, Any], here: dict[str, str]) -> str | None:
    """Why the plan that `sidecar` describes cannot run on the device `here` describes (`device_info()`), or None.
    The GPU (name and compute capability) must match; the TensorRT version too, unless the plan is
    version-compatible and this TensorRT is the same or newer within the plan's major version or the next one
    (TensorRT runs a 10.x version-compatible plan on 10.x and 11.x, not on 12.x)."""
    built_gpu = f"{sidecar.get('gpu')} (compute capability {sidecar.get('compute_capability')})"
    here_gpu = f"{here['gpu']} (compute capability {here['compute_capability']})"
    if built_gpu != here_gpu:
        return f"was built on {built_gpu}, this device is {here_gpu}"
    built, running = str(sidecar.get("tensorrt")), here["tensorrt"]
    if built == running:
        return None
    if not sidecar.get("version_compatible"):
        return f"was built with TensorRT {built}, this is TensorRT {running}"
    built_v, running_v = _version_tuple(built), _version_tuple(running)
    if running_v < built_v or running_v[0] > built_v[0] + 1:
        return (f"was built version-compatible with TensorRT {built}, which only TensorRT {built} or newer up to "
                f"TensorRT {built_v[0] + 1}.x runs; this is TensorRT {running}")
    return None


# --- CUDA and TensorRT (lazy imports) --------------------------------------------------------------------------------

def import_cudart() -> Any:
    """cuda-python's runtime module: `cuda.bindings.runtime` (cuda-python 12.6.2.post1 and later), else `cuda.cudart`
    (12.6.0 and older have only that)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime
    return runtime


def cuda_call(result: tuple[Any, ...]) -> Any:
    """Unpack a cuda-python result `(error, *values)`: the value (None, one, or a tuple), RuntimeError on error."""
    rt = import_cudart()
    err, *values = result
    if err != rt.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error {rt.cudaGetErrorName(err)[1].decode()}")
    return values[0] if len(values) == 1 else tuple(values) or None


def _cuda_version(number: int) -> str:
    return f"{number // 1000}.{number % 1000 // 10}"


def cuda_device_info() -> dict[str, str]:
    """The current CUDA device and versions: gpu, compute_capability, cuda_runtime, cuda_driver (needs a GPU)."""
    rt = import_cudart()
    prop = cuda_call(rt.cudaGetDeviceProperties(cuda_call(rt.cudaGetDevice())))
    return {"gpu": prop.name.decode(errors="replace").rstrip("\x00"),
            "compute_capability": f"{prop.major}.{prop.minor}",
            "cuda_runtime": _cuda_version(cuda_call(rt.cudaRuntimeGetVersion())),
            "cuda_driver": _cuda_version(cuda_call(rt.cudaDriverGetVersion()))}


def device_info() -> dict[str, str]:
    """`cuda_device_info()` plus the TensorRT version; call only when `trt_status()` is ok."""
    import tensorrt as trt

    return {"tensorrt": trt.__version__, **cuda_device_info()}


def cuda_python_version() -> str | None:
    """The installed cuda-python's version (the metapackage; its `cuda-bindings` where only that is installed)."""
    for name in ("cuda-python", "cuda-bindings"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(name)
    return None


def _driver_problem(rt: Any) -> str | None:
    """Why the CUDA driver cannot serve cuda-python's runtime `rt`: no driver, or a driver for an older CUDA major
    (cuda-python 13 on a CUDA 12 driver fails with cudaErrorInsufficientDriver); None when it can."""
    driver, runtime = cuda_call(rt.cudaDriverGetVersion()), cuda_call(rt.cudaRuntimeGetVersion())
    if driver == 0:
        return "no NVIDIA driver"
    if driver // 1000 < runtime // 1000:
        return (f"the driver supports CUDA {_cuda_version(driver)}; cuda-python {cuda_python_version()} needs CUDA "
                f"{runtime // 1000}: install cuda-python<{driver // 1000 + 1}")
    return None


def cuda_probe() -> tuple[bool, str]:
    """(True, "") when cuda-python sees a usable CUDA device, else (False, why not); safe without a GPU."""
    try:
        rt = import_cudart()
    except ImportError:
        return False, _NO_CUDA_PYTHON
    try:
        err, count = rt.cudaGetDeviceCount()
    except Exception as e:  # noqa: BLE001 - e.g. cuda-python 13 failing to load libcudart
        return False, f"cuda-python cannot reach the CUDA runtime ({type(e).__name__}: {e})"
    if err != rt.cudaError_t.cudaSuccess:
        why = f"cudaGetDeviceCount: {rt.cudaGetErrorName(err)[1].decode()}"
        problem = _driver_problem(rt)
        return False, f"{problem} ({why})" if problem else f"no CUDA device ({why})"
    if count == 0:
        return False, "no CUDA device (cudaGetDeviceCount: 0 devices)"
    try:
        cuda_device_info()
    except RuntimeError as e:
        return False, f"the CUDA device is not usable ({e})"
    return True, ""


def tensorrt_version() -> str | None:
    """The installed TensorRT's version (importing it constructs nothing), or None."""
    try:
        import tensorrt as trt
    except Exception:  # noqa: BLE001 - missing, or a broken install (OSError, RuntimeError, ...)
        return None
    return trt.__version__


def trt_status() -> tuple[bool, str]:
    """(True, what) when TensorRT can build and run here, else (False, why not). Constructs no TensorRT object."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "tensorrt is not installed"
    except Exception as e:  # noqa: BLE001 - a broken install fails with OSError, RuntimeError, ...
        return False, f"tensorrt cannot be imported ({type(e).__name__}: {e})"
    try:
        import_cudart()
    except ImportError:
        return False, f"{_NO_CUDA_PYTHON}"
    ok, why = cuda_probe()
    if not ok:
        return False, why
    info = cuda_device_info()
    return True, f"TensorRT {trt.__version__} on {info['gpu']} (compute capability {info['compute_capability']})"


# --- building --------------------------------------------------------------------------------------------------------

def build_engines(onnx_by_precision: dict[str, Path], out_dir: Path, sec: EngineSection, scale: int,
                  force: bool = False) -> list[Path]:
    """One plan per ONNX model: `{"fp16": .../student.fp16.onnx}` -> `out_dir/student.fp16.plan` + `.plan.json`.
    A plan whose sidecar already matches the ONNX, the settings, this GPU and this TensorRT is kept unless `force`.
    A UserError (with `trt_status()`'s reason) when TensorRT cannot run here."""
    shapes = profile_shapes(sec, scale)
    unknown = set(onnx_by_precision) - REQUIRED_DTYPES.keys()
    if unknown:
        raise UserError(f"unknown engine precision {', '.join(sorted(unknown))} (known: {', '.join(REQUIRED_DTYPES)})")
    ok, why = trt_status()
    if not ok:
        raise UserError(f"cannot build TensorRT engines here: {why}")
    here = device_info()
    plans = []
    for precision, onnx_path in onnx_by_precision.items():
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise UserError(f"{onnx_path} does not exist; run `pipeline export` (and `pipeline quantize`) first")
        plan = Path(out_dir) / onnx_path.with_suffix(".plan").name
        key = {"precision": precision, "onnx_sha256": sha256_file(onnx_path), "scale": scale,
               "profile": {k: list(v) for k, v in shapes.items()}, "max_batch": sec.max_batch,
               "workspace_mb": sec.workspace_mb, "opt_level": sec.opt_level,
               "version_compatible": sec.version_compatible, "tensorrt": here["tensorrt"], "gpu": here["gpu"],
               "compute_capability": here["compute_capability"]}
        if not force and _is_current(plan, key):
            log.info("%s is up to date (same ONNX, settings, GPU and TensorRT)", plan.name)
        else:
            log.info("building %s from %s (TensorRT %s, %s)", plan.name, onnx_path.name, here["tensorrt"], here["gpu"])
            _build_plan(onnx_path, plan, sec, {**key, **here, "onnx": onnx_path.name})
        plans.append(plan)
    return plans


def _is_current(plan: Path, key: dict[str, Any]) -> bool:
    try:
        old = json.loads(sidecar_path(plan).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    same = all(old.get(k) == v for k, v in key.items())
    return same and plan.is_file() and old.get("plan_sha256") == sha256_file(plan)


def _build_plan(onnx_path: Path, plan: Path, sec: EngineSection, meta: dict[str, Any]) -> None:
    """Build, check the precision, then write the plan and its sidecar (an existing plan stays on any failure)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # opt-in on 10.x; 11.x is always strongly typed
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path}: {errors}")
    if network.num_inputs != 1 or network.num_outputs != 1:
        raise UserError(f"{onnx_path} must have one input and one output, has {network.num_inputs} and "
                        f"{network.num_outputs}")
    tensor = network.get_input(0)
    shapes = input_profile(tuple(tensor.shape), {k: tuple(v) for k, v in meta["profile"].items()}, sec.max_batch)
    profile = builder.create_optimization_profile()
    profile.set_shape(tensor.name, shapes["min"], shapes["opt"], shapes["max"])

    config = builder.create_builder_config()
    config.add_optimization_profile(profile)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, sec.workspace_mb << 20)
    config.builder_optimization_level = sec.opt_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if sec.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    cache_path = Path(sec.timing_cache).expanduser() if sec.timing_cache else None
    if cache_path is not None and not _attach_timing_cache(config, cache_path):
        cache_path = None  # an unusable file stays as it is

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise UserError(f"TensorRT could not build {onnx_path.name} (see its messages above)")
    runtime = trt.Runtime(logger)
    runtime.engine_host_code_allowed = sec.version_compatible
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise UserError(f"TensorRT built {onnx_path.name} but cannot load the result")
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    dtypes = assert_engine_precision(info, meta["precision"])

    with atomic_path(plan) as tmp:
        tmp.write_bytes(serialized)
    write_json_atomic(sidecar_path(plan), {
        **meta, "plan": plan.name, "plan_sha256": sha256_file(plan), "input": tensor.name, "input_shapes": shapes,
        "tensor_dtypes": dtypes, "build_seconds": round(seconds, 1), "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    if cache_path is not None:
        _save_timing_cache(config, cache_path)


def _attach_timing_cache(config: trt.IBuilderConfig, path: Path) -> bool:
    """Give the build the timing cache in `path` (a missing file: an empty cache); True when the build's cache may
    be saved to `path`. A file TensorRT cannot use (corrupt, or from another GPU or TensorRT version) gets a warning
    and an empty cache instead, and False: the file is left as it is."""
    try:
        cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
        if cache is None:
            problem = "TensorRT cannot read it"
        elif not config.set_timing_cache(cache, False):
            problem = "it does not fit this GPU or TensorRT"
        else:
            return True
    except Exception as e:  # noqa: BLE001 - an unreadable file (OSError), or TensorRT rejecting its bytes
        problem = f"{type(e).__name__}: {e}"
    log.warning("timing cache %s is unusable (%s); this build starts an empty one and leaves the file as it is "
                "(delete it to let builds save a new one)", path, problem)
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return False


def _save_timing_cache(config: trt.IBuilderConfig, path: Path) -> None:
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(config.get_timing_cache().serialize())
    except OSError as e:
        log.warning("could not save the timing cache %s (%s); the next build will time its layers again", path, e)
