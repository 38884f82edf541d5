"""Opening a model file (ours or a published EDSR / RCAN state dict) and describing the model presets."""

from __future__ import annotations

from pathlib import Path

from models import (PRESETS, CheckpointError, SRNet, count_flops, count_params, create_model, load_published,
                    model_from_checkpoint, read_torch_file)


def load_model(path: Path, scale: int | None = None) -> SRNet:
    """A model from one of our checkpoints, or from EDSR-PyTorch / BasicSR weights (arch and scale detected).

    A file for another scale than `scale` is a CheckpointError. Never runs code from the file (weights_only).
    """
    raw = read_torch_file(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a checkpoint or a state dict")
    if "format" in raw:
        return model_from_checkpoint(raw, expect_scale=scale, name=f"checkpoint {path}")
    return load_published(raw, scale=scale, name=f"weights {path}")


def models_table(scale: int, lr_hw: tuple[int, int]) -> str:
    h, w = lr_hw
    head = f"{'preset':15s} {'arch':5s} {'ch':>4s} {'groups':>6s} {'blocks':>6s} {'params':>10s} {'GFLOPs':>9s}"
    lines = [f"model presets at x{scale}; FLOPs = 2 x conv multiply-accumulates for one {w}x{h} LR input", head]
    for name in PRESETS:
        model = create_model(name, scale=scale)
        c = model.config
        groups = c["groups"] if c["arch"] == "rcan" else "-"
        lines.append(f"{name:15s} {c['arch']:5s} {c['channels']:4d} {groups:>6} {c['blocks']:6d} "
                     f"{count_params(model):10,d} {count_flops(model, lr_hw) / 1e9:9.2f}")
    return "\n".join(lines)
