"""Typed experiment configuration: defaults <- named preset <- TOML file <- `--set key=value` overrides.

Every key is a dataclass field; an unknown key or a value of the wrong type is a UserError naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import UserError

# `pipeline upscale`'s tiling, which the latency budget times too. The tile side bounds memory (an EDSR-baseline
# pass at 640x360 holds GBs); the overlap is LR pixels shared by neighbouring tiles.
DEFAULT_TILE, DEFAULT_OVERLAP = 384, 32


@dataclass
class ModelSection:
    teacher: str = "edsr_baseline"  # a preset of `pipeline models`; where one is shipped for the scale, it is used
    student: str = "anchor_m"  # benchmarks/results/students_cpu.md: the best trade on a CPU
    # The student's shape, overriding the preset's (0 = the preset's); `pipeline all --budget-ms` sets them.
    student_blocks: int = 0
    student_channels: int = 0

    def student_shape(self) -> dict[str, int]:
        """The `create_model` overrides of the student preset: blocks and channels, where set."""
        return {k: v for k, v in (("blocks", self.student_blocks), ("channels", self.student_channels)) if v}


@dataclass
class DataSection:
    train: str = "embedded-train"  # "embedded-train", or a folder (HR-only or HR/ + LR_bicubic/X{s}/)
    eval: str = "embedded"  # "embedded" (the 24 shipped eval crops), "embedded-eval7" (the earlier 7), or a folder
    val_count: int = 3  # training images held out of every training stage, the first part of the validation split
    val: str = "embedded-val"  # more validation images, never trained on: a dataset name or folder ("" = none)


@dataclass
class TrainSection:
    iters: int = 600
    batch: int = 16
    lr_patch: int = 24  # LR patch side; the HR patch is lr_patch * scale
    lr: float = 1e-3
    schedule: Literal["cosine", "step"] = "cosine"
    step_milestones: list[int] = field(default_factory=lambda: [200_000])  # "step": iterations where lr is multiplied
    step_gamma: float = 0.5
    warmup: int = 0  # iterations of linear warm-up
    eval_every: int = 200  # 0 = only at the end
    ckpt_every: int = 100
    log_every: int = 10
    threads: int = 0  # torch CPU threads; 0 = torch's default
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available
    amp: Literal["off", "bf16", "fp16"] = "off"  # mixed precision, CUDA only
    channels_last: bool = False  # CUDA only


METHODS = ("none", "out", "fd", "facd", "facd-nogate")  # distillation methods, see pipeline/training/distill.py


@dataclass
class DistillSection:
    # `out` on the CPU recipe: at its 600 iterations it was the best method with a teacher on the validation split
    # (docs/benchmarks.md, matched compute; facd 0.35 dB below it there). The paper presets use facd.
    method: Literal[METHODS] = "out"
    taps: int = 3  # J evenly spaced body blocks of student and teacher, matched by relative depth
    # The weights are what the study chose on the validation split (README, "The distillation study").
    lambda_out: float = 3.0  # output distillation L1(SR_S, SR_T)
    lambda_fd: float = 3.0  # feature distillation L1(adapted student features, teacher features), image scale
    lambda_facd: float = 0.3  # the contrastive term
    # The gate (facd): distil a patch only where PSNR(SR_T) > PSNR(SR_S) + gate_margin (dB), and only the
    # gate_fraction of the batch's patches where the teacher's advantage is largest (1.0: every patch that passes).
    gate_margin: float = 0.0
    gate_fraction: float = 1.0


@dataclass
class FacdSection:
    tau: float = 0.15
    max_anchors: int = 4096  # sampled positions per tap and batch (0 = every position)
    negatives: Literal["other-images", "all-positions"] = "other-images"
    impl: Literal["auto", "naive", "chunked", "cuda"] = "auto"


@dataclass
class ExportSection:
    simplify: bool = True  # onnxsim (onnxslim as fallback)
    parity_sizes: list[str] = field(default_factory=lambda: ["33x17", "64x48"])  # LR crops (WxH) of each eval image
    max_abs_err: float = 1e-3  # ONNX Runtime FP32 vs PyTorch, on [0, 1] outputs


CALIB_METHODS = ("minmax", "percentile", "entropy")


@dataclass
class QuantSection:
    calib_count: int = 48  # distinct LR crops from the training data (calibration + holdout)
    calib_crop: int = 48  # LR crop side
    calib_holdout: int = 12  # of those, held out to measure the INT8 model
    calib_seed: int = 0
    method: Literal[CALIB_METHODS] = "percentile"
    percentile: float = 99.99
    max_drop_db: float = 0.1  # sensitivity step: keep Convs in FP16 until INT8 is this close to FP32 on the holdout


@dataclass
class VerifySection:
    gate_fp32_db: float = 0.01  # max |Y-PSNR difference| to the PyTorch FP32 reference, per precision
    gate_fp16_db: float = 0.05
    gate_int8_db: float = 0.2
    latency_sizes: list[str] = field(default_factory=lambda: ["320x180", "640x360"])  # LR WxH, batch 1
    warmup: int = 2
    repeats: int = 10


@dataclass
class EngineSection:
    profile: Literal["720p", "1080p", "tile", "custom"] = "720p"  # LR sizes of a 720p/1080p output, a tile, or custom
    min_lr: str = "64x64"  # WxH, the smallest LR input (720p, 1080p, custom); smaller ones are padded
    opt_lr: str = ""  # WxH, the size TensorRT tunes for ("custom" only)
    max_lr: str = ""  # WxH, the largest LR input ("custom" only); larger images are tiled
    tile: int = 256  # LR tile side of the "tile" profile: min = opt = max
    max_batch: int = 1  # images or tiles per call; the profile's batch range is 1..max_batch, tuned for max_batch
    workspace_mb: int = 2048
    opt_level: int = 3  # builder optimization level, 0..5
    timing_cache: str = "~/.cache/facd-pipeline/trt-timing.cache"  # "" = none
    version_compatible: bool = False  # later TensorRT versions run the plan too (possibly slower)


BACKENDS = ("onnxruntime", "tensorrt", "openvino")  # runtimes a latency budget is measured on (as `upscale`)


@dataclass
class BudgetSection:
    """A student sized to a latency budget (`pipeline budget`, `pipeline all --budget-ms`); see
    pipeline/deploy/budget.py."""

    budget_ms: float = 0.0  # p95 latency of one frame; 0 = no budget (the student is model.student as it is)
    frame: str = "1280x720"  # HR output WxH of one frame; the LR input is frame / scale
    backend: Literal[BACKENDS] = "onnxruntime"
    precision: Literal["fp32", "fp16", "int8"] = "int8"
    latency_table: str = ""  # a latency.json (from a probe folder's `make probe`) instead of timing here
    margin: float = 0.1  # a candidate fits when its p95 is at most (1 - margin) x budget_ms
    # The student presets whose shapes are candidates, in order of preference (empty: model.student alone): the
    # choice is the largest fitting shape of the first preset that has one (docs/budget.md says why).
    students: list[str] = field(default_factory=list)
    blocks: list[int] = field(default_factory=lambda: [1, 3, 6, 12])  # blocks (EDSR) or conv layers (anchor)
    channels: list[int] = field(default_factory=lambda: [8, 16, 32])  # x these widths: every combination
    # Convs the candidates' INT8 models keep in float, by name, or `first` / `last`: by default the first and last
    # Conv, which the sensitivity step of `pipeline quantize` kept in float in every trained EDSR student measured.
    float_convs: list[str] = field(default_factory=lambda: ["first", "last"])
    warmup: int = 1
    repeats: int = 10


@dataclass
class Config:
    name: str = "tiny"
    scale: int = 4
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    distill: DistillSection = field(default_factory=DistillSection)
    facd: FacdSection = field(default_factory=FacdSection)
    export: ExportSection = field(default_factory=ExportSection)
    quant: QuantSection = field(default_factory=QuantSection)
    verify: VerifySection = field(default_factory=VerifySection)
    engine: EngineSection = field(default_factory=EngineSection)
    budget: BudgetSection = field(default_factory=BudgetSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Presets are data: overrides on top of the defaults (which are the `tiny` CPU preset).
_PAPER_TRAIN = {
    "iters": 300_000,
    "batch": 16,
    "lr_patch": 48,
    "lr": 1e-4,
    "schedule": "step",
    "step_milestones": [200_000],
    "step_gamma": 0.5,
    "eval_every": 5_000,
    "ckpt_every": 5_000,
    "log_every": 100,
}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "edsr_paper": {
        "name": "edsr_paper",
        "model": {"teacher": "edsr", "student": "edsr_student"},
        "distill": {"method": "facd"},
        "data": {"train": "data/DIV2K"},
        "train": _PAPER_TRAIN,
    },
    "rcan_paper": {
        "name": "rcan_paper",
        "model": {"teacher": "rcan", "student": "rcan_student"},
        "distill": {"method": "facd"},
        "data": {"train": "data/DIV2K"},
        "train": _PAPER_TRAIN,
    },
}
PRESET_HELP = {
    "tiny": "default; tiny EDSR teacher/student on the embedded photos, minutes on a CPU",
    "edsr_paper": "EDSR (32x256) teacher, EDSR student, DIV2K 48px LR patches, 300k iterations (GPU)",
    "rcan_paper": "RCAN (10x20x64) teacher, RCAN student (10x6x64), DIV2K 48px LR patches, 300k iterations (GPU)",
}


def is_json_number(value: Any) -> bool:
    """A number from a JSON document (not a bool) >= 0 that is finite as a float (huge integers are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= sys.float_info.max


def is_json_int(value: Any, low: int, high: int = sys.maxsize) -> bool:
    """An integer from a JSON document (not a bool) from `low` to `high`."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise UserError(f"config key {key!r}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"config key {key!r}: expected a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"config key {key!r}: {value!r} is not a finite number")
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise UserError(f"config key {key!r}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for name, value in updates.items():
        key = prefix + name
        if name not in hints:
            known = ", ".join(prefix + n for n in hints)
            raise UserError(f"unknown config key {key!r} (known: {known})")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"config key {key!r} is a section; set its keys, e.g. {key}.<name>=...")
            _merge(getattr(obj, name), value, key + ".")
        else:
            setattr(obj, name, _check_type(key, value, tp))


def _parse_override(text: str) -> dict[str, Any]:
    """`a.b=value` -> {"a": {"b": value}}; the value is read as TOML, else taken as a plain string."""
    import tomllib  # here, not at the top: the edge runtime imports this module on Python 3.10 (JetPack 6)

    if "=" not in text:
        raise UserError(f"--set expects KEY=VALUE, got {text!r}")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    update: dict[str, Any] = {}
    node = update
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return update


def _validate(cfg: Config) -> None:
    from models import PRESETS as MODEL_PRESETS  # here: the torch-free edge runtime imports this module

    if cfg.scale not in (2, 3, 4):
        raise UserError(f"config key 'scale': {cfg.scale} is not one of 2, 3, 4")
    named = {f"model.{key}": getattr(cfg.model, key) for key in ("teacher", "student")}
    named.update((f"budget.students[{i}]", name) for i, name in enumerate(cfg.budget.students))
    for key, name in named.items():
        if name not in MODEL_PRESETS:
            raise UserError(f"config key {key!r}: {name!r} is not a model preset (known: "
                            f"{', '.join(MODEL_PRESETS)}; see `pipeline models`)")
    t = cfg.train
    positive = {"train.iters": t.iters, "train.batch": t.batch, "train.lr_patch": t.lr_patch, "train.lr": t.lr,
                "train.ckpt_every": t.ckpt_every, "train.log_every": t.log_every}
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"config key {key!r} must be > 0, got {value}")
    d, f = cfg.distill, cfg.facd
    non_negative = {"train.eval_every": t.eval_every, "train.warmup": t.warmup, "train.threads": t.threads,
                    "distill.lambda_out": d.lambda_out, "distill.lambda_fd": d.lambda_fd,
                    "distill.lambda_facd": d.lambda_facd, "facd.max_anchors": f.max_anchors}
    for key, value in non_negative.items():
        if value < 0:
            raise UserError(f"config key {key!r} must be >= 0, got {value}")
    q, v = cfg.quant, cfg.verify
    non_negative = {"quant.max_drop_db": q.max_drop_db,
                    "verify.gate_fp32_db": v.gate_fp32_db, "verify.gate_fp16_db": v.gate_fp16_db,
                    "verify.gate_int8_db": v.gate_int8_db, "verify.warmup": v.warmup}
    for key, value in non_negative.items():
        if value < 0:
            raise UserError(f"config key {key!r} must be >= 0, got {value}")
    positive = {"distill.taps": d.taps, "facd.tau": f.tau, "export.max_abs_err": cfg.export.max_abs_err,
                "quant.calib_count": q.calib_count, "quant.calib_crop": q.calib_crop, "verify.repeats": v.repeats}
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"config key {key!r} must be > 0, got {value}")
    if not 0 < d.gate_fraction <= 1:
        raise UserError(f"config key 'distill.gate_fraction' must be in (0, 1], got {d.gate_fraction}")
    if cfg.data.val_count < 0:
        raise UserError(f"config key 'data.val_count' must be >= 0, got {cfg.data.val_count}")
    if not 0 < q.calib_holdout < q.calib_count:
        raise UserError(f"config key 'quant.calib_holdout' must be between 1 and quant.calib_count - 1 "
                        f"({q.calib_count - 1}), got {q.calib_holdout}")
    if not 50 < q.percentile <= 100:
        raise UserError(f"config key 'quant.percentile' must be in (50, 100], got {q.percentile}")
    validate_engine_section(cfg.engine)
    _validate_budget(cfg)
    for key, sizes in {"export.parity_sizes": cfg.export.parity_sizes, "verify.latency_sizes": v.latency_sizes}.items():
        for text in sizes:
            parse_size(text, key)


def _validate_budget(cfg: Config) -> None:
    b, m = cfg.budget, cfg.model
    for key, value in {"model.student_blocks": m.student_blocks, "model.student_channels": m.student_channels,
                       "budget.budget_ms": b.budget_ms, "budget.warmup": b.warmup}.items():
        if value < 0:
            raise UserError(f"config key {key!r} must be >= 0, got {value}")
    if b.repeats <= 0:
        raise UserError(f"config key 'budget.repeats' must be > 0, got {b.repeats}")
    if not 0 <= b.margin < 1:
        raise UserError(f"config key 'budget.margin' must be in [0, 1), got {b.margin}")
    for key, values in {"budget.blocks": b.blocks, "budget.channels": b.channels}.items():
        if not values or min(values) < 1:
            raise UserError(f"config key {key!r} must list integers >= 1, got {values}")
    frame_lr_size(b.frame, cfg.scale)


def frame_lr_size(frame: str, scale: int) -> tuple[int, int]:
    """The LR input (h, w) of an HR output frame 'WxH' at `scale`; a UserError unless both sides divide by it."""
    h, w = parse_size(frame, "frame size (budget.frame, --frame)")
    if h % scale or w % scale:
        raise UserError(f"frame size {frame!r}: width and height must be multiples of the scale {scale} "
                        f"(the LR input is frame / {scale})")
    return h // scale, w // scale


def validate_engine_section(sec: EngineSection) -> None:
    """A UserError naming the first bad key of the `engine` section."""
    parse_size(sec.min_lr, "engine.min_lr")
    for key in ("opt_lr", "max_lr"):
        value = getattr(sec, key)
        if sec.profile == "custom" and not value:
            raise UserError(f"config key 'engine.{key}' must be set when engine.profile is 'custom'")
        if sec.profile != "custom" and value:
            raise UserError(f"config key 'engine.{key}' is used only by engine.profile = 'custom' "
                            f"(it is {sec.profile!r}); remove it or set the profile to 'custom'")
        if value:
            parse_size(value, f"engine.{key}")
    for key in ("tile", "max_batch", "workspace_mb"):
        if getattr(sec, key) <= 0:
            raise UserError(f"config key 'engine.{key}' must be > 0, got {getattr(sec, key)}")
    if not 0 <= sec.opt_level <= 5:
        raise UserError(f"config key 'engine.opt_level' must be 0..5, got {sec.opt_level}")


MAX_SIDE = 8192  # pixels a side of any size given as WxH (an 8K frame's width): more would only exhaust memory


def parse_size(text: str, what: str = "size") -> tuple[int, int]:
    """'WxH' -> (h, w), both from 1 to MAX_SIDE."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"{what}: expected WxH, e.g. 320x180, got {text!r}") from None
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
        raise UserError(f"{what}: each side must be from 1 to {MAX_SIDE}, got {text!r}")
    return h, w


def load_config(preset: str = "tiny", file: str | Path | None = None, overrides: list[str] = ()) -> Config:
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    import tomllib

    cfg = Config()
    _merge(cfg, PRESETS[preset])
    if file is not None:
        path = Path(file)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"config file {path} does not exist") from None
        except IsADirectoryError:
            raise UserError(f"--config {path} is a folder; name a TOML file") from None
        except OSError as e:
            raise UserError(f"config file {path} cannot be read: {e.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"config file {path} is not valid TOML: {e}") from None
        _merge(cfg, data)
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A validated copy of `cfg` with `--set KEY=VALUE` overrides applied."""
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        _merge(cfg, _parse_override(text))
    _validate(cfg)
    return cfg


def to_toml(cfg: Config) -> str:
    """The effective config as TOML (loads back to the same config)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, str):  # JSON's escapes are TOML's, but for DEL, which TOML wants escaped too
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    top, sections = [], []
    for name, v in cfg.to_dict().items():
        if isinstance(v, dict):
            sections.append(f"\n[{name}]\n" + "".join(f"{k} = {value(x)}\n" for k, x in v.items()))
        else:
            top.append(f"{name} = {value(v)}\n")
    return "".join(top) + "".join(sections)

