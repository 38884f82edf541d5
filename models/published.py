"""Load published EDSR / RCAN weights: EDSR-PyTorch (also the official RCAN code) and BasicSR layouts.

The layout is detected from the keys (`head.0.weight` -> EDSR-PyTorch, `conv_first.weight` -> BasicSR; BasicSR files
are `{"params_ema" | "params": state_dict}`, `params_ema` preferred). A DataParallel `module.` prefix is stripped.
Channels, blocks, groups and reduction are read from the tensor shapes unless given; `res_scale` cannot be, so it
defaults to 0.1 for a 32-block 256-channel EDSR (the published EDSR) and 1.0 otherwise.

Key mapping, one row per conv (each maps `.weight` and `.bias`); n = blocks, G = groups:

    ours                            EDSR-PyTorch                          BasicSR
    head                            head.0                                conv_first
    body.{i}.conv1        (EDSR)    body.{i}.body.0                       body.{i}.conv1
    body.{i}.conv2        (EDSR)    body.{i}.body.2                       body.{i}.conv2
    body.{g}.blocks.{b}.conv1       body.{g}.body.{b}.body.0              body.{g}.residual_group.{b}.rcab.0
    body.{g}.blocks.{b}.conv2       body.{g}.body.{b}.body.2              body.{g}.residual_group.{b}.rcab.2
    body.{g}.blocks.{b}.ca.down     body.{g}.body.{b}.body.3.conv_du.0    body.{g}.residual_group.{b}.rcab.3.attention.1
    body.{g}.blocks.{b}.ca.up       body.{g}.body.{b}.body.3.conv_du.2    body.{g}.residual_group.{b}.rcab.3.attention.3
    body.{g}.conv         (RCAN)    body.{g}.body.{n}                     body.{g}.conv
    body_tail                       body.{n} (EDSR) / body.{G} (RCAN)     conv_after_body
    upsample.0 (, upsample.2 at x4) tail.0.0 (, tail.0.2)                 upsample.0 (, upsample.2)
    last                            tail.1                                conv_last
    (mean buffer, fixed)            sub_mean, add_mean: checked, dropped  (none)

EDSR-PyTorch's `sub_mean` / `add_mean` must be the standard MeanShift (identity weight, bias -/+ 255 * DIV2K mean);
our models apply the same shift, so the outputs match the published code's (EDSR-PyTorch's output / 255).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .checkpoint import CheckpointError, load_state_strict, read_torch_file
from .common import DIV2K_MEAN, RGB_RANGE, ModelConfig, SRNet
from .registry import build_model

EDSR_PYTORCH = "edsr-pytorch"
BASICSR = "basicsr"
_OPTIONS = ("channels", "blocks", "groups", "res_scale", "reduction")


def load_published(
    src: str | os.PathLike[str] | Mapping[str, Any],
    arch: str | None = None,
    scale: int | None = None,
    *,
    name: str = "weights",
    **overrides: Any,
) -> SRNet:
    """Our model holding the published weights `src` (a file or a loaded dict, called `name` in errors).

    `arch` and `scale` are detected from the weights; when given, weights of another arch or scale are an error.
    """
    for key in overrides:
        if key not in _OPTIONS:
            raise ValueError(f"unknown model option {key!r}; options: {', '.join(_OPTIONS)}")
    if isinstance(src, Mapping):
        raw = src
    else:
        raw, name = read_torch_file(src, what="weights"), f"weights {src}"
    sd = _unwrap(raw, name)
    layout = detect_layout(sd, name)
    found_arch = _detect_arch(sd, layout)
    if arch is not None and found_arch != arch:
        raise CheckpointError(f"{name} look like {found_arch} ({layout} layout), expected {arch}")
    arch = found_arch
    found_scale = _detect_scale(sd, layout, name)
    if scale is not None and found_scale != scale:
        raise CheckpointError(f"{name} are for scale {found_scale}, expected scale {scale}")
    scale = found_scale
    fields = {**_infer(sd, arch, layout, name), **overrides}
    if arch == "rcan" and layout == EDSR_PYTORCH and fields.get("res_scale", 1.0) != 1.0:
        raise ValueError("res_scale: EDSR-PyTorch's RCAN ignores res_scale, so it must be 1.0 for these weights")
    config = ModelConfig(arch=arch, scale=scale, **fields)
    model = build_model(config)

    mapping = published_key_map(config, layout)
    extra = ("sub_mean.weight", "sub_mean.bias", "add_mean.weight", "add_mean.bias") if layout == EDSR_PYTORCH else ()
    missing = [k for k in [*mapping, *extra] if k not in sd]
    unexpected = [k for k in sd if k not in mapping and k not in extra]
    if missing or unexpected:
        parts = [f"missing keys: {', '.join(missing)}"] if missing else []
        parts += [f"unexpected keys: {', '.join(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{name} do not fit {config}: {'; '.join(parts)}")
    if layout == EDSR_PYTORCH:
        _check_mean_shift(sd, name)
    own = model.state_dict()
    state: dict[str, Tensor] = {}
    for theirs, ours in mapping.items():
        t = sd[theirs]
        if not isinstance(t, Tensor):
            raise CheckpointError(f"{name}: {theirs} is not a tensor ({type(t).__name__})")
        if t.shape != own[ours].shape:
            raise CheckpointError(
                f"{name}: {theirs} has shape {tuple(t.shape)}, expected {tuple(own[ours].shape)} (our {ours})"
            )
        state[ours] = t
    load_state_strict(model, state, name)
    return model


def detect_layout(sd: Mapping[str, Any], name: str = "weights") -> str:
    """`"edsr-pytorch"` or `"basicsr"`, from the first conv's key."""
    if "head.0.weight" in sd:
        return EDSR_PYTORCH
    if "conv_first.weight" in sd:
        return BASICSR
    raise CheckpointError(
        f"{name}: unknown layout (neither EDSR-PyTorch's head.0.weight nor BasicSR's conv_first.weight); "
        f"first keys: {', '.join(list(sd)[:5])}"
    )


