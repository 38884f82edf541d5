"""ctypes binding of the fused CUDA kernel, and the engine that plugs it into ``RowGradLoss``.

The library is built (or taken from the cache) by ``kernels.build.build_kernel`` at first use. It links the CUDA
runtime statically and is called with raw ``data_ptr()``s on torch's current stream of the tensors' device, so it
needs no CUDA build of torch extensions. Loading it on a machine without a GPU works; calls then fail with a CUDA
error, raised as KernelUnavailable.

Operands: fp16 inputs -> fp16, bf16 -> bf16, fp32 -> fp16 (normalised rows are within [-1, 1], so fp16 keeps 11
significant bits without range problems; accuracy is the fp16 row of the tolerance table). Channels are zero-padded
to the next size of the tile table (16, 32, 64, 128, 256), which changes no dot product.
"""

from __future__ import annotations

import ctypes
import math
from functools import cache

import torch

from kernels.build import KernelUnavailable, Tile, build_kernel, tile_table
from kernels.contrastive import EPS, Engine
from kernels.emulate import kernel_tile, split_layout

OPERAND_DTYPES = {torch.float16: torch.float16, torch.bfloat16: torch.bfloat16, torch.float32: torch.float16}
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}
_library: ctypes.CDLL | KernelUnavailable | None = None


def load_library(path) -> ctypes.CDLL:
    """Open the shared library at ``path`` and declare its C signatures (no CUDA call is made)."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelUnavailable(f"cannot load {path}: {exc}") from exc
    c_int, c_float, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    lib.facd_forward.restype = c_int
    # dtype, channels, device | q, k, pos, weight | n, m, rows_per_image, tau, splits, cols_per_split |
    # o_rest, part_max, part_sum, grad, lse, loss, stream
    lib.facd_forward.argtypes = [c_int] * 3 + [ptr] * 4 + [c_int] * 3 + [c_float] + [c_int] * 2 + [ptr] * 7
    lib.facd_blocks_per_sm.restype = c_int
    lib.facd_blocks_per_sm.argtypes = [c_int, c_int, c_int, ctypes.POINTER(c_int)]
    lib.facd_error_string.restype = ctypes.c_char_p
    lib.facd_error_string.argtypes = [c_int]
    return lib


def library() -> ctypes.CDLL:
    """The kernel library for the default architectures, built on first use; a failure is remembered and re-raised."""
    global _library
    if _library is None:
        try:
            _library = load_library(build_kernel())
        except KernelUnavailable as exc:
            _library = exc
    if isinstance(_library, KernelUnavailable):
        raise _library
    return _library


def check(lib: ctypes.CDLL, code: int, what: str) -> None:
    """Raise KernelUnavailable with the library's message for a non-zero return code."""
    if code != 0:
        raise KernelUnavailable(f"{what} failed: {lib.facd_error_string(code).decode()} (code {code})")


def blocks_per_sm(lib: ctypes.CDLL, dtype: torch.dtype, channels: int, device: int) -> int:
    """Resident blocks per SM of the partial kernel for this operand dtype and (padded) channel count."""
    blocks = ctypes.c_int(0)
    check(lib, lib.facd_blocks_per_sm(_DTYPE_CODES[dtype], channels, device, ctypes.byref(blocks)), "occupancy query")
    return blocks.value


