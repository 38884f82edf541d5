"""What the chunked PyTorch path (kernels.contrastive) and the CUDA path (kernels.cuda) share: the row
normalisation floor, the engine signature, and the autograd Function that turns an engine into a loss."""

from __future__ import annotations

from collections.abc import Callable

import torch

EPS = 1e-8  # rows are normalised as x / max(||x||, EPS), as F.cosine_similarity does

# engine(s, inv_norm) -> (weighted per-row losses (N,), dL/dq (N, C')), q = s * inv_norm[:, None]; C' >= C (padding).
Engine = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class RowGradLoss(torch.autograd.Function):
    """L = sum_i loss_i / N where ``engine`` returns the per-row losses and dL/dq in one forward pass.

    The student enters un-normalised: forward computes the row norms (float32, float64 for float64 inputs), the engine
    normalises and computes; backward scales the saved dL/dq by the upstream gradient and applies the normalisation
    backward dL/ds = (dL/dq - q (q . dL/dq)) / ||s|| (dL/dq / EPS where the norm is clamped). Double backward
    (create_graph=True) raises instead of returning a gradient that silently lacks second-order terms.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, engine: Engine) -> torch.Tensor:
        acc = torch.float64 if s.dtype == torch.float64 else torch.float32
        norm = torch.linalg.vector_norm(s, dim=1, dtype=acc)
        loss_rows, grad_q = engine(s, 1.0 / norm.clamp_min(EPS))
        ctx.save_for_backward(s, norm, grad_q)
        return loss_rows.sum() / s.shape[0]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient cannot be given, so refuse
            raise RuntimeError(
                "contrastive_loss does not support double backward (create_graph=True): its gradient is computed in "
                "the forward pass"
            )
        s, norm, grad_q = ctx.saved_tensors
        inv = (1.0 / norm.clamp_min(EPS))[:, None]
        dq = grad_q[:, : s.shape[1]] * grad_out
        q = s.to(dq.dtype) * inv
        proj = (q * dq).sum(dim=1, keepdim=True) * (norm[:, None] > EPS)
        ds = dq.addcmul_(q, proj, value=-1.0).mul_(inv)
        return ds.to(s.dtype), None
