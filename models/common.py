"""Pieces shared by the model families: configs, building blocks, the `SRBase` interface (feature taps) and `SRNet`,
the EDSR / RCAN skeleton; `folded()`, the one call that turns any model into its inference form."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Self

import torch
from torch import Tensor, nn

# DIV2K RGB mean and the [0, 255] range that EDSR-PyTorch, the RCAN code and BasicSR all compute in.
DIV2K_MEAN: tuple[float, float, float] = (0.4488, 0.4371, 0.4040)
RGB_RANGE = 255.0

ARCHS = ("edsr", "rcan")
SCALES = (2, 3, 4)


class ConfigDict:
    """`from_dict` / `to_dict` for a frozen config dataclass, with errors naming unknown or missing keys."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        """Build from a plain dict; unknown or missing keys are a ValueError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(unknown)}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]  # type: ignore[arg-type]
        missing = [n for n in required if n not in d]
        if missing:
            raise ValueError(f"missing model config key(s): {', '.join(missing)}")
        return cls(**d)

    def to_dict(self) -> dict[str, str | int | float | bool]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclasses.dataclass(frozen=True)
class ModelConfig(ConfigDict):
    """Everything needed to rebuild a network; `asdict()` is what checkpoints store.

    - `blocks`: EDSR residual blocks, or RCAN blocks (RCABs) per residual group.
    - `groups`: RCAN residual groups. EDSR has none and requires `groups == 1`.
    - `res_scale`: residual scaling inside each block (EDSR, and RCAN's RCAB as in BasicSR; EDSR-PyTorch's RCAN
      ignores it, which equals the default 1.0).
    - `reduction`: RCAN channel-attention squeeze factor; unused by EDSR.
    """

    arch: str
    scale: int
    channels: int
    blocks: int
    groups: int = 1
    res_scale: float = 1.0
    reduction: int = 16

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch: must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if not_int(self.scale) or self.scale not in SCALES:
            raise ValueError(f"scale: must be one of {', '.join(map(str, SCALES))}, got {self.scale!r}")
        check_size_fields(self, ("channels", "blocks", "groups", "reduction"))
        rs = self.res_scale
        if isinstance(rs, bool) or not isinstance(rs, (int, float)) or not math.isfinite(rs) or rs <= 0:
            raise ValueError(f"res_scale: must be a finite number > 0, got {rs!r}")
        object.__setattr__(self, "res_scale", float(rs))
        if self.arch == "edsr" and self.groups != 1:
            raise ValueError(f"groups: EDSR has no residual groups, must be 1, got {self.groups}")
        if self.arch == "rcan" and self.reduction > self.channels:
            raise ValueError(f"reduction: must be <= channels ({self.channels}), got {self.reduction}")



# Upper bounds no real preset comes near (the largest, EDSR's paper model: 256 channels, 32 blocks, 38 M body
# weights; RCAN: 10 groups), checked before anything is allocated: a hand-edited checkpoint config cannot make us
# allocate gigabytes.
MAX_SIZE = {"channels": 1024, "blocks": 512, "groups": 64, "reduction": 1024}
MAX_BODY_WEIGHTS = 200_000_000  # blocks x groups x 18 x channels^2: two 3x3 convs per block (800 MB in float32)


def check_size_fields(config: object, names: tuple[str, ...]) -> None:
    """Each of `names` an integer in 1..MAX_SIZE, and the body's weights within MAX_BODY_WEIGHTS; else ValueError."""
    for name in names:
        value = getattr(config, name)
        if not_int(value) or not 1 <= value <= MAX_SIZE[name]:
            raise ValueError(f"{name}: must be an integer from 1 to {MAX_SIZE[name]}, got {value!r}")
    weights = config.blocks * getattr(config, "groups", 1) * 18 * config.channels ** 2
    if weights > MAX_BODY_WEIGHTS:
        raise ValueError(f"blocks x channels: about {weights:,} body weights, more than the {MAX_BODY_WEIGHTS:,} "
                         "this tool builds")


def not_int(v: object) -> bool:
    return isinstance(v, bool) or not isinstance(v, int)


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class ResBlock(nn.Module):
    """EDSR residual block: x + res_scale * conv2(relu(conv1(x)))."""

    def __init__(self, channels: int, res_scale: float = 1.0) -> None:
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.conv2 = conv3x3(channels, channels)
        self.res_scale = res_scale

    def forward(self, x: Tensor) -> Tensor:
        return x + self.res_scale * self.conv2(torch.relu(self.conv1(x)))


