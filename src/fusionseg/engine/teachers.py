"""Teachers for pseudo-labelling: training-free or trained models that give dense class probabilities.

A teacher has ``names`` (its K classes, the words the student will learn), ``synonyms`` (per class, every
word for it: WordNet lemmas and group words, used for text augmentation and for ``--exclude-classes``),
``probabilities(image) -> (K, h, w)`` in [0, 1] over the image (any resolution; the caller resamples) and
``describe() -> dict``.

* :class:`BridgeTeacher`: an image encoder's own classifier over named classes, per location (EfficientNet-Lite:
  the 1,000 ImageNet classes at stride 32; ``hf:`` image-classification models with named labels).
* :class:`ModelTeacher`: a trained fusion model over a list of names (self-training rounds).
* :class:`MaskCLIPTeacher`: CLIP's training-free dense map (``hf:`` CLIP image towers), when available.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..encoders.base import EncoderError

#: Longer side (px) at which the classifier bridge reads images (the size its constants were chosen at).
TEACHER_SIZE = 320


def _prepare(image, size: int, enc) -> tuple[torch.Tensor, tuple[int, int]]:
    """The Segmenter's own preparation (:class:`~fusionseg.segmenter.Preparer`) at ``size`` for encoder ``enc``:
    normalised, padded ``(1, 3, H, W)`` and the (h, w) of the image inside it."""
    from ..segmenter import Preparer
    p = Preparer(size, tuple(enc.mean), tuple(enc.std), int(getattr(enc, "size_multiple", 32)))(image)
    return p.x, p.valid


def _crop(maps: torch.Tensor, valid: tuple[int, int], padded: tuple[int, int]) -> torch.Tensor:
    """``(K, hl, wl)`` over a padded canvas -> the part showing the image."""
    hl, wl = maps.shape[-2:]
    hv = max(1, round(hl * valid[0] / padded[0]))
    wv = max(1, round(wl * valid[1] / padded[1]))
    return maps[:, :hv, :wv]


def distinct_names(names: Sequence[str], synonyms: Sequence[Sequence[str]]) -> list[str]:
    """Teacher class names made distinct under the class-name policy (:func:`~fusionseg.names.match_key`: a
    dataset, and ``evaluate``, refuse two names equal up to case), from each class's own words: within a group of
    equal names, a class whose synonym holds the name takes that synonym ("Cardigan Welsh corgi"), else the name
    with its first other word ("crane (bird)"); one class without such a word keeps the bare name, any further one
    gets its index ("maillot #639"). Names that are already distinct are kept as they are."""
    from collections import defaultdict

    from ..names import match_key
    keys = [match_key(n) for n in names]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    out = list(names)
    taken = set(keys)
    for key, idx in groups.items():
        if len(idx) < 2:
            continue
        bare = []
        for i in idx:
            for w in synonyms[i][1:]:
                cand = w if f" {key} " in f" {match_key(w)} " else f"{names[i]} ({w})"
                if match_key(cand) not in taken:
                    out[i] = cand
                    taken.add(match_key(cand))
                    break
            else:
                bare.append(i)
        for i in bare[1:]:
            out[i] = f"{names[i]} #{i}"
    return out


class BridgeTeacher:
    """The image encoder's classifier head applied at every location: softmax over its named classes."""

    def __init__(self, image_encoder, size: int = TEACHER_SIZE, groups: bool = True):
        from ..model.bridge import require_classifier
        require_classifier(image_encoder)
        self.encoder = image_encoder.eval()
        self.size = int(size)
        self.names = [str(n) for n in image_encoder.class_names]
        syn = image_encoder.class_synonyms() if hasattr(image_encoder, "class_synonyms") else [[n] for n in self.names]
        if groups and len(syn) == 1000:
            from ..model.imagenet_groups import imagenet_groups
            syn = [list(s) + [g for g in gr if g not in s] for s, gr in zip(syn, imagenet_groups())]
        syn = [list(dict.fromkeys([n] + list(s))) for n, s in zip(self.names, syn)]
        self.names = distinct_names(self.names, syn)  # ImageNet has two "crane"s, "Cardigan" and "cardigan", ...
        self.synonyms = [list(dict.fromkeys([n] + s)) for n, s in zip(self.names, syn)]

    def describe(self) -> dict:
        return {"kind": "bridge", "image_encoder": self.encoder.spec.name, "size": self.size}

    @torch.inference_mode()
    def probabilities(self, image) -> torch.Tensor:
        enc = self.encoder
        x, valid = _prepare(image, self.size, enc)
        maps = enc(x)
        p = enc.classify_maps(list(maps)).float().softmax(1)[0]
        return _crop(p, valid, tuple(x.shape[-2:]))


