"""Named presets (data, not subclasses), `create_model`, and parameter / FLOP counts."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, overload

import torch
from torch import nn
from torch.func import functional_call

from .anchor import ARCH as ANCHOR
from .anchor import AnchorConfig, AnchorNet
from .common import ARCHS, ModelConfig, SRBase, SRNet, folded
from .edsr import EDSR
from .rcan import RCAN

# Every preset but `scale`, which the caller gives (`create_model(name, scale=...)`).
PRESETS: dict[str, dict[str, Any]] = {
    # EDSR-baseline (Lim et al. 2017).
    "edsr_baseline": {"arch": "edsr", "channels": 64, "blocks": 16, "res_scale": 1.0},
    # The paper's EDSR teacher (EDSR, Lim et al. 2017).
    "edsr": {"arch": "edsr", "channels": 256, "blocks": 32, "res_scale": 0.1},
    # The paper's RCAN teacher (Zhang et al. 2018).
    "rcan": {"arch": "rcan", "channels": 64, "groups": 10, "blocks": 20, "reduction": 16},
    # Our choice: FACD does not pin its EDSR student down; half the width of EDSR-baseline.
    "edsr_student": {"arch": "edsr", "channels": 32, "blocks": 16, "res_scale": 1.0},
    # Our choice: the FAKD-style RCAN student, 6 RCABs per group instead of 20.
    "rcan_student": {"arch": "rcan", "channels": 64, "groups": 10, "blocks": 6, "reduction": 16},
    # Sized to train on a 2-core CPU in about two minutes and still beat bicubic.
    "tiny_teacher": {"arch": "edsr", "channels": 32, "blocks": 6, "res_scale": 1.0},
    "tiny_student": {"arch": "edsr", "channels": 16, "blocks": 3, "res_scale": 1.0},
    # Our choice, the `anchor` family (models/anchor.py: plain convs trained as ECBs, anchor residual, INT8-friendly),
    # blocks x channels: ECBSR-M4C16's width, ABPN's 28 channels, and a larger one for a roomier latency budget.
    "anchor_s": {"arch": "anchor", "channels": 16, "blocks": 4},
    "anchor_m": {"arch": "anchor", "channels": 28, "blocks": 5},
    "anchor_l": {"arch": "anchor", "channels": 32, "blocks": 7},
}

_OVERRIDABLE = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("arch", "scale"))
_ANCHOR_OVERRIDABLE = tuple(f.name for f in dataclasses.fields(AnchorConfig) if f.name not in ("arch", "scale"))


@overload
def build_model(config: ModelConfig) -> SRNet: ...
@overload
def build_model(config: AnchorConfig) -> AnchorNet: ...
@overload
def build_model(config: Mapping[str, Any]) -> SRBase: ...
def build_model(config: ModelConfig | AnchorConfig | Mapping[str, Any]) -> SRBase:
    """The network a config describes (a `ModelConfig`, an `AnchorConfig` or the plain-dict form of either);
    bad values -> ValueError. An anchor config with `folded: true` builds the folded (plain conv) structure."""
    if isinstance(config, AnchorConfig) or (isinstance(config, Mapping) and config.get("arch") == ANCHOR):
        a = config if isinstance(config, AnchorConfig) else AnchorConfig.from_dict(config)
        return AnchorNet(a.scale, a.channels, a.blocks, a.folded)
    if isinstance(config, Mapping) and "arch" in config and config["arch"] not in ARCHS:
        raise ValueError(f"arch: must be one of {', '.join((*ARCHS, ANCHOR))}, got {config['arch']!r}")
    c = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    if c.arch == "edsr":
        return EDSR(c.scale, c.channels, c.blocks, c.res_scale)
    return RCAN(c.scale, c.channels, c.groups, c.blocks, c.reduction, c.res_scale)


def create_model(name: str, scale: int = 4, **overrides: Any) -> SRBase:
    """Preset `name` at `scale`, with config fields overridden: channels, blocks, groups, res_scale, reduction for
    EDSR / RCAN presets; channels, blocks, folded for `anchor` presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    options = _ANCHOR_OVERRIDABLE if PRESETS[name]["arch"] == ANCHOR else _OVERRIDABLE
    for key in overrides:
        if key not in options:
            raise ValueError(f"unknown model option {key!r} for preset {name!r}; options: {', '.join(options)}")
    return build_model({**PRESETS[name], "scale": scale, **overrides})


def count_params(model: nn.Module, deployed: bool = True) -> int:
    """Number of parameters (all of them, trainable or not) of the inference form, `folded(model)`, like
    `count_flops`; `deployed=False` counts `model` as given (a re-parameterised model in its training form: with
    every branch, what the optimizer updates). The two differ only for such a model, never for EDSR / RCAN."""
    return sum(p.numel() for p in (folded(model) if deployed else model).parameters())


def count_flops(model: nn.Module, lr_hw: tuple[int, int] = (48, 48)) -> int:
    """FLOPs of one forward pass on one 3 x h x w input: 2 x the multiply-accumulates of every `nn.Conv2d`.

    Counted on the inference form, `folded(model)`: a re-parameterised model in its training form costs what its
    folded network costs (its branches exist only in training). Conv biases, activations, pixel shuffles, the anchor's
    split / concat, pooling and other elementwise ops are not counted. The forward runs on meta tensors (shapes only),
    so it is instant and allocates nothing even for the largest teacher.
    """
    model = folded(model)
    total = 0

    def hook(conv: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(conv, nn.Conv2d)
        kh, kw = conv.kernel_size
        total += 2 * out.numel() * (conv.in_channels // conv.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        meta = {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}
        x = torch.empty(1, 3, *lr_hw, device="meta")
        with torch.no_grad():
            functional_call(model, meta, (x,))
    finally:
        for h in handles:
            h.remove()
    return total
