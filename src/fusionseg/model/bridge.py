"""The semantic bridge: pixels -> named classifier classes -> words, with no training.

An image encoder with a classifier head over named classes (EfficientNet-Lite: the 1,000 ImageNet classes)
gives, at every stride-32 location, a probability for each class. Each class is embedded by the text encoder
from its names (all WordNet synonyms and, for ImageNet, coarse hypernyms such as "sheep" for "ram, tup";
normalised and averaged). A queried name's score at a location is the
*expected similarity* ``sum_k p_k * cos(label_k, query)`` over the top-k classes there: scoring in similarity
space, so a crowded label group (118 dog breeds) counts by its probability mass, not by how many of its
members sit near the query in the embedding space.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..encoders.base import EncoderError

#: Expected similarity at which a location counts as showing the name (sigmoid 0.5), and the logit scale.
#: Chosen on six *development* names of MSRC (horse, bird, car, bicycle, aeroplane, chair), never on the
#: held-out names the study reports (see docs/RESULTS.md).
BRIDGE_CENTER = 0.40
BRIDGE_WIDTH = 0.05
#: Longer image side at which the bridge reads the classifier (its constants were chosen there). Above it the
#: stride-32 cells see ever smaller parts of objects and the ImageNet head, trained on whole objects at 224 px,
#: loses them (MSRC six names at 640 px: discrimination 0.70 instead of 0.84), so the Segmenter runs the
#: encoder once more on the image at this size for the bridge.
BRIDGE_SIZE = 320
#: Weight of the trained model's within-image map in :func:`refine_with_model` (``fusion+bridge`` mode).
#: Chosen on the four COCO-20i-style study folds (their held-out names and images): the largest of 1, 2, 3, 4
#: that cost no fold more than 0.01 of the bridge's discrimination or AUC gap; MSRC's six names never took part.
REFINE_WEIGHT = 2.0


def has_classifier(image_encoder) -> bool:
    return hasattr(image_encoder, "classify_maps") and bool(getattr(image_encoder, "class_names", None))


def require_classifier(image_encoder) -> None:
    """Raise :class:`EncoderError` (naming the encoders that have one) unless the encoder has a named classifier."""
    if not has_classifier(image_encoder):
        raise EncoderError(f"the bridge needs an image encoder with a classifier head over named classes; "
                           f"{image_encoder.spec.name} has none (use efficientnet-lite0, -lite1 or -lite2, or an hf: "
                           f"image-classification checkpoint with named labels, e.g. hf:google/vit-base-patch16-224)")


def label_words(image_encoder, groups: bool = True) -> tuple[list[list[str]], list[str]]:
    """-> (per class its words: synonyms and, for ImageNet-1k with ``groups``, coarse WordNet hypernyms; every
    distinct word, sorted)."""
    require_classifier(image_encoder)
    synonyms = image_encoder.class_synonyms() if hasattr(image_encoder, "class_synonyms") \
        else [[n] for n in image_encoder.class_names]
    if groups and len(synonyms) == 1000:  # ImageNet-1k: add the coarse WordNet hypernyms
        from .imagenet_groups import imagenet_groups
        synonyms = [list(s) + [g for g in gr if g not in s] for s, gr in zip(synonyms, imagenet_groups())]
    words = sorted({w for syn in synonyms for w in syn})
    return synonyms, words


class ClassifierBridge:
    """Training-free open-vocabulary scores through a classifier's named classes.

    Each class label is embedded from its synonyms and, for ImageNet-1k, its coarse WordNet hypernyms
    (:mod:`fusionseg.model.imagenet_groups`: "ram, tup" also says "sheep"). :meth:`logits` turns the expected
    similarity into a logit with a fixed "none of these" point ``center`` (sigmoid 0.5) and scale ``width``.

    Takes the label embeddings ``(K, D)`` ready made (nothing here reads files): build one from a text encoder
    with :func:`fusionseg.textcache.build_bridge`, which keeps the words' embeddings in the on-disk text cache,
    or with :meth:`from_words` and any word embedder.
    """

    def __init__(self, image_encoder, label_embeddings: Tensor, top_k: int = 10, center: float = BRIDGE_CENTER,
                 width: float = BRIDGE_WIDTH):
        require_classifier(image_encoder)
        if not isinstance(label_embeddings, Tensor):
            raise TypeError("ClassifierBridge takes the class labels' embeddings (K, D); to build it from a text "
                            "encoder use fusionseg.textcache.build_bridge (embeddings kept on disk) or "
                            "ClassifierBridge.from_words")
        k = len(image_encoder.class_names)
        if label_embeddings.dim() != 2 or label_embeddings.shape[0] != k:
            raise ValueError(f"label embeddings must be ({k}, D) for {image_encoder.spec.name}'s {k} classes, "
                             f"got {tuple(label_embeddings.shape)}")
        self.image_encoder = image_encoder
        self.top_k = top_k
        self.center, self.width = float(center), float(width)
        self.label_embeddings = label_embeddings  # (K, D)

    @classmethod
    def from_words(cls, image_encoder, embed: Callable[[list[str]], Tensor], top_k: int = 10, groups: bool = True,
                   **kw) -> "ClassifierBridge":
        """Build from a word embedder: ``embed(words) -> (len(words), D)`` is called once with every word of
        :func:`label_words`; each class's embedding is the normalised mean of its words'."""
        synonyms, words = label_words(image_encoder, groups)
        emb = embed(words)
        row = {w: i for i, w in enumerate(words)}
        labels = torch.stack([F.normalize(emb[[row[w] for w in syn]].mean(0), dim=0) for syn in synonyms])
        return cls(image_encoder, labels, top_k=top_k, **kw)

    def probabilities(self, maps: Sequence[Tensor]) -> Tensor:
        """Encoder maps -> ``(B, K, h, w)`` class probabilities, all but the top-k per location zeroed."""
        p = self.image_encoder.classify_maps(list(maps)).float().softmax(1)
        if self.top_k and self.top_k < p.shape[1]:
            v, i = p.topk(self.top_k, dim=1)
            p = torch.zeros_like(p).scatter_(1, i, v)
        return p

    def scores(self, maps: Sequence[Tensor], queries: Tensor) -> Tensor:
        """maps: encoder output; queries ``(N, D)`` normalised name embeddings -> ``(B, N, h, w)`` expected
        cosine similarity of the location's classes with each name (renormalised over the top-k mass)."""
        p = self.probabilities(maps)
        p = p / p.sum(1, keepdim=True).clamp(min=1e-8)
        sim = self.label_embeddings.to(queries.device) @ queries.float().T  # (K, N)
        return torch.einsum("bkhw,kn->bnhw", p, sim)

    def logits(self, maps: Sequence[Tensor], queries: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
        """:meth:`scores` as logits ``(B, N, H, W)``, ``(score - center) / width``: sigmoid 0.5 where the expected
        similarity is ``center``, the "none of these" point; bilinearly resampled to ``out_size``."""
        lg = (self.scores(maps, queries) - self.center) / self.width
        if out_size is not None and tuple(lg.shape[-2:]) != tuple(out_size):
            lg = F.interpolate(lg, size=out_size, mode="bilinear", align_corners=False)
        return lg


def standardize(maps: Tensor, valid: Sequence[tuple[float, float]] | None = None) -> Tensor:
    """``(B, N, h, w)`` -> each map minus its mean over the image, over its standard deviation. ``valid``: per
    batch item the (height, width) fractions of the map that show the image (padding left out of the stats)."""
    out = torch.empty_like(maps)
    for b in range(maps.shape[0]):
        fh, fw = valid[b] if valid is not None else (1.0, 1.0)
        hv = max(1, min(maps.shape[-2], math.ceil(fh * maps.shape[-2] - 1e-6)))
        wv = max(1, min(maps.shape[-1], math.ceil(fw * maps.shape[-1] - 1e-6)))
        v = maps[b, :, :hv, :wv].flatten(1)
        mean, std = v.mean(1), v.std(1, unbiased=False).clamp(min=1e-6)
        out[b] = (maps[b] - mean[:, None, None]) / std[:, None, None]
    return out


def refine_with_model(bridge_logits: Tensor, model_logits: Tensor, valid: Sequence[tuple[float, float]] | None = None,
                      weight: float = REFINE_WEIGHT, claimed: Tensor | None = None) -> Tensor:
    """Bridge logits sharpened by the trained model's map for the same (unknown) names, both ``(B, N, h, w)``:
    ``bridge + weight * sigmoid(bridge) * (1 - claimed) * standardize(model)``.

    The bridge knows *what* a name means but only at stride 32; the trained model, asked an unknown name, finds
    "an object it was not trained on" sharply but not which one (its level is useless: it learned to say no to
    names outside its vocabulary, so only its ranking within the image is used). Gating by ``sigmoid(bridge)``
    adds that shape only where the bridge already sees the name, so a wrong name's map does not light up on
    the object (the wrong-name control of ``evaluate --protocol novel-names`` checks this). ``claimed``
    ``(B, h, w)`` in [0, 1]: how surely the model sees one of the *known* names asked alongside (the largest of
    their sigmoids); where it does, the unknown names get no boost, so they do not take pixels the model
    recognises (without it, seen-class mIoU on MSRC fell by 2 points when six unknown names were asked too)."""
    z = standardize(model_logits.float(), valid)
    b = bridge_logits.float()
    gate = torch.sigmoid(b)
    if claimed is not None:
        gate = gate * (1 - claimed.float()[:, None])
    return b + weight * gate * z
