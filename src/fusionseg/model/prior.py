"""The bridge as an input to the fusion model: a per-class prior map refined by the decoder's pixel features.

For every queried name the semantic bridge (:mod:`fusionseg.model.bridge`) gives a coarse score map at the
token stride. :class:`PriorRefine` adds it to the fusion model's logit through a small convolution that also
sees the pixel features, so the model learns, on the training names, how to turn a coarse "this name is
around here" map into a sharp mask. Trained with *name dropout* (a class's text token replaced by one learned
"unknown name" token, so the only thing telling that class apart is its prior), the same path serves names
the model never saw.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PRIOR_SCALE = 0.25  # bridge logits span about [-8, 6]; scaled to the order of the fusion logits' use here


class PriorRefine(nn.Module):
    """logits ``(B, N, H, W)``, prior ``(B, N, h, w)`` (bridge logits) or None, pixels ``(B, E, H, W)`` ->
    refined logits ``(B, N, H, W)`` = logits + w * prior + conv([logits, prior, reduced pixels]).

    The last convolution and ``w`` start at zero, so a fresh refiner leaves the fusion logits unchanged.
    """

    def __init__(self, pixel_dim: int, reduced: int = 8, hidden: int = 8):
        super().__init__()
        self.reduce = nn.Conv2d(pixel_dim, reduced, 1)
        self.net = nn.Sequential(nn.Conv2d(reduced + 2, hidden, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, 1, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, logits: Tensor, prior: Tensor | None, pixels: Tensor) -> Tensor:
        b, n, h, w = logits.shape
        if prior is None:
            p = torch.zeros_like(logits)
        else:
            p = F.interpolate(prior.to(logits.dtype), size=(h, w), mode="bilinear", align_corners=False) * PRIOR_SCALE
        f = self.reduce(pixels.to(logits.dtype))
        x = torch.cat([(logits / 10).unsqueeze(2), p.unsqueeze(2), f.unsqueeze(1).expand(-1, n, -1, -1, -1)], dim=2)
        delta = self.net(x.flatten(0, 1)).view(b, n, h, w)
        return logits + self.weight * p + delta
