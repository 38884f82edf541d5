"""Contrastive (FACD / InfoNCE) loss between student and frozen-teacher feature rows, with a fused CUDA kernel.

Use::

    from kernels import contrastive_loss
    loss = contrastive_loss(s, t, tau=0.07, rows_per_image=h * w, weight=gate)   # s (N, C) student, t (M, C) teacher

Math (rows normalised as x / max(||x||, 1e-8); t is frozen)::

    z_ij = q_i . k_j / tau,  LSE_i = log sum_{j allowed(i)} exp z_ij,  loss_i = LSE_i - z_i,pos(i)
    L = mean_i w_i loss_i,   dL/dq_i = w_i / (N tau) (sum_j softmax_ij k_j - k_pos(i))

``allowed(i)`` is every column, or with ``rows_per_image`` every column of another image plus the positive.

Implementations (``impl=``): ``naive`` (materialised N x M logits, autograd; the float64 oracle), ``chunked``
(column-tiled online log-sum-exp in PyTorch, any device, O(N + M) memory; the student gradient is produced in the
forward pass because the teacher is frozen), ``cuda`` (the fused kernel), ``auto`` (kernel for CUDA tensors when
usable, chunked otherwise). Modules:

* ``kernels.contrastive``: ``contrastive_loss``, input validation, ``naive_loss``, ``chunked_loss``, ``cuda_loss``.
* ``kernels.rowgrad``: ``RowGradLoss``, the autograd Function shared by the chunked and CUDA paths (an "engine"
  returns per-row losses and dL/dq in one pass; backward = scale + normalisation backward; double backward raises).
* ``kernels.emulate``: the kernel's tiled algorithm in PyTorch (``tiled_softmax``), used by the chunked path and, with
  operands rounded to fp16/bf16 and the kernel's tiles and splits, as ``emulate_kernel`` for tolerance tests on CPU.
* ``kernels.contrastive.cu``: the CUDA kernel. One pass over column tiles per block of rows (mma.sync m16n8k16,
  fp16/bf16 operands, fp32 accumulation, cp.async double-buffered K tiles, ldmatrix from padded shared memory),
  online log-sum-exp, the same-image column mask, then a combine kernel that merges column splits in order and
  writes LSE, the weighted per-row loss and dL/dq. No atomics (bit-reproducible). Tiles (``FACD_TILES``, one row
  per C: rows per warp, warps, columns per K tile, launch-bounds min blocks, Q in registers, K stages, lazy-rescale
  threshold): C = 16, 32, 64: 128 rows (4 warps x 2 x 16) x 64 columns; C = 128: 64 x 64; C = 256: 64 x 32 (Q
  re-read from shared memory instead of held in registers). fp32 inputs use fp16 operands; other C are zero-padded
  to the next size; C > 256 is not supported by the kernel (``auto`` falls back to chunked). Two optional row
  kernels (``facd_prepare``, ``facd_scale_backward``) replace the PyTorch ops around it when
  ``kernels.cuda.FUSED_PRE_POST`` is True.
* ``kernels.build``: nvcc build into a cached shared library (``build_kernel``; cache
  ~/.cache/facd-pipeline/kernels/<hash>, or $FACD_KERNEL_CACHE), ``compile_report`` (register spills, warnings),
  ``KernelUnavailable``.
* ``kernels.cuda``: ctypes binding (``forward``: the raw kernel on normalised rows), the split heuristic and the
  engine used by ``cuda_loss``.
* ``kernels.bench``: ``python -m kernels.bench --out DIR`` times naive, chunked, SDPA (V = K), cuBLAS Q K^T and the
  kernel on a GPU and writes JSON plus a memory plot.
* ``benchmarks/kernel_tune.py`` (outside the package, run by benchmarks/kernel_tune.sh) builds variants of the
  FACD_TILES rows, gates them on correctness and times them on a GPU; it prints the row to paste for the winner.

This package imports nothing from ``pipeline`` or ``models``.
"""

from kernels.build import KernelUnavailable, build_kernel
from kernels.contrastive import contrastive_loss

__all__ = ["KernelUnavailable", "build_kernel", "contrastive_loss"]
