"""The runner interface. A runner is a context manager: `activate` allocates (sessions, buffers), `infer` runs,
`deactivate` frees, so only one heavy backend is alive at a time."""

from __future__ import annotations

import numpy as np

from pipeline.data.imresize import bicubic_upscale


class Runner:
    name = "runner"

    def activate(self) -> None:
        pass

    def deactivate(self) -> None:
        pass

    def infer(self, lr: np.ndarray) -> np.ndarray:
        """(h, w, 3) uint8 RGB -> (h*s, w*s, 3) uint8 RGB."""
        raise NotImplementedError

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()


class BicubicRunner(Runner):
    """The baseline every table starts with: MATLAB-exact bicubic upscaling."""

    name = "bicubic"

    def __init__(self, scale: int):
        self.scale = scale

    def infer(self, lr: np.ndarray) -> np.ndarray:
        return bicubic_upscale(lr, self.scale)
