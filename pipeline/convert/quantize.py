"""INT8 quantization: our own calibration on real LR crops, explicit QDQ that TensorRT 10 and 11 accept, and a
per-layer sensitivity sweep that keeps the layers that hurt most in FP16.

The INT8 model is the FP16 model with a QuantizeLinear -> DequantizeLinear pair on the inputs (activation and
weight) of the chosen Conv nodes: symmetric INT8, zero points 0, per-channel weight scales on axis 0, per-tensor
activation scales, FP16 scales, no bias quantization, nothing else quantized; the bias of the image Conv corrected for
the mean shift INT8 leaves (`image_bias_corrected`, both INT8 models). Everything not quantized is FP16, so a
strongly typed TensorRT build gives an INT8 + FP16 engine; ONNX Runtime's CPU provider runs the same file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import reprlib
import shutil
import tempfile
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from tqdm import tqdm

from pipeline.config import Config
from pipeline.convert.export import INPUT, conv_nodes
from pipeline.data.datasets import PairFolder
from pipeline.errors import UserError
from pipeline.metrics import psnr_y, to_uint8
from pipeline.rundir import ONNX

log = logging.getLogger("pipeline")

# --- the calibration set --------------------------------------------------------------------------------------------

def calibration_set(data: str, scale: int, count: int, crop: int, holdout: int, seed: int) -> dict[str, np.ndarray]:
    """`count` distinct, non-overlapping LR crops (`crop` px square, with their HR crops) from the training images,
    drawn with `seed`; the last `holdout` of them are held out to measure the INT8 model, the rest calibrate it."""
    pairs = list(PairFolder(data, scale))
    cells = [(i, y, x) for i, p in enumerate(pairs)
             for y in range(0, p.lr.shape[0] - crop + 1, crop) for x in range(0, p.lr.shape[1] - crop + 1, crop)]
    if len(cells) < count:
        raise UserError(f"the training data {data} yields only {len(cells)} distinct {crop}x{crop} LR crops, "
                        f"quant.calib_count asks for {count}: lower quant.calib_count or quant.calib_crop")
    chosen = np.random.default_rng(seed).choice(len(cells), size=count, replace=False)
    lr, hr = [], []
    for k in chosen:
        i, y, x = cells[k]
        lr.append(pairs[i].lr[y:y + crop, x:x + crop])
        hr.append(pairs[i].hr[y * scale:(y + crop) * scale, x * scale:(x + crop) * scale])
    return {"lr": np.stack(lr), "hr": np.stack(hr), "holdout": np.arange(count) >= count - holdout,
            "scale": np.array(scale), "seed": np.array(seed)}


CALIB_KEYS = ("lr", "hr", "holdout", "scale", "seed")


def load_calibration(path: Path, count: int, crop: int, scale: int) -> dict[str, np.ndarray]:
    """A saved calibration set (what `calibration_set` gives, saved with np.savez), every array's dtype, shape and
    range checked, and checked against what the config asks for: the one reader of this format (no use re-checks)."""
    what = f"{path} is not a calibration set of `pipeline quantize`"
    # What numpy and zipfile raise on corrupt bytes (RuntimeError: "encrypted", NotImplementedError: "compression
    # method"; TokenError: a broken .npy header) and, ValueError, on an object array.
    unreadable = (ValueError, OSError, EOFError, RuntimeError, zipfile.BadZipFile, zlib.error, tokenize.TokenError)
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"calibration set {path} does not exist") from None
    except unreadable as e:
        raise UserError(f"{what} (truncated or corrupt? {type(e).__name__}: {e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise UserError(f"{what}: it is one {z.dtype} {z.shape} array (a .npy file?), not the arrays "
                        f"{', '.join(CALIB_KEYS)}")
    with z:
        missing = [k for k in CALIB_KEYS if k not in z.files]
        unknown = [k for k in z.files if k not in CALIB_KEYS]
        if missing or unknown:
            raise UserError(f"{what}: missing arrays {', '.join(missing) or 'none'}, unknown arrays "
                            f"{', '.join(unknown) or 'none'}")
        calib = {}
        for key in CALIB_KEYS:
            try:
                calib[key] = z[key]
            except unreadable as e:
                raise UserError(f"{what}: its {key} cannot be read (truncated, corrupt or an object array? "
                                f"{type(e).__name__}: {e})") from None
            if not isinstance(calib[key], np.ndarray):
                raise UserError(f"{what}: its {key} is not a .npy array")

    def refuse(key: str, want: str) -> UserError:
        a = calib[key]
        value = f" = {reprlib.repr(a.item())}" if a.ndim == 0 else ""
        return UserError(f"{what}: {key} must be {want}, not {a.dtype} {a.shape}{value}")

    lr, hr, hold, s, seed = (calib[k] for k in CALIB_KEYS)
    if s.shape != () or s.dtype.kind not in "iu" or int(s) not in (2, 3, 4):
        raise refuse("scale", "an integer 2, 3 or 4 (0-d)")
    if seed.shape != () or seed.dtype.kind not in "iu" or int(seed) < 0:
        raise refuse("seed", "an integer >= 0 (0-d)")
    if lr.dtype != np.uint8 or lr.ndim != 4 or lr.shape[3] != 3 or 0 in lr.shape:
        raise refuse("lr", "uint8 RGB crops (count, height, width, 3), none empty")
    n, h, w = lr.shape[:3]
    k = int(s)
    if hr.dtype != np.uint8 or hr.shape != (n, h * k, w * k, 3):
        raise refuse("hr", f"uint8 {(n, h * k, w * k, 3)}: lr's crops at x{k}")
    if hold.dtype != bool or hold.shape != (n,):
        raise refuse("holdout", f"bool ({n},): one flag per crop")
    if hold.all() or not hold.any():
        raise UserError(f"{path} has {'no' if not hold.any() else 'only'} held-out crops: quantize needs crops to "
                        "calibrate on and held-out crops to measure the INT8 models")
    if k != scale:
        raise UserError(f"{path} was made for x{k}, this run is x{scale}")
    if n < count:
        raise UserError(f"{path} holds {n} crops, quant.calib_count asks for {count}")
    if (h, w) != (crop, crop):
        raise UserError(f"{path} holds {w}x{h} crops, quant.calib_crop asks for {crop}")
    return calib


def _batches(lr: np.ndarray, size: int = 8) -> list[np.ndarray]:
    x = lr.transpose(0, 3, 1, 2).astype(np.float32) / 255
    return [x[i:i + size] for i in range(0, len(x), size)]


# --- activation ranges ----------------------------------------------------------------------------------------------

def activation_amax(fp32_model: Path, lr: np.ndarray, method: str, percentile: float) -> dict[str, float]:
    """Symmetric range (max |x| to keep) of every Conv input tensor, from ONNX Runtime's calibrators."""
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter({INPUT: b} for b in _batches(lr, 1))  # the histogram collectors need equal batches

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "fp32.onnx"  # ONNX Runtime writes `<model>-inferred.onnx` beside the model it reads
        shutil.copyfile(fp32_model, source)
        calibrator = create_calibrator(source, ["Conv"], augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=methods[method],
                                       extra_options={"symmetric": True, "percentile": percentile,
                                                      "num_bins": 2048, "num_quantized_bins": 128})
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress notes
            calibrator.collect_data(Reader())
            ranges = calibrator.compute_data()
    return {name: float(max(abs(float(np.max(t.range_value[0]))), abs(float(np.max(t.range_value[1])))))
            for name, t in ranges.items()}


