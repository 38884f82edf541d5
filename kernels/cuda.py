"""ctypes binding of the fused CUDA kernel, and the engine that plugs it into ``RowGradLoss``.

The library is built (or taken from the cache) by ``kernels.build.build_kernel`` at first use. It links the CUDA
runtime statically and is called with raw ``data_ptr()``s on torch's current stream of the tensors' device, so it
needs no CUDA build of torch extensions. Loading it on a machine without a GPU works; calls then fail with a CUDA
error, raised as KernelUnavailable.

Operands: fp16 inputs -> fp16, bf16 -> bf16, fp32 -> fp16 (normalised rows are within [-1, 1], so fp16 keeps 11
significant bits without range problems; accuracy is the fp16 row of the tolerance table). Channels are zero-padded
to the next size of the tile table (16, 32, 64, 128, 256), which changes no dot product.

Two ways around the kernel (``FUSED_PRE_POST``): False: ``RowGradLoss`` with ``kernel_engine`` (row norms, operand
conversion and the normalisation backward as PyTorch elementwise ops, about 25 small kernels per step); True:
``KernelLoss``, the same math in two fused row kernels of the library (``facd_prepare``, ``facd_scale_backward``).
"""

from __future__ import annotations

import ctypes
import math
from functools import cache

import torch

from kernels.build import KernelUnavailable, Tile, build_kernel, tile_table
from kernels.rowgrad import EPS, Engine, RowGradLoss
from kernels.emulate import kernel_tile, split_layout

OPERAND_DTYPES = {torch.float16: torch.float16, torch.bfloat16: torch.bfloat16, torch.float32: torch.float16}
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}
_ROW_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}  # inputs of the fused row kernels
# True: normalisation + its backward in fused row kernels (KernelLoss); False: PyTorch ops (RowGradLoss).
FUSED_PRE_POST = True
KERNEL_INFO_FIELDS = (
    "registers", "local_bytes", "blocks_per_sm", "smem_bytes", "block_rows", "block_cols", "threads",
    "min_blocks", "q_in_registers", "stages", "lazy_rescale", "binary_version",
)  # fmt: skip
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
    if hasattr(lib, "facd_kernel_info"):  # (absent from older sources, e.g. the tuning experiment's control)
        lib.facd_kernel_info.restype = c_int
        lib.facd_kernel_info.argtypes = [c_int, c_int, c_int, ctypes.POINTER(c_int)]
    if hasattr(lib, "facd_prepare"):
        lib.facd_prepare.restype = c_int
        # in dtype, out dtype, device | x | n, c_in, c_pad | eps | out, norm, stream
        lib.facd_prepare.argtypes = [c_int] * 3 + [ptr] + [c_int] * 3 + [c_float] + [ptr] * 3
        lib.facd_scale_backward.restype = c_int
        # dtype, device | s, norm, grad_q, grad_out | n, c, c_pad | eps | ds, stream
        lib.facd_scale_backward.argtypes = [c_int] * 2 + [ptr] * 4 + [c_int] * 3 + [c_float] + [ptr] * 2
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


def reset_library() -> None:
    """Forget the loaded library and the per-device occupancy cache: the next call builds / loads the library for the
    current $FACD_KERNEL_SOURCE and $FACD_KERNEL_ARCHS (the tuning experiment switches kernel variants this way)."""
    global _library
    _library = None
    _device_splits_info.cache_clear()


def check(lib: ctypes.CDLL, code: int, what: str) -> None:
    """Raise KernelUnavailable with the library's message for a non-zero return code."""
    if code != 0:
        raise KernelUnavailable(f"{what} failed: {lib.facd_error_string(code).decode()} (code {code})")


def blocks_per_sm(lib: ctypes.CDLL, dtype: torch.dtype, channels: int, device: int) -> int:
    """Resident blocks per SM of the partial kernel for this operand dtype and (padded) channel count."""
    blocks = ctypes.c_int(0)
    check(lib, lib.facd_blocks_per_sm(_DTYPE_CODES[dtype], channels, device, ctypes.byref(blocks)), "occupancy query")
    return blocks.value


def kernel_info(lib: ctypes.CDLL, dtype: torch.dtype, channels: int, device: int) -> dict[str, int]:
    """Registers, local (spill) bytes, resident blocks per SM, shared memory and tile of the compiled partial kernel."""
    if not hasattr(lib, "facd_kernel_info"):
        return {"blocks_per_sm": blocks_per_sm(lib, dtype, channels, device)}
    info = (ctypes.c_int * len(KERNEL_INFO_FIELDS))()
    check(lib, lib.facd_kernel_info(_DTYPE_CODES[dtype], channels, device, info), "kernel info query")
    return dict(zip(KERNEL_INFO_FIELDS, info))


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
    splits: int | None = None,
) -> Engine:
    """The ``RowGradLoss`` engine running the kernel (inputs already validated; KernelUnavailable if unusable).

    ``splits``: column splits (None: the occupancy heuristic)."""
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
        loss_rows, _, grad = forward(q, k, pos, tau=tau, rows_per_image=rows_per_image, weight=w, splits=splits)
        return loss_rows, grad

    return engine