def published_key_map(config: ModelConfig, layout: str) -> dict[str, str]:
    """Published key -> our key, for every weight and bias (the table in the module docstring)."""
    n, pt = config.blocks, layout == EDSR_PYTORCH
    convs: dict[str, str] = {"head.0" if pt else "conv_first": "head"}
    if config.arch == "edsr":
        for i in range(n):
            convs[f"body.{i}.body.0" if pt else f"body.{i}.conv1"] = f"body.{i}.conv1"
            convs[f"body.{i}.body.2" if pt else f"body.{i}.conv2"] = f"body.{i}.conv2"
        convs[f"body.{n}" if pt else "conv_after_body"] = "body_tail"
    else:
        for g in range(config.groups):
            for b in range(n):
                ours = f"body.{g}.blocks.{b}"
                theirs = f"body.{g}.body.{b}.body" if pt else f"body.{g}.residual_group.{b}.rcab"
                convs[f"{theirs}.0"] = f"{ours}.conv1"
                convs[f"{theirs}.2"] = f"{ours}.conv2"
                convs[f"{theirs}.3.conv_du.0" if pt else f"{theirs}.3.attention.1"] = f"{ours}.ca.down"
                convs[f"{theirs}.3.conv_du.2" if pt else f"{theirs}.3.attention.3"] = f"{ours}.ca.up"
            convs[f"body.{g}.body.{n}" if pt else f"body.{g}.conv"] = f"body.{g}.conv"
        convs[f"body.{config.groups}" if pt else "conv_after_body"] = "body_tail"
    for j in (0, 2) if config.scale == 4 else (0,):
        convs[f"tail.0.{j}" if pt else f"upsample.{j}"] = f"upsample.{j}"
    convs["tail.1" if pt else "conv_last"] = "last"
    return {f"{t}.{p}": f"{o}.{p}" for t, o in convs.items() for p in ("weight", "bias")}


