"""MaskCLIP: a training-free dense map from a CLIP ViT image tower (Zhou et al., "Extract Free Dense Labels from
CLIP", ECCV 2022), as a pseudo-labelling teacher and as the bridge of ``--mode bridge`` for ``hf:`` CLIP towers.

CLIP's last block mixes every patch token with the class token through query-key attention, so the patch tokens
of its output are nearly the same everywhere. MaskCLIP reads the last block's *value path* instead, which keeps
each token's own content and still lands in CLIP's joint image-text space:

* ``x``: the input of the last encoder layer (all tokens, the class token included);
* ``v = out_proj(v_proj(layer_norm1(x)))`` of that layer: no query-key attention, no residual, no MLP;
* ``e = visual_projection(post_layernorm(v))``: the tower's own output head, applied to every token;
* the class token is dropped, the patch tokens reshaped to ``(B, D, h, w)`` and L2-normalised.

Names are embedded by the CLIP text tower of the same checkpoint, prompt-ensembled (each template's sentence
normalised, averaged, normalised again; :meth:`~fusionseg.encoders.hf_text.HFTextEncoder.encode`).

Scores and logits (the rule, as MaskCLIP's): the cosine ``c_n`` of each patch with name ``n``; CLIP's logit
scale ``s = 100`` (``exp`` of the trained ``logit_scale``, which CLIP saturates at 100; a temperature of 0.01);
``p_n = softmax_n(s * c_n)`` over the asked names (plus any ``background`` names, which compete but are not
returned); the per-name logit is the log-odds ``log(p_n / (1 - p_n)) = s*c_n - logsumexp_{m != n}(s*c_m)``, so
``sigmoid(logit) = p_n`` exactly and a threshold of 0.5 on the sigmoid means "more probable than all other names
together". With one name and no background names nothing competes: its logit is the cap :data:`LOGIT_CAP`
everywhere (give ``background`` names for single-name queries).

The Segmenter hands the bridge the encoder's *output* maps, from which the value path cannot be recovered; so a
:class:`MaskCLIPBridge` hooks the tower while it lives and keeps the last layer's input of its most recent few
forward passes, as long as their output maps live (at most :data:`KEEP`), found again by the identity of the
output map. Or pass pixels directly.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..encoders.base import EncoderError

#: CLIP's logit scale (the trained ``exp(logit_scale)``, clamped at 100 in training): MaskCLIP's softmax
#: temperature 0.01.
CLIP_LOGIT_SCALE = 100.0
#: |logit| cap: sigmoid(20) = 1 - 2e-9. Reached when a name has nothing to compete with.
LOGIT_CAP = 20.0
#: At most this many forward passes of the tower are remembered at once (an entry also goes as soon as the output
#: map it belongs to is freed, so in practice only the maps a caller still holds are remembered).
KEEP = 64
#: Templates used for the names this module embeds itself (CLIP-style phrasings, as MaskCLIP's ensemble).
MASKCLIP_TEMPLATES = "paper"

_SUPPORTED = ("an hf: CLIP ViT image tower with its visual projection, e.g. hf:openai/clip-vit-base-patch16, "
              "hf:openai/clip-vit-base-patch32 or hf:openai/clip-vit-large-patch14")


def _tower(image_encoder):
    """(last encoder layer, post_layernorm, visual_projection) of an hf: CLIP image tower, or None."""
    if getattr(image_encoder, "kind", None) != "clip":
        return None
    model, proj = getattr(image_encoder, "model", None), getattr(image_encoder, "projection", None)
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    post = getattr(model, "post_layernorm", None)
    if proj is None or post is None or not layers:
        return None
    last = layers[-1]
    attn = getattr(last, "self_attn", None)
    if getattr(last, "layer_norm1", None) is None or not all(hasattr(attn, a) for a in ("v_proj", "out_proj")):
        return None
    return last, post, proj


def supports_maskclip(image_encoder) -> bool:
    """Whether MaskCLIP's dense map can be read from this image encoder (an ``hf:`` CLIP ViT tower)."""
    return _tower(image_encoder) is not None


def require_maskclip(image_encoder) -> None:
    """Raise :class:`EncoderError` (one line, naming the encoders that have it) unless MaskCLIP applies."""
    if not supports_maskclip(image_encoder):
        name = getattr(getattr(image_encoder, "spec", None), "name", type(image_encoder).__name__)
        raise EncoderError(f"MaskCLIP's dense map needs {_SUPPORTED}; {name} is not one")


