"""Scoring policy: encoder maps + name embeddings -> one logit map per name, by mode.

Modes (see the README's ``--mode``):

* ``fusion``: the trained model (:class:`~fusionseg.model.fusioner.FusionHead`) for every name;
* ``bridge``: the training-free classifier bridge (:class:`~fusionseg.model.bridge.ClassifierBridge`);
* ``fusion+bridge``: per name, the trained model, the bridge, or a mix of both; how is decided by one
  replaceable function, the *combination* (:data:`Combine`, default :func:`support_weighted`: for names near
  its training vocabulary the model and the bridge mixed by how many training images showed the name, for the
  others the bridge sharpened by the model; a checkpoint without those counts gets
  :func:`switch_at_similarity`: the model alone for names near its vocabulary);
* a model trained with the bridge as input (``cfg.prior``) takes every name, the bridge's map as its prior,
  and in ``fusion+bridge`` the names far from its vocabulary get its learned unknown-name token.

Nothing here reads files or embeds text: the :class:`Scorer` is handed providers for what it may need
(the bridge, the training vocabulary's embeddings), called only when a call needs them.

To try another way of combining the model and the bridge per name (e.g. a calibrated mix instead of the
switch at cosine :data:`KNOWN_NAME_SIMILARITY`), write a function ``NameScores -> (B, N, hl, wl)`` logits and
pass it as ``combine`` (``Segmenter.scorer.combine = fn`` on a built segmenter); :class:`NameScores` gives it
each name's similarity to the training vocabulary and the model's and the bridge's maps of any subset of names.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .bridge import refine_with_model

#: The scoring modes a :class:`Scorer` takes (``auto`` is resolved before: see :func:`resolve_mode`).
SCORING_MODES = ("fusion", "bridge", "fusion+bridge")
#: :func:`switch_at_similarity`: a name whose text embedding has cosine >= this with a training name counts as known.
KNOWN_NAME_SIMILARITY = 0.85

#: :func:`support_weighted`: a name's trained map and the bridge's are mixed with weight n / (n + this) on the
#: model, n = the training images that showed the (nearest) training name: the model is trusted as far as its
#: evidence goes. Chosen among 10, 30 and 100 on the held-out images of the shared folders with the previous
#: default model (docs/RESULTS.md, "Everyday photos"); 10 cost MSRC and CamVid under half a point.
SUPPORT_PRIOR = 10.0

#: Maps handed to the bridge: the encoder's maps of the canvas at the bridge's size, None (read the main maps),
#: or a callable giving either on first use (a second encoder pass paid only when the bridge is read).
BridgeMaps = "list[Tensor] | None | Callable[[], list[Tensor] | None]"


def resolve_mode(mode: str, has_classifier: bool) -> str:
    """``auto`` -> ``fusion+bridge`` when the image encoder has a named classifier, else ``fusion``."""
    if mode == "auto":
        return "fusion+bridge" if has_classifier else "fusion"
    return mode


def known_from_similarity(similarity: Tensor | None, n: int, threshold: float = KNOWN_NAME_SIMILARITY) -> list[bool]:
    """Per name: known when its similarity (max cosine with a training name) is >= ``threshold``; ``None``
    (no recorded vocabulary): every name is known."""
    if similarity is None:
        return [True] * n
    return (similarity >= threshold).tolist()


def _resized(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, N, h, w)`` bilinearly resampled to ``size`` (align_corners=False), or as it is when already that size."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class NameScores:
    """What a combination may read for one call's names, each part computed on demand.

    ``n`` names; ``size`` (hl, wl), the decoder's resolution every returned map has; ``valid``: per batch item
    the (height, width) fractions of the maps that show the image (None: all); :attr:`similarity`: ``(n,)``
    max cosine of each name with the training vocabulary (None: the checkpoint records none).
    """

    def __init__(self, head, bridge: Callable[[], object], visual: Sequence[Tensor], text: Tensor,
                 bridge_visual, similarity: Callable[[], Tensor | None], valid=None,
                 support: Callable[[], Tensor | None] | None = None):
        self.head, self._bridge, self.visual, self.text = head, bridge, visual, text
        self._support = support
        self._bridge_visual, self._similarity, self.valid = bridge_visual, similarity, valid
        self.n = int(text.shape[0])
        cfg = head.cfg
        ref = visual[max(cfg.token_levels(), key=lambda i: cfg.visual_strides[i])]
        f = cfg.token_stride // cfg.output_stride
        self.batch, self.device = ref.shape[0], ref.device
        self.size = (ref.shape[-2] * f, ref.shape[-1] * f)
        self._sim_done = False
        self._sim: Tensor | None = None

    @property
    def similarity(self) -> Tensor | None:
        if not self._sim_done:
            self._sim, self._sim_done = self._similarity(), True
        return self._sim

    def known(self, threshold: float = KNOWN_NAME_SIMILARITY) -> list[bool]:
        return known_from_similarity(self.similarity, self.n, threshold)

    def support(self) -> Tensor | None:
        """``(n,)`` float: training images that showed each name's nearest training name (None: not recorded)."""
        return self._support() if self._support is not None else None

    def fusion_raw(self, idx: Sequence[int] | None = None, **head_kw) -> Tensor:
        """The trained head on names ``idx`` (default all) decoded together, as it returns them (its dtype and
        resolution); ``head_kw``: ``prior``, ``unknown``."""
        text = self.text if idx is None else self.text[list(idx)]
        return self.head(self.visual, text, **head_kw)

    def fusion(self, idx: Sequence[int]) -> Tensor:
        """``(B, len(idx), hl, wl)`` float: the trained head on names ``idx`` decoded together, without the others
        (class tokens attend to each other, so a name's score depends on which names are decoded with it)."""
        return _resized(self.fusion_raw(idx).float(), self.size)

    def bridge_maps(self):
        bv = self._bridge_visual
        if callable(bv):
            bv = self._bridge_visual = bv()
        return bv if bv is not None else self.visual

    def bridge(self, idx: Sequence[int] | None = None, size: tuple[int, int] | None = None) -> Tensor:
        """``(B, len(idx), hl, wl)`` float: the bridge's logits for names ``idx`` (default all)."""
        text = self.text if idx is None else self.text[list(idx)]
        return self._bridge().logits(self.bridge_maps(), text, size or self.size).float()

    def empty(self) -> Tensor:
        """An uninitialised ``(B, n, hl, wl)`` float32 output to fill."""
        return torch.empty(self.batch, self.n, *self.size, device=self.device)


