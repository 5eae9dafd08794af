"""Text embeddings kept for reuse: a bounded in-memory LRU (:class:`TextCache`) and the builders of what the
scoring needs from the on-disk text cache (:func:`fusionseg.data.features.cached_text_embeddings`): the
classifier bridge's label embeddings (:func:`build_bridge`) and a training vocabulary's embeddings
(:func:`vocabulary_embeddings`).

Everything under :mod:`fusionseg.model` works on tensors handed to it; reading and writing the disk cache
happens here, above it.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch


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


def build_bridge(image_encoder, text_encoder, top_k: int = 10, label_templates: str = "none",
                 cache_dir: str | Path | None = None, groups: bool = True, **kw):
    """A :class:`~fusionseg.model.bridge.ClassifierBridge` for ``image_encoder``'s named classes, their words
    embedded by ``text_encoder`` through the on-disk text cache (``cache_dir``, default ``FUSIONSEG_CACHE``;
    an unwritable folder is warned about and the embeddings used anyway). ``kw``: ``center``, ``width``."""
    from .data.features import cached_text_embeddings
    from .model.bridge import ClassifierBridge

    def embed(words: list[str]) -> torch.Tensor:
        emb, _ = cached_text_embeddings(words, label_templates, cache_dir, encoder=text_encoder, must_persist=False)
        return emb

    return ClassifierBridge.from_words(image_encoder, embed, top_k=top_k, groups=groups, **kw)


def vocabulary_embeddings(names: Sequence[str], templates, text_encoder) -> torch.Tensor:
    """``(V, D)`` embeddings of a training vocabulary, kept on disk (``FUSIONSEG_CACHE``): embedding a whole
    vocabulary takes ~2 s per process."""
    from .data.features import cached_text_embeddings
    emb, _ = cached_text_embeddings(list(names), templates, encoder=text_encoder, must_persist=False)
    return emb
