"""Vision transformers through ``transformers``: CLIP vision towers, ViT, DINO, DINOv2.

One map of last-layer patch tokens after the final norm (CLIP: post-layernorm and the visual projection),
class and register tokens dropped: ``(B, 3, H, W) -> [(B, C, H/p, W/p)]``. Position embeddings are
interpolated, so any input size that is a multiple of the patch size works.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .base import EncoderError, EncoderSpec, ImageEncoder, fingerprint_state, register_image_encoder

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class HFVisionEncoder(ImageEncoder):
    def __init__(self, name: str, source: str, model, kind: str, mean, std, projection=None):
        super().__init__()
        self.model = model.eval()
        self.kind = kind
        self.projection = projection
        cfg = model.config
        self.patch = int(cfg.patch_size)
        self.n_skip = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        width = int(projection.out_features) if projection is not None else int(cfg.hidden_size)
        self.strides, self.channels = (self.patch,), (width,)
        self.size_multiple = self.patch
        self.native_size = int(getattr(cfg, "image_size", 224) or 224)
        self.mean, self.std = tuple(mean), tuple(std)
        self.spec = EncoderSpec(name, source, fingerprint_state(self, kind))

    @torch.no_grad()
    def forward(self, pixels: Tensor) -> list[Tensor]:
        b, _, h, w = pixels.shape
        if h % self.patch or w % self.patch:
            raise ValueError(f"input {h}x{w} must be a multiple of the patch size {self.patch}; pad it first")
        out = self.model(pixel_values=pixels, interpolate_pos_encoding=True)
        tokens = out.last_hidden_state
        if self.kind == "clip":
            tokens = self.model.post_layernorm(tokens)
            if self.projection is not None:
                tokens = self.projection(tokens)
        tokens = tokens[:, self.n_skip:]
        gh, gw = h // self.patch, w // self.patch
        return [tokens.transpose(1, 2).reshape(b, -1, gh, gw)]


def _norm_stats(ref: str, local: bool, kind: str):
    if local:
        p = Path(ref) / "preprocessor_config.json"
        if p.is_file():
            d = json.loads(p.read_text())
            if "image_mean" in d and "image_std" in d:
                return d["image_mean"], d["image_std"]
    return (CLIP_MEAN, CLIP_STD) if kind == "clip" else (IMAGENET_MEAN, IMAGENET_STD)


@register_image_encoder("hf:")
def build_hf_vision(name: str) -> HFVisionEncoder:
    ref = name[3:]
    if not ref:
        raise EncoderError("give a hub id or folder after 'hf:', e.g. hf:facebook/dino-vitb16")
    local = Path(ref).exists()
    kw = {"local_files_only": True} if local else {}
    try:
        from transformers import AutoConfig, AutoModel
        from .hf_text import _quiet
        _quiet()
        cfg = AutoConfig.from_pretrained(ref, **kw)
        mt = getattr(cfg, "model_type", "")
        projection = None
        if mt == "clip":
            from transformers import CLIPModel
            full = CLIPModel.from_pretrained(ref, **kw)
            model, projection, kind = full.vision_model, full.visual_projection, "clip"
        elif mt == "clip_vision_model":
            from transformers import CLIPVisionModelWithProjection
            m = CLIPVisionModelWithProjection.from_pretrained(ref, **kw)
            model, projection, kind = m.vision_model, m.visual_projection, "clip"
        elif mt in ("vit", "dinov2", "dinov2_with_registers", "deit"):
            model = AutoModel.from_pretrained(ref, add_pooling_layer=False, **kw) if mt in ("vit", "deit") \
                else AutoModel.from_pretrained(ref, **kw)
            kind = mt
        else:
            raise EncoderError(f"{name}: model type {mt!r} is not supported as an image encoder "
                               f"(CLIP, ViT, DINO, DINOv2 are)")
    except EncoderError:
        raise
    except Exception as e:
        raise EncoderError(f"could not load image encoder {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                           f"check the name or folder (and your network for hub ids)") from None
    mean, std = _norm_stats(ref, local, kind)
    return HFVisionEncoder(name, ref if local else f"hf:{ref}", model, kind, mean, std, projection)
