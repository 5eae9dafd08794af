"""Segmenter: image(s) + class names -> label map and scores, with the expensive parts cached.

Text embeddings are cached in a bounded LRU keyed by (text-encoder fingerprint, templates, name); images are
resized so the longer side is the model's working size (default: the training size), run once through the
frozen encoder, and the logits are upsampled back to the original size in row bands, so a 10,000 x 8,000
photo costs little more memory than its label map. Above a working size of ``AUTO_TILE_ABOVE`` px (or when
``tile`` is asked for) the image is run in overlapping windows whose low-resolution logits are blended, so
memory stays bounded whatever the working size. Several images of one padded shape run as one batch
(:meth:`Segmenter.predict_batch`), with the same result as one at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .choices import MODES
from .data.io import DEFAULT_MAX_PIXELS, load_image_with_size
from .data.transforms import pad_to, resize_image, round_up, to_tensor
from .model.checkpoint import load_model
from .model.scoring import KNOWN_NAME_SIMILARITY, known_from_similarity, resolve_mode
from .textcache import TextCache, build_bridge, vocabulary_embeddings
from .tiling import (DECISIONS, OVERLAP, _frac, _owned, _starts, labels_from_logits, relative_labels, stitch_windows,  # noqa: F401 - re-exported
                     upsample_crop, upsample_rows)

from .names import MAX_CLASSES, parse_class_names  # noqa: F401  (the one class-name policy; re-exported)

# Re-exported here, where they were first defined (callers import them from fusionseg.segmenter).
__all__ = ["Segmenter", "Prediction", "Prepared", "Preparer", "EncodedImage", "TextCache", "parse_class_names",
           "labels_from_logits", "upsample_crop", "upsample_rows", "MAX_CLASSES", "AUTO_TILE_ABOVE", "DEFAULT_TILE",
           "OVERLAP", "check_tta_scales", "KNOWN_NAME_SIMILARITY", "MODES"]

#: Working sizes (longer side, px) above this are tiled automatically (memory), unless ``tile=0``.
AUTO_TILE_ABOVE = 1536
#: Window side (px, at the working size) used by automatic tiling.
DEFAULT_TILE = 768


@dataclass
class EncodedImage:
    """The frozen encoder's maps for one image: ``visual`` maps, ``padded`` (H, W) fed to the encoder,
    ``valid`` (h, w) of the resized image inside it, ``orig`` (W, H) of the original image."""

    visual: list
    padded: tuple[int, int]
    valid: tuple[int, int]
    orig: tuple[int, int]
    canvas: torch.Tensor | None = field(default=None, repr=False)  # the padded input, until the bridge needs it
    bridge_fn: Callable | None = field(default=None, repr=False)   # canvas -> bridge maps (Segmenter.bridge_maps)
    #: test-time augmentation: one (EncodedImage, mirrored) per view; then ``visual`` is None and ``padded`` /
    #: ``valid`` give the working-size grid the views' logits are averaged on
    views: list = field(default_factory=list, repr=False)
    _bridge_visual: list | None = field(default=None, init=False, repr=False)

    @property
    def bridge_visual(self) -> list | None:
        """The encoder's maps of the canvas at the bridge's size (see ``Segmenter.bridge_maps``), made on first
        use, so an image whose names all take the fusion path never pays the extra encoder pass."""
        if self.bridge_fn is not None:
            self._bridge_visual = self.bridge_fn(self.canvas)
            self.bridge_fn = self.canvas = None
        return self._bridge_visual


#: Test-time scales: each a multiple of the working size in this range, at most this many.
TTA_SCALE_RANGE = (0.25, 4.0)
MAX_TTA_SCALES = 6


def check_tta_scales(scales) -> tuple[float, ...]:
    """``scales`` (numbers, or a comma-separated string such as ``"1,1.4"``) -> a tuple of distinct floats in
    :data:`TTA_SCALE_RANGE`; ValueError with one sentence otherwise."""
    items = [t.strip() for t in scales.split(",")] if isinstance(scales, str) else list(scales)
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"test-time scales must be numbers such as 1,1.4, got {scales!r}") from None
    lo, hi = TTA_SCALE_RANGE
    if not out:
        raise ValueError("test-time scales must name at least one scale, e.g. 1")
    if len(out) > MAX_TTA_SCALES:
        raise ValueError(f"at most {MAX_TTA_SCALES} test-time scales (each one is a full pass), got {len(out)}")
    bad = [v for v in out if not lo <= v <= hi]  # nan included
    if bad:
        raise ValueError(f"test-time scales must be between {lo} and {hi} times the working size, got {bad[0]}")
    if len(set(out)) != len(out):
        raise ValueError(f"test-time scales must differ from each other, got {','.join(map(str, out))}")
    return out


#: The bridge's reading size (``bridge_size``, px on the longer side) lies in this range.
BRIDGE_SIZE_RANGE = (32, 4096)


def check_bridge_size(size) -> int | None:
    """``size`` (px, or None for the default) -> int or None; ValueError with one sentence outside
    :data:`BRIDGE_SIZE_RANGE`."""
    if size is None:
        return None
    lo, hi = BRIDGE_SIZE_RANGE
    if not lo <= int(size) <= hi:
        raise ValueError(f"bridge size must be between {lo} and {hi} px, got {size}")
    return int(size)


def uses_tta(scales: Sequence[float], flip: bool) -> bool:
    """Whether these test-time settings read more than the one plain view (the working size, unmirrored)."""
    return bool(flip) or tuple(float(v) for v in scales) != (1.0,)


def test_time_record(scales: Sequence[float], flip: bool, bridge_size: int | None) -> dict:
    """How images are read, as the JSON records say it (a ``segment`` run's summary, ``serve``'s ``/v1/model``,
    a model teacher's description): test-time ``scales``, ``flip`` and the bridge's reading size in effect."""
    from .model.bridge import BRIDGE_SIZE
    return {"scales": [float(v) for v in scales], "flip": bool(flip),
            "bridge_size": BRIDGE_SIZE if bridge_size is None else int(bridge_size)}


def test_time_field(scales: Sequence[float], flip: bool, bridge_size: int | None) -> dict:
    """``{"test_time": record}`` when this reading differs from one plain pass (:func:`test_time_record`), else
    ``{}``: the one rule by which a record that describes a run (a ``segment`` summary, a model teacher) says how
    it read the images."""
    rec = test_time_record(scales, flip, bridge_size)
    return {} if rec == test_time_record((1.0,), False, None) else {"test_time": rec}


@dataclass
class Prepared:
    """One image ready for the encoder (CPU, picklable: made in DataLoader workers).

    ``x``: normalised ``(1, 3, Hp, Wp)`` float32, padded at the bottom/right to the encoder's multiple;
    ``valid``: (h, w) of the resized image inside it; ``orig``: (W, H) of the original image; ``views``: the same
    image prepared at the other working sizes of a multi-scale segmenter (``tta_scales``), by size:
    ``{size: (x, valid)}``."""

    x: torch.Tensor
    valid: tuple[int, int]
    orig: tuple[int, int]
    views: dict = field(default_factory=dict)


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
        n = len(self.class_names) + 1
        counts = np.zeros(n, np.int64)
        sums = np.zeros(n, np.float64)
        rows = max(1, 2_000_000 // max(1, w))  # in row bands: no full-size float64 copy of the scores
        for y0 in range(0, h, rows):
            lab = self.labels[y0:y0 + rows].ravel()
            counts += np.bincount(lab, minlength=n)[:n]
            sums += np.bincount(lab, weights=self.scores[y0:y0 + rows].ravel(), minlength=n)[:n]
        per = {}
        for k, name in enumerate(self.class_names, start=1):
            per[name] = {"label": k, "pixel_fraction": round(counts[k] / total, 6),
                         "mean_score": round(sums[k] / counts[k], 4) if counts[k] else None}
        return {"width": w, "height": h, "classes": list(self.class_names),
                "none_fraction": round(counts[0] / total, 6), "per_class": per}




@dataclass(frozen=True)
class Preparer:
    """image -> :class:`Prepared` for a working ``size``, the encoder's ``mean``/``std`` and padding ``multiple``."""

    size: int
    mean: tuple
    std: tuple
    multiple: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS  # on the size the file declares (the label map is made at that size)
    extra_sizes: tuple[int, ...] = ()  # other working sizes, prepared too (Prepared.views): test-time scales

    def __call__(self, image) -> Prepared:
        # Decode at up to twice the working size (JPEG draft mode keeps huge photos cheap), then one
        # antialiased resize as in training, so the result hardly depends on how the file was decoded.
        img, orig = load_image_with_size(image, max_side=2 * max(self.size, *self.extra_sizes, 1),
                                         max_pixels=self.max_pixels)
        x, valid = self._tensor(img, self.size)
        return Prepared(x, valid, orig, {s: self._tensor(img, s) for s in self.extra_sizes if s != self.size})

    def _tensor(self, img, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
        x = to_tensor(resize_image(img, size))[None]
        x = (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)
        h, w = x.shape[-2:]
        return pad_to(x, round_up(h, self.multiple), round_up(w, self.multiple)), (h, w)


def _region(low: torch.Tensor, padded: tuple[int, int], valid: tuple[int, int]) -> tuple[float, float]:
    """The (w, h) of ``low``'s grid that shows the image, for a canvas ``padded`` (H, W) holding it at ``valid``."""
    (H, W), (h, w) = padded, valid
    return w * low.shape[-1] / W, h * low.shape[-2] / H


class Segmenter:
    """Predictor over a trained Fusioner.

    >>> seg = Segmenter.from_pretrained("default")
    >>> pred = seg.predict("photo.jpg", ["cat", "sofa", "potted plant"])
    >>> pred.labels.shape  # (H, W) of the photo

    ``tile``: window side in px at the working size for sliding-window inference (``None``: automatic, only
    above ``AUTO_TILE_ABOVE`` px; ``0``: never). ``text_cache``: a :class:`TextCache` (shared between
    segmenters if you like); by default a private one of ``text_cache_size`` entries.
    ``tta_scales`` / ``tta_flip``: test-time augmentation (:meth:`predict`, and :meth:`encode` with
    :meth:`logits_from`): the image is also read at these multiples of the working size and/or mirrored, and the
    logits of all views are averaged on the working-size grid before the decision. Each view costs one more
    encoder and fusion pass. ``bridge_size``: the bridge reads a larger view at this size (default
    :data:`~fusionseg.model.bridge.BRIDGE_SIZE`).
    """

    def __init__(self, model, meta: dict, device: str | torch.device = "cpu", size: int | None = None,
                 threshold: float | None = None, tile: int | None = None, text_cache: TextCache | None = None,
                 text_cache_size: int = 4096, mode: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS,
                 decision: str | None = None, tta_scales: Sequence[float] = (1.0,), tta_flip: bool = False,
                 bridge_size: int | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        from .model.bridge import has_classifier
        mode = resolve_mode(mode, has_classifier(model.image_encoder))
        self.model = model.eval()
        self.meta = meta
        self.device = torch.device(device)
        self.size = int(size or meta.get("image_size", 320))
        if self.size < 8:
            raise ValueError(f"working size must be at least 8 px, got {self.size}")
        self.threshold = float(meta.get("threshold", 0.5) if threshold is None else threshold)
        #: How "none of these" is decided when a call gives no threshold: ``threshold`` or ``relative``
        #: (:func:`~fusionseg.tiling.relative_labels`); from the checkpoint (``meta["decision"]``), else
        #: ``threshold`` (in ``bridge`` mode always ``threshold`` unless asked). A threshold given here or to a call
        #: means the threshold decision.
        self.decision = self._decision(decision, threshold,
                                       "threshold" if mode == "bridge" else meta.get("decision", "threshold"))
        if tile is not None and tile != 0 and tile < 64:
            raise ValueError(f"tile must be 0 (off) or at least 64 px, got {tile}")
        self.tile = tile
        if int(max_pixels) < 1:
            raise ValueError(f"max_pixels must be at least 1, got {max_pixels}")
        self.max_pixels = int(max_pixels)  # largest image (width x height as declared), refused before decoding
        self.tta_scales = check_tta_scales(tta_scales)
        self.tta_flip = bool(tta_flip)
        from .model.bridge import BRIDGE_SIZE
        #: The bridge reads a canvas larger than this (longer side, px) at this size (the ImageNet head loses whole
        #: objects in the stride-32 cells of a large canvas); at or below it, the canvas's own maps.
        bridge_size = check_bridge_size(bridge_size)
        self.bridge_size = BRIDGE_SIZE if bridge_size is None else bridge_size
        self.text_cache = text_cache if text_cache is not None else TextCache(text_cache_size)
        self.mode = mode
        self._bridge = None
        self._vocab_emb: torch.Tensor | None = None
        if mode != "fusion":  # fail now, naming the encoders that have a classifier; build the bridge on first use
            from .model.bridge import require_classifier
            require_classifier(model.image_encoder)
        #: The scoring policy (:class:`~fusionseg.model.scoring.Scorer`): modes, known names, the bridge.
        self.scorer = model.scorer(mode, bridge=lambda: self.bridge,
                                   vocabulary=meta.get("training", {}).get("vocabulary") or [],
                                   vocabulary_embeddings=self._vocabulary_embeddings,
                                   support=meta.get("training", {}).get("name_images"))

    @property
    def bridge(self):
        """The :class:`~fusionseg.model.bridge.ClassifierBridge` of this model's encoders (built on first use)."""
        if self._bridge is None:
            self._bridge = build_bridge(self.model.image_encoder, self.model.text_encoder)
        return self._bridge

    def _vocabulary_embeddings(self) -> torch.Tensor:
        if self._vocab_emb is None:  # kept on disk (FUSIONSEG_CACHE): embedding it takes ~2 s per process
            vocab = self.meta.get("training", {}).get("vocabulary") or []
            self._vocab_emb = vocabulary_embeddings(vocab, self.model.templates, self.model.text_encoder) \
                .to(self.device).float()
        return self._vocab_emb

    def known_names(self, names: Sequence[str]) -> list[bool]:
        """Per name: True when its text embedding has cosine >= :data:`KNOWN_NAME_SIMILARITY` with a name the
        model was trained on (a checkpoint without a recorded vocabulary: every name counts as known)."""
        return known_from_similarity(self.name_similarity(names), len(names))

    def name_similarity(self, names: Sequence[str]) -> torch.Tensor | None:
        """``(N,)`` max cosine of each name's text embedding with the training vocabulary (None: the checkpoint
        records none); names all in the vocabulary are not embedded at all."""
        return self.scorer.similarity(list(names), lambda: self.text_embeddings(list(names)))

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "default", device: str | None = None, runtime: str = "torch",
                        **kw) -> "Segmenter":
        if runtime != "torch":  # onnxruntime: name_or_path is a `fusionseg export` folder (fusionseg.export.onnx)
            from .export.onnx import onnx_segmenter
            return onnx_segmenter(cls, name_or_path, device, runtime, **kw)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available here; use --device cpu")
        model, meta = load_model(name_or_path, device)
        return cls(model, meta, device, **kw)

    # ------------------------------------------------------------------------------------------ text
    def _text_key(self, name: str) -> tuple:
        return TextCache.key(self.model.text_encoder.spec.fingerprint, self.model.templates, name)

    def text_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """-> ``(N, C_t)`` on the model's device; names missing from the LRU are encoded in one call."""
        keys = [self._text_key(n) for n in names]
        got = {k: self.text_cache.get(k) for k in dict.fromkeys(keys)}
        missing = [k for k, v in got.items() if v is None]
        if missing:
            emb = self.model.encode_text([k[2] for k in missing])
            for k, e in zip(missing, emb):
                got[k] = e
                self.text_cache.put(k, e)
        if not keys:
            return torch.zeros(0, self.model.text_encoder.dim, device=self.device)
        return torch.stack([got[k] for k in keys]).to(self.device)

    # ------------------------------------------------------------------------------------------ images
    def prepare(self, image) -> Prepared:
        """Load, resize (longer side = working size), normalise and pad; CPU only (see :class:`Preparer`)."""
        return self.preparer()(image)

    def preparer(self) -> "Preparer":
        """A small picklable callable doing :meth:`prepare` (for DataLoader worker processes)."""
        enc = self.model.image_encoder
        return Preparer(self.size, tuple(enc.mean), tuple(enc.std), int(getattr(enc, "size_multiple", 32)),
                        self.max_pixels, tuple(self._tta_size(s) for s in self.tta_scales if s != 1.0))

    @property
    def tta(self) -> bool:
        """Whether label maps average several views (``tta_scales`` other than the working size alone, or
        ``tta_flip``)."""
        return uses_tta(self.tta_scales, self.tta_flip)

    @property
    def test_time(self) -> dict:
        """:func:`test_time_record` of this segmenter's reading settings."""
        return test_time_record(self.tta_scales, self.tta_flip, self.bridge_size)

    def _tta_size(self, scale: float) -> int:
        return max(8, int(round(self.size * scale)))

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    @torch.inference_mode()
    def encode(self, image) -> "EncodedImage":
        """Load, resize (longer side = working size), pad and run the frozen image encoder once (with test-time
        augmentation: once per view, :meth:`logits_from` averaging them)."""
        p = image if isinstance(image, Prepared) else self.prepare(image)
        if self.tta:
            return EncodedImage(None, (p.x.shape[-2], p.x.shape[-1]), p.valid, p.orig,
                                views=[(self._encode_one(v), flip) for v, flip in self._tta_views(p)])
        return self._encode_one(p)

    def _encode_one(self, p: Prepared) -> "EncodedImage":
        with self._autocast():
            x = p.x.to(self.device)
            visual = self.model.encode_image(x)
        return EncodedImage(visual, (p.x.shape[-2], p.x.shape[-1]), p.valid, p.orig, x, self._bridge_maps_later)

    @torch.inference_mode()
    def _bridge_maps_later(self, x: torch.Tensor) -> list | None:
        with self._autocast():
            return self.bridge_maps(x)

    def _uses_bridge(self, names: Sequence[str]) -> bool:
        """Whether scoring ``names`` in this mode reads the bridge (its maps are made only then, on first read)."""
        return self.scorer.uses_bridge(list(names), lambda: self.text_embeddings(list(names)))

    def bridge_maps(self, x: torch.Tensor) -> list | None:
        """Padded input canvas ``(B, 3, H, W)`` -> the encoder's maps of the same canvas scaled so its longer side
        is :attr:`bridge_size` (default :data:`~fusionseg.model.bridge.BRIDGE_SIZE`; sides rounded up to the
        encoder's multiple), for the bridge; None when the bridge is not used or the canvas is already that small (a test-time view larger
        than that is read by the bridge at that size, as a larger working size is)."""
        H, W = x.shape[-2:]
        if self.mode == "fusion" or max(H, W) <= self.bridge_size:
            return None
        f = self.bridge_size / max(H, W)
        m = int(getattr(self.model.image_encoder, "size_multiple", 32))
        size = (max(m, round_up(round(H * f), m)), max(m, round_up(round(W * f), m)))
        small = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.model.encode_image(small)

    @torch.inference_mode()
    def logits_from(self, encoded: "EncodedImage", class_names: Sequence[str]) -> torch.Tensor:
        """-> logits ``(N, h, w)`` at the working size, cropped to the image (padding removed), scored as
        :attr:`mode` says."""
        names = list(class_names)
        text = self.text_embeddings(names)
        if encoded.views:  # test-time views, averaged on the working-size grid
            def view_logits(ev: EncodedImage) -> tuple[torch.Tensor, tuple[float, float]]:
                with self._autocast():
                    low = self.low_logits(ev.visual, names, text, [_frac(ev.valid, ev.padded)],
                                          lambda: ev.bridge_visual)[0].float()
                return low, _region(low, ev.padded, ev.valid)
            return self._mean_on_grid(((*view_logits(ev), flip) for ev, flip in encoded.views), encoded.valid)
        with self._autocast():
            low = self.low_logits(encoded.visual, names, text, [_frac(encoded.valid, encoded.padded)],
                                  lambda: encoded.bridge_visual)
        return upsample_crop(low, encoded.padded, encoded.valid)[0].float()

    def low_logits(self, visual, names: Sequence[str], text: torch.Tensor,
                   valid: Sequence[tuple[float, float]] | None = None, bridge_visual=None) -> torch.Tensor:
        """Encoder maps + names -> logits ``(B, N, hl, wl)`` at the decoder's resolution, scored as :attr:`mode`
        says: ``fusion`` the trained model; ``bridge`` the classifier bridge; ``fusion+bridge`` the model for
        names near its training vocabulary and, for the others, the bridge sharpened by the model's own map of
        those names (:func:`~fusionseg.model.bridge.refine_with_model`); a model trained with the bridge as
        input instead takes every name, the unknown ones with its unknown-name token.
        ``valid``: per batch item the (height, width) fractions of the maps that show the image (default all);
        ``bridge_visual``: :meth:`bridge_maps` of the same canvas, or a callable giving them on first use (the
        bridge reads those when given). The policy is :attr:`scorer` (:mod:`fusionseg.model.scoring`)."""
        return self.model.score(visual, text, self.scorer, names, valid, bridge_visual)

    def foreground(self, encoded: "EncodedImage", name: str, threshold: float | None = None) -> torch.Tensor:
        """One name alone -> ``(H, W)`` bool mask at the original size (sigmoid >= threshold): its label map, where
        a pixel is labelled 1 exactly when the name's score passes the threshold."""
        thr = self.threshold if threshold is None else threshold
        labels, _ = labels_from_logits(self.logits_from(encoded, [name]), encoded.orig, thr)
        return torch.from_numpy(labels == 1)

    def logits(self, image, class_names: Sequence[str]) -> tuple[torch.Tensor, tuple[int, int]]:
        """-> (logits ``(N, h, w)`` at the working size, original (W, H))."""
        e = self.encode(image)
        return self.logits_from(e, class_names), e.orig

    @staticmethod
    def _decision(decision: str | None, threshold: float | None, default: str) -> str:
        """The decision to make: ``decision`` if given, ``threshold`` when a threshold is given, else ``default``
        (for a call: the segmenter's; at construction: the checkpoint's, except in ``bridge`` mode, which keeps the
        threshold: the checkpoint's decision was chosen on its model's scores, and the bridge's faint, flat maps
        of absent names would pass the relative one's presence gate)."""
        if decision is None:
            decision = "threshold" if threshold is not None else default
        if decision not in DECISIONS:
            raise ValueError(f"unknown decision {decision!r}; use one of {', '.join(DECISIONS)}")
        return decision

    def _check(self, class_names, threshold) -> tuple[list[str], float]:
        names = parse_class_names(class_names)
        thr = self.threshold if threshold is None else float(threshold)
        if not 0.0 <= thr <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {thr}")
        return names, thr

    @staticmethod
    def _labels(lg: torch.Tensor, orig, thr: float, background: bool, decision: str, region=None):
        if decision == "relative" and not background:
            return relative_labels(lg, orig, region=region)
        return labels_from_logits(lg, orig, thr, background, region=region)

    def _tile_for(self, p: Prepared) -> int:
        """Window side for this image, or 0 for one pass over the whole image."""
        longer = max(p.valid)
        if self.tile == 0:
            return 0
        t = self.tile if self.tile is not None else (DEFAULT_TILE if longer > AUTO_TILE_ABOVE else 0)
        return t if t and longer > t else 0

    def predict(self, image, class_names: Sequence[str] | str, threshold: float | None = None,
                background: bool = False, decision: str | None = None) -> Prediction:
        """Label every pixel with one of ``class_names`` or 0 ("none of these").

        ``decision`` (default :attr:`decision`; ``threshold`` whenever a threshold is given): ``threshold``: a
        pixel takes the arg-max class if its sigmoid score passes ``threshold`` (default from the checkpoint,
        0.5); ``relative``: each name is measured against its own peak in the image
        (:func:`~fusionseg.tiling.relative_labels`). With ``background=True`` the plain arg-max is used (name a
        "background" class yourself).
        """
        names, thr = self._check(class_names, threshold)
        p = image if isinstance(image, Prepared) else self.prepare(image)
        return self.predict_batch([p], names, threshold, background, decision)[0]

    @torch.inference_mode()
    def predict_batch(self, images: Sequence, class_names: Sequence[str] | str, threshold: float | None = None,
                      background: bool = False, decision: str | None = None) -> list[Prediction]:
        """:meth:`predict` for several images: images of one padded shape go through the encoder and the
        fusion head as one batch (same results as one at a time; shapes never mix, since padding would
        change the attention). ``images``: anything :meth:`predict` takes, or :class:`Prepared`."""
        names, thr = self._check(class_names, threshold)
        decision = self._decision(decision, threshold, self.decision)
        preps = [im if isinstance(im, Prepared) else self.prepare(im) for im in images]
        text = self.text_embeddings(names)
        if self.tta:
            return [Prediction(*self._labels(self.tta_logits(p, names, text), p.orig, thr, background, decision),
                               list(names)) for p in preps]
        out: list[Prediction | None] = [None] * len(preps)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(preps):
            if self._tile_for(p):
                lr, region = self._tiled_lowres(p, text, self._tile_for(p), names)
                labels, scores = self._labels(lr, p.orig, thr, background, decision, region=region)
                out[i] = Prediction(labels, scores, list(names))
            else:
                groups.setdefault(tuple(p.x.shape[-2:]), []).append(i)
        for shape, idx in groups.items():
            x = torch.cat([preps[i].x for i in idx]).to(self.device)
            with self._autocast():
                visual = self.model.encode_image(x)
                low = self.low_logits(visual, names, text, [_frac(preps[i].valid, shape) for i in idx],
                                      lambda: self.bridge_maps(x))  # (B, N, Hp/os, Wp/os)
            for b, i in enumerate(idx):
                lg = upsample_crop(low[b:b + 1], shape, preps[i].valid)[0].float()
                labels, scores = self._labels(lg, preps[i].orig, thr, background, decision)
                out[i] = Prediction(labels, scores, list(names))
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def tta_logits(self, p: Prepared, names: Sequence[str], text: torch.Tensor) -> torch.Tensor:
        """Test-time augmentation: logits ``(N, h, w)`` on the working-size grid of ``p`` (padding removed), the
        mean over every view: each of :attr:`tta_scales` (the image prepared at that multiple of the working size;
        from ``p.views``, else resampled from ``p``), and with :attr:`tta_flip` each of those mirrored too (its
        logits mirrored back)."""
        return self._mean_on_grid(((*self._lowres(v, text, names), flip) for v, flip in self._tta_views(p)), p.valid)

    def _tta_views(self, p: Prepared) -> list[tuple[Prepared, bool]]:
        """The views of test-time augmentation: ``p`` at each of :attr:`tta_scales` and, with :attr:`tta_flip`,
        each mirrored inside its canvas (the padding stays at the bottom/right); (view, mirrored) pairs."""
        out = []
        for scale in self.tta_scales:
            x, valid = self._view(p, self._tta_size(scale))
            out.append((Prepared(x, valid, p.orig), False))
            if self.tta_flip:
                xv = x.clone()
                xv[..., :valid[0], :valid[1]] = x[..., :valid[0], :valid[1]].flip(-1)
                out.append((Prepared(xv, valid, p.orig), True))
        return out

    @staticmethod
    def _mean_on_grid(views, valid: tuple[int, int]) -> torch.Tensor:
        """(logits ``(N, hl, wl)``, the ``region`` (w, h) of them that shows the image, mirrored) per view ->
        their mean ``(N, h, w)`` on the working-size grid ``valid`` = (h, w), each mirrored view mirrored back."""
        h, w = valid
        total, k = None, 0
        for low, region, flip in views:
            lg = next(upsample_rows(low, (w, h), h, region))[2]
            lg = lg.flip(-1) if flip else lg
            total, k = (lg if total is None else total.add_(lg)), k + 1
        return total / k

    def _view(self, p: Prepared, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """``p`` at working size ``size``: its prepared view, or (made elsewhere, without views) resampled."""
        if size == self.size:
            return p.x, p.valid
        if size in p.views:
            return p.views[size]
        h, w = p.valid
        f = size / max(h, w)
        nh, nw = max(1, round(h * f)), max(1, round(w * f))
        x = F.interpolate(p.x[..., :h, :w], size=(nh, nw), mode="bilinear", align_corners=False, antialias=f < 1)
        m = int(getattr(self.model.image_encoder, "size_multiple", 32))
        return pad_to(x, round_up(nh, m), round_up(nw, m)), (nh, nw)

    def _lowres(self, p: Prepared, text: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, tuple[float, float]]:
        """One image -> (logits ``(N, hl, wl)`` at the decoder's stride over its canvas, the image's (w, h) in
        those pixels): sliding windows where :meth:`_tile_for` says so, else one pass."""
        tile = self._tile_for(p)
        if tile:
            return self._tiled_lowres(p, text, tile, names)
        x = p.x.to(self.device)
        with self._autocast():
            visual = self.model.encode_image(x)
            low = self.low_logits(visual, names, text, [_frac(p.valid, tuple(x.shape[-2:]))],
                                  lambda: self.bridge_maps(x))[0].float()
        return low, _region(low, tuple(x.shape[-2:]), p.valid)

    @torch.inference_mode()
    def _tiled_lowres(self, p: Prepared, text: torch.Tensor, tile: int, names: Sequence[str]) -> tuple[torch.Tensor, tuple[float, float]]:
        """Sliding-window encoding: the frozen encoder runs on overlapping windows of ``tile`` px (its activations
        are what grows with the image), each window's feature maps are kept where it owns the image (up to the
        middle of each overlap, away from its padded borders) and stitched; the fusion transformer, decoder and
        head then run once over the whole stitched grid, so every class still competes across the whole image.
        -> (logits ``(N, hc, wc)`` at the decoder's stride, the image's (w, h) in those canvas pixels)."""
        enc, cfg = self.model.image_encoder, self.model.cfg
        a = math.lcm(int(getattr(enc, "size_multiple", 32)), int(cfg.token_stride), *map(int, enc.strides))
        os_ = int(cfg.output_stride)
        h, w = p.valid
        x = pad_to(p.x, round_up(p.x.shape[-2], a), round_up(p.x.shape[-1], a))
        Hp, Wp = x.shape[-2:]
        t = round_up(max(int(tile), a), a)

        def encode(xb: torch.Tensor) -> list:
            with self._autocast():
                return self.model.encode_image(xb)

        maps = stitch_windows(x, t, a, enc.strides, encode, self.device)
        with self._autocast():
            low = self.low_logits(maps, names, text, [_frac((h, w), (Hp, Wp))],
                                  lambda: self.bridge_maps(x.to(self.device)))
        return low[0].float(), (w / os_, h / os_)
