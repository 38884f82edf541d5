"""The CUDA kernel's tiled algorithm in PyTorch: the chunked path, and an emulation of the kernel step for step.

``tiled_softmax`` walks the columns in tiles with an online log-sum-exp (log2 domain, running max, rescaled sums),
per column split, then merges the splits in order - step for step what ``contrastive.cu`` does, on whole row blocks at
once. Run in float32/float64 it is the memory-efficient path (``kernels.contrastive.chunked_loss``: memory
O((N + M) C + N * block_cols), never N x M). ``emulate_kernel`` runs it the way the kernel does: operands rounded to
fp16/bf16 (P too, before the P K product; row sums from the unrounded P), fp32 accumulation, the kernel's column tile
from the FACD_TILES table and the same column splits; its error against the float64 oracle is what the kernel's error
should be (tested on CPU in tests/test_contrastive.py).
"""

from __future__ import annotations

import math

import torch

from kernels.build import KernelUnavailable, Tile, tile_table

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def excluded_columns(pos: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, rows_per_image: int) -> torch.Tensor:
    """Bool (len(rows), len(cols)): True where column j shares row i's image (index // rows_per_image), j != pos(i)."""
    same_image = (rows[:, None] // rows_per_image) == (cols[None, :] // rows_per_image)
    return same_image & (cols[None, :] != pos[rows][:, None])


def split_layout(m: int, block_cols: int, splits: int) -> tuple[int, int]:
    """(columns per split, number of splits) for at most ``splits`` splits of whole tiles, none empty (grid.y)."""
    per_split = math.ceil(math.ceil(m / block_cols) / splits) * block_cols
    return per_split, math.ceil(m / per_split)


def split_ranges(m: int, block_cols: int, splits: int) -> list[tuple[int, int]]:
    """Column ranges [begin, end) of the splits of ``split_layout``."""
    per_split, count = split_layout(m, block_cols, splits)
    return [(i * per_split, min(m, (i + 1) * per_split)) for i in range(count)]


def tiled_softmax(
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    *,
    tau: float,
    rows_per_image: int | None,
    block_cols: int,
    splits: int = 1,
    p_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row i: LSE_i = log sum_{j allowed} exp(z_ij) and attn_i = sum_j softmax(z_i)_j k_j, with z = q k^T / tau.

    q (N, C), k (M, C) in the accumulation dtype (float32 or float64). ``p_dtype`` rounds P before the P k product
    (the kernel's MMA operand type). Never holds more than N x block_cols scores.
    """
    n = q.shape[0]
    scale = LOG2E / tau
    rows = torch.arange(n, device=q.device)
    parts = []
    for begin, end in split_ranges(k.shape[0], block_cols, splits):
        row_max = q.new_full((n,), -math.inf)
        row_sum = q.new_zeros(n)
        o = q.new_zeros(q.shape)
        for c0 in range(begin, end, block_cols):
            kt = k[c0 : min(c0 + block_cols, end)]
            s = q @ kt.T
            if rows_per_image is not None:
                cols = torch.arange(c0, c0 + kt.shape[0], device=q.device)
                s.masked_fill_(excluded_columns(pos, rows, cols, rows_per_image), -math.inf)
            new_max = torch.maximum(row_max, s.amax(dim=1) * scale)
            base = torch.where(new_max == -math.inf, 0.0, new_max)  # a row with nothing allowed yet
            alpha = torch.exp2(row_max - base)
            row_max = new_max
            p = s.mul_(scale).sub_(base[:, None]).exp2_()  # in place: S becomes P
            row_sum = row_sum * alpha + p.sum(dim=1)
            if p_dtype is not None:
                p = p.to(p_dtype).to(q.dtype)
            o = o * alpha[:, None] + p @ kt
        parts.append((row_max, row_sum, o))
    # The combine kernel: splits merged in order.
    row_max = torch.stack([m for m, _, _ in parts]).amax(dim=0)
    row_sum = sum(sums * torch.exp2(m - row_max) for m, sums, _ in parts)
    o = sum(o * torch.exp2(m - row_max)[:, None] for m, _, o in parts)
    lse = (row_max + torch.log2(row_sum)) * LN2
    return lse, o / row_sum[:, None]


def rows_loss_and_grad(
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    lse: torch.Tensor,
    attn: torch.Tensor,
    *,
    tau: float,
    weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted per-row losses w_i (LSE_i - z_i,pos(i)) and dL/dq = w_i / (N tau) (attn_i - k_pos(i)), L = sum / N."""
    k_pos = k[pos]
    z_pos = (q * k_pos).sum(dim=1) * (1.0 / tau)
    w = torch.ones_like(lse) if weight is None else weight.to(lse.dtype)
    grad_scale = 1.0 / (q.shape[0] * tau)
    return w * (lse - z_pos), (w * grad_scale)[:, None] * (attn - k_pos)


def kernel_tile(channels: int) -> Tile:
    """The tile configuration the kernel uses for ``channels`` (padded up to the next table entry)."""
    for c, tile in sorted(tile_table().items()):
        if channels <= c:
            return tile
    raise KernelUnavailable(f"the CUDA kernel supports at most {max(tile_table())} channels, got {channels}")


def emulate_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    *,
    tau: float,
    rows_per_image: int | None = None,
    weight: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float16,
    splits: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's outputs (loss_rows, lse, grad) for normalised q (N, C), k (M, C), as ``kernels.cuda.forward``.

    Operands are rounded to ``dtype`` (fp16 or bf16); everything else is float32 with the kernel's column tile
    and ``splits`` column splits. Zero channel padding does not change any value, so it is not applied.
    """
    tile = kernel_tile(q.shape[1])
    qo, ko = q.to(dtype).float(), k.to(dtype).float()
    lse, attn = tiled_softmax(
        qo, ko, pos, tau=tau, rows_per_image=rows_per_image, block_cols=tile.block_cols, splits=splits, p_dtype=dtype
    )
    loss_rows, grad = rows_loss_and_grad(qo, ko, pos, lse, attn, tau=tau, weight=weight)
    return loss_rows, lse, grad
