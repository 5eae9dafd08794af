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
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .choices import MODES
from .data.io import load_image_with_size
from .data.transforms import pad_to, resize_image, round_up, to_tensor
from .labelmap import argmax_classes, resample_argmax, write_band
from .model.bridge import refine_with_model
from .model.checkpoint import load_model

MAX_CLASSES = 1000
#: Working sizes (longer side, px) above this are tiled automatically (memory), unless ``tile=0``.
AUTO_TILE_ABOVE = 1536
#: Window side (px, at the working size) used by automatic tiling.
DEFAULT_TILE = 768
#: Fraction of a window shared with its neighbour (features are kept up to the middle of the overlap).
OVERLAP = 0.5
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
    canvas: torch.Tensor | None = field(default=None, repr=False)  # the padded input, until the bridge needs it
    bridge_fn: Callable | None = field(default=None, repr=False)   # canvas -> bridge maps (Segmenter.bridge_maps)
    _bridge_visual: list | None = field(default=None, init=False, repr=False)

    @property
    def bridge_visual(self) -> list | None:
        """The encoder's maps of the canvas at the bridge's size (see ``Segmenter.bridge_maps``), made on first
        use, so an image whose names all take the fusion path never pays the extra encoder pass."""
        if self.bridge_fn is not None:
            self._bridge_visual = self.bridge_fn(self.canvas)
            self.bridge_fn = self.canvas = None
        return self._bridge_visual


@dataclass
class Prepared:
    """One image ready for the encoder (CPU, picklable: made in DataLoader workers).

    ``x``: normalised ``(1, 3, Hp, Wp)`` float32, padded at the bottom/right to the encoder's multiple;
    ``valid``: (h, w) of the resized image inside it; ``orig``: (W, H) of the original image."""

    x: torch.Tensor
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


class TextCache:
    """A bounded LRU of text embeddings keyed by (text-encoder fingerprint, templates, name).

    The key names everything the embedding depends on, so one cache may be shared by several models: two
    models with the same text encoder and templates reuse each other's entries, others never collide.
    Entries are ``(dim,)`` float tensors; ``hits``/``misses`` count look-ups (for benchmarks and tests).
    """

    def __init__(self, maxsize: int = 4096):
        if maxsize < 1:
            raise ValueError(f"text cache size must be at least 1, got {maxsize}")
        self.maxsize = int(maxsize)
        self._d: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # a server shares one Segmenter between worker threads
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(fingerprint: str, templates, name: str) -> tuple:
        t = templates if isinstance(templates, str) or templates is None else tuple(str(s) for s in templates)
        return (str(fingerprint), t, name)

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self.hits += 1
            self._d.move_to_end(key)
            return v

    def put(self, key: tuple, value: torch.Tensor) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.maxsize:
                self._d.popitem(last=False)

    def clear(self) -> None:
        self._d.clear()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: tuple) -> bool:
        return key in self._d


@dataclass(frozen=True)
class Preparer:
    """image -> :class:`Prepared` for a working ``size``, the encoder's ``mean``/``std`` and padding ``multiple``."""

    size: int
    mean: tuple
    std: tuple
    multiple: int = 32

    def __call__(self, image) -> Prepared:
        # Decode at up to twice the working size (JPEG draft mode keeps huge photos cheap), then one
        # antialiased resize as in training, so the result hardly depends on how the file was decoded.
        img, orig = load_image_with_size(image, max_side=2 * max(self.size, 1))
        img = resize_image(img, self.size)
        x = to_tensor(img)[None]
        x = (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)
        h, w = x.shape[-2:]
        x = pad_to(x, round_up(h, self.multiple), round_up(w, self.multiple))
        return Prepared(x, (h, w), orig)