#: A combination: the scores of one call's names -> logits ``(B, n, hl, wl)`` (``fusion+bridge`` mode).
Combine = Callable[[NameScores], Tensor]


def switch_at_similarity(s: NameScores, threshold: float = KNOWN_NAME_SIMILARITY) -> Tensor:
    """The model for names with cosine >= ``threshold`` to a training name; for the others the bridge sharpened
    by the model's own map of those names (:func:`~fusionseg.model.bridge.refine_with_model`), which gives no
    boost where the model surely sees one of the known names asked alongside (they have priority).
    Known names are decoded together without the unknown ones and vice versa, so a name's score does not
    depend on which names of the other kind were asked alongside it."""
    known = s.known(threshold)
    fused = [i for i, k in enumerate(known) if k]
    if len(fused) == s.n:
        return s.fusion_raw()
    out = s.empty()
    if fused:
        out[:, fused] = s.fusion(fused)
    return _unknown_by_bridge(s, out, known)


def _unknown_by_bridge(s: NameScores, out: Tensor, known: Sequence[bool]) -> Tensor:
    """Fill ``out``'s unknown names with the bridge sharpened by the model's map of them, no boost where one of
    the known names (already in ``out``) is surely seen."""
    fused = [i for i, k in enumerate(known) if k]
    bridged = [i for i, k in enumerate(known) if not k]
    if not bridged:
        return out
    br = s.bridge(bridged)
    lo = s.fusion(bridged)
    claimed = out[:, fused].sigmoid().amax(1) if fused else None
    out[:, bridged] = refine_with_model(br, lo, s.valid, claimed=claimed)
    return out


def support_weighted(s: NameScores, threshold: float = KNOWN_NAME_SIMILARITY, prior: float = SUPPORT_PRIOR) -> Tensor:
    """Known names (cosine >= ``threshold`` with a training name): ``w * model + (1 - w) * bridge`` logits with
    ``w = n / (n + prior)``, n the training images that showed the nearest training name, so a name the head saw
    in a handful of photos (most of COCO's in the shipped data) leans on the bridge, and one it saw in hundreds
    keeps the head's sharp map. Unknown names as in :func:`switch_at_similarity`. A checkpoint that records no
    counts falls back to :func:`switch_at_similarity`."""
    sup = s.support()
    if sup is None:
        return switch_at_similarity(s, threshold)
    known = s.known(threshold)
    fused = [i for i, k in enumerate(known) if k]
    out = s.empty()
    if fused:
        w = (sup[fused].float() / (sup[fused].float() + prior)).to(s.device).view(1, -1, 1, 1)
        out[:, fused] = w * s.fusion(fused) + (1 - w) * s.bridge(fused)
    return _unknown_by_bridge(s, out, known)


