"""Fusioner: frozen encoders -> fusion transformer -> decoder -> cosine head.

The trainable part (:class:`FusionHead`) works from feature maps alone, so training runs on cached
features; :class:`Fusioner` adds the frozen encoders for inference from pixels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..choices import DEFAULT_PRESET  # noqa: F401 - re-exported: model.fusioner.DEFAULT_PRESET
from .decoder import Decoder
from .fusion import FusionModule
from .head import CosineHead

PRESETS: dict[str, dict] = {
    # CPU-friendly default (see the model card / issue note for the numbers behind it).
    "small": dict(width=256, layers=4, heads=8, mlp=1024, decoder_channels=(96, 64)),
    # The paper's fusion module: D=512, 12 layers, 8 heads, MLP 2048.
    "paper": dict(width=512, layers=12, heads=8, mlp=2048, decoder_channels=(256, 128)),
    # Tiny, for tests.
    "tiny": dict(width=32, layers=1, heads=4, mlp=64, decoder_channels=(16, 16)),
}


@dataclass
class FusionerConfig:
    """Shape of the trainable model. ``visual_strides``/``visual_channels`` describe the image encoder's maps."""

    visual_strides: tuple[int, ...]
    visual_channels: tuple[int, ...]
    text_dim: int
    width: int = 256
    layers: int = 4
    heads: int = 8
    mlp: int = 1024
    decoder_channels: tuple[int, ...] = (96, 64)
    dropout: float = 0.0
    temperature: float = 0.07
    learn_temperature: bool = False
    pos_embed: str = "none"
    fusion: bool = True  # False: the paper's no-fusion ablation (projections + cosine head only)
    prior: bool = False  # True: the bridge's per-class map is an input (model/prior.py), with an "unknown name" token
    preset: str = "custom"

    @classmethod
    def from_preset(cls, preset: str, visual_strides, visual_channels, text_dim: int, **overrides) -> "FusionerConfig":
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        kw = dict(PRESETS[preset])
        kw.update(overrides)
        return cls(tuple(visual_strides), tuple(visual_channels), int(text_dim), preset=preset, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "FusionerConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**kw)

    @property
    def token_stride(self) -> int:
        return max(self.visual_strides)

    def token_levels(self) -> list[int]:
        """Indices of maps pooled to the token grid and concatenated: every map at >= half the token stride."""
        return [i for i, s in enumerate(self.visual_strides) if s >= self.token_stride // 2]

    def skip_levels(self) -> list[int]:
        """Indices of finer maps used as decoder skips, coarsest first, one per stride."""
        out, seen = [], set()
        for i in sorted(range(len(self.visual_strides)), key=lambda i: -self.visual_strides[i]):
            s = self.visual_strides[i]
            if s < self.token_stride and s not in seen:
                seen.add(s)
                out.append(i)
        return out

    @property
    def output_stride(self) -> int:
        return self.token_stride // (2 ** len(self.decoder_channels))


class FusionHead(nn.Module):
    """Everything trainable: token builder, fusion module, decoder, cosine head."""

    def __init__(self, cfg: FusionerConfig):
        super().__init__()
        self.cfg = cfg
        vis_dim = sum(cfg.visual_channels[i] for i in cfg.token_levels())
        embed = cfg.decoder_channels[-1]
        if cfg.fusion:
            self.fusion = FusionModule(vis_dim, cfg.text_dim, cfg.width, cfg.layers, cfg.heads, cfg.mlp,
                                       cfg.dropout, cfg.pos_embed)
        else:  # ablation: per-modality projections, no joint attention
            self.visual_proj = nn.Sequential(nn.LayerNorm(vis_dim), nn.Linear(vis_dim, cfg.width), nn.LayerNorm(cfg.width))
            self.text_proj = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, cfg.width))
        skip_ch = tuple(cfg.visual_channels[i] for i in cfg.skip_levels())
        self.decoder = Decoder(cfg.width, cfg.decoder_channels, skip_ch, embed)
        self.class_proj = nn.Linear(cfg.width, embed)
        self.head = CosineHead(cfg.temperature, cfg.learn_temperature)
        if cfg.prior:
            from .prior import PriorRefine
            self.unknown_token = nn.Parameter(F.normalize(torch.randn(cfg.text_dim), dim=0))
            self.prior_refine = PriorRefine(embed)

    def tokens(self, visual: Sequence[Tensor]) -> tuple[Tensor, tuple[int, int]]:
        """Multi-stride maps -> ``(B, h*w, C)`` tokens on the coarsest grid."""
        levels = self.cfg.token_levels()
        ref = visual[max(levels, key=lambda i: self.cfg.visual_strides[i])]
        h, w = ref.shape[-2:]
        maps = []
        for i in levels:
            m = visual[i]
            if m.shape[-2:] != (h, w):
                m = F.adaptive_avg_pool2d(m.float(), (h, w)).to(m.dtype)
            maps.append(m)
        x = torch.cat(maps, dim=1)
        return x.flatten(2).transpose(1, 2), (h, w)

    def forward(self, visual: Sequence[Tensor], text: Tensor, out_size: tuple[int, int] | None = None,
                text_padding: Tensor | None = None, prior: Tensor | None = None,
                unknown: Tensor | None = None) -> Tensor:
        """visual: encoder maps ``[(B, C_i, H/s_i, W/s_i)]``; text: ``(N, C_t)`` or ``(B, N, C_t)``
        -> logits ``(B, N, H_out, W_out)`` at ``out_size`` (default: the decoder's resolution).

        Models with ``cfg.prior`` also take ``prior`` ``(B, N, h, w)`` (the bridge's logits per class) and
        ``unknown`` ``(N,)`` bool: those classes' text tokens are replaced by the learned unknown-name token."""
        dtype = next(self.parameters()).dtype
        visual = [v.to(dtype) for v in visual]
        tok, (h, w) = self.tokens(visual)
        text = text.to(dtype)
        if unknown is not None and self.cfg.prior and bool(unknown.any()):
            unk = unknown.to(text.device).view(*([1] * (text.dim() - 2)), -1, 1)
            text = torch.where(unk, self.unknown_token.to(dtype).expand_as(text), text)
        b = tok.shape[0]
        if self.cfg.fusion:
            v, t = self.fusion(tok, text, (h, w), text_padding)
        else:
            v = self.visual_proj(tok)
            t = self.text_proj(text if text.dim() == 3 else text.unsqueeze(0).expand(b, -1, -1))
        fmap = v.transpose(1, 2).reshape(b, -1, h, w)
        skips = [visual[i] for i in self.cfg.skip_levels()]
        pix = self.decoder(fmap, skips)
        logits = self.head(pix, self.class_proj(t))
        if self.cfg.prior:
            logits = self.prior_refine(logits, prior, pix)
        if out_size is not None and tuple(logits.shape[-2:]) != tuple(out_size):
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return logits