# --- the QDQ graph --------------------------------------------------------------------------------------------------

def quantize(fp16: onnx.ModelProto, amax: dict[str, float], layers: Collection[str]) -> onnx.ModelProto:
    """The FP16 model with the Conv nodes named in `layers` quantized (input and weight); metadata precision int8."""
    proto = onnx.ModelProto()
    proto.CopyFrom(fp16)
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    unknown = set(layers) - {n.name for n in conv_nodes(proto)}
    if unknown:
        raise ValueError(f"no Conv node named {', '.join(sorted(unknown))}")
    qdq: dict[str, str] = {}  # quantized tensor -> its DequantizeLinear output (one pair per tensor)
    new_nodes: list[onnx.NodeProto] = []

    def add_pair(tensor: str, scale: np.ndarray, axis: int | None) -> str:
        if tensor not in qdq:
            s, z = f"{tensor}_qscale", f"{tensor}_qzero"
            g.initializer.extend([numpy_helper.from_array(scale.astype(np.float16), s),
                                  numpy_helper.from_array(np.zeros(scale.shape, np.int8), z)])
            kw = {} if axis is None else {"axis": axis}
            new_nodes.append(helper.make_node("QuantizeLinear", [tensor, s, z], [f"{tensor}_q"],
                                              name=f"{tensor}_QuantizeLinear", **kw))
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{tensor}_q", s, z], [f"{tensor}_dq"],
                                              name=f"{tensor}_DequantizeLinear", **kw))
            qdq[tensor] = f"{tensor}_dq"
        return qdq[tensor]

    for node in g.node:
        if node.op_type == "Conv" and node.name in layers:
            x, w = node.input[0], node.input[1]
            calibrated = INPUT if x == f"{INPUT}_fp16" else x  # a Conv on the input sees its FP16 cast (to_fp16)
            if calibrated not in amax:
                raise ValueError(f"no calibrated range for {x!r}, the input of {node.name}")
            weight = numpy_helper.to_array(inits[w]).astype(np.float32)
            w_amax = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)
            node.input[0] = add_pair(x, np.array(_scale(amax[calibrated])), None)
            node.input[1] = add_pair(w, np.array([_scale(a) for a in w_amax]), 0)
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    for p in proto.metadata_props:
        if p.key == "precision":
            p.value = "int8"
    return proto