class ChannelAttention(nn.Module):
    """x * sigmoid(up(relu(down(avgpool(x))))), with 1x1 convs C -> C // reduction -> C."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, channels // reduction, 1)
        self.up = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        w = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.up(torch.relu(self.down(w))))


class RCAB(nn.Module):
    """Residual channel-attention block: x + res_scale * ca(conv2(relu(conv1(x))))."""

    def __init__(self, channels: int, reduction: int, res_scale: float = 1.0) -> None:
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.conv2 = conv3x3(channels, channels)
        self.ca = ChannelAttention(channels, reduction)
        self.res_scale = res_scale

    def forward(self, x: Tensor) -> Tensor:
        return x + self.res_scale * self.ca(self.conv2(torch.relu(self.conv1(x))))


class ResidualGroup(nn.Module):
    """RCAN residual group: x + conv(blocks(x))."""

    def __init__(self, channels: int, blocks: int, reduction: int, res_scale: float = 1.0) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(RCAB(channels, reduction, res_scale) for _ in range(blocks)))
        self.conv = conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(self.blocks(x))


def make_upsampler(scale: int, channels: int) -> nn.Sequential:
    """x2/x3: conv C -> s²C + PixelShuffle(s); x4: two stages of conv C -> 4C + PixelShuffle(2)."""
    if scale == 4:
        stages = [2, 2]
    elif scale in (2, 3):
        stages = [scale]
    else:
        raise ValueError(f"scale: must be one of {', '.join(map(str, SCALES))}, got {scale!r}")
    layers: list[nn.Module] = []
    for s in stages:
        layers += [conv3x3(channels, s * s * channels), nn.PixelShuffle(s)]
    return nn.Sequential(*layers)


class SRBase(nn.Module):
    """What every model family provides: `config` (plain dict, what checkpoints store), `scale`, `channels`,
    `num_taps`, `forward(x)` and `forward_features(x, taps)`. The taps are the modules of `self.body`; a subclass sets
    `_config` (with `to_dict()`, `scale`, `channels`) and `body`, and implements `_run(x, taps)`.
    """

    _config: Any
    body: nn.ModuleList
    # What one unit of the body features is on the [0, 1] image scale: distillation divides by it, so that features
    # of families that work on different scales are compared on one.
    feature_range = 1.0

    @property
    def config(self) -> dict[str, str | int | float | bool]:
        return self._config.to_dict()

    @property
    def scale(self) -> int:
        return self._config.scale

    @property
    def channels(self) -> int:
        return self._config.channels

    @property
    def num_taps(self) -> int:
        return len(self.body)

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, ())[0]

    def forward_features(self, x: Tensor, taps: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        """SR output and the outputs of body blocks `taps` (0-based, in the order asked, in the model's own scale)."""
        taps = list(taps)
        for t in taps:
            if not_int(t) or not 0 <= t < self.num_taps:
                raise ValueError(f"tap {t!r} out of range: this model has body blocks 0..{self.num_taps - 1}")
        return self._run(x, taps)

    def _run(self, x: Tensor, taps: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        raise NotImplementedError


def folded(model: nn.Module) -> nn.Module:
    """The inference form of `model`: every training-time multi-branch block folded into one plain conv.

    Call this on ANY model before export or deployment timing. A model with a `fold()` method (the re-parameterised
    `anchor` family) returns its folded copy (or itself, when already folded); every other model (EDSR, RCAN) is
    returned as it is, the same object. The argument is never modified.
    """
    fold = getattr(model, "fold", None)
    return fold() if callable(fold) else model


class SRNet(SRBase):
    """head -> body blocks -> body_tail (+ head output) -> upsample -> last, on (x - mean) * 255.

    Input: RGB float in [0, 1], NCHW. Output: RGB in ~[0, 1] (not clamped), spatial size times `scale`.
    The body blocks are the feature taps used for distillation (`num_taps`, `forward_features`; internal x255 scale).
    """

    feature_range = RGB_RANGE

    def __init__(self, config: ModelConfig, body: Sequence[nn.Module]) -> None:
        super().__init__()
        c = config.channels
        self._config = config
        # Non-persistent: state dicts stay free of mean keys, exactly like BasicSR's.
        self.register_buffer("mean", torch.tensor(DIV2K_MEAN).view(1, 3, 1, 1), persistent=False)
        self.head = conv3x3(3, c)
        self.body = nn.ModuleList(body)
        self.body_tail = conv3x3(c, c)
        self.upsample = make_upsampler(config.scale, c)
        self.last = conv3x3(c, 3)

    def _run(self, x: Tensor, taps: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        wanted = set(taps)
        found: dict[int, Tensor] = {}
        h = self.head((x - self.mean) * RGB_RANGE)
        f = h
        for i, block in enumerate(self.body):
            f = block(f)
            if i in wanted:
                found[i] = f
        out = self.last(self.upsample(self.body_tail(f) + h))
        return out / RGB_RANGE + self.mean, [found[t] for t in taps]
