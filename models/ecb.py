"""Edge-oriented convolution block (ECB; ECBSR, Zhang et al., ACM MM 2021): a 3x3 conv trained as five branches.

Training form, all branches summed (no batch norm anywhere, so nothing depends on batch statistics):

    conv3x3                      3x3 conv, cin -> cout
    expand -> squeeze            1x1 conv cin -> 2*cout (ECBSR's depth multiplier 2), then 3x3 conv 2*cout -> cout
    1x1 -> Sobel-x               1x1 conv cin -> cout, then a per-channel fixed Sobel-x mask x a learnt scale, + bias
    1x1 -> Sobel-y               the same with the Sobel-y mask
    1x1 -> Laplacian             the same with the 4-neighbour Laplacian mask

Every branch is linear and ends in a 3x3 kernel, so their sum is one 3x3 conv (`ECB.fold()`), exactly, provided the
padding agrees: the folded conv zero-pads its *input*, where a 1x1 conv then sees zeros and outputs its bias. So each
1x1 -> 3x3 branch pads `x` with zeros *before* its 1x1 conv, which makes the border of the 1x1 output equal to the
1x1's bias (ECBSR writes that bias into a zero-padded output; the two are the same numbers). Padding the 1x1 output
with zeros instead would make the folded conv differ from the trained one along a one-pixel border.

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
    """1x1 conv cin -> cout, then per channel `scale * mask` (a fixed 3x3 edge mask) as a depthwise conv, + `bias`.

    Input padded before the 1x1 conv (see the module docstring). `scale` and `bias` start at N(0, 1e-3), as in ECBSR.
    """

    def __init__(self, cin: int, cout: int, mask: tuple[tuple[float, ...], ...]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)  # a bias would be inert: the masks sum to zero
        self.scale = nn.Parameter(torch.randn(cout, 1, 1, 1) * 1e-3)
        self.bias = nn.Parameter(torch.randn(cout) * 1e-3)
        # A constant: non-persistent, so checkpoints hold only what is learnt.
        self.register_buffer("mask", torch.tensor(mask).view(1, 1, 3, 3), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(F.pad(x, (1, 1, 1, 1)))
        return F.conv2d(y, self.scale * self.mask, self.bias, groups=self.conv.out_channels)

    def kernel(self, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """The equivalent 3x3 conv's (weight, bias) in `dtype`."""
        k0, b0 = _1x1(self.conv, dtype)
        depthwise = (self.scale * self.mask).to(dtype)  # (cout, 1, 3, 3)
        eye = torch.eye(k0.shape[0], dtype=dtype, device=k0.device)
        dense = eye[:, :, None, None] * depthwise  # (cout, cout, 3, 3), diagonal
        return _compose(k0, b0, dense, self.bias.to(dtype))


class ECB(nn.Module):
    """The training form of one 3x3 conv (cin -> cout, padding 1); `fold()` gives the plain `nn.Conv2d`."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.conv3x3 = nn.Conv2d(cin, cout, 3, padding=1)
        self.expand = nn.Conv2d(cin, DEPTH_MULTIPLIER * cout, 1)
        self.squeeze = nn.Conv2d(DEPTH_MULTIPLIER * cout, cout, 3)  # no padding: its input is padded before `expand`
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
        k0, b0 = _1x1(self.expand, dtype)
        parts = [(self.conv3x3.weight.to(dtype), self.conv3x3.bias.to(dtype)),
                 _compose(k0, b0, self.squeeze.weight.to(dtype), self.squeeze.bias.to(dtype)),
                 self.sobel_x.kernel(dtype), self.sobel_y.kernel(dtype), self.laplacian.kernel(dtype)]
        return sum(w for w, _ in parts), sum(b for _, b in parts)  # type: ignore[return-value]

    @torch.no_grad()
    def fold(self) -> nn.Conv2d:
        """One `nn.Conv2d(cin, cout, 3, padding=1)` computing the same function, in this block's dtype and device."""
        w, b = self.kernel(torch.float64)
        ref = self.conv3x3.weight
        conv = nn.Conv2d(self.in_channels, self.out_channels, 3, padding=1, device=ref.device, dtype=ref.dtype)
        conv.weight.copy_(w)
        conv.bias.copy_(b)
        return conv


def _1x1(conv: nn.Conv2d, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    w = conv.weight.to(dtype)[:, :, 0, 0]
    return w, conv.bias.to(dtype) if conv.bias is not None else w.new_zeros(w.shape[0])


def _compose(k0: Tensor, b0: Tensor, k1: Tensor, b1: Tensor) -> tuple[Tensor, Tensor]:
    """A 1x1 conv (k0: mid x cin, b0) then a 3x3 conv (k1: cout x mid x 3 x 3, b1) on its bias-padded output, as one
    3x3 conv: W[o,i] = sum_m k1[o,m] k0[m,i]; b[o] = b1[o] + sum_{m,h,w} k1[o,m,h,w] b0[m] (every tap sees b0)."""
    return torch.einsum("omhw,mi->oihw", k1, k0), b1 + torch.einsum("omhw,m->o", k1, b0)
