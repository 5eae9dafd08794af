"""Vision transformers through ``transformers``: CLIP vision towers, ViT, DINO, DINOv2, SigLIP.

One map of the last layer's patch tokens after the final norm, class and register tokens dropped:
``(B, 3, H, W) -> [(B, C, H/p, W/p)]`` with ``p`` the patch size (``strides == (p,)``).

* CLIP: ``post_layernorm`` on every token, then ``visual_projection`` (so ``C`` is the joint embedding width,
  as in the paper);
* ViT / DINO (v1 is a ViT checkpoint) / DeiT / DINOv2 (with or without registers): the model's final
  ``layernorm`` (already applied to ``last_hidden_state``);
* SigLIP: ``post_layernorm`` (already applied), no class token.

Position embeddings are interpolated, so any input whose sides are multiples of ``p`` works (the caller pads
to ``size_multiple``).
"""
from __future__ import annotations

import inspect
import json
from typing import Sequence

import torch
from torch import Tensor, nn

from .base import (EncoderError, EncoderSpec, ImageEncoder, fingerprint_state, lean_activations,
                   register_image_encoder)
from ._hf import one_line as _one_line, optional_file, quiet as _quiet, resolve_ref

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

#: model_type -> how its tokens are read ("clip", "vit" (final layernorm applied, CLS first), "siglip").
KINDS = {"clip": "clip", "clip_vision_model": "clip", "vit": "vit", "deit": "vit", "dinov2": "vit",
         "dinov2_with_registers": "vit", "siglip": "siglip", "siglip_vision_model": "siglip"}


class HFVisionEncoder(ImageEncoder):
    """A frozen ``transformers`` ViT-style vision model as a one-level feature map ``[(B, C, H/p, W/p)]``."""

    def __init__(self, name: str, source: str, model: nn.Module, kind: str, mean, std,
                 projection: nn.Module | None = None, classifier: nn.Linear | None = None,
                 labels: Sequence[str] | None = None):
        super().__init__()
        self.model = model.eval()
        lean_activations(self.model)
        self.kind = kind
        self.projection = projection
        # An image-classification checkpoint keeps its head: the semantic bridge (model/bridge.py) reads it per
        # location through the labels' names (id2label), as it does EfficientNet-Lite's ImageNet head.
        self.classifier = classifier
        if classifier is not None:
            self.class_names = tuple(labels or ())
        cfg = model.config
        self.patch = int(cfg.patch_size)
        # Leading non-patch tokens: CLS (+ DeiT's distillation token, + DINOv2's registers); SigLIP has none.
        self.n_skip = 0 if kind == "siglip" else (1 + int(getattr(cfg, "model_type", "") == "deit")
                                                  + int(getattr(cfg, "num_register_tokens", 0) or 0))
        width = int(projection.out_features) if projection is not None else int(cfg.hidden_size)
        self.strides, self.channels = (self.patch,), (width,)
        self.size_multiple = self.patch
        size = getattr(cfg, "image_size", 224) or 224
        self.native_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        params = inspect.signature(model.forward).parameters
        # DINOv2 always interpolates and takes no such argument; ViT, CLIP and SigLIP need it asked for.
        self._interp = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in params else {}
        self.spec = EncoderSpec(name, source, fingerprint_state(self, kind))

    @torch.no_grad()
    def forward(self, pixels: Tensor) -> list[Tensor]:
        """``(B, 3, H, W)`` normalised, ``H`` and ``W`` multiples of the patch -> ``[(B, C, H/p, W/p)]``."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")
        b, _, h, w = pixels.shape
        if h % self.patch or w % self.patch:
            raise ValueError(f"input {h}x{w} must be a multiple of the patch size {self.patch}; pad it first "
                             f"(size_multiple={self.size_multiple})")
        dtype = next(self.model.parameters()).dtype
        tokens = self.model(pixel_values=pixels.to(dtype), **self._interp).last_hidden_state
        if self.kind == "clip":  # CLIP applies post_layernorm only to the pooled token; we want every token
            tokens = self.model.post_layernorm(tokens)
            if self.projection is not None:
                tokens = self.projection(tokens)
        tokens = tokens[:, self.n_skip:]
        gh, gw = h // self.patch, w // self.patch
        if tokens.shape[1] != gh * gw:
            raise RuntimeError(f"{self.spec.name}: got {tokens.shape[1]} patch tokens for a {gh}x{gw} grid")
        return [tokens.transpose(1, 2).reshape(b, -1, gh, gw)]

    def classify_maps(self, maps: list[Tensor]) -> Tensor:
        """Dense class logits ``(B, K, h, w)`` from :meth:`forward`'s map: the checkpoint's classifier (trained on
        the class token) applied to every patch token; a head over [class token, mean patch token] (DINOv2)
        gets [patch token, mean patch token]."""
        if self.classifier is None:
            raise AttributeError(f"{self.spec.name} has no classifier head")
        fmap = maps[-1]
        w, bias = self.classifier.weight, self.classifier.bias
        c = fmap.shape[1]
        if w.shape[1] == 2 * c:
            mean = fmap.mean(dim=(2, 3))
            out = torch.einsum("bchw,kc->bkhw", fmap, w[:, :c].to(fmap.dtype)) \
                + (mean @ w[:, c:].T.to(fmap.dtype))[:, :, None, None]
        else:
            out = torch.einsum("bchw,kc->bkhw", fmap, w.to(fmap.dtype))
        return out + bias.to(fmap.dtype).view(1, -1, 1, 1) if bias is not None else out

    def class_synonyms(self) -> list[list[str]]:
        """Each label's names: id2label entries such as "tabby, tabby cat" are split at the commas."""
        return [[p.strip() for p in str(n).split(",") if p.strip()] or [str(n)] for n in self.class_names]