def _scale(amax: float) -> float:
    """INT8 scale for a symmetric range, kept representable in FP16 (an all-zero tensor still gets a valid scale)."""
    return max(amax / 127, 2.0 ** -14) if amax > 0 else 1.0


def check_qdq(proto: onnx.ModelProto) -> list[str]:
    """Every broken rule of a TensorRT INT8 QDQ model, one line each (empty when the model is clean):
    zero points present, INT8 and 0; scales > 0; per-channel only on axis 0; no INT32 (bias) DequantizeLinear;
    Q feeds only DQ and DQ feeds only Conv inputs; no Q/DQ output is a graph output; DepthToSpace computes on float
    (no Q/DQ produces its input, no DQ consumes its output: a Conv input quantized after it is allowed)."""
    g = proto.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    errors = []
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        where = f"{n.op_type} {n.name or n.output[0]}"
        data = inits.get(n.input[0])
        if n.op_type == "DequantizeLinear" and data is not None and data.dtype == np.int32:
            errors.append(f"{where}: dequantizes an INT32 tensor (bias); TensorRT accepts only activation types")
        zero = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zero is None:
            errors.append(f"{where}: no zero point initializer (the default is UINT8); give an INT8 zero point 0")
        elif zero.dtype != np.int8 or np.any(zero != 0):
            errors.append(f"{where}: zero point must be INT8 0, got {zero.dtype} {np.unique(zero)[:4].tolist()}")
        scale = inits.get(n.input[1])
        if scale is None or np.any(scale <= 0):
            errors.append(f"{where}: scale must be a positive initializer")
        elif scale.size > 1:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            if axis != 0:
                errors.append(f"{where}: per-channel axis is {axis}, must be 0")
        if any(o in outputs for o in n.output):
            errors.append(f"{where}: quantizes a graph output")
        for c in consumers.get(n.output[0], []):
            if n.op_type == "QuantizeLinear" and c.op_type != "DequantizeLinear":
                errors.append(f"{where}: feeds {c.op_type} {c.name}, not a DequantizeLinear")
            if n.op_type == "DequantizeLinear" and (c.op_type != "Conv" or list(c.input).index(n.output[0]) > 1):
                errors.append(f"{where}: feeds {c.op_type} {c.name}; only Conv inputs (data, weight) are quantized")
    for n in g.node:
        if n.op_type != "DepthToSpace":
            continue
        src = producer.get(n.input[0])
        if src is not None and src.op_type in ("QuantizeLinear", "DequantizeLinear"):
            errors.append(f"DepthToSpace {n.name}: its input comes from {src.op_type} {src.name}")
        if any(c.op_type == "DequantizeLinear" for c in consumers.get(n.output[0], [])):
            errors.append(f"DepthToSpace {n.name}: its output is dequantized")
    return errors


# --- sensitivity-guided mixed precision -----------------------------------------------------------------------------

