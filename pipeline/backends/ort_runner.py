"""ONNX Runtime runner for our FP32, FP16 and INT8 (QDQ) models, on the CPU, CUDA or TensorRT provider."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends.base import Runner
from pipeline.errors import UserError
from pipeline.rundir import ONNX

FORMAT = "facd-pipeline-onnx/1"  # metadata_props["format"] of every model `pipeline export` writes
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def provider_status(device: str) -> tuple[bool, str]:
    """Whether ONNX Runtime here has the provider for `device` ('cpu', 'cuda', 'tensorrt'), and if not, why."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False, "onnxruntime is not installed (pip install 'facd-pipeline[cpu]', or [gpu] for CUDA)"
    available = ort.get_available_providers()
    if PROVIDERS[device] in available:
        return True, ""
    hint = " (install the gpu extra: onnxruntime-gpu)" if device != "cpu" else ""
    return False, f"onnxruntime {ort.__version__} here has no {PROVIDERS[device]}{hint}"


def fastest_device() -> str:
    """The provider `pipeline upscale` runs ONNX models on: TensorRT, else CUDA, else the CPU."""
    return next(d for d in ("tensorrt", "cuda", "cpu") if d == "cpu" or provider_status(d)[0])


def onnx_for(precision: str, device: str) -> str:
    """The ONNX file of a run for `precision` on `device`: INT8 on the CPU provider is the U8S8 CPU model, on the GPU
    providers the TensorRT-style one."""
    return ONNX["int8-cpu" if (precision, device) == ("int8", "cpu") else precision]


def read_meta(path: Path) -> dict[str, str]:
    """Our metadata of an ONNX file; a file that is not ours is a UserError. Reads it with ONNX Runtime, so the
    torch-free edge runtime needs no `onnx` package."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own Fail / InvalidProtobuf / ... types
        raise UserError(f"{path} is not an ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    meta = dict(session.get_modelmeta().custom_metadata_map)
    missing = [k for k in ("format", "scale", "precision", "source_checkpoint_sha256") if k not in meta]
    if meta.get("format") != FORMAT or missing:
        raise UserError(f"{path} was not written by `pipeline export` (metadata {', '.join(missing) or 'format'} "
                        "missing or different); export the student with `pipeline export`")
    return meta


class OrtRunner(Runner):
    """One InferenceSession, created in `activate` and dropped in `deactivate` (a session can hold GBs)."""

    def __init__(self, model: Path, device: str = "cpu", threads: int = 0, **tiling: Any):
        self.meta = read_meta(model)
        super().__init__(int(self.meta["scale"]), **tiling)
        ok, reason = provider_status(device)
        if not ok:
            raise UserError(reason)
        self.model, self.device, self.threads = Path(model), device, threads
        self.backend, self.precision = f"onnxruntime-{device}", self.meta["precision"]
        self.name = f"{self.backend}-{self.precision}"
        self.session: Any = None

    def activate(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # FP16 graphs log a warning per node the CPU provider cannot constant-fold
        opts.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(str(self.model), opts, providers=[PROVIDERS[self.device]])

    def deactivate(self) -> None:
        self.session = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"lr": np.ascontiguousarray(x, np.float32)})[0]
