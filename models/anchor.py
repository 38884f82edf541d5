"""The `anchor` family: a plain LR-space conv net with an image-space anchor residual, for INT8 deployment.

    x (RGB, [0, 1]) -> blocks x [3x3 conv -> ReLU] (3 -> C, then C -> C) -> 3x3 conv C -> 3s^2
                    -> + anchor(x) -> clamp [0, 1] -> PixelShuffle(s)

The anchor (ABPN, Du et al., MAI 2021 challenge) is the input with each colour channel repeated s^2 times in a row
(R x s^2, G x s^2, B x s^2), so that PixelShuffle turns it into the nearest-neighbour upsampled input. See
`AnchorNet._anchor` for why it helps INT8 and how it exports. The clamp runs before the PixelShuffle: the two commute
(a pixel shuffle only moves values), and there Conv -> Add -> Clip is one fusable chain for INT8 backends, where
XLSR (Ayazoglu, 2021) used a clipped ReLU at the output for the same reason.

Training form: every 3x3 conv (first, body and last) is an ECB (`models.ecb`), a five-branch block; `fold()` turns the
model into the same network of plain `nn.Conv2d`s (`folded=True` in the config, which is what checkpoints store, so
both forms load). Feature taps (`forward_features`) are the outputs of the `blocks` conv + ReLU layers, each with
`channels` channels, in the network's own [0, 1] input scale (not EDSR's x255).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .common import SCALES, ConfigDict, SRBase, check_size_fields, conv3x3, not_int
from .ecb import ECB

ARCH = "anchor"


@dataclasses.dataclass(frozen=True)
class AnchorConfig(ConfigDict):
    """`blocks` conv + ReLU layers of `channels` channels at `scale`; `folded`: plain convs (inference) or ECBs."""

    arch: str
    scale: int
    channels: int
    blocks: int
    folded: bool = False

    def __post_init__(self) -> None:
        if self.arch != ARCH:
            raise ValueError(f"arch: must be {ARCH!r}, got {self.arch!r}")
        if not_int(self.scale) or self.scale not in SCALES:
            raise ValueError(f"scale: must be one of {', '.join(map(str, SCALES))}, got {self.scale!r}")
        check_size_fields(self, ("channels", "blocks"))
        if not isinstance(self.folded, bool):
            raise ValueError(f"folded: must be true or false, got {self.folded!r}")  # noqa: TRY004 - config errors are ValueErrors


class AnchorNet(SRBase):
    """The `anchor` family; `num_taps == blocks`. Input RGB in [0, 1], NCHW; output RGB in [0, 1] (clamped)."""

    def __init__(self, scale: int = 4, channels: int = 28, blocks: int = 5, folded: bool = False) -> None:
        super().__init__()
        self._config = AnchorConfig(ARCH, scale, channels, blocks, folded)
        conv = conv3x3 if folded else ECB
        self.body = nn.ModuleList([conv(3, channels)] + [conv(channels, channels) for _ in range(blocks - 1)])
        self.last = conv(channels, 3 * scale * scale)
        self.shuffle = nn.PixelShuffle(scale)

    @property
    def is_folded(self) -> bool:
        return self._config.folded

    def _anchor(self, x: Tensor) -> Tensor:
        # Why an anchor, for INT8: the network only has to learn a small residual around the (nearest-neighbour
        # upsampled) image, so the last conv's output range is narrow and its INT8 quantization step is fine; the
        # bulk of the signal, the image itself, never passes through a quantized conv. An image-space residual like
        # this survives full INT8 quantization better than a feature-space one (a skip that adds features keeps
        # their whole range in the quantized tensors); ABPN measured about +0.3 dB.
        #
        # How it exports: Split (x -> R, G, B) + one Concat (each repeated s^2 times in a row): two data-movement ops,
        # exact in every precision, with no weights and no FLOPs. Not Concat(x, x, ...) of the whole input: that
        # order (RGBRGB...) is what TensorFlow's depth_to_space (DCR) wants, PyTorch's PixelShuffle (ONNX
        # DepthToSpace mode CRD) wants RR..GG..BB... Not a fixed 1x1 conv: it would add a Conv node with no
        # Conv2d module behind it (the exporter names Conv nodes after the modules) and INT8 quantizers would
        # quantize it. Not repeat_interleave: it exports to Shape / Expand / Reshape, dynamic-shape arithmetic.
        r = self.scale * self.scale
        return torch.cat([c for c in x.split(1, dim=1) for _ in range(r)], dim=1)

    def _run(self, x: Tensor, taps: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        wanted = set(taps)
        found: dict[int, Tensor] = {}
        f = x
        for i, layer in enumerate(self.body):
            f = torch.relu(layer(f))
            if i in wanted:
                found[i] = f
        out = torch.clamp(self.last(f) + self._anchor(x), 0.0, 1.0)
        return self.shuffle(out), [found[t] for t in taps]

    def fold(self) -> AnchorNet:
        """The same network with every ECB folded into one plain 3x3 conv (same dtype, device and train/eval mode);
        an already folded model is returned as it is. `self` is not modified."""
        if self.is_folded:
            return self
        c = self._config
        out = AnchorNet(c.scale, c.channels, c.blocks, folded=True)
        out.body = nn.ModuleList(_fold(layer) for layer in self.body)
        out.last = _fold(self.last)
        return out.train(self.training)


def _fold(layer: nn.Module) -> nn.Conv2d:
    assert isinstance(layer, ECB)
    return layer.fold()
