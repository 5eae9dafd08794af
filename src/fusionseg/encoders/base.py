"""Encoder interfaces, specs and the name registry.

Image encoders map normalised pixels ``(B, 3, H, W)`` to a list of feature maps
``[(B, C_i, H / s_i, W / s_i)]`` with ``strides`` and ``channels`` declared up front.
Text encoders map class names to L2-normalised embeddings ``(N, dim)``.
Both are frozen: eval mode, ``requires_grad=False``, called under ``torch.no_grad()``.

The registry (``register_*_encoder`` / ``build_*_encoder``) imports no implementation: each implementation
module registers its names when imported, and the package (``fusionseg/encoders/__init__.py``) imports them
all, so any import of ``fusionseg.encoders.*`` sees the full table (as timm's model registry works).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, asdict
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..runtime import fast_paths


class EncoderError(ValueError):
    """An encoder name or folder that cannot be built (message says what to do)."""


@dataclass(frozen=True)
class EncoderSpec:
    """Identity of a frozen encoder: its public name, where it came from, a fingerprint of its weights."""

    name: str
    source: str
    fingerprint: str

    def to_dict(self) -> dict:
        return asdict(self)


def fingerprint_state(module: nn.Module, extra: str = "") -> str:
    """A short hash of a module's parameters and buffers: names, dtypes, shapes and every byte of the values.

    Exact bytes (no float reductions), so the same weights give the same fingerprint on any machine,
    thread count or torch build.
    """
    h = hashlib.sha256(extra.encode())
    for key, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool
                     else t.numpy().tobytes())
    return h.hexdigest()[:16]


class InplaceQuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)`` (CLIP's activation) with one fewer temporary: the product is written into the
    sigmoid's own output. Bitwise the same as ``transformers``' ``QuickGELUActivation``; on the CPU it saves
    about 6% of a CLIP ViT-B/16 forward (the 3072-wide temporaries cost page faults, not arithmetic). Falls back
    to the plain form when autograd needs the sigmoid's output, or when the fast paths are off
    (:func:`fusionseg.runtime.fast_paths`)."""

    def forward(self, x: Tensor) -> Tensor:
        y = torch.sigmoid(1.702 * x)
        if (torch.is_grad_enabled() and x.requires_grad) or not fast_paths():
            return x * y
        return y.mul_(x)


def lean_activations(module: nn.Module) -> int:
    """Swap every ``transformers`` QuickGELU in ``module`` for :class:`InplaceQuickGELU` (same values);
    -> how many were swapped. Used on the frozen encoders, which run without gradients."""
    n = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "QuickGELUActivation":
                setattr(parent, name, InplaceQuickGELU())
                n += 1
    return n


class ImageEncoder(nn.Module):
    """Frozen image encoder: normalised pixels -> multi-stride feature maps.

    Subclasses set ``spec``, ``mean``, ``std``, ``strides``, ``channels`` and implement ``forward``.
    ``forward(pixels: (B, 3, H, W)) -> list[(B, C_i, ceil(H / s_i), ceil(W / s_i))]``, ordered by stride.
    Optionally ``class_names`` (tuple of str) and ``classify(pixels) -> (B, K, h, w)`` logits when the
    encoder has a classifier head over named classes.
    """

    spec: EncoderSpec
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    strides: tuple[int, ...]
    channels: tuple[int, ...]
    #: Side length (px) the encoder was pretrained at; a sensible default inference size.
    native_size: int = 224
    #: Inputs are padded to a multiple of this.
    size_multiple: int = 32

    def freeze(self) -> "ImageEncoder":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "ImageEncoder":  # frozen: always eval (BN statistics stay fixed)
        return super().train(False)

    def normalize(self, pixels01: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> normalised input for ``forward``."""
        mean = torch.tensor(self.mean, dtype=pixels01.dtype, device=pixels01.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=pixels01.dtype, device=pixels01.device).view(1, 3, 1, 1)
        return (pixels01 - mean) / std


class TextEncoder(nn.Module):
    """Frozen text encoder: class names -> ``(N, dim)`` L2-normalised embeddings."""

    spec: EncoderSpec
    dim: int

    def freeze(self) -> "TextEncoder":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(False)

    def encode(self, class_names: Sequence[str], templates: Sequence[str] | str | None = "default") -> Tensor:
        raise NotImplementedError


_IMAGE: dict[str, Callable[[str], ImageEncoder]] = {}
_TEXT: dict[str, Callable[[str], TextEncoder]] = {}


def register_image_encoder(prefix: str):
    def deco(fn):
        _IMAGE[prefix] = fn
        return fn
    return deco


def register_text_encoder(prefix: str):
    def deco(fn):
        _TEXT[prefix] = fn
        return fn
    return deco


def _lookup(table: dict, name: str, kind: str):
    if name in table:
        return table[name]
    for prefix, fn in table.items():
        if prefix.endswith(":") and name.startswith(prefix):
            return fn
    known = ", ".join(sorted(k + ("<repo or folder>" if k.endswith(":") else "") for k in table))
    raise EncoderError(f"unknown {kind} encoder {name!r}; known: {known}")


def build_image_encoder(name: str) -> ImageEncoder:
    """Build a frozen image encoder by name, e.g. ``efficientnet-lite0`` or ``hf:facebook/dino-vits16``."""
    return _lookup(_IMAGE, name, "image")(name).freeze()


def build_text_encoder(name: str) -> TextEncoder:
    """Build a frozen text encoder by name, e.g. ``minilm-l6`` or ``hf:openai/clip-vit-base-patch16``."""
    return _lookup(_TEXT, name, "text")(name).freeze()


def available_encoders() -> dict[str, list[str]]:
    return {"image": sorted(_IMAGE), "text": sorted(_TEXT)}