def value_path_tokens(hidden: Tensor, layer, post_layernorm, projection) -> Tensor:
    """Last layer's input ``(B, T, C)`` -> MaskCLIP token embeddings ``(B, T, D)`` (not normalised), float32:
    ``projection(post_layernorm(out_proj(v_proj(layer_norm1(hidden)))))``."""
    def lin(m, x):
        return F.linear(x, m.weight.float(), None if m.bias is None else m.bias.float())

    def ln(m, x):
        return F.layer_norm(x, m.normalized_shape, None if m.weight is None else m.weight.float(),
                            None if m.bias is None else m.bias.float(), m.eps)

    with torch.autocast(hidden.device.type, enabled=False):
        x = ln(layer.layer_norm1, hidden.float())
        x = lin(layer.self_attn.out_proj, lin(layer.self_attn.v_proj, x))
        return lin(projection, ln(post_layernorm, x))


def log_odds(z: Tensor, n_named: int | None = None) -> Tensor:
    """Scaled similarities ``(B, K, ...)`` -> per-class log-odds of ``softmax`` over dim 1,
    ``z_n - logsumexp_{m != n} z_m``, for the first ``n_named`` classes (all by default), capped at
    :data:`LOGIT_CAP`. Exact and stable: for the arg-max class the others' logsumexp is computed directly; for
    every other class ``1 - p >= 1/2`` and ``log1p(-p)`` is accurate."""
    z = z.float()
    n = z.shape[1] if n_named is None else int(n_named)
    logp = z.log_softmax(1)
    log1m = torch.log1p(-logp.exp().clamp(max=0.5))  # right for every class but the arg-max (p <= 1/2 there)
    top = z.argmax(1, keepdim=True)
    others = z.scatter(1, top, float("-inf")).logsumexp(1, keepdim=True) - z.logsumexp(1, keepdim=True)
    log1m = log1m.scatter(1, top, others)
    return (logp - log1m)[:, :n].clamp(-LOGIT_CAP, LOGIT_CAP)


