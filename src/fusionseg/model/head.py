"""Cosine head: similarity of each pixel embedding with each class embedding, over a temperature."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CosineHead(nn.Module):
    """pixels ``(B, E, H, W)``, classes ``(B, N, E)`` -> logits ``(B, N, H, W)`` = (cos - bias) / T.

    T is fixed at ``temperature`` (paper: 0.07) unless ``learn_temperature``. A single learned scalar bias,
    shared by all classes (no per-name bias, so nothing is tied to the training vocabulary), sets where the
    0.5 sigmoid threshold falls.
    """

    def __init__(self, temperature: float = 0.07, learn_temperature: bool = False):
        super().__init__()
        t = torch.tensor(math.log(temperature))
        self.log_temperature = nn.Parameter(t, requires_grad=learn_temperature)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, pixels: Tensor, classes: Tensor) -> Tensor:
        p = F.normalize(pixels, dim=1)
        c = F.normalize(classes, dim=-1)
        cos = torch.einsum("behw,bne->bnhw", p, c)
        return (cos - self.bias) / self.log_temperature.exp()