class Fusioner(nn.Module):
    """Frozen image + text encoders and a trainable :class:`FusionHead`."""

    def __init__(self, image_encoder, text_encoder, head: FusionHead, templates: str | Sequence[str] = "default"):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.head = head
        self.templates = templates

    @property
    def cfg(self) -> FusionerConfig:
        return self.head.cfg

    def forward_features(self, visual: Sequence[Tensor], text: Tensor, out_size=None) -> Tensor:
        """Cached-feature path: see :meth:`FusionHead.forward`."""
        return self.head(visual, text, out_size)

    def scorer(self, mode: str = "fusion", **kw):
        """The scoring policy of this model in ``mode`` (:class:`~fusionseg.model.scoring.Scorer`; ``kw``: its
        providers ``bridge``, ``vocabulary``, ``vocabulary_embeddings`` and the ``combine`` function)."""
        from .scoring import Scorer
        return Scorer(self.head, mode, **kw)

    @torch.no_grad()
    def encode_image(self, pixels: Tensor) -> list[Tensor]:
        return self.image_encoder(pixels)

    @torch.no_grad()
    def encode_text(self, class_names: Sequence[str]) -> Tensor:
        return self.text_encoder.encode(list(class_names), self.templates)

    def score(self, visual: Sequence[Tensor], text: Tensor, scorer=None, names: Sequence[str] | None = None,
              valid=None, bridge_visual=None) -> Tensor:
        """Encoder maps + name embeddings -> logits ``(B, N, hl, wl)`` at the decoder's resolution, scored by
        ``scorer`` (:class:`~fusionseg.model.scoring.Scorer`; None: the trained head for every name)."""
        if scorer is None:
            return self.head(visual, text)
        return scorer(visual, text, names, valid, bridge_visual)

    def forward(self, pixels: Tensor, class_names: Sequence[str], scorer=None) -> Tensor:
        """pixels: normalised ``(B, 3, H, W)``; -> logits ``(B, N, H, W)`` (``scorer``: see :meth:`score`)."""
        visual = self.encode_image(pixels)
        text = self.encode_text(class_names).to(pixels.device)
        if scorer is None:
            return self.head(visual, text, tuple(pixels.shape[-2:]))
        low = self.score(visual, text, scorer, class_names)
        return F.interpolate(low.float(), size=tuple(pixels.shape[-2:]), mode="bilinear", align_corners=False)
