"""The PyTorch reference runner (FP32)."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.backends.base import Runner
from pipeline.metrics import to_uint8


class TorchRunner(Runner):
    name = "pytorch-fp32"

    def __init__(self, model: torch.nn.Module, device: str = "cpu"):
        self.model, self.device = model, torch.device(device)

    def activate(self) -> None:
        self.model.to(self.device).eval()

    @torch.inference_mode()
    def infer(self, lr: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(lr).permute(2, 0, 1)[None].to(self.device, torch.float32) / 255
        return to_uint8(self.model(x)[0].cpu())
