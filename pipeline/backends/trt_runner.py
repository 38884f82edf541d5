"""The TensorRT runner: a plan from `pipeline build` behind the Runner interface (backend "tensorrt").

`activate` refuses a plan built for another GPU or TensorRT version (from its sidecar, before deserializing), then
allocates the input and output buffers once, for the profile maximum: torch CUDA tensors when torch is already
imported with CUDA available, else cuda-python allocations (the torch-free path of an edge device). Images larger
than the profile maximum are tiled by the base class (`max_lr_hw`); inputs smaller than its minimum are padded
(edge replication) and the output cropped back. `gpu_times_ms` times the engine alone (CUDA events).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.backends.base import Runner
from pipeline.backends.trt_engine import (cuda_call, device_info, import_cudart, plan_incompatibility, read_sidecar,
                                          trt_status)
from pipeline.errors import UserError

if TYPE_CHECKING:  # the type stubs only; TensorRT itself is imported in activate()
    import tensorrt as trt


class _CudaPythonMemory:
    """Device buffers and a stream from cuda-python."""

    def __init__(self) -> None:
        self.rt = import_cudart()
        self.stream = int(cuda_call(self.rt.cudaStreamCreate()))
        self.pointers: list[int] = []

    def alloc(self, nbytes: int) -> int:
        self.pointers.append(int(cuda_call(self.rt.cudaMalloc(nbytes))))
        return self.pointers[-1]

    def upload(self, pointer: int, array: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_call(self.rt.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, kind, self.stream))

    def download(self, pointer: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(self.rt.cudaMemcpyAsync(out.ctypes.data, pointer, out.nbytes, kind, self.stream))
        cuda_call(self.rt.cudaStreamSynchronize(self.stream))
        return out

    def close(self) -> None:
        for pointer in self.pointers:
            cuda_call(self.rt.cudaFree(pointer))
        cuda_call(self.rt.cudaStreamDestroy(self.stream))


class _TorchMemory:
    """Device buffers as torch CUDA tensors (bytes), on torch's current stream."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.stream = torch.cuda.current_stream().cuda_stream
        self.tensors: dict[int, Any] = {}

    def alloc(self, nbytes: int) -> int:
        tensor = self.torch.empty(nbytes, dtype=self.torch.uint8, device="cuda")
        self.tensors[tensor.data_ptr()] = tensor
        return tensor.data_ptr()

    def upload(self, pointer: int, array: np.ndarray) -> None:
        self.tensors[pointer][: array.nbytes].copy_(self.torch.from_numpy(array.reshape(-1).view(np.uint8)))

    def download(self, pointer: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        return self.tensors[pointer][:nbytes].cpu().numpy().view(dtype).reshape(shape)

    def close(self) -> None:
        self.tensors.clear()


def _torch_cuda_ready() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available()


class TrtRunner(Runner):
    backend = "tensorrt"

    def __init__(self, plan: Path, *, batch: int | None = None, tile: int = 0, overlap: int = 32,
                 buffers: Literal["auto", "torch", "cuda-python"] = "auto"):
        """`batch`: images or tiles per call (default and maximum: the plan's max_batch); `buffers`: "auto" uses
        torch tensors when torch is imported with CUDA available, else cuda-python."""
        self.plan = Path(plan)
        self.sidecar = read_sidecar(self.plan)
        max_batch = int(self.sidecar["max_batch"])
        if batch is not None and batch > max_batch:
            raise UserError(f"batch {batch} exceeds the max batch {max_batch} of {self.plan.name} "
                            "(rebuild with a larger engine.max_batch)")
        max_hw = self.sidecar["profile"]["max"]
        super().__init__(int(self.sidecar["scale"]), batch=batch or max_batch, tile=tile, overlap=overlap,
                         max_lr_hw=(int(max_hw[0]), int(max_hw[1])))
        self.precision = self.sidecar["precision"]
        self.name = f"tensorrt-{self.precision}"
        self.buffers = buffers
        self._engine: trt.ICudaEngine | None = None

    def activate(self) -> None:
        ok, why = trt_status()
        if not ok:
            raise UserError(f"cannot run {self.plan.name}: {why}")
        problem = plan_incompatibility(self.sidecar, device_info())
        if problem:
            raise UserError(f"{self.plan} {problem}; rebuild it from the ONNX on this device (`pipeline build`)")
        data = self.plan.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.sidecar.get("plan_sha256"):
            raise UserError(f"{self.plan} is not the plan its sidecar describes (sha256 differs); rebuild it "
                            "(`pipeline build`)")
        import tensorrt as trt

        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._runtime.engine_host_code_allowed = bool(self.sidecar.get("version_compatible"))
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise UserError(f"TensorRT cannot load {self.plan} (messages above); rebuild it (`pipeline build`)")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"{self.plan} must have one input and one output, has {inputs} and {outputs}")
        (self._in,), (self._out,) = inputs, outputs
        self._min, _, self._max = (tuple(s) for s in self._engine.get_tensor_profile_shape(self._in, 0))
        self._in_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._in)))
        self._out_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._out)))
        self._set_input_shape(self._max)
        out_max = tuple(self._context.get_tensor_shape(self._out))
        use_torch = self.buffers == "torch" or (self.buffers == "auto" and _torch_cuda_ready())
        self._memory = _TorchMemory() if use_torch else _CudaPythonMemory()
        self._in_ptr = self._memory.alloc(int(np.prod(self._max)) * self._in_dtype.itemsize)
        self._out_ptr = self._memory.alloc(int(np.prod(out_max)) * self._out_dtype.itemsize)
        for name, pointer in ((self._in, self._in_ptr), (self._out, self._out_ptr)):
            if not self._context.set_tensor_address(name, pointer):
                raise RuntimeError(f"TensorRT refused the device address {pointer:#x} for tensor {name!r} of "
                                   f"{self.plan.name}")

    def deactivate(self) -> None:
        if self._engine is None:
            return
        self._memory.close()
        del self._context, self._memory, self._runtime
        self._engine = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        _, _, h, w = x.shape
        self._run(self._load(x))
        out = self._memory.download(self._out_ptr, tuple(self._context.get_tensor_shape(self._out)), self._out_dtype)
        return out[:, :, : h * self.scale, : w * self.scale].astype(np.float32, copy=False)

    def _load(self, x: np.ndarray) -> tuple[int, ...]:
        """Put `x` into the input buffer as the engine's contiguous input, padded (edge replication) up to the profile
        minimum, and set the input shape; that shape. A ValueError when `x` is outside the profile."""
        h, w = x.shape[2:]
        pad_h, pad_w = max(0, self._min[2] - h), max(0, self._min[3] - w)
        if pad_h or pad_w:
            x = np.pad(x, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)), mode="edge")
        if not all(lo <= v <= hi for lo, v, hi in zip(self._min, x.shape, self._max)):
            raise ValueError(f"input shape {x.shape} is outside the engine profile {self._min}..{self._max}")
        x = np.ascontiguousarray(x, self._in_dtype)
        self._set_input_shape(x.shape)
        self._memory.upload(self._in_ptr, x)
        return x.shape

    def _set_input_shape(self, shape: tuple[int, ...]) -> None:
        if not self._context.set_input_shape(self._in, shape):
            raise RuntimeError(f"TensorRT refused the shape {tuple(shape)} for input {self._in!r} of {self.plan.name} "
                               f"(profile {self._min}..{self._max})")

    def _run(self, shape: tuple[int, ...]) -> None:
        if not self._context.execute_async_v3(self._memory.stream):
            raise RuntimeError(f"TensorRT could not run {self.plan.name} on an input of shape {shape}")

    def gpu_times_ms(self, x: np.ndarray, iters: int) -> list[float]:
        """Milliseconds of the engine alone per call on `x` (float32 NCHW, padded to the profile minimum as in
        `forward`), between CUDA events on its stream (the copies excluded); `backends.base.latency` adds the
        host-timed calls with copies."""
        shape = self._load(x)
        rt = import_cudart()
        events = [cuda_call(rt.cudaEventCreate()) for _ in range(2)]
        times = []
        try:
            for _ in range(iters):
                cuda_call(rt.cudaEventRecord(events[0], self._memory.stream))
                self._run(shape)
                cuda_call(rt.cudaEventRecord(events[1], self._memory.stream))
                cuda_call(rt.cudaEventSynchronize(events[1]))
                times.append(float(cuda_call(rt.cudaEventElapsedTime(*events))))
        finally:
            for event in events:
                cuda_call(rt.cudaEventDestroy(event))
        return times
