"""Light upsampling decoder: fused visual tokens (+ optional finer encoder maps as skips) -> pixel embeddings."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    groups = 8 if cout % 8 == 0 else 1
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True))


class Decoder(nn.Module):
    """Rounds of [conv3x3 -> GroupNorm -> ReLU -> bilinear x2 (+ 1x1-projected skip)], then a 1x1 conv.

    x: ``(B, D, h, w)`` at the token stride; skips: maps at token_stride/2, /4, ... (coarsest first, may be
    fewer than rounds) -> ``(B, out_dim, h * 2**rounds, w * 2**rounds)``.
    """

    def __init__(self, in_dim: int, channels: tuple[int, ...], skip_channels: tuple[int, ...], out_dim: int):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.skips = nn.ModuleList()
        cin = in_dim
        for i, c in enumerate(channels):
            self.blocks.append(_conv_block(cin, c))
            self.skips.append(nn.Conv2d(skip_channels[i], c, 1) if i < len(skip_channels) else nn.Identity())
            cin = c
        self.n_skips = min(len(skip_channels), len(channels))
        self.out = nn.Conv2d(cin, out_dim, 1)

    def forward(self, x: Tensor, skips: list[Tensor]) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            if i < self.n_skips:
                s = skips[i]
                if s.shape[-2:] != x.shape[-2:]:
                    x = x[..., : s.shape[-2], : s.shape[-1]] if x.shape[-2] >= s.shape[-2] and x.shape[-1] >= s.shape[-1] \
                        else F.interpolate(x, size=s.shape[-2:], mode="bilinear", align_corners=False)
                x = x + self.skips[i](s.to(x.dtype))
        return self.out(x)