class Scorer:
    """The scoring policy of one model in one mode: ``scorer(visual, text)`` -> logits ``(B, N, hl, wl)``.

    ``head``: the trained :class:`~fusionseg.model.fusioner.FusionHead`; ``mode``: one of :data:`SCORING_MODES`;
    ``bridge``: a callable giving the :class:`~fusionseg.model.bridge.ClassifierBridge` (called on first use);
    ``vocabulary``: the names the model was trained on (empty: unknown, every name counts as known) and
    ``vocabulary_embeddings``: a callable giving their ``(V, D)`` L2-normalised embeddings (called on first
    need: a query whose names are all in the vocabulary never needs them); ``combine``: the ``fusion+bridge``
    combination (:data:`Combine`).
    """

    def __init__(self, head, mode: str, bridge: Callable[[], object] | None = None,
                 vocabulary: Sequence[str] = (), vocabulary_embeddings: Callable[[], Tensor] | None = None,
                 combine: Combine | None = None, support: dict[str, int] | None = None):
        if mode not in SCORING_MODES:
            raise ValueError(f"unknown scoring mode {mode!r}; use one of {', '.join(SCORING_MODES)}")
        self.head, self.mode = head, mode
        self.combine = combine or support_weighted
        self._bridge = bridge
        self.vocabulary = list(vocabulary)
        self._members = {n: i for i, n in enumerate(self.vocabulary)}
        self._vocabulary_embeddings = vocabulary_embeddings
        #: training images per vocabulary name (``training.name_images`` of the checkpoint), or None
        self.support_counts = torch.tensor([float(support.get(n, 0)) for n in self.vocabulary]) \
            if support and self.vocabulary else None

    @property
    def with_prior(self) -> bool:
        """Whether the model takes the bridge's map as an input (trained with ``bridge_prior``)."""
        return bool(getattr(self.head.cfg, "prior", False))

    def bridge(self):
        if self._bridge is None:
            raise ValueError("this scorer was given no bridge")
        return self._bridge()

    def similarity(self, names: Sequence[str], text: Tensor | Callable[[], Tensor]) -> Tensor | None:
        """``(N,)`` max cosine of each name's embedding (``text``, or a callable giving it) with the training
        vocabulary; None when there is no vocabulary. Names all in the vocabulary: ones, nothing embedded (each
        has cosine 1 with itself: embeddings are L2-normalised)."""
        near = self.nearest(names, text)
        return None if near is None else near[0]

    def nearest(self, names: Sequence[str], text: Tensor | Callable[[], Tensor]) -> tuple[Tensor, Tensor] | None:
        """(``(N,)`` max cosine with the training vocabulary, ``(N,)`` index of that training name), or None
        without a vocabulary; names all in the vocabulary are not embedded."""
        if not self.vocabulary:
            return None
        if all(n in self._members for n in names):
            return torch.ones(len(names)), torch.tensor([self._members[n] for n in names])
        q = (text() if callable(text) else text).float()
        v = self._vocabulary_embeddings()
        best = (q @ v.to(q.device).float().T).max(1)
        return best.values, best.indices.cpu()

    def support(self, names: Sequence[str], text: Tensor | Callable[[], Tensor]) -> Tensor | None:
        """``(N,)`` training images that showed each name's nearest training name; None when not recorded."""
        if self.support_counts is None:
            return None
        near = self.nearest(names, text)
        return None if near is None else self.support_counts[near[1]]

    def known(self, names: Sequence[str], text: Tensor | Callable[[], Tensor],
              threshold: float = KNOWN_NAME_SIMILARITY) -> list[bool]:
        """Per name: whether it counts as one the model was trained on (:func:`known_from_similarity`)."""
        return known_from_similarity(self.similarity(names, text), len(names), threshold)

    def uses_bridge(self, names: Sequence[str], text: Tensor | Callable[[], Tensor]) -> bool:
        """Whether scoring ``names`` reads the bridge (with the default combination: some name is unknown)."""
        if self.mode == "fusion":
            return False
        if self.mode == "bridge" or self.with_prior:
            return True
        if self.combine is support_weighted and self.support_counts is not None:
            return True
        if self.combine not in (switch_at_similarity, support_weighted):
            return True
        return not all(self.known(names, text))

    def __call__(self, visual: Sequence[Tensor], text: Tensor, names: Sequence[str] | None = None,
                 valid: Sequence[tuple[float, float]] | None = None, bridge_visual=None) -> Tensor:
        """Encoder maps ``[(B, C_i, h_i, w_i)]`` + name embeddings ``(N, C_t)`` -> logits ``(B, N, hl, wl)`` at
        the decoder's resolution. ``names``: the names (a query whose names are all in the training vocabulary
        is known without embedding the vocabulary; without names the embeddings decide); ``valid``: per batch item the (height, width) fractions of the maps
        that show the image (default all); ``bridge_visual``: :data:`BridgeMaps`."""
        names = list(names) if names is not None else [None] * int(text.shape[0])
        s = NameScores(self.head, self.bridge, visual, text, bridge_visual,
                       lambda: self.similarity(names, text), valid, lambda: self.support(names, text))
        if self.mode == "fusion":
            prior = s.bridge(size=tuple(visual[-1].shape[-2:])) if self.with_prior else None
            return s.fusion_raw(prior=prior, unknown=None)
        if self.mode == "bridge":
            if s.n == 0:  # as the head would: an empty (B, 0, ...) map
                return s.fusion_raw(prior=s.bridge(size=tuple(visual[-1].shape[-2:])) if self.with_prior else None)
            out = s.empty()
            out[:] = s.bridge()
            return out
        if self.with_prior:  # every name through the model, the unknown ones with its unknown-name token
            unknown = torch.tensor([not k for k in s.known()], device=s.device)
            return s.fusion_raw(prior=s.bridge(size=tuple(visual[-1].shape[-2:])), unknown=unknown)
        return self.combine(s)
