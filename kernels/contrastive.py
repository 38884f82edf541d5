"""Contrastive (InfoNCE) loss between student rows and frozen teacher rows: validation, implementations, dispatch.

Implementations (all return the same scalar; see ``contrastive_loss``):

* ``naive_loss``: the oracle. Materialises the N x M logits and lets autograd differentiate; any dtype (float64 for
  reference values). O(N M) memory.
* ``chunked_loss``: memory-efficient, any device. ``RowGradLoss`` with the column-tiled online log-sum-exp of
  ``kernels.emulate.tiled_softmax`` in float32 (float64 for float64 inputs). Because the teacher is frozen, the whole
  student gradient dL/dq_i = w_i / (N tau) (attn_i - k_pos(i)) comes out of the forward pass; backward is a scale plus
  the normalisation backward. Memory O((N + M) C + N * block_cols).
* ``cuda_loss``: the same ``RowGradLoss`` with the fused CUDA kernel as its engine (``kernels.cuda``).

(A CPU alternative, flash attention with V = K, needs a dense N x M mask for the same-image rule; the column-tiled
path applies the rule one tile at a time instead.)
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch

from kernels.emulate import excluded_columns, rows_loss_and_grad, tiled_softmax
from kernels.rowgrad import EPS, RowGradLoss

IMPLS = ("auto", "naive", "chunked", "cuda")


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """x_i / max(||x_i||, EPS), differentiable (the oracle's normalisation)."""
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(EPS)


def validate(
    s: torch.Tensor,
    t: torch.Tensor,
    tau: float,
    pos: torch.Tensor | None,
    rows_per_image: int | None,
    weight: torch.Tensor | None,
) -> torch.Tensor:
    """Check the arguments of ``contrastive_loss`` (ValueError with the reason); return pos as a long tensor.

    Value checks of an explicit pos (range, negatives per row) read back one small tensor each, i.e. synchronise on
    CUDA; with the default pos (arange, N == M) everything is decided on the host.
    """
    if not isinstance(tau, numbers.Real) or isinstance(tau, bool) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    if s.dim() != 2 or t.dim() != 2 or s.shape[1] != t.shape[1]:
        raise ValueError(f"s and t must be (N, C) and (M, C), got {tuple(s.shape)} and {tuple(t.shape)}")
    n, m = s.shape[0], t.shape[0]
    if n == 0 or m == 0 or s.shape[1] == 0:
        raise ValueError(f"s and t must be non-empty, got {tuple(s.shape)} and {tuple(t.shape)}")
    if not s.is_floating_point() or not t.is_floating_point():
        raise ValueError(f"s and t must be floating point, got {s.dtype} and {t.dtype}")
    if s.device != t.device:
        raise ValueError(f"s and t must be on the same device, got {s.device} and {t.device}")
    if t.requires_grad:
        raise ValueError("t must not require grad (the teacher is frozen): pass t.detach()")
    default_pos = pos is None
    if default_pos:
        if n != m:
            raise ValueError(f"pos is required when N != M (N={n}, M={m})")
        pos = torch.arange(n, device=s.device)
    else:
        if pos.shape != (n,) or pos.dtype.is_floating_point or pos.dtype.is_complex or pos.dtype == torch.bool:
            raise ValueError(f"pos must be an integer tensor of shape ({n},), got {pos.dtype} {tuple(pos.shape)}")
        if pos.device != s.device:
            raise ValueError(f"pos must be on {s.device}, got {pos.device}")
        pos = pos.long()
        lo, hi = torch.stack([pos.min(), pos.max()]).tolist()
        if lo < 0 or hi >= m:
            raise ValueError(f"pos must lie in [0, {m}), got values in [{lo}, {hi}]")
    if weight is not None:
        if weight.shape != (n,) or not weight.is_floating_point():
            raise ValueError(
                f"weight must be a floating tensor of shape ({n},), got {weight.dtype} {tuple(weight.shape)}"
            )
        if weight.device != s.device:
            raise ValueError(f"weight must be on {s.device}, got {weight.device}")
        if weight.requires_grad:
            raise ValueError("weight must not require grad (no gradient flows to it): pass weight.detach()")
    if rows_per_image is None:
        if m < 2:
            raise ValueError("M = 1: no negative column left (every row needs at least one negative)")
        return pos
    if not isinstance(rows_per_image, int) or isinstance(rows_per_image, bool) or rows_per_image < 1:
        raise ValueError(f"rows_per_image must be a positive int, got {rows_per_image!r}")
    if default_pos:  # every positive lies in its row's own image; image 0 owns the most columns, min(R, M)
        if m - min(rows_per_image, m) < 1:
            raise _no_negatives(0, n, m, rows_per_image)
        return pos
    image = torch.arange(n, device=s.device) // rows_per_image
    own_columns = (((image + 1) * rows_per_image).clamp(max=m) - image * rows_per_image).clamp(min=0)
    negatives = m - own_columns - (pos // rows_per_image != image).long()  # the positive is no negative either
    fewest, row = torch.stack([negatives.min(), negatives.argmin()]).tolist()
    if fewest < 1:
        raise _no_negatives(row, n, m, rows_per_image)
    return pos


def _no_negatives(row: int, n: int, m: int, rows_per_image: int) -> ValueError:
    return ValueError(
        f"row {row} has no negative column left (N={n}, M={m}, rows_per_image={rows_per_image}): negatives "
        "come from other images only, so the batch needs at least two images"
    )


def naive_loss(s, t, *, tau, pos=None, rows_per_image=None, weight=None) -> torch.Tensor:
    """The oracle: cross entropy over the materialised (N, M) logits, computed in s's dtype (use float64)."""
    pos = validate(s, t, tau, pos, rows_per_image, weight)
    return logits_loss(normalize_rows(s) @ normalize_rows(t.to(s.dtype)).T / tau, pos, rows_per_image, weight)


def logits_loss(z: torch.Tensor, pos: torch.Tensor, rows_per_image: int | None, weight: torch.Tensor | None):
    """mean_i w_i (logsumexp_{j allowed} z_ij - z_i,pos(i)) for materialised logits z (N, M); no validation."""
    if rows_per_image is not None:
        rows, cols = torch.arange(z.shape[0], device=z.device), torch.arange(z.shape[1], device=z.device)
        z = z.masked_fill(excluded_columns(pos, rows, cols, rows_per_image), -math.inf)
    loss = torch.logsumexp(z, dim=1) - z.gather(1, pos[:, None]).squeeze(1)
    return (loss if weight is None else loss * weight.to(loss.dtype)).mean()


def default_block_cols(n: int, m: int) -> int:
    """Column tile of the chunked path: about 2^21 scores per tile, between 64 and 4096 columns."""
    return min(m, max(64, min(4096, 2**21 // n)))


def chunked_loss(s, t, *, tau, pos=None, rows_per_image=None, weight=None, block_cols=None) -> torch.Tensor:
    """Memory-efficient loss on any device (float32 math; float64 for float64 inputs); never materialises N x M."""
    pos = validate(s, t, tau, pos, rows_per_image, weight)
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    k = normalize_rows(t.to(acc))
    cols = block_cols or default_block_cols(s.shape[0], t.shape[0])

    def engine(s_, inv_norm):
        q = s_.to(acc) * inv_norm[:, None]
        lse, attn = tiled_softmax(q, k, pos, tau=tau, rows_per_image=rows_per_image, block_cols=cols)
        return rows_loss_and_grad(q, k, pos, lse, attn, tau=tau, weight=weight)

    return RowGradLoss.apply(s, engine)


def cuda_loss(s, t, *, tau, pos=None, rows_per_image=None, weight=None) -> torch.Tensor:
    """The fused CUDA kernel (fp16/bf16 operands; fp32 inputs use fp16 operands). KernelUnavailable if it can't run."""
    from kernels import cuda

    pos = validate(s, t, tau, pos, rows_per_image, weight)
    return cuda.kernel_loss(s, t, pos, tau=tau, rows_per_image=rows_per_image, weight=weight)


def contrastive_loss(s, t, *, tau, pos=None, rows_per_image=None, weight=None, impl="auto") -> torch.Tensor:
    """Mean over student rows i of weight_i * (LSE_i - z_i,pos(i)), z_ij = cos(s_i, t_j) / tau.

    s (N, C) student rows (with grad); t (M, C) frozen teacher rows (no grad, converted to s's dtype); pos (N,) the
    positive column of each row (default arange(N), needs N == M); with rows_per_image, row i and column j belong to
    images i // rows_per_image and j // rows_per_image and the other columns of row i's own image are excluded
    (negatives from other images only); weight (N,) per-row weights (no gradient). cos uses max(||x||, 1e-8).
    impl: "naive" (materialised oracle), "chunked" (memory-efficient PyTorch), "cuda" (fused kernel), or "auto":
    the kernel for CUDA tensors when it is usable (else, with a one-time warning, chunked), chunked otherwise.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    kwargs = dict(tau=tau, pos=pos, rows_per_image=rows_per_image, weight=weight)
    if impl == "naive":
        return naive_loss(s, t, **kwargs)
    if impl == "chunked":
        return chunked_loss(s, t, **kwargs)
    if impl == "cuda":
        return cuda_loss(s, t, **kwargs)
    if s.device.type == "cuda":
        from kernels import cuda

        reason = cuda.unavailable_reason(s)
        if reason is None:
            return cuda_loss(s, t, **kwargs)
        _warn_once(f"contrastive_loss: using the chunked PyTorch path ({reason})")
    return chunked_loss(s, t, **kwargs)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)
