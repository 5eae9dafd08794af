"""Segmenter: image(s) + class names -> label map and scores, with the expensive parts cached.

Text embeddings are cached per (name, templates); images are resized so the longer side is the model's
working size (default: the training size), run once through the frozen encoder, and the logits are
upsampled back to the original size in row bands, so a 10,000 x 8,000 photo costs little more memory
than its label map.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data.io import load_image_with_size
from .data.transforms import pad_to, resize_image, round_up, to_tensor
from .model.checkpoint import load_model

MAX_CLASSES = 1000
#: How names are scored: the trained fusion model; the training-free classifier bridge; or the fusion model
#: for names near its training vocabulary and the bridge for the others.
MODES = ("fusion", "bridge", "fusion+bridge")
#: fusion+bridge: a name whose text embedding has cosine >= this with a training name counts as known.
KNOWN_NAME_SIMILARITY = 0.85


@dataclass
class EncodedImage:
    """The frozen encoder's maps for one image: ``visual`` maps, ``padded`` (H, W) fed to the encoder,
    ``valid`` (h, w) of the resized image inside it, ``orig`` (W, H) of the original image."""

    visual: list
    padded: tuple[int, int]
    valid: tuple[int, int]
    orig: tuple[int, int]


@dataclass
class Prediction:
    """labels: ``(H, W)`` uint16 (0 = none of the classes, k = class_names[k-1]); scores: ``(H, W)`` float32
    sigmoid score of the chosen class (for label 0: the best class's score, below the threshold)."""

    labels: np.ndarray
    scores: np.ndarray
    class_names: list[str]

    def summary(self) -> dict:
        """Image size and, per class, pixel fraction and mean score over its pixels."""
        h, w = self.labels.shape
        total = h * w
        counts = np.bincount(self.labels.ravel(), minlength=len(self.class_names) + 1)
        sums = np.bincount(self.labels.ravel(), weights=self.scores.ravel().astype(np.float64),
                           minlength=len(self.class_names) + 1)
        per = {}
        for k, name in enumerate(self.class_names, start=1):
            per[name] = {"label": k, "pixel_fraction": round(counts[k] / total, 6),
                         "mean_score": round(sums[k] / counts[k], 4) if counts[k] else None}
        return {"width": w, "height": h, "classes": list(self.class_names),
                "none_fraction": round(counts[0] / total, 6), "per_class": per}


def parse_class_names(spec: str | Sequence[str], limit: int = MAX_CLASSES) -> list[str]:
    """'cat, sofa, potted plant' or a list -> trimmed names. Raises ValueError on empty, duplicate or too many."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [" ".join(str(n).split()) for n in items]
    if any(not n for n in names) and any(names):
        names = [n for n in names if n]  # tolerate "cat, , dog" trailing commas
    if not names or not any(names):
        raise ValueError("the class list is empty; give names like --classes \"cat, sofa, potted plant\"")
    seen: dict[str, str] = {}
    for n in names:
        key = n.casefold()
        if key in seen:
            raise ValueError(f"duplicate class name {n!r} (same as {seen[key]!r} after trimming and case-folding)")
        seen[key] = n
    if len(names) > limit:
        raise ValueError(f"{len(names)} class names given; the limit is {limit}")
    return names


class Segmenter:
    """Predictor over a trained Fusioner.

    >>> seg = Segmenter.from_pretrained("default")
    >>> pred = seg.predict("photo.jpg", ["cat", "sofa", "potted plant"])
    >>> pred.labels.shape  # (H, W) of the photo
    """

    def __init__(self, model, meta: dict, device: str | torch.device = "cpu", size: int | None = None,
                 threshold: float | None = None, mode: str = "fusion"):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        self.model = model.eval()
        self.meta = meta
        self.device = torch.device(device)
        self.size = int(size or meta.get("image_size", 320))
        self.threshold = float(meta.get("threshold", 0.5) if threshold is None else threshold)
        self._text_cache: dict[str, torch.Tensor] = {}
        self.mode = mode
        self._bridge = None
        self._vocab_emb: torch.Tensor | None = None
        if mode != "fusion":
            self.bridge  # fail now, with the list of encoders that have a classifier, not at the first image

    @property
    def bridge(self):
        """The :class:`~fusionseg.model.bridge.ClassifierBridge` of this model's encoders (built on first use)."""
        if self._bridge is None:
            from .model.bridge import ClassifierBridge
            self._bridge = ClassifierBridge(self.model.image_encoder, self.model.text_encoder)
        return self._bridge

    def known_names(self, names: Sequence[str]) -> list[bool]:
        """Per name: True when its text embedding has cosine >= :data:`KNOWN_NAME_SIMILARITY` with a name the
        model was trained on (a checkpoint without a recorded vocabulary: every name counts as known)."""
        vocab = self.meta.get("training", {}).get("vocabulary") or []
        if not vocab:
            return [True] * len(names)
        if self._vocab_emb is None:
            self._vocab_emb = self.text_embeddings(vocab).float()
        q = self.text_embeddings(list(names)).float()
        return ((q @ self._vocab_emb.T).max(1).values >= KNOWN_NAME_SIMILARITY).tolist()

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "default", device: str | None = None, **kw) -> "Segmenter":
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available here; use --device cpu")
        model, meta = load_model(name_or_path, device)
        return cls(model, meta, device, **kw)

    def text_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        missing = [n for n in names if n not in self._text_cache]
        if missing:
            emb = self.model.encode_text(missing)
            for n, e in zip(missing, emb):
                self._text_cache[n] = e
        return torch.stack([self._text_cache[n] for n in names]).to(self.device)

    @torch.no_grad()
    def encode(self, image) -> "EncodedImage":
        """Load, resize (longer side = working size), pad and run the frozen image encoder once."""
        # Decode at up to twice the working size (JPEG draft mode keeps huge photos cheap), then one
        # antialiased resize as in training, so the result hardly depends on how the file was decoded.
        img, orig = load_image_with_size(image, max_side=2 * max(self.size, 1))
        img = resize_image(img, self.size)
        enc = self.model.image_encoder
        x = enc.normalize(to_tensor(img)[None])
        h, w = x.shape[-2:]
        mult = getattr(enc, "size_multiple", 32)
        x = pad_to(x, round_up(h, mult), round_up(w, mult))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            visual = self.model.encode_image(x.to(self.device))
        return EncodedImage(visual, (x.shape[-2], x.shape[-1]), (h, w), orig)

    @torch.no_grad()
    def logits_from(self, encoded: "EncodedImage", class_names: Sequence[str]) -> torch.Tensor:
        """-> logits ``(N, h, w)`` at the working size, cropped to the image (padding removed), scored as
        :attr:`mode` says (``fusion+bridge``: known names by the fusion model, the others by the bridge)."""
        names = list(class_names)
        text = self.text_embeddings(names)
        h, w = encoded.valid
        with_prior = bool(getattr(self.model.head.cfg, "prior", False))
        unknown = None
        if self.mode == "fusion":
            fused = list(range(len(names)))
        elif self.mode == "bridge":
            fused = []
        elif with_prior:  # one model for all names: unknown ones get the unknown-name token and their prior
            fused = list(range(len(names)))
            unknown = torch.tensor([not k for k in self.known_names(names)], device=self.device)
        else:
            fused = [i for i, k in enumerate(self.known_names(names)) if k]
        bridged = [i for i in range(len(names)) if i not in set(fused)]
        out = torch.empty(len(names), h, w, device=self.device)
        if fused:
            # Known names are decoded together without the others (class tokens attend to each other), so a
            # name's fusion score does not depend on which unknown names were asked alongside it.
            t = text[fused]
            prior = self.bridge.logits(encoded.visual, t) if with_prior else None
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                lg = self.model.head(encoded.visual, t, encoded.padded, prior=prior, unknown=unknown)
            out[fused] = lg[0, :, :h, :w].float()
        if bridged:
            out[bridged] = self.bridge.logits(encoded.visual, text[bridged], encoded.padded)[0, :, :h, :w].float()
        return out

    def foreground(self, encoded: "EncodedImage", name: str, threshold: float | None = None) -> torch.Tensor:
        """One name alone -> ``(H, W)`` bool mask at the original size (sigmoid >= threshold), in row bands."""
        thr = self.threshold if threshold is None else threshold
        W, H = encoded.orig
        lg = self.logits_from(encoded, [name])
        fg = torch.empty(H, W, dtype=torch.bool)
        for y0, y1, band in upsample_rows(lg, (W, H), max(1, 4_000_000 // max(1, W))):
            fg[y0:y1] = band[0].sigmoid().cpu() >= thr
        return fg

    def logits(self, image, class_names: Sequence[str]) -> tuple[torch.Tensor, tuple[int, int]]:
        """-> (logits ``(N, h, w)`` at the working size, original (W, H))."""
        e = self.encode(image)
        return self.logits_from(e, class_names), e.orig

    def predict(self, image, class_names: Sequence[str] | str, threshold: float | None = None,
                background: bool = False) -> Prediction:
        """Label every pixel with one of ``class_names`` or 0 ("none of these").

        A pixel takes the arg-max class if its sigmoid score passes ``threshold`` (default from the checkpoint,
        0.5); with ``background=True`` the plain arg-max is used (name a "background" class yourself).
        """
        names = parse_class_names(class_names)
        thr = self.threshold if threshold is None else float(threshold)
        if not 0.0 <= thr <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {thr}")
        lg, (W, H) = self.logits(image, names)
        labels, scores = labels_from_logits(lg, (W, H), thr, background)
        return Prediction(labels, scores, list(names))


def upsample_rows(lg: torch.Tensor, size: tuple[int, int], rows: int):
    """Yield (y0, y1, band) with ``band`` = logits ``(N, h, w)`` bilinearly resampled to rows y0:y1 of an image
    of ``size`` = (W, H); bands keep memory bounded for huge images."""
    W, H = size
    src = lg[None].float()
    xs = (torch.arange(W, dtype=torch.float32) + 0.5) / W * 2 - 1
    for y0 in range(0, H, rows):
        y1 = min(H, y0 + rows)
        ys = (torch.arange(y0, y1, dtype=torch.float32) + 0.5) / H * 2 - 1
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([gx, gy], -1)[None].to(src.device)
        yield y0, y1, F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def labels_from_logits(lg: torch.Tensor, size: tuple[int, int], threshold: float, background: bool = False):
    """logits ``(N, h, w)`` -> (labels ``(H, W)`` uint16, scores ``(H, W)`` float32) at ``size`` = (W, H)."""
    W, H = size
    n = lg.shape[0]
    labels = np.empty((H, W), dtype=np.uint16)
    scores = np.empty((H, W), dtype=np.float32)
    rows = max(1, int(4_000_000 // max(1, W * n)))  # rows per band: bounded memory
    for y0, y1, up in upsample_rows(lg, size, rows):
        best, idx = up.max(0)
        prob = best.sigmoid()
        lab = idx + 1
        if not background:
            lab = torch.where(prob >= threshold, lab, torch.zeros_like(lab))
        labels[y0:y1] = lab.cpu().numpy().astype(np.uint16)
        scores[y0:y1] = prob.cpu().numpy()
    return labels, scores
