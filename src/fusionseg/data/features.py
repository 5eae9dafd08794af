"""Frozen-feature cache: encoder maps computed once per (image, view) and kept on disk.

Layout: ``CACHE/<encoder name>-<fingerprint>/<dataset>-<hash of its path and ids>-s<size>.safetensors``
holding, for N images, every encoder level as one ``(N, V, C_i, h_i, w_i)`` fp16 tensor (V views: original
and horizontally flipped) and the masks as ``(N, V, size, size)`` uint8. The file's metadata records the ids,
so a cache hit gives bit-identical features without running the encoder.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..encoders.base import ImageEncoder
from .datasets import FolderDataset
from .transforms import prepare_training_pair


def default_cache_dir() -> Path:
    return Path(os.environ.get("FUSIONSEG_CACHE", Path.home() / ".cache" / "fusionseg"))


@dataclass
class CachedFeatures:
    """Features of one dataset: ``levels[i]`` is ``(N, V, C_i, h_i, w_i)`` fp16, ``masks`` ``(N, V, S, S)`` uint8."""

    ids: list[str]
    levels: list[torch.Tensor]
    masks: torch.Tensor
    path: Path
    hit: bool


def _key(ds: FolderDataset, size: int, views: int) -> str:
    h = hashlib.sha256(json.dumps([str(ds.root.resolve()), ds.ids, size, views, ds.meta.get("classes")]).encode())
    return f"{ds.name}-{h.hexdigest()[:12]}-s{size}-v{views}"


@torch.no_grad()
def cache_features(ds: FolderDataset, encoder: ImageEncoder, size: int = 320, views: int = 2,
                   cache_dir: str | Path | None = None, batch_size: int = 16, device: str | torch.device = "cpu",
                   progress: bool = True) -> CachedFeatures:
    """Compute (or load) the cached encoder maps of every image of ``ds`` at ``size`` px (longer side, padded square)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = root / f"{encoder.spec.name.replace('/', '_').replace(':', '_')}-{encoder.spec.fingerprint}"
    path = folder / (_key(ds, size, views) + ".safetensors")
    if path.is_file():
        t = load_file(str(path))
        n_levels = len([k for k in t if k.startswith("level")])
        return CachedFeatures(list(ds.ids), [t[f"level{i}"] for i in range(n_levels)], t["masks"], path, True)
    folder.mkdir(parents=True, exist_ok=True)
    encoder = encoder.to(device)
    n = len(ds)
    levels: list[torch.Tensor] | None = None
    masks = torch.empty(n, views, size, size, dtype=torch.uint8)
    bar = tqdm(total=n, desc=f"caching {ds.name}", unit="img", disable=not progress, dynamic_ncols=True)
    t0 = time.time()
    for start in range(0, n, batch_size):
        xs, ms = [], []
        for i in range(start, min(n, start + batch_size)):
            s = ds[i]
            x, m = prepare_training_pair(s.image, s.mask, size, encoder.mean, encoder.std)
            xs.append(x)
            ms.append(m)
        x = torch.stack(xs)
        m = torch.stack(ms)
        batch_views = [x, x.flip(-1)][:views]
        mask_views = [m, m.flip(-1)][:views]
        for v, (xv, mv) in enumerate(zip(batch_views, mask_views)):
            outs = encoder(xv.to(device))
            if levels is None:
                levels = [torch.empty(n, views, *o.shape[1:], dtype=torch.float16) for o in outs]
            for lv, o in zip(levels, outs):
                lv[start:start + len(xs), v] = o.to("cpu", torch.float16)
            masks[start:start + len(xs), v] = mv
        bar.update(len(xs))
    bar.close()
    assert levels is not None
    tensors = {f"level{i}": lv.contiguous() for i, lv in enumerate(levels)}
    tensors["masks"] = masks
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"ids": json.dumps(ds.ids), "dataset": str(ds.root), "size": str(size),
                                          "seconds": f"{time.time() - t0:.1f}"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return CachedFeatures(list(ds.ids), levels, masks, path, False)


# --------------------------------------------------------------------------------------------- text side
def _text_file(root: Path, name: str, fingerprint: str, templates) -> Path:
    # Keyed by the resolved template list, so editing a named set never reuses stale embeddings.
    from ..encoders.templates import resolve_templates
    t = hashlib.sha256(json.dumps(resolve_templates(templates)).encode()).hexdigest()[:12]
    return root / "text" / f"{name.replace('/', '_').replace(':', '_')}-{fingerprint}-{t}.safetensors"


def cached_text_embeddings(names: list[str], templates, cache_dir: str | Path | None = None,
                           encoder=None, encoder_name: str | None = None) -> tuple[torch.Tensor, "object"]:
    """Embeddings ``(N, dim)`` of ``names`` from the on-disk text cache, computing only the missing ones.

    Give a built ``encoder``, or just ``encoder_name``: if the cache already holds every name for the spec last
    recorded under that name, the text model is not even loaded. Returns (embeddings, EncoderSpec).
    """
    from ..encoders.base import EncoderSpec, build_text_encoder
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    index_path = root / "text" / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    name = encoder.spec.name if encoder is not None else encoder_name
    spec = encoder.spec if encoder is not None else (EncoderSpec(**index[name]) if name in index else None)
    store: dict[str, torch.Tensor] = {}
    if spec is not None:
        f = _text_file(root, spec.name, spec.fingerprint, templates)
        if f.is_file():
            store = load_file(str(f))
    missing = [n for n in names if n not in store]
    if missing:
        if encoder is None:
            encoder = build_text_encoder(name)
            spec = encoder.spec
            f = _text_file(root, spec.name, spec.fingerprint, templates)
            store = load_file(str(f)) if f.is_file() else {}
            missing = [n for n in names if n not in store]
        if missing:
            emb = encoder.encode(missing, templates).float().cpu()
            store.update({n: e.contiguous() for n, e in zip(missing, emb)})
            f.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=f.parent)
            os.close(fd)
            save_file(store, tmp)
            os.replace(tmp, f)
        index[spec.name] = spec.to_dict()
        index_path.write_text(json.dumps(index, indent=1))
    return torch.stack([store[n] for n in names]), spec