def _unwrap(raw: Any, name: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{name} are not a state dict (got {type(raw).__name__})")
    for key in ("params_ema", "params"):
        if isinstance(raw.get(key), Mapping):
            raw = raw[key]
            break
    odd = [k for k in raw if not isinstance(k, str)]
    if odd:
        raise CheckpointError(f"{name} are not a state dict (keys such as {odd[0]!r} are not parameter names)")
    return {k.removeprefix("module."): v for k, v in raw.items()}


def _detect_arch(sd: Mapping[str, Any], layout: str) -> str:
    marker = ".conv_du." if layout == EDSR_PYTORCH else ".residual_group."
    return "rcan" if any(marker in k for k in sd) else "edsr"


def _detect_scale(sd: Mapping[str, Any], layout: str, name: str) -> int:
    pt = layout == EDSR_PYTORCH
    if ("tail.0.2.weight" if pt else "upsample.2.weight") in sd:
        return 4
    first = "tail.0.0.weight" if pt else "upsample.0.weight"
    ratio = _shape(sd, first, name)[0] // _shape(sd, "head.0.weight" if pt else "conv_first.weight", name)[0]
    if ratio not in (4, 9):
        raise CheckpointError(f"{name}: {first} has {ratio}x the channels, not 4x (scale 2) or 9x (scale 3)")
    return 2 if ratio == 4 else 3


def _infer(sd: Mapping[str, Any], arch: str, layout: str, name: str) -> dict[str, Any]:
    """channels / blocks / groups / reduction / res_scale as the shapes and key counts say."""
    pt = layout == EDSR_PYTORCH
    channels = _shape(sd, "head.0.weight" if pt else "conv_first.weight", name)[0]
    if arch == "edsr":
        blocks = _count(sd, "body.{}.body.0.weight" if pt else "body.{}.conv1.weight", name)
        # Not in the weights: the published EDSR (32 x 256) was trained with 0.1, every smaller one with 1.0.
        res_scale = 0.1 if (blocks, channels) == (32, 256) else 1.0
        return {"channels": channels, "blocks": blocks, "res_scale": res_scale}
    groups = _count(sd, "body.{}.body.0.body.0.weight" if pt else "body.{}.residual_group.0.rcab.0.weight", name)
    blocks = _count(sd, "body.0.body.{}.body.0.weight" if pt else "body.0.residual_group.{}.rcab.0.weight", name)
    squeeze = "body.0.body.0.body.3.conv_du.0.weight" if pt else "body.0.residual_group.0.rcab.3.attention.1.weight"
    reduction = channels // max(_shape(sd, squeeze, name)[0], 1)
    return {"channels": channels, "groups": groups, "blocks": blocks, "reduction": reduction}


def _count(sd: Mapping[str, Any], pattern: str, name: str) -> int:
    n = 0
    while pattern.format(n) in sd:
        n += 1
    if n == 0:
        raise CheckpointError(f"{name}: missing key {pattern.format(0)}")
    return n


def _shape(sd: Mapping[str, Any], key: str, name: str) -> tuple[int, ...]:
    t = sd.get(key)
    if t is None:
        raise CheckpointError(f"{name}: missing key {key}")
    if not isinstance(t, Tensor) or t.dim() != 4:
        raise CheckpointError(f"{name}: {key} is not a 4-d conv weight")
    return tuple(t.shape)


def _check_mean_shift(sd: Mapping[str, Any], name: str) -> None:
    mean = torch.tensor(DIV2K_MEAN, dtype=torch.float64) * RGB_RANGE
    eye = torch.eye(3, dtype=torch.float64).view(3, 3, 1, 1)
    for key, sign in (("sub_mean", -1.0), ("add_mean", 1.0)):
        w, b = sd[f"{key}.weight"], sd[f"{key}.bias"]
        ok = (
            isinstance(w, Tensor) and isinstance(b, Tensor) and w.shape == eye.shape and b.shape == (3,)
            and bool((w.double() - eye).abs().max() <= 1e-6)
            and bool((b.double() - sign * mean).abs().max() <= 1e-3)
        )
        if not ok:
            raise CheckpointError(
                f"{name}: {key} is not the standard MeanShift (identity weight, bias {sign:+.0f} * 255 * DIV2K mean "
                f"{DIV2K_MEAN}); weights trained with another rgb_range or mean are not supported"
            )