def _session(model: onnx.ModelProto | Path, exact_arithmetic: bool = False) -> Any:
    """ONNX Runtime's CPU provider on `model`: with this CPU's integer kernels, or (`exact_arithmetic`) with every
    Q/DQ run as float ops, which is what exact integer arithmetic (VNNI, AMX) computes, whatever this CPU is."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if exact_arithmetic:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def holdout_psnr(model: onnx.ModelProto | Path, lr: np.ndarray, hr: np.ndarray, scale: int,
                 exact_arithmetic: bool = False) -> float:
    """Mean Y-PSNR (uint8 outputs, shave = scale) of a model on crops, with ONNX Runtime's CPU provider (see
    `_session` for `exact_arithmetic`)."""
    session = _session(model, exact_arithmetic)
    outs = np.concatenate([session.run(None, {INPUT: b})[0] for b in _batches(lr)])
    return float(np.mean([psnr_y(to_uint8(o.transpose(1, 2, 0)), h, scale) for o, h in zip(outs, hr)]))


def _tensor(model: onnx.ModelProto, name: str, lr: np.ndarray) -> np.ndarray:
    """The values of the tensor `name` inside `model` on the crops `lr`, with exact arithmetic, as float64."""
    probe = onnx.shape_inference.infer_shapes(model)
    info = next((v for v in probe.graph.value_info if v.name == name), None)
    if info is None:
        raise ValueError(f"the model has no tensor {name!r} of known type")
    probe.graph.output.append(info)
    session = _session(probe, exact_arithmetic=True)
    return np.concatenate([session.run([name], {INPUT: b})[0] for b in _batches(lr)]).astype(np.float64)


def image_bias_corrected(model: onnx.ModelProto, quantized: Callable[[onnx.ModelProto], onnx.ModelProto],
                         lr: np.ndarray) -> onnx.ModelProto:
    """`quantized(model)` with the bias of the image Conv (the last Conv: its output channels are the colour and
    sub-pixel planes of the output image) lowered by the mean shift that INT8 leaves on each of its channels,
    measured on the calibration crops `lr`. Rounded weights move each plane's mean, a brightness error on every
    pixel of that plane that PSNR counts in full (on the trained anchor_m, about 40 % of the INT8 model's error power:
    all-Conv drop on the calibration hold-out 0.056 dB without the correction, 0.015 dB with it); the rest of the
    error is zero-mean and stays."""
    conv = conv_nodes(model)[-1]
    if len(conv.input) < 3:
        raise ValueError(f"the image Conv {conv.name} has no bias to correct")
    shift = (_tensor(quantized(model), conv.output[0], lr) - _tensor(model, conv.output[0], lr)).mean(axis=(0, 2, 3))
    corrected = onnx.ModelProto()
    corrected.CopyFrom(model)
    bias = next(i for i in corrected.graph.initializer if i.name == conv.input[2])
    value = numpy_helper.to_array(bias)
    bias.CopyFrom(numpy_helper.from_array((value.astype(np.float64) - shift).astype(value.dtype), bias.name))
    return quantized(corrected)


def choose_layers(names: list[str], quantized: Callable[[set[str]], onnx.ModelProto], fp32: Path, lr: np.ndarray,
                  hr: np.ndarray, scale: int, max_drop_db: float, progress: bool = True,
                  label: str = "") -> dict[str, Any]:
    """Quantize each Conv of `names` alone (`quantized(layers)` gives the model with those Convs INT8) and measure
    its PSNR cost on the held-out crops; then, from the fully quantized model, keep the most sensitive Convs in float,
    one at a time, until the drop against FP32 is at most `max_drop_db` (or only one INT8 Conv is left: then
    `reached` is False and the verify gate decides)."""
    fp32_psnr = holdout_psnr(fp32, lr, hr, scale)

    def drop(layers: Iterable[str]) -> float:
        return fp32_psnr - holdout_psnr(quantized(set(layers)), lr, hr, scale)

    cost = {name: drop([name]) for name in tqdm(names, desc=f"per-layer sensitivity{label}", unit="conv",
                                                 disable=not progress, leave=False)}
    order = sorted(names, key=lambda n: cost[n], reverse=True)
    kept: list[str] = []
    steps = [{"kept_float": [], "drop_db": drop(names)}]
    while steps[-1]["drop_db"] > max_drop_db and len(kept) < len(names) - 1:
        kept.append(order[len(kept)])
        steps.append({"kept_float": list(kept), "drop_db": drop(n for n in names if n not in kept)})
    final = steps[-1]["drop_db"]
    table = [{"layer": n, "cost_db": cost[n], "rank": order.index(n) + 1,
              "precision": "float" if n in kept else "int8"} for n in names]
    return {"fp32_psnr_y": fp32_psnr, "all_int8_drop_db": steps[0]["drop_db"], "drop_db": final,
            "max_drop_db": max_drop_db, "reached": final <= max_drop_db,
            "int8_layers": [n for n in names if n not in kept], "float_layers": kept, "steps": steps, "layers": table}


def format_table(result: dict[str, Any], title: str, float_name: str) -> str:
    lines = [f"{title}: on {result['holdout']} held-out crops, FP32 {result['fp32_psnr_y']:.3f} dB Y-PSNR; "
             f"all Convs INT8: -{result['all_int8_drop_db']:.3f} dB; chosen: -{result['drop_db']:.3f} dB "
             f"(target {result['max_drop_db']} dB: {'reached' if result['reached'] else 'NOT reached'}), "
             f"{len(result['float_layers'])} Conv(s) kept in {float_name}.", "",
             "| layer | cost alone (dB) | rank | precision |", "|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['cost_db']:.4f} | {r['rank']} | "
              f"{float_name if r['precision'] == 'float' else 'INT8'} |" for r in result["layers"]]
    return "\n".join(lines) + "\n"


# --- the CPU twin ---------------------------------------------------------------------------------------------------

# ONNX Runtime's U8S8 kernels on x86 CPUs without VNNI (AVX2, AVX-512F/BW) multiply with VPMADDUBSW, which sums each
# pair of u8 x s8 products into a saturating int16 before widening: with 8-bit weights a pair reaches
# 2 * 255 * 127 = 64770 and is clipped to 32767 (the CPU model lost 9 dB that way). With weights in [-64, 64]
# ("7-bit", ONNX Runtime's reduce_range) a pair stays within 2 * 255 * 64 = 32640, so every x86 CPU (AVX2,
# AVX-512, VNNI, AMX) computes the same exact integer result, at the speed of U8S8.
CPU_WEIGHT_QMAX = 64
# Beside the Convs, the ops between them, so that no float op runs between two integer kernels: with Conv alone the
# quantizer left each Relu as DequantizeLinear -> Relu -> QuantizeLinear in float; quantized, a Relu is removed (its
# output's range starts at 0, which clips as it did) and ONNX Runtime fuses Add and Concat into integer kernels and
# moves Split and DepthToSpace as uint8. Measured on the trained anchor_m at 640x360 (AMD EPYC, AVX2, 2 threads,
# loaded machine), against FP32 338 ms: Conv only 297 ms, + Relu 236 ms, all of these 193 ms; the all-INT8 drop on
# the calibration hold-out 0.077, 0.041 and 0.038 dB.
CPU_INT8_OPS = ["Conv", "Relu", "Clip", "Add", "Concat", "Split", "DepthToSpace"]
CPU_INT8_META = {"int8_cpu_weights": f"7-bit (-{CPU_WEIGHT_QMAX}..{CPU_WEIGHT_QMAX})",
                 "int8_cpu_assumes": "any x86-64 CPU: u8 x s8 pair sums stay within int16, so AVX2 and AVX-512 "
                                     "without VNNI compute what VNNI and AMX do"}


def cpu_twin_quantizer(fp32: Path, lr: np.ndarray, method: str, percentile: float,
                       workdir: Path) -> Callable[[set[str]], onnx.ModelProto]:
    """`quantized(layers)` for the CPU model `student.int8-cpu.onnx`: ONNX Runtime's own QDQ recipe with unsigned
    asymmetric per-tensor activations and signed symmetric per-channel 7-bit weights (U8S8, whose Convs ONNX
    Runtime's CPU provider fuses into integer kernels; 7-bit so that no x86 CPU saturates, see CPU_WEIGHT_QMAX), and
    the ops between them (CPU_INT8_OPS); the Convs not in `layers`, and what feeds only them, stay FP32; the image
    Conv's bias corrected (`image_bias_corrected`). Calibrated once on `lr`; the ranges are cached in `workdir`, a
    private temporary folder: ONNX Runtime reads a copy of the model there, as it writes `<model>-inferred.onnx`
    beside the model it reads (and leaves it behind when it fails or is killed)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter({INPUT: b} for b in _batches(lr, 1))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    fp32_proto = onnx.load(str(fp32))
    graph = fp32_proto.graph
    names = [n.name for n in graph.node if n.op_type == "Conv"]
    consumers = {t: [c for c in graph.node if t in c.input] for n in graph.node for t in n.output}
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}

    def left_out(layers: set[str]) -> list[str]:
        """The Convs not in `layers`, and every other op whose outputs feed only those: a Conv kept in FP32 reads
        an FP32 input, not a quantized one."""
        floats = {n for n in names if n not in layers}
        feeders = [n.name for n in graph.node if n.op_type != "Conv" and all(
            consumers[t] and all(c.name in floats for c in consumers[t]) for t in n.output)]
        return sorted(floats) + feeders

    source = workdir / "twin-input.fp32.onnx"

    def quantized_once(model: onnx.ModelProto, layers: set[str]) -> onnx.ModelProto:
        out = workdir / "int8-cpu.onnx"
        onnx.save(model, str(source))
        with contextlib.redirect_stdout(io.StringIO()):  # the ranges are calibrated once, then read from the cache
            quantize_static(str(source), str(out), Reader(), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=CPU_INT8_OPS, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, reduce_range=True,
                            nodes_to_exclude=left_out(layers),
                            calibrate_method=methods[method], calibration_cache_path=workdir / "ranges.json",
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                           "CalibPercentile": percentile, "CalibNumBins": 2048})
        return onnx.load(str(out))

    def quantized(layers: set[str]) -> onnx.ModelProto:
        proto = image_bias_corrected(fp32_proto, lambda model: quantized_once(model, layers), lr)
        for p in proto.metadata_props:
            if p.key == "precision":
                p.value = "int8-cpu"
        onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **CPU_INT8_META})
        return proto

    return quantized