class ModelTeacher:
    """A trained fusion model's sigmoid scores over ``names`` (default: the names it was trained on).
    Its classes are its own names, not a classifier's indices, so a folder's ``labels.csv`` does not address them
    (``indexed_by_labels`` False: the image-level labels are not used)."""

    indexed_by_labels = False

    def __init__(self, segmenter, names: Sequence[str] | None = None, synonyms: Sequence[Sequence[str]] | None = None):
        vocab = names or segmenter.meta.get("training", {}).get("vocabulary") or []
        if not vocab:
            raise EncoderError("this model records no training vocabulary; give the teacher's names with --names")
        self.segmenter = segmenter
        self.names = [str(n) for n in vocab]
        self.synonyms = [list(s) for s in synonyms] if synonyms else [[n] for n in self.names]

    def describe(self) -> dict:
        from ..segmenter import test_time_field
        seg = self.segmenter
        return {"kind": "model", "model": str(seg.meta.get("path")), "mode": seg.mode, "names": len(self.names),
                **test_time_field(seg.tta_scales, seg.tta_flip, seg.bridge_size)}

    @torch.inference_mode()
    def probabilities(self, image) -> torch.Tensor:
        seg = self.segmenter  # with test-time augmentation, encode/logits_from average the views
        return seg.logits_from(seg.encode(image), self.names).float().sigmoid()


class MaskCLIPTeacher:
    """CLIP's training-free dense map (:class:`~fusionseg.model.maskclip.MaskCLIPBridge`): softmax at temperature
    0.01 over ``names`` (default: the 1,000 ImageNet classes, each embedded from its synonyms and group words)."""

    def __init__(self, image_encoder, names: Sequence[str] | None = None, size: int = TEACHER_SIZE):
        from ..model.maskclip import MaskCLIPBridge
        self.encoder = image_encoder.eval()
        self.bridge = MaskCLIPBridge(image_encoder)
        self.size = int(size)
        self.indexed_by_labels = not names  # labels.csv gives ImageNet indices: only the default names match them
        if names:
            self.names = [str(n) for n in names]
            self.synonyms = [[n] for n in self.names]
        else:
            from ..encoders.efficientnet_lite import imagenet_class_names, imagenet_synonyms
            from ..model.imagenet_groups import imagenet_groups
            self.names = list(imagenet_class_names())
            self.synonyms = [list(dict.fromkeys([n] + s + list(g)))
                             for n, s, g in zip(self.names, imagenet_synonyms(), imagenet_groups())]
        self.queries = self.bridge.embed_classes(self.synonyms)

    def describe(self) -> dict:
        return {"kind": "maskclip", "image_encoder": self.encoder.spec.name, "size": self.size,
                "names": len(self.names)}

    @torch.inference_mode()
    def probabilities(self, image) -> torch.Tensor:
        enc = self.encoder
        x, valid = _prepare(image, self.size, enc)
        p = self.bridge.dense_probabilities(x, self.queries)[0]
        return _crop(p, valid, tuple(x.shape[-2:]))


def build_teacher(spec: str = "bridge", image_encoder: str | None = None, device: str = "cpu",
                  names: Sequence[str] | None = None, size: int = TEACHER_SIZE, tta_scales: Sequence[float] = (1.0,),
                  tta_flip: bool = False, bridge_size: int | None = None):
    """``bridge`` (the classifier bridge of ``image_encoder``, default efficientnet-lite0), ``maskclip`` (CLIP's
    dense map of an ``hf:`` CLIP ``image_encoder``) or a model (``default``, a checkpoint or a run folder).
    ``tta_scales`` / ``tta_flip`` / ``bridge_size``: how a model teacher reads each image (``Segmenter``'s); the
    training-free teachers take none of them (ValueError)."""
    from ..choices import DEFAULT_IMAGE_ENCODER
    from ..encoders.base import build_image_encoder
    from ..segmenter import uses_tta
    if (uses_tta(tta_scales, tta_flip) or bridge_size is not None) and spec in ("bridge", "maskclip"):
        raise ValueError(f"--tta-scales, --tta-flip and --bridge-size apply to a model teacher (default, a checkpoint "
                         f"or a run folder), not --teacher {spec}")
    if spec == "bridge":
        if names is not None:  # its classes are the classifier's; the names would be dropped without a word
            raise ValueError("--names applies to a model or MaskCLIP teacher; --teacher bridge labels with its image "
                             "encoder's classifier classes (leave --names out)")
        from ..model.bridge import has_classifier
        enc = build_image_encoder(image_encoder or DEFAULT_IMAGE_ENCODER)
        if not has_classifier(enc):
            raise EncoderError(f"--teacher bridge needs an image encoder with a classifier head over named classes; "
                               f"{enc.spec.name} has none (use efficientnet-lite0, -lite1 or -lite2, or an hf: "
                               f"image-classification model with named labels; for hf: CLIP towers use --teacher maskclip)")
        return BridgeTeacher(enc.to(device), size=size)
    if spec == "maskclip":
        from ..model.maskclip import require_maskclip
        if not image_encoder:
            raise EncoderError("--teacher maskclip needs an hf: CLIP image tower: --image-encoder "
                               "hf:openai/clip-vit-base-patch16 (or -base-patch32, -large-patch14)")
        enc = build_image_encoder(image_encoder)
        require_maskclip(enc)
        return MaskCLIPTeacher(enc.to(device), names, size=size)
    from ..segmenter import Segmenter
    return ModelTeacher(Segmenter.from_pretrained(spec, device=device, tta_scales=tta_scales, tta_flip=tta_flip,
                                                  bridge_size=bridge_size), names)
