"""Super-resolution architectures (EDSR, RCAN), named presets, checkpoints and published-weight loading.

    model = create_model("edsr_baseline", scale=4)           # or build_model(config_dict)
    sr, feats = model.forward_features(lr, taps=[0, 7, 15])  # distillation taps; model(lr) collects nothing

Imports nothing from `pipeline/`.
"""

from .checkpoint import (FORMAT, CheckpointError, load_checkpoint, model_from_checkpoint, read_torch_file,
                         save_checkpoint)
from .common import DIV2K_MEAN, ModelConfig, SRNet
from .edsr import EDSR
from .published import load_published
from .rcan import RCAN
from .registry import PRESETS, build_model, count_flops, count_params, create_model

__all__ = [
    "DIV2K_MEAN",
    "EDSR",
    "FORMAT",
    "PRESETS",
    "RCAN",
    "CheckpointError",
    "ModelConfig",
    "SRNet",
    "build_model",
    "count_flops",
    "count_params",
    "create_model",
    "load_checkpoint",
    "load_published",
    "model_from_checkpoint",
    "read_torch_file",
    "save_checkpoint",
]
