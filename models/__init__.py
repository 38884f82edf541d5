"""Super-resolution architectures (EDSR, RCAN, the re-parameterised `anchor` family), named presets, checkpoints
and published-weight loading.

    model = create_model("edsr_baseline", scale=4)           # or build_model(config_dict)
    sr, feats = model.forward_features(lr, taps=[0, 7, 15])  # distillation taps; model(lr) collects nothing
    deploy = folded(model)                                   # inference form of ANY model (EDSR / RCAN: unchanged)

Imports nothing from `pipeline/`.
"""

from .anchor import AnchorConfig, AnchorNet
from .checkpoint import (FORMAT, CheckpointError, load_checkpoint, model_from_checkpoint, read_torch_file,
                         save_checkpoint)
from .common import DIV2K_MEAN, ModelConfig, SRBase, SRNet, folded
from .ecb import ECB
from .edsr import EDSR
from .published import load_published
from .rcan import RCAN
from .registry import PRESETS, build_model, count_flops, count_params, create_model

__all__ = [
    "DIV2K_MEAN",
    "ECB",
    "EDSR",
    "FORMAT",
    "PRESETS",
    "RCAN",
    "AnchorConfig",
    "AnchorNet",
    "CheckpointError",
    "ModelConfig",
    "SRBase",
    "SRNet",
    "build_model",
    "count_flops",
    "count_params",
    "create_model",
    "folded",
    "load_checkpoint",
    "load_published",
    "model_from_checkpoint",
    "read_torch_file",
    "save_checkpoint",
]
