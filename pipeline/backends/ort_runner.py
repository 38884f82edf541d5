"""ONNX Runtime runner for our FP32, FP16 and INT8 (QDQ) models, on the CPU, CUDA or TensorRT provider."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends.base import Runner
from pipeline.errors import UserError

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


class OrtRunner(Runner):
    """One InferenceSession, created in `activate` and dropped in `deactivate` (a session can hold GBs)."""

    def __init__(self, model: Path, device: str = "cpu", threads: int = 0, **tiling: Any):
        from pipeline.export import read_meta

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
