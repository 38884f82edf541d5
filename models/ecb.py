"""Edge-oriented convolution block (ECB; ECBSR, Zhang et al., ACM MM 2021): a 3x3 conv trained as five branches.

Training form, all branches summed (no batch norm anywhere, so nothing depends on batch statistics):

    conv3x3                      3x3 conv, cin -> cout
    expand -> squeeze            1x1 conv cin -> 2*cout (ECBSR's depth multiplier 2), then 3x3 conv 2*cout -> cout
    1x1 -> Sobel-x               1x1 conv cin -> cout, then a per-channel fixed Sobel-x mask x a learnt scale
    1x1 -> Sobel-y               the same with the Sobel-y mask
    1x1 -> Laplacian             the same with the 4-neighbour Laplacian mask

Every branch is linear and ends in a 3x3 kernel, so their sum is one 3x3 conv (`ECB.fold()`), exactly: the folded
conv zero-pads its input, and each 1x1 -> 3x3 branch pads `x` with zeros before its bias-free 1x1 conv.

One bias per block, the 3x3 branch's, where ECBSR gives every branch its own: the folded conv has one bias, and five
trained ones sum into it. Under Adam each of them moves by about the learning rate per step, so their sum moves about
five times as fast as a plain conv's bias; with ReLU (which INT8 backends fuse, where ECBSR uses PReLU) that drove
whole layers to zero in the first 50 iterations: `anchor_m` trained without distillation (600 iterations, lr 1e-3)
ended at the nearest-neighbour image on every one of 6 seeds, and on 4 of 4 at lr 5e-4 or with a 50-iteration warm-up
(docs/benchmarks.md, the student families).

Why ECB and not RepVGG (3x3 + 1x1 + identity): the Sobel and Laplacian branches are first-derivative and second-
derivative edge filters, which is what an SR network spends its capacity on; ECBSR reports ECB above RepVGG-style blocks
for SR at equal inference cost. Run branch by branch, training would cost about 9 + (2 + 18) + 3 = 32 C^2
multiply-adds per pixel against 9 C^2 for a plain conv (3.5x); `forward` instead derives the one equivalent kernel from
the branches' parameters at each call (linear in them, so the function and its gradients are the same), which makes an
ECB cost a plain conv in training too. Inference: after `fold()` every ECB is one plain 3x3 conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEPTH_MULTIPLIER = 2  # ECBSR's width of the 1x1 -> 3x3 branch, relative to cout

SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))
SOBEL_Y = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))
LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


class EdgeBranch(nn.Module):
    """1x1 conv cin -> cout (no bias), then per channel `scale * mask` (a fixed 3x3 edge mask) as a depthwise conv.

    Input padded before the 1x1 conv (see the module docstring). `scale` starts at N(0, 1e-3), as in ECBSR.
    """

    def __init__(self, cin: int, cout: int, mask: tuple[tuple[float, ...], ...]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.scale = nn.Parameter(torch.randn(cout, 1, 1, 1) * 1e-3)
        # A constant: non-persistent, so checkpoints hold only what is learnt.
        self.register_buffer("mask", torch.tensor(mask).view(1, 1, 3, 3), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(F.pad(x, (1, 1, 1, 1)))
        return F.conv2d(y, self.scale * self.mask, groups=self.conv.out_channels)

    def kernel(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The equivalent 3x3 conv's weight (no bias) in `dtype`."""
        depthwise = (self.scale * self.mask).to(dtype)  # (cout, 1, 3, 3)
        eye = torch.eye(depthwise.shape[0], dtype=dtype, device=depthwise.device)
        return _compose(self.conv, eye[:, :, None, None] * depthwise, dtype)  # a diagonal (cout, cout, 3, 3)


class ECB(nn.Module):
    """The training form of one 3x3 conv (cin -> cout, padding 1); `fold()` gives the plain `nn.Conv2d`."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.conv3x3 = nn.Conv2d(cin, cout, 3, padding=1)  # holds the block's one bias
        self.expand = nn.Conv2d(cin, DEPTH_MULTIPLIER * cout, 1, bias=False)
        self.squeeze = nn.Conv2d(DEPTH_MULTIPLIER * cout, cout, 3, bias=False)  # its input is padded before `expand`
        self.sobel_x = EdgeBranch(cin, cout, SOBEL_X)
        self.sobel_y = EdgeBranch(cin, cout, SOBEL_Y)
        self.laplacian = EdgeBranch(cin, cout, LAPLACIAN)

    explicit = False  # True: forward sums the five branches as written (the definition; tests' oracle)

    def forward(self, x: Tensor) -> Tensor:
        """The five branches' sum, computed as one 3x3 conv whose kernel is derived from the branches' parameters at
        every call: the same function and, the derivation being differentiable, the same gradients for every branch
        parameter, at the training cost of a plain conv plus a C^2-sized kernel sum (instead of about 3.5x)."""
        if self.explicit:
            return self.branches(x)
        w, b = self.kernel(x.dtype)
        return F.conv2d(x, w, b, padding=1)

    def branches(self, x: Tensor) -> Tensor:
        return (self.conv3x3(x) + self.squeeze(self.expand(F.pad(x, (1, 1, 1, 1))))
                + self.sobel_x(x) + self.sobel_y(x) + self.laplacian(x))

    def kernel(self, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """The equivalent 3x3 conv's (weight, bias), computed in `dtype` (float64 for folding)."""
        w = (self.conv3x3.weight.to(dtype) + _compose(self.expand, self.squeeze.weight.to(dtype), dtype)
             + self.sobel_x.kernel(dtype) + self.sobel_y.kernel(dtype) + self.laplacian.kernel(dtype))
        return w, self.conv3x3.bias.to(dtype)

    @torch.no_grad()
    def fold(self) -> nn.Conv2d:
        """One `nn.Conv2d(cin, cout, 3, padding=1)` computing the same function, in this block's dtype and device."""
        w, b = self.kernel(torch.float64)
        ref = self.conv3x3.weight
        conv = nn.Conv2d(self.in_channels, self.out_channels, 3, padding=1, device=ref.device, dtype=ref.dtype)
        conv.weight.copy_(w)
        conv.bias.copy_(b)
        return conv


def _compose(one_by_one: nn.Conv2d, k1: Tensor, dtype: torch.dtype) -> Tensor:
    """A bias-free 1x1 conv (weight k0: mid x cin) then a bias-free 3x3 conv (k1: cout x mid x 3 x 3) as one 3x3
    conv's weight: W[o,i] = sum_m k1[o,m] k0[m,i]."""
    return torch.einsum("omhw,mi->oihw", k1, one_by_one.weight.to(dtype)[:, :, 0, 0])