def choose_splits(n: int, m: int, tile: Tile, sm_count: int, resident_blocks: int, max_splits: int = 8) -> int:
    """Number of column splits: the fewest that fill the last wave of blocks to >= 85% (best fill otherwise).

    Splits keep at least 4 column tiles each. More splits cost (splits - 1) x N x C x 4 bytes of workspace.
    """
    row_blocks = math.ceil(n / tile.block_rows)
    wave = sm_count * max(1, resident_blocks)
    best, best_fill = 1, 0.0
    for splits in range(1, max(1, min(max_splits, math.ceil(m / tile.block_cols) // 4)) + 1):
        blocks = row_blocks * splits
        fill = blocks / (math.ceil(blocks / wave) * wave)
        if fill >= 0.85:
            return splits
        if fill > best_fill:
            best, best_fill = splits, fill
    return best


@cache
def _device_splits_info(device: int, dtype: torch.dtype, channels: int) -> tuple[int, int]:
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    return sm_count, blocks_per_sm(library(), dtype, channels, device)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    *,
    tau: float,
    rows_per_image: int | None = None,
    weight: torch.Tensor | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the kernel on normalised rows; returns float32 (loss_rows, lse, grad) as ``kernels.emulate.emulate_kernel``.

    q (N, C) and k (M, C): contiguous fp16 or bf16 CUDA tensors of one dtype with C a size of the tile table; pos (N,)
    long; weight (N,) float32 or None. Launches on the current stream of q's device. ``splits`` (column splits) is
    chosen from the device occupancy when None.
    """
    for name, x in (("q", q), ("k", k), ("pos", pos)) + ((("weight", weight),) if weight is not None else ()):
        if x.device.type != "cuda":
            raise ValueError(f"the CUDA kernel needs CUDA tensors; {name} is on {x.device}")
        if x.device != q.device:
            raise ValueError(f"all tensors must be on one device; {name} is on {x.device}, q on {q.device}")
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if q.dtype not in _DTYPE_CODES or k.dtype != q.dtype:
        raise ValueError(f"q and k must both be fp16 or both bf16, got {q.dtype} and {k.dtype}")
    n, c = q.shape
    m = k.shape[0]
    tile = kernel_tile(c)
    if tile.channels != c or k.shape[1] != c:
        raise ValueError(f"q and k must have the same padded channel count in {sorted(tile_table())}, got {c}")
    if max(n, m) >= 2**31:
        raise KernelUnavailable(f"the kernel indexes rows with int32; got N={n}, M={m}")
    if pos.dtype != torch.long or pos.shape != (n,):
        raise ValueError(f"pos must be a long tensor of shape ({n},)")
    if weight is not None and (weight.dtype != torch.float32 or weight.shape != (n,)):
        raise ValueError(f"weight must be a float32 tensor of shape ({n},)")
    device = q.device.index if q.device.index is not None else torch.cuda.current_device()
    lib = library()
    if splits is None:
        splits = choose_splits(n, m, tile, *_device_splits_info(device, q.dtype, c))
    cols_per_split, splits = split_layout(m, tile.block_cols, splits)

    f32 = dict(dtype=torch.float32, device=q.device)
    grad = torch.empty((n, c), **f32)
    o_rest = torch.empty((splits - 1, n, c), **f32)
    part = torch.empty((2, splits, n), **f32)  # running max, running sum per split
    lse, loss_rows = torch.empty(n, **f32), torch.empty(n, **f32)
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        code = lib.facd_forward(
            _DTYPE_CODES[q.dtype], c, device,
            q.data_ptr(), k.data_ptr(), pos.data_ptr(), None if weight is None else weight.data_ptr(),
            n, m, min(rows_per_image or 0, max(n, m)), float(tau), splits, cols_per_split,  # R >= max(n, m): one image
            o_rest.data_ptr(), part[0].data_ptr(), part[1].data_ptr(), grad.data_ptr(), lse.data_ptr(),
            loss_rows.data_ptr(), stream,
        )  # fmt: skip
    check(lib, code, "facd_forward")
    return loss_rows, lse, grad


def unavailable_reason(s: torch.Tensor) -> str | None:
    """Why the kernel cannot take these student rows (None if it can); builds/loads the library on first call."""
    if s.device.type != "cuda":
        return f"the CUDA kernel needs CUDA tensors; s is on {s.device}"
    if s.dtype not in OPERAND_DTYPES:
        return f"the CUDA kernel takes fp32, fp16 or bf16, got {s.dtype}"
    if s.shape[1] > max(tile_table()):
        return f"the CUDA kernel supports at most {max(tile_table())} channels, got {s.shape[1]}"
    major, minor = torch.cuda.get_device_capability(s.device)
    if major < 8:
        return f"the CUDA kernel needs compute capability >= 8.0, {s.device} has {major}.{minor}"
    try:
        library()
    except KernelUnavailable as exc:
        return str(exc)
    return None


def kernel_engine(
    s: torch.Tensor,
    t: torch.Tensor,
    pos: torch.Tensor,
    *,
    tau: float,
    rows_per_image: int | None,
    weight: torch.Tensor | None,
) -> Engine:
    """The ``RowGradLoss`` engine running the kernel (inputs already validated; KernelUnavailable if unusable)."""
    reason = unavailable_reason(s)
    if reason is not None:
        raise KernelUnavailable(reason)
    dtype = OPERAND_DTYPES[s.dtype]
    channels = kernel_tile(s.shape[1]).channels
    k = _operand(t, 1.0 / torch.linalg.vector_norm(t, dim=1, dtype=torch.float32).clamp_min(EPS), dtype, channels)
    w = None if weight is None else weight.float().contiguous()
    pos = pos.contiguous()

    def engine(s_: torch.Tensor, inv_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = _operand(s_, inv_norm, dtype, channels)
        loss_rows, _, grad = forward(q, k, pos, tau=tau, rows_per_image=rows_per_image, weight=w)
        return loss_rows, grad

    return engine


def _operand(x: torch.Tensor, inv_norm: torch.Tensor, dtype: torch.dtype, channels: int) -> torch.Tensor:
    """Rows x_i * inv_norm_i in the operand dtype, zero-padded to ``channels`` columns (a new contiguous tensor)."""
    rows = x * inv_norm[:, None]
    if channels == x.shape[1]:
        return rows.to(dtype)
    out = x.new_zeros((x.shape[0], channels), dtype=dtype)
    out[:, : x.shape[1]] = rows
    return out