def _norm_stats(ref: str, local: bool, kind: str) -> tuple[tuple, tuple]:
    """image_mean / image_std from the checkpoint's preprocessor_config.json, else the family's defaults."""
    p = optional_file(ref, "preprocessor_config.json", local)
    if p is not None:
        try:
            d = json.loads(p.read_text())
            mean, std = d.get("image_mean"), d.get("image_std")
            if isinstance(mean, list) and isinstance(std, list) and len(mean) == 3 and len(std) == 3:
                return tuple(mean), tuple(std)
        except (OSError, ValueError):
            pass
    return {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}.get(kind, (IMAGENET_MEAN, IMAGENET_STD))


def _load(ref: str, local: bool, name: str):
    """(vision model, kind, projection or None, (classifier, labels) or None) for a folder or hub id."""
    from transformers import AutoConfig, AutoModel
    _quiet()
    kw = {"local_files_only": True} if local else {}
    cfg = AutoConfig.from_pretrained(ref, **kw)
    mt = getattr(cfg, "model_type", "")
    if mt not in KINDS:
        raise EncoderError(f"{name}: model type {mt!r} is not supported as an image encoder "
                           f"(CLIP, SigLIP, ViT, DeiT, DINO and DINOv2 are)")
    kind = KINDS[mt]
    if kind == "clip":
        from transformers import CLIPVisionModelWithProjection
        vcfg = cfg
        if mt == "clip":  # a full CLIP checkpoint: load only the vision tower and its projection
            vcfg = cfg.vision_config
            vcfg.projection_dim = cfg.projection_dim
        m = CLIPVisionModelWithProjection.from_pretrained(ref, config=vcfg, **kw)
        return m.vision_model, kind, m.visual_projection, None
    if kind == "siglip":
        from transformers import SiglipVisionModel
        vcfg = cfg.vision_config if mt == "siglip" else cfg
        vcfg.vision_use_head = False  # the attention-pooling head is not used for patch tokens
        m = SiglipVisionModel.from_pretrained(ref, config=vcfg, **kw)
        return getattr(m, "vision_model", m), kind, None, None
    labels = _labels(cfg)
    if labels and any(str(a).endswith("ForImageClassification") for a in (getattr(cfg, "architectures", None) or [])):
        from transformers import AutoModelForImageClassification
        m = AutoModelForImageClassification.from_pretrained(ref, **kw)
        head = getattr(m, "classifier", None)  # not a single linear layer: the base model alone, loaded once
        return m.base_model, kind, None, ((head, labels) if isinstance(head, nn.Linear) else None)
    extra = {"add_pooling_layer": False} if mt in ("vit", "deit") else {}
    return AutoModel.from_pretrained(ref, **extra, **kw), kind, None, None


def _labels(cfg) -> list[str] | None:
    """The class names of an image-classification config (id2label in index order), or None when it has only
    transformers' placeholders (LABEL_0, ...) or fewer than two."""
    id2label = getattr(cfg, "id2label", None) or {}
    try:
        labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (TypeError, ValueError):
        return None
    if len(labels) < 2 or all(l.startswith("LABEL_") for l in labels):
        return None
    return labels


@register_image_encoder("hf:")
def build_hf_vision(name: str) -> HFVisionEncoder:
    """``hf:<hub id or folder>``: CLIP / SigLIP vision tower, ViT, DeiT, DINO or DINOv2, e.g.
    ``hf:facebook/dino-vitb16``, ``hf:facebook/dinov2-small``, ``hf:openai/clip-vit-base-patch16``."""
    ref, local = resolve_ref(name, "image")
    try:
        model, kind, projection, head = _load(ref, local, name)
    except EncoderError:
        raise
    except Exception as e:  # transformers raises many types; the user needs one line
        where = "the folder" if local else "the name or your network"
        raise EncoderError(f"could not load image encoder {name}: {_one_line(e)}; check {where}") from None
    mean, std = _norm_stats(ref, local, kind)
    classifier, labels = head if head is not None else (None, None)
    return HFVisionEncoder(name, ref if local else f"hf:{ref}", model, kind, mean, std, projection, classifier, labels)
