"""OpenVINO runner on the CPU, for the same ONNX files ONNX Runtime runs: FP32 from `student.fp32.onnx`, INT8 from
the CPU model `student.int8-cpu.onnx` (our QDQ model calibrated on `calib.npz`; OpenVINO turns its Q/DQ pairs into
integer convolutions). OpenVINO reads the ONNX itself, so there is no converted model file that could drift from it.
The TensorRT-style `student.int8.onnx` (FP16 rest, signed activations) is not for OpenVINO: its output is wrong there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends.base import Runner
from pipeline.backends.ort_runner import FORMAT
from pipeline.errors import UserError

META_KEYS = ("format", "scale", "precision", "source_checkpoint_sha256")
PRECISIONS = ("fp32", "int8-cpu")  # the models OpenVINO runs right (the FP16 and TensorRT INT8 ones are not for it)


def openvino_status() -> tuple[bool, str]:
    """Whether OpenVINO can run here, and if not, why."""
    try:
        import openvino
    except ImportError:
        return False, "openvino is not installed (pip install openvino; the cpu extra has it)"
    return True, f"OpenVINO {openvino.__version__.split('-')[0]}"  # "2026.4.1-22982-e213a147257-releases/..."


def read_ov_model(path: Path) -> tuple[Any, dict[str, str]]:
    """The OpenVINO model of one of our ONNX files and our metadata from it; a UserError for a file that is missing,
    not ONNX, or not written by `pipeline export`."""
    import openvino as ov

    path = Path(path)
    if path.suffix != ".onnx":
        raise UserError(f"{path}: the OpenVINO backend runs our ONNX models (.onnx), not {path.suffix or 'this'} files")
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        model = ov.Core().read_model(str(path))
    except RuntimeError as e:
        raise UserError(f"{path} is not an ONNX model OpenVINO can read ({str(e).splitlines()[0][:200]})") from None
    info = model.get_rt_info()
    meta = {k: model.get_rt_info(["framework", k]).astype(str) for k in META_KEYS
            if "framework" in info and model.has_rt_info(["framework", k])}
    if meta.get("format") != FORMAT or len(meta) < len(META_KEYS):
        raise UserError(f"{path} was not written by `pipeline export` (our metadata is missing or different); "
                        "export the student with `pipeline export`")
    return model, meta


class OpenVinoRunner(Runner):
    """One compiled model on OpenVINO's CPU plugin, created in `activate` and dropped in `deactivate`. FP32 rows run
    in FP32 (no BF16 on AMX CPUs), with the latency hint."""

    backend = "openvino"

    def __init__(self, model: Path, threads: int = 0, **tiling: Any):
        ok, reason = openvino_status()
        if not ok:
            raise UserError(reason)
        self.ov_model, self.meta = read_ov_model(model)  # the graph only; compiled (and its buffers made) in activate
        super().__init__(int(self.meta["scale"]), **tiling)
        self.model, self.threads = Path(model), threads
        self.precision = self.meta["precision"]
        if self.precision not in PRECISIONS:
            raise UserError(f"{model} is the {self.precision} model; OpenVINO runs {' and '.join(PRECISIONS)} "
                            "(student.fp32.onnx, student.int8-cpu.onnx)")
        self.name = f"{self.backend}-{self.precision}"
        self.compiled: Any = None

    def activate(self) -> None:
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        self.compiled = ov.Core().compile_model(self.ov_model, "CPU", config)

    def deactivate(self) -> None:
        self.compiled = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.compiled(np.ascontiguousarray(x, np.float32))[0]
