"""RCAN (Zhang et al., 2018): residual groups of residual channel-attention blocks."""

from __future__ import annotations

from .common import ModelConfig, ResidualGroup, SRNet


class RCAN(SRNet):
    """RCAN; `num_taps == groups` (one tap per residual group)."""

    def __init__(
        self,
        scale: int = 4,
        channels: int = 64,
        groups: int = 10,
        blocks: int = 20,
        reduction: int = 16,
        res_scale: float = 1.0,
    ) -> None:
        config = ModelConfig("rcan", scale, channels, blocks, groups, res_scale, reduction)
        super().__init__(
            config, [ResidualGroup(channels, blocks, reduction, config.res_scale) for _ in range(groups)]
        )