class Segmenter:
    """Predictor over a trained Fusioner.

    >>> seg = Segmenter.from_pretrained("default")
    >>> pred = seg.predict("photo.jpg", ["cat", "sofa", "potted plant"])
    >>> pred.labels.shape  # (H, W) of the photo

    ``tile``: window side in px at the working size for sliding-window inference (``None``: automatic, only
    above ``AUTO_TILE_ABOVE`` px; ``0``: never). ``text_cache``: a :class:`TextCache` (shared between
    segmenters if you like); by default a private one of ``text_cache_size`` entries.
    """

    def __init__(self, model, meta: dict, device: str | torch.device = "cpu", size: int | None = None,
                 threshold: float | None = None, tile: int | None = None, text_cache: TextCache | None = None,
                 text_cache_size: int = 4096, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if mode == "auto":
            from .model.bridge import has_classifier
            mode = "fusion+bridge" if has_classifier(model.image_encoder) else "fusion"
        self.model = model.eval()
        self.meta = meta
        self.device = torch.device(device)
        if self.device.type == "cpu":
            from .runtime import tune_malloc
            tune_malloc()  # large activations reused from the heap, not page-faulted in on every call
        self.size = int(size or meta.get("image_size", 320))
        if self.size < 8:
            raise ValueError(f"working size must be at least 8 px, got {self.size}")
        self.threshold = float(meta.get("threshold", 0.5) if threshold is None else threshold)
        if tile is not None and tile != 0 and tile < 64:
            raise ValueError(f"tile must be 0 (off) or at least 64 px, got {tile}")
        self.tile = tile
        self.text_cache = text_cache if text_cache is not None else TextCache(text_cache_size)
        self.mode = mode
        self._bridge = None
        self._vocab_emb: torch.Tensor | None = None
        if mode != "fusion":  # fail now, naming the encoders that have a classifier; build the bridge on first use
            from .model.bridge import require_classifier
            require_classifier(model.image_encoder)

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
        members = set(vocab)
        if all(n in members for n in names):  # each has cosine 1 with itself (embeddings are L2-normalised):
            return [True] * len(names)  # no need to embed the whole vocabulary at all
        if self._vocab_emb is None:  # kept on disk (FUSIONSEG_CACHE): embedding it takes ~2 s per process
            from .data.features import cached_text_embeddings
            emb, _ = cached_text_embeddings(list(vocab), self.model.templates, encoder=self.model.text_encoder,
                                            must_persist=False)
            self._vocab_emb = emb.to(self.device).float()
        q = self.text_embeddings(list(names)).float()
        return ((q @ self._vocab_emb.T).max(1).values >= KNOWN_NAME_SIMILARITY).tolist()

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
        return Preparer(self.size, tuple(enc.mean), tuple(enc.std), int(getattr(enc, "size_multiple", 32)))

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    @torch.inference_mode()
    def encode(self, image) -> "EncodedImage":
        """Load, resize (longer side = working size), pad and run the frozen image encoder once."""
        p = image if isinstance(image, Prepared) else self.prepare(image)
        with self._autocast():
            x = p.x.to(self.device)
            visual = self.model.encode_image(x)
        return EncodedImage(visual, (p.x.shape[-2], p.x.shape[-1]), p.valid, p.orig, x, self._bridge_maps_later)

    @torch.inference_mode()
    def _bridge_maps_later(self, x: torch.Tensor) -> list | None:
        with self._autocast():
            return self.bridge_maps(x)

    def _uses_bridge(self, names: Sequence[str]) -> bool:
        """Whether scoring ``names`` in this mode reads the bridge."""
        if self.mode == "fusion":
            return False
        return self.mode == "bridge" or bool(getattr(self.model.head.cfg, "prior", False)) \
            or not all(self.known_names(names))

    def bridge_maps(self, x: torch.Tensor) -> list | None:
        """Padded input canvas ``(B, 3, H, W)`` -> the encoder's maps of the same canvas scaled so its longer side
        is :data:`~fusionseg.model.bridge.BRIDGE_SIZE` (sides rounded up to the encoder's multiple), for the
        bridge; None when the bridge is not used or the working size is already that small."""
        from .model.bridge import BRIDGE_SIZE
        if self.mode == "fusion" or self.size <= BRIDGE_SIZE:
            return None
        H, W = x.shape[-2:]
        f = BRIDGE_SIZE / max(H, W)
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
        with self._autocast():
            low = self.low_logits(encoded.visual, names, text, [_frac(encoded.valid, encoded.padded)],
                                  encoded.bridge_visual if self._uses_bridge(names) else None)
        return upsample_crop(low, encoded.padded, encoded.valid)[0].float()

    def low_logits(self, visual, names: Sequence[str], text: torch.Tensor,
                   valid: Sequence[tuple[float, float]] | None = None, bridge_visual=None) -> torch.Tensor:
        """Encoder maps + names -> logits ``(B, N, hl, wl)`` at the decoder's resolution, scored as :attr:`mode`
        says: ``fusion`` the trained model; ``bridge`` the classifier bridge; ``fusion+bridge`` the model for
        names near its training vocabulary and, for the others, the bridge sharpened by the model's own map of
        those names (:func:`~fusionseg.model.bridge.refine_with_model`); a model trained with the bridge as
        input instead takes every name, the unknown ones with its unknown-name token.
        ``valid``: per batch item the (height, width) fractions of the maps that show the image (default all);
        ``bridge_visual``: :meth:`bridge_maps` of the same canvas (the bridge reads those when given)."""
        cfg = self.model.head.cfg
        with_prior = bool(getattr(cfg, "prior", False))
        unknown = None
        if self.mode == "fusion":
            fused = list(range(len(names)))
        elif self.mode == "bridge":
            fused = []
        elif with_prior:
            fused = list(range(len(names)))
            unknown = torch.tensor([not k for k in self.known_names(names)], device=self.device)
        else:
            fused = [i for i, k in enumerate(self.known_names(names)) if k]
        bv = bridge_visual if bridge_visual is not None else visual
        if len(fused) == len(names):
            prior = self.bridge.logits(bv, text, tuple(visual[-1].shape[-2:])) if with_prior else None
            return self.model.head(visual, text, prior=prior, unknown=unknown)
        # Known names are decoded together without the others (class tokens attend to each other), so a
        # name's fusion score does not depend on which unknown names were asked alongside it.
        ref = visual[max(cfg.token_levels(), key=lambda i: cfg.visual_strides[i])]
        f = cfg.token_stride // cfg.output_stride
        hl, wl = ref.shape[-2] * f, ref.shape[-1] * f
        out = torch.empty(ref.shape[0], len(names), hl, wl, device=ref.device)
        if fused:
            out[:, fused] = _resized(self.model.head(visual, text[fused]).float(), (hl, wl))
        known = set(fused)
        bridged = [i for i in range(len(names)) if i not in known]
        br = self.bridge.logits(bv, text[bridged], (hl, wl)).float()
        if self.mode == "fusion+bridge":  # the unknown names decoded together, without the known ones
            lo = _resized(self.model.head(visual, text[bridged]).float(), (hl, wl))
            claimed = out[:, fused].sigmoid().amax(1) if fused else None  # known names have priority
            br = refine_with_model(br, lo, valid, claimed=claimed)
        out[:, bridged] = br
        return out

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

    def _check(self, class_names, threshold) -> tuple[list[str], float]:
        names = parse_class_names(class_names)
        thr = self.threshold if threshold is None else float(threshold)
        if not 0.0 <= thr <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {thr}")
        return names, thr

    def _tile_for(self, p: Prepared) -> int:
        """Window side for this image, or 0 for one pass over the whole image."""
        longer = max(p.valid)
        if self.tile == 0:
            return 0
        t = self.tile if self.tile is not None else (DEFAULT_TILE if longer > AUTO_TILE_ABOVE else 0)
        return t if t and longer > t else 0

    def predict(self, image, class_names: Sequence[str] | str, threshold: float | None = None,
                background: bool = False) -> Prediction:
        """Label every pixel with one of ``class_names`` or 0 ("none of these").

        A pixel takes the arg-max class if its sigmoid score passes ``threshold`` (default from the checkpoint,
        0.5); with ``background=True`` the plain arg-max is used (name a "background" class yourself).
        """
        names, thr = self._check(class_names, threshold)
        p = image if isinstance(image, Prepared) else self.prepare(image)
        return self.predict_batch([p], names, thr, background)[0]

    @torch.inference_mode()
    def predict_batch(self, images: Sequence, class_names: Sequence[str] | str, threshold: float | None = None,
                      background: bool = False) -> list[Prediction]:
        """:meth:`predict` for several images: images of one padded shape go through the encoder and the
        fusion head as one batch (same results as one at a time; shapes never mix, since padding would
        change the attention). ``images``: anything :meth:`predict` takes, or :class:`Prepared`."""
        names, thr = self._check(class_names, threshold)
        preps = [im if isinstance(im, Prepared) else self.prepare(im) for im in images]
        text = self.text_embeddings(names)
        out: list[Prediction | None] = [None] * len(preps)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(preps):
            if self._tile_for(p):
                lr, region = self._tiled_lowres(p, text, self._tile_for(p), names)
                labels, scores = labels_from_logits(lr, p.orig, thr, background, region=region)
                out[i] = Prediction(labels, scores, list(names))
            else:
                groups.setdefault(tuple(p.x.shape[-2:]), []).append(i)
        for shape, idx in groups.items():
            x = torch.cat([preps[i].x for i in idx]).to(self.device)
            with self._autocast():
                visual = self.model.encode_image(x)
                small = self.bridge_maps(x) if self._uses_bridge(names) else None
                low = self.low_logits(visual, names, text, [_frac(preps[i].valid, shape) for i in idx],
                                      small)  # (B, N, Hp/os, Wp/os)
            for b, i in enumerate(idx):
                lg = upsample_crop(low[b:b + 1], shape, preps[i].valid)[0].float()
                labels, scores = labels_from_logits(lg, preps[i].orig, thr, background)
                out[i] = Prediction(labels, scores, list(names))
        return out  # type: ignore[return-value]

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
        th, tw = min(t, Hp), min(t, Wp)
        ys, xs = _starts(Hp, th, a), _starts(Wp, tw, a)
        by, bx = _owned(ys, th, Hp, a), _owned(xs, tw, Wp, a)
        maps: list[torch.Tensor] | None = None
        wins = [(j, i) for j in range(len(ys)) for i in range(len(xs))]
        for k in range(0, len(wins), 1):  # one window at a time: memory bounded by one window
            chunk = wins[k:k + 1]
            xb = torch.cat([x[..., ys[j]:ys[j] + th, xs[i]:xs[i] + tw] for j, i in chunk]).to(self.device)
            with self._autocast():
                feats = self.model.encode_image(xb)
            if maps is None:
                maps = [torch.zeros(1, f.shape[1], Hp // s, Wp // s, dtype=f.dtype, device=f.device)
                        for f, s in zip(feats, enc.strides)]
            for n, (j, i) in enumerate(chunk):
                (y0, y1), (x0, x1) = by[j], bx[i]
                for f, m, s in zip(feats, maps, enc.strides):
                    m[0, :, y0 // s:y1 // s, x0 // s:x1 // s] = \
                        f[n, :, (y0 - ys[j]) // s:(y1 - ys[j]) // s, (x0 - xs[i]) // s:(x1 - xs[i]) // s]
        with self._autocast():
            small = self.bridge_maps(x.to(self.device)) if self._uses_bridge(names) else None
            low = self.low_logits(maps, names, text, [_frac((h, w), (Hp, Wp))], small)
        return low[0].float(), (w / os_, h / os_)


def _owned(starts: list[int], tile: int, total: int, align: int) -> list[tuple[int, int]]:
    """For windows at ``starts`` of side ``tile``: the span each one owns, split at the middle of each overlap."""
    cuts = [0] + [min(total, (s1 + s0 + tile) // 2 // align * align) for s0, s1 in zip(starts, starts[1:])] + [total]
    return [(cuts[k], cuts[k + 1]) for k in range(len(starts))]


def _starts(total: int, tile: int, align: int) -> list[int]:
    """Window starts (multiples of ``align``) covering ``total`` with windows of ``tile``, overlap >= tile/4."""
    if total <= tile:
        return [0]
    step = max(align, (tile - int(tile * OVERLAP)) // align * align)
    n = -(-(total - tile) // step) + 1
    starts = sorted({min(total - tile, round(i * (total - tile) / (n - 1) / align) * align) for i in range(n)})
    return starts


def _resized(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, N, h, w)`` bilinearly resampled to ``size`` (align_corners=False), or as it is when already that size."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _frac(valid: tuple[int, int], padded: tuple[int, int]) -> tuple[float, float]:
    """(h, w) of the image inside a padded (H, W) input -> the fractions (h / H, w / W)."""
    return valid[0] / padded[0], valid[1] / padded[1]


def upsample_crop(low: torch.Tensor, padded: tuple[int, int], valid: tuple[int, int]) -> torch.Tensor:
    """``(B, N, hl, wl)`` -> ``(B, N, h, w)``: bilinear to ``padded`` (align_corners=False), cropped to ``valid``.

    """
    H, W = padded
    h, w = valid
    if tuple(low.shape[-2:]) == (H, W):
        return low[..., :h, :w]
    return F.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)[..., :h, :w]


def upsample_rows(lg: torch.Tensor, size: tuple[int, int], rows: int, region: tuple[float, float] | None = None):
    """Yield (y0, y1, band) with ``band`` = logits ``(N, h, w)`` bilinearly resampled to rows y0:y1 of an image
    of ``size`` = (W, H); bands keep memory bounded for huge images. ``region`` = (w, h) in ``lg`` pixels that
    the image covers (default: all of ``lg``; smaller when ``lg`` also holds padding)."""
    W, H = size
    src = lg[None].float()
    hs, ws = lg.shape[-2:]
    rw, rh = region if region is not None else (ws, hs)
    xs = ((torch.arange(W, dtype=torch.float32) + 0.5) / W * rw) / ws * 2 - 1
    for y0 in range(0, H, rows):
        y1 = min(H, y0 + rows)
        ys = ((torch.arange(y0, y1, dtype=torch.float32) + 0.5) / H * rh) / hs * 2 - 1
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([gx, gy], -1)[None].to(src.device)
        yield y0, y1, F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def labels_from_logits(lg: torch.Tensor, size: tuple[int, int], threshold: float, background: bool = False,
                       region: tuple[float, float] | None = None):
    """logits ``(N, h, w)`` -> (labels ``(H, W)`` uint16, scores ``(H, W)`` float32) at ``size`` = (W, H).

    When ``size`` is the logits' own size the resampling is skipped (it would be the identity). When it is at
    least twice as large on average, only the classes that can win at each pixel are resampled
    (:mod:`fusionseg.labelmap`: the same labels and scores, several times faster for photos above the working
    size), unless the maps are too noisy for that to pay."""
    W, H = size
    n = lg.shape[0]
    hs, ws = lg.shape[-2:]
    if H * W >= 4 * hs * ws:
        out = resample_argmax(lg, size, threshold, background, region)
        if out is not None:
            return out
    labels = np.empty((H, W), dtype=np.uint16)
    scores = np.empty((H, W), dtype=np.float32)
    rows = max(1, int(4_000_000 // max(1, W * n)))  # rows per band: bounded memory
    if region is None and (hs, ws) == (H, W):
        bands = ((y0, min(H, y0 + rows), lg[:, y0:y0 + rows].float()) for y0 in range(0, H, rows))
    else:
        bands = upsample_rows(lg, size, rows, region)
    for y0, _, up in bands:
        write_band(labels, scores, y0, *argmax_classes(up), threshold, background)
    return labels, scores