# --- the two INT8 models of a run -----------------------------------------------------------------------------------

def int8_models(cfg: Config, fp32: Path, fp16: Path, data: dict[str, np.ndarray],
                progress: bool = True) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, Any]]:
    """The TensorRT model (S8S8 symmetric QDQ on the FP16 model, the QDQ rules checked) and the CPU model (U8S8,
    the ops between the Convs quantized too), each with its own per-layer sensitivity choice on the calibration set's
    held-out crops, and the record of both (quant.json)."""
    q = cfg.quant
    hold = data["holdout"]
    calib_lr, hold_lr, hold_hr = data["lr"][~hold], data["lr"][hold], data["hr"][hold]
    fp16_proto = onnx.load(str(fp16))
    names = [n.name for n in conv_nodes(fp16_proto)]
    amax = activation_amax(fp32, calib_lr, q.method, q.percentile)

    def trt_model(layers: Collection[str]) -> onnx.ModelProto:
        return image_bias_corrected(fp16_proto, lambda model: quantize(model, amax, layers), calib_lr)

    trt = choose_layers(names, trt_model, fp32, hold_lr, hold_hr, cfg.scale, q.max_drop_db, progress,
                        " (TensorRT model)")
    trt_proto = trt_model(trt["int8_layers"])
    broken = check_qdq(trt_proto)
    if broken:
        raise RuntimeError(f"{ONNX['int8']} breaks the TensorRT QDQ rules:\n" + "\n".join(broken))
    with tempfile.TemporaryDirectory() as tmp:
        twin = cpu_twin_quantizer(fp32, calib_lr, q.method, q.percentile, Path(tmp))
        cpu = choose_layers(names, twin, fp32, hold_lr, hold_hr, cfg.scale, q.max_drop_db, progress, " (CPU model)")
        cpu_proto = twin(set(cpu["int8_layers"]))
    # The drop measured above is this CPU's integer kernels; the same model with exact integer arithmetic (VNNI,
    # AMX) must lose the same, which is what makes it portable (its 7-bit weights never saturate on AVX2).
    cpu["drop_db_exact_arithmetic"] = cpu["fp32_psnr_y"] - holdout_psnr(cpu_proto, hold_lr, hold_hr, cfg.scale,
                                                                        exact_arithmetic=True)
    counts = {"method": q.method, "calibration": len(calib_lr), "holdout": len(hold_lr)}
    result = {**counts, "tensorrt": {**counts, **trt, "model": ONNX["int8"], "act_amax": amax,
                                     "qdq_rules": "checked (TensorRT model only)"},
              "cpu": {**counts, **cpu, "model": ONNX["int8-cpu"]}}
    return trt_proto, cpu_proto, result


def format_result(result: dict[str, Any]) -> str:
    """quant.md: the per-layer tables of both INT8 models."""
    return "\n".join([
        format_table(result["tensorrt"], f"{ONNX['int8']} (TensorRT: S8S8 symmetric, FP16 rest, QDQ rules checked)",
                     "FP16"),
        format_table(result["cpu"], f"{ONNX['int8-cpu']} (ONNX Runtime on CPUs: U8S8 with 7-bit weights; "
                                    "not for TensorRT, the QDQ rules do not apply)", "FP32"),
        f"The chosen CPU model with exact integer arithmetic (VNNI, AMX; Q/DQ run as float ops): "
        f"-{result['cpu']['drop_db_exact_arithmetic']:.3f} dB.\n"])
