"""EDSR (Lim et al., 2017): residual blocks without batch norm, optional residual scaling."""

from __future__ import annotations

from .common import ModelConfig, ResBlock, SRNet


class EDSR(SRNet):
    """EDSR; `num_taps == blocks` (one tap per residual block)."""

    def __init__(self, scale: int = 4, channels: int = 64, blocks: int = 16, res_scale: float = 1.0) -> None:
        config = ModelConfig("edsr", scale, channels, blocks, res_scale=res_scale)
        super().__init__(config, [ResBlock(channels, config.res_scale) for _ in range(blocks)])