def prepare(x: torch.Tensor, dtype: torch.dtype, channels: int, with_norm: bool):
    """Fused ``facd_prepare``: (x_i / max(||x_i||, EPS) in ``dtype`` zero-padded to ``channels``, float32 norms or
    None) for a contiguous fp32/fp16/bf16 CUDA matrix x, on the current stream."""
    lib = library()
    n, c = x.shape
    out = torch.empty((n, channels), dtype=dtype, device=x.device)
    norm = torch.empty(n, dtype=torch.float32, device=x.device) if with_norm else None
    with torch.cuda.device(x.device):  # (the library sets the device; restore torch's afterwards)
        code = lib.facd_prepare(
            _ROW_DTYPE_CODES[x.dtype], _DTYPE_CODES[dtype], x.device.index, x.data_ptr(), n, c, channels, EPS,
            out.data_ptr(), None if norm is None else norm.data_ptr(), torch.cuda.current_stream(x.device).cuda_stream,
        )  # fmt: skip
    check(lib, code, "facd_prepare")
    return out, norm


class KernelLoss(torch.autograd.Function):
    """``RowGradLoss`` with the kernel engine, the row norms / operand conversion and the normalisation backward done
    by the library's fused row kernels (same math in float32; see RowGradLoss for the formulas)."""

    @staticmethod
    def forward(ctx, s, t, pos, tau, rows_per_image, weight, splits):
        dtype = OPERAND_DTYPES[s.dtype]
        channels = kernel_tile(s.shape[1]).channels
        s = s.contiguous()
        t = (t if t.dtype in _ROW_DTYPE_CODES else t.float()).contiguous()
        q, norm = prepare(s, dtype, channels, with_norm=True)
        k, _ = prepare(t, dtype, channels, with_norm=False)
        w = None if weight is None else weight.float().contiguous()
        loss_rows, _, grad_q = forward(
            q, k, pos.contiguous(), tau=tau, rows_per_image=rows_per_image, weight=w, splits=splits
        )
        ctx.save_for_backward(s, norm, grad_q)
        return loss_rows.mean()

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "contrastive_loss does not support double backward (create_graph=True): its gradient is computed in "
                "the forward pass"
            )
        s, norm, grad_q = ctx.saved_tensors
        g = grad_out.float().contiguous()
        ds = torch.empty_like(s)
        lib = library()
        with torch.cuda.device(s.device):
            code = lib.facd_scale_backward(
                _ROW_DTYPE_CODES[s.dtype], s.device.index, s.data_ptr(), norm.data_ptr(), grad_q.data_ptr(),
                g.data_ptr(), s.shape[0], s.shape[1], grad_q.shape[1], EPS, ds.data_ptr(),
                torch.cuda.current_stream(s.device).cuda_stream,
            )  # fmt: skip
        check(lib, code, "facd_scale_backward")
        return ds, None, None, None, None, None, None


def kernel_loss(s, t, pos, *, tau, rows_per_image, weight, splits=None, fused=None) -> torch.Tensor:
    """The loss through the kernel (inputs already validated): ``KernelLoss`` if ``fused`` (default
    ``FUSED_PRE_POST``), else ``RowGradLoss`` with ``kernel_engine``. KernelUnavailable if the kernel is unusable."""
    reason = unavailable_reason(s)
    if reason is not None:
        raise KernelUnavailable(reason)
    if FUSED_PRE_POST if fused is None else fused:
        return KernelLoss.apply(s, t, pos, float(tau), rows_per_image, weight, splits)
    engine = kernel_engine(s, t, pos, tau=tau, rows_per_image=rows_per_image, weight=weight, splits=splits)
    return RowGradLoss.apply(s, engine)


def _operand(x: torch.Tensor, inv_norm: torch.Tensor, dtype: torch.dtype, channels: int) -> torch.Tensor:
    """Rows x_i * inv_norm_i in the operand dtype, zero-padded to ``channels`` columns (a new contiguous tensor)."""
    rows = x * inv_norm[:, None]
    if channels == x.shape[1]:
        return rows.to(dtype)
    out = x.new_zeros((x.shape[0], channels), dtype=dtype)
    out[:, : x.shape[1]] = rows
    return out
