"""Resize / pad / flip / normalise with Pillow and torch (no torchvision)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .datasets import IGNORE


def fit_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(w, h) scaled so the longer side is ``size`` (aspect kept, at least 1 px each)."""
    s = size / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL -> ``(3, H, W)`` float32 in [0, 1]."""
    a = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)


def resize_image(img: Image.Image, size: int) -> Image.Image:
    w, h = fit_size(img.width, img.height, size)
    if (w, h) == img.size:
        return img
    return img.resize((w, h), Image.BILINEAR, reducing_gap=3.0 if max(img.size) > 3 * size else None)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an ``(H, W)`` uint8 mask to ``size`` = (w, h)."""
    if (mask.shape[1], mask.shape[0]) == tuple(size):
        return mask
    return np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))


def pad_to(x: Tensor, h: int, w: int, value: float = 0.0) -> Tensor:
    """Pad the last two dims of ``x`` at the bottom/right to (h, w)."""
    ph, pw = h - x.shape[-2], w - x.shape[-1]
    if ph == 0 and pw == 0:
        return x
    return torch.nn.functional.pad(x, (0, pw, 0, ph), value=value)


def round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def prepare_training_pair(img: Image.Image, mask: np.ndarray, size: int, mean, std) -> tuple[Tensor, Tensor]:
    """Image and mask resized (longer side ``size``) and padded to ``size x size``; padding is ignore.

    -> normalised ``(3, size, size)`` float32 and ``(size, size)`` uint8 mask.
    """
    im = resize_image(img, size)
    m = resize_mask(mask, im.size)
    x = to_tensor(im)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    x = pad_to(x, size, size, 0.0)
    mt = pad_to(torch.from_numpy(m.copy()).to(torch.uint8)[None], size, size, IGNORE)[0]
    return x, mt