class MaskCLIPBridge:
    """MaskCLIP's training-free dense scores, with :class:`~fusionseg.model.bridge.ClassifierBridge`'s interface.

    ``image_encoder``: an ``hf:`` CLIP tower (:func:`require_maskclip`); ``text_encoder``: the CLIP text tower of
    the same checkpoint (built from the image encoder's name when None). ``templates``: the prompt ensemble for the
    names this object embeds itself (``queries`` given as strings, ``background``, :meth:`dense_probabilities`);
    ``background``: names that compete in the softmax but are never returned (e.g. ``("background",)``);
    ``scale``: the softmax's logit scale (temperature ``1/scale``). ``cache_dir``: the on-disk text cache.
    """

    def __init__(self, image_encoder, text_encoder=None, templates=MASKCLIP_TEMPLATES,
                 background: Sequence[str] = (), scale: float = CLIP_LOGIT_SCALE, cache_dir=None):
        require_maskclip(image_encoder)
        self.image_encoder = image_encoder
        self.layer, self.post_layernorm, self.projection = _tower(image_encoder)
        self.dim = int(self.projection.out_features)
        if text_encoder is None:
            from ..encoders.base import build_text_encoder
            name = image_encoder.spec.name
            try:
                text_encoder = build_text_encoder(name)
            except EncoderError as e:
                raise EncoderError(f"MaskCLIP needs the CLIP text tower of {name} and could not build it ({e}); "
                                   f"give a full CLIP checkpoint (image and text towers)") from None
        if getattr(text_encoder, "pooling", None) != "clip" or int(getattr(text_encoder, "dim", -1)) != self.dim:
            raise EncoderError(f"MaskCLIP needs the CLIP text tower of the same checkpoint as "
                               f"{image_encoder.spec.name} ({self.dim}-d joint space); "
                               f"{text_encoder.spec.name} is not one")
        self.text_encoder = text_encoder
        self.templates = templates
        self.scale = float(scale)
        self.cache_dir = cache_dir
        self.background = [str(b) for b in background]
        self._background_emb: Tensor | None = None
        self._tls = threading.local()
        self._lock = threading.RLock()  # weakref callbacks may run while it is held
        self._seen: OrderedDict[int, tuple] = OrderedDict()  # id(output map) -> (weakref to it, last layer input)
        me = weakref.ref(self)

        def pre_hook(module, args, kwargs):
            b = me()
            if b is not None:
                return b._on_layer_input(args[0] if args else kwargs["hidden_states"])

        def post_hook(module, args, output):
            b = me()
            if b is not None:
                b._on_encoder_output(output)

        self._handles = [self.layer.register_forward_pre_hook(pre_hook, with_kwargs=True),
                         image_encoder.register_forward_hook(post_hook)]
        weakref.finalize(self, _remove, list(self._handles))

    # ------------------------------------------------------------------------------ capturing the tower
    def _on_layer_input(self, hidden: Tensor) -> None:
        self._tls.pending = hidden
        if getattr(self._tls, "stop", False):
            raise _Captured()

    def _on_encoder_output(self, output) -> None:
        hidden = getattr(self._tls, "pending", None)
        self._tls.pending = None
        if hidden is None or not isinstance(output, (list, tuple)) or not output:
            return
        key, k = output[-1], id(output[-1])
        me = weakref.ref(self)

        def forget(_ref):
            b = me()
            if b is not None:
                with b._lock:
                    got = b._seen.get(k)
                    if got is not None and got[0] is _ref:
                        del b._seen[k]

        with self._lock:
            self._seen[k] = (weakref.ref(key, forget), hidden)
            self._seen.move_to_end(k)
            while len(self._seen) > KEEP:
                self._seen.popitem(last=False)

    def close(self) -> None:
        """Remove the hooks from the tower and forget the captured passes (also done when the object is freed)."""
        _remove(self._handles)
        self._seen.clear()

    def _hidden_from_pixels(self, pixels: Tensor) -> Tensor:
        enc = self.image_encoder
        p = int(enc.patch)
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")
        if pixels.shape[-2] % p or pixels.shape[-1] % p:
            raise ValueError(f"input {pixels.shape[-2]}x{pixels.shape[-1]} must be a multiple of the patch size {p}; "
                             f"pad it first (size_multiple={enc.size_multiple})")
        dtype = next(enc.model.parameters()).dtype
        self._tls.stop, self._tls.pending = True, None
        try:  # the tower stops at the last layer's input: that layer itself is never run
            with torch.no_grad():
                enc.model(pixel_values=pixels.to(dtype), **getattr(enc, "_interp", {}))
        except _Captured:
            pass
        finally:
            self._tls.stop = False
        hidden, self._tls.pending = self._tls.pending, None
        if hidden is None:
            raise RuntimeError(f"{enc.spec.name}: the last encoder layer was not reached")
        return hidden

    def _hidden_from_maps(self, maps) -> Tensor:
        key = maps[-1]
        with self._lock:
            got = self._seen.get(id(key))
        if got is None or got[0]() is not key:
            raise ValueError("MaskCLIP reads the CLIP tower's last-layer input, not its output maps: give the maps "
                             "of one of the tower's last few forward passes made while this bridge existed "
                             "(not cached, stitched or copied maps), or give the pixels (B, 3, H, W)")
        return got[1]

    # ------------------------------------------------------------------------------------ dense map
    @torch.no_grad()
    def dense_embeddings(self, maps_or_pixels) -> Tensor:
        """Encoder maps (from a live forward pass) or normalised pixels ``(B, 3, H, W)`` -> MaskCLIP embeddings
        ``(B, D, h, w)``, float32, L2-normalised over ``D``; class (and any other leading) tokens dropped."""
        if isinstance(maps_or_pixels, Tensor):
            hidden = self._hidden_from_pixels(maps_or_pixels)
            gh, gw = (s // self.image_encoder.patch for s in maps_or_pixels.shape[-2:])
        else:
            maps = list(maps_or_pixels)
            hidden = self._hidden_from_maps(maps)
            gh, gw = maps[-1].shape[-2:]
        tokens = value_path_tokens(hidden, self.layer, self.post_layernorm, self.projection)
        tokens = tokens[:, int(self.image_encoder.n_skip):]
        if tokens.shape[1] != gh * gw:
            raise RuntimeError(f"{self.image_encoder.spec.name}: got {tokens.shape[1]} patch tokens for a "
                               f"{gh}x{gw} grid")
        b = tokens.shape[0]
        return F.normalize(tokens.transpose(1, 2).reshape(b, -1, gh, gw), dim=1)

    def embed_names(self, names: Sequence[str]) -> Tensor:
        """Names -> ``(N, D)`` prompt-ensembled CLIP text embeddings (:attr:`templates`), L2-normalised, float32."""
        names = [str(n) for n in names]
        if not names:
            return torch.zeros(0, self.dim)
        from ..data.features import cached_text_embeddings
        emb, _ = cached_text_embeddings(names, self.templates, self.cache_dir, encoder=self.text_encoder,
                                        must_persist=False)
        return F.normalize(emb.float(), dim=-1)

    def embed_classes(self, synonyms: Sequence[Sequence[str]]) -> Tensor:
        """Classes given by their names (e.g. an ImageNet class's WordNet synonyms ``["tabby", "tabby cat"]``) ->
        ``(K, D)``: each class the normalised mean of its names' :meth:`embed_names` embeddings."""
        words = sorted({str(w) for syn in synonyms for w in syn})
        if any(not list(syn) for syn in synonyms):
            raise ValueError("every class needs at least one name")
        emb = self.embed_names(words)
        row = {w: i for i, w in enumerate(words)}
        if not synonyms:
            return torch.zeros(0, self.dim)
        return F.normalize(torch.stack([emb[[row[str(w)] for w in syn]].mean(0) for syn in synonyms]), dim=-1)

    def _queries(self, queries) -> Tensor:
        if isinstance(queries, Tensor):
            if queries.dim() != 2 or queries.shape[1] != self.dim:
                raise ValueError(f"MaskCLIP queries must be (N, {self.dim}) embeddings from the CLIP text tower "
                                 f"of {self.image_encoder.spec.name}, got {tuple(queries.shape)}; or give the names")
            return F.normalize(queries.float(), dim=-1)
        if isinstance(queries, str):
            raise ValueError("queries must be a list of names or an (N, D) tensor, not one string; wrap it: [name]")
        return self.embed_names(list(queries))

    def scores(self, maps_or_pixels, queries) -> Tensor:
        """-> ``(B, N, h, w)`` cosine similarity of each patch's MaskCLIP embedding with each query. ``queries``:
        ``(N, D)`` CLIP text embeddings (normalised here) or a list of names (embedded with :attr:`templates`)."""
        dense = self.dense_embeddings(maps_or_pixels)
        return torch.einsum("bdhw,nd->bnhw", dense, self._queries(queries).to(dense.device))

    def _scaled(self, maps_or_pixels, queries) -> tuple[Tensor, int]:
        """(``scale`` * cosine over the queries then the background names, ``(B, N + nb, h, w)``; N)."""
        q = self._queries(queries)
        n = q.shape[0]
        if self.background:
            if self._background_emb is None:
                self._background_emb = self.embed_names(self.background)
            q = torch.cat([q, self._background_emb.to(q.device)])
        dense = self.dense_embeddings(maps_or_pixels)
        return self.scale * torch.einsum("bdhw,nd->bnhw", dense, q.to(dense.device)), n

    def probabilities(self, maps_or_pixels, queries) -> Tensor:
        """-> ``(B, N, h, w)``: ``softmax(scale * cos)`` over the queries and the background names, the queries'
        part (it sums to 1 over the queries only when there are no background names)."""
        z, n = self._scaled(maps_or_pixels, queries)
        return z.softmax(1)[:, :n]

    def logits(self, maps_or_pixels, queries, out_size: tuple[int, int] | None = None) -> Tensor:
        """-> ``(B, N, H, W)`` log-odds of :meth:`probabilities` (``sigmoid(logit) = p``; capped at
        :data:`LOGIT_CAP`). With ``out_size`` the scaled similarities are resampled bilinearly first and the
        softmax taken at that size, so the sigmoids still sum to 1 over the names at every pixel (resampling
        log-odds instead would leave pixels between cells of different winners with no name at all)."""
        z, n = self._scaled(maps_or_pixels, queries)
        if out_size is not None and tuple(z.shape[-2:]) != tuple(out_size):
            z = F.interpolate(z, size=tuple(out_size), mode="bilinear", align_corners=False)
        return log_odds(z, n)

    def dense_probabilities(self, pixels: Tensor, names) -> Tensor:
        """Teacher's view: normalised pixels ``(B, 3, H, W)`` and class names (or their ``(N, D)`` embeddings, e.g.
        from :meth:`embed_classes`) -> ``(B, N, h, w)`` MaskCLIP probabilities (softmax over the names and the
        background names at temperature ``1/scale`` = 0.01)."""
        if not isinstance(pixels, Tensor):
            raise ValueError("dense_probabilities takes normalised pixels (B, 3, H, W); use probabilities() for maps")
        return self.probabilities(pixels, names)


class _Captured(Exception):
    """Stops the tower once the last layer's input is captured (the pixels path never runs that layer)."""


def _remove(handles) -> None:
    for h in handles:
        h.remove()
    handles.clear()
