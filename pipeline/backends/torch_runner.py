"""The PyTorch reference runner (FP32)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.backends.base import Runner


class TorchRunner(Runner):
    name = "pytorch-fp32"
    backend = "pytorch"

    def __init__(self, model: torch.nn.Module, device: str = "cpu", **tiling: Any):
        super().__init__(model.scale, **tiling)
        self.model, self.device = model, torch.device(device)

    def activate(self) -> None:
        self.model.to(self.device).eval()

    @torch.inference_mode()
    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(x).to(self.device)).float().cpu().numpy()
