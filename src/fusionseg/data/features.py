"""Frozen-feature cache: encoder maps computed once per (image, view) and kept on disk in checksummed shards.

Layout::

    CACHE/<encoder name>-<encoder fingerprint>/<dataset>-<hash of its root, classes, size, views>/
        shard-<hash of its ids>.safetensors   every level as (n, V, C_i, h_i, w_i) fp16 + masks (n, V, S, S) uint8
        shard-<hash of its ids>.json          the shard's index entry: ids, sha256 of the file bytes, shapes

A store is keyed by the encoder fingerprint and the (dataset, size, views); inside it every image id lives in
exactly one shard, so any subset of a dataset (the training split, the validation split, a rank's share)
reads the shards that hold its ids and computes only the ids no shard holds. Views are the original and the
horizontally flipped image (``views=2``); scale jitter is a separate store per training size, and crops are
taken on the cached grid at training time (by the training loop's batch planning), so augmentation stays real.

Integrity: a shard is written to a temporary file, fsynced and renamed, and only then is its ``.json`` entry
written (same way). A shard without an entry (a kill mid-write) is ignored and recomputed; a shard whose bytes
do not match the recorded sha256 (truncated, bit rot) is reported with a warning, deleted and recomputed.
Loading never uses bytes that were not verified.

Memory: shards are memory-mapped (private, read-only use), not read into the process. The features live in
the operating system's page cache, shared by every process that reads the same store (the ranks of a
``torchrun`` job on one machine) and evicted under memory pressure; :class:`RowTable` reads the rows of many
shards as one table without concatenating them. A process's own (anonymous) memory therefore does not grow
with the dataset. Shards are only ever replaced by a rename (a new file), never rewritten in place, so a mapped
shard keeps the bytes that were verified.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save as save_bytes
from tqdm import tqdm

from .._atomic import write_atomic, write_failure_reason
from ..encoders.base import ImageEncoder
from .transforms import prepare_training_pair

try:
    from safetensors import SafetensorError
except ImportError:  # older releases
    SafetensorError = Exception  # type: ignore[misc,assignment]

FORMAT = "fusionseg-cache/2"
DEFAULT_SHARD_SIZE = 256


class CacheError(OSError):
    """The feature cache could not be written (disk full, permissions): the message says where and what to do."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("FUSIONSEG_CACHE", Path.home() / ".cache" / "fusionseg"))


class RowTable:
    """A tensor whose rows (first dimension) lie in several parts, e.g. memory-mapped shards, read as one.

    ``t[i, ...]`` with an int ``i`` is that row of its part (a view, no copy); ``t[rows, ...]`` with a list,
    range, slice or 1-D tensor stacks the selected rows. A part may carry a lookup table applied on read
    (``lut[value]``; masks with dataset-local class ids -> global ids), so no re-indexed copy is ever stored.
    """

    def __init__(self, parts: Sequence[torch.Tensor], index: Sequence[tuple[int, int]],
                 luts: Sequence[torch.Tensor | None] | None = None):
        if not parts or not index:
            raise ValueError("a RowTable needs at least one part and one row")
        self.parts = list(parts)
        self.index = list(index)  # row -> (part, row within the part)
        self.luts = list(luts) if luts is not None else [None] * len(self.parts)
        self.shape = torch.Size([len(self.index), *self.parts[0].shape[1:]])
        lut = self.luts[0]
        self.dtype = lut.dtype if lut is not None else self.parts[0].dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> "RowTable":
        """One in-memory tensor as a table."""
        return cls([t], [(0, r) for r in range(t.shape[0])])

    @classmethod
    def concat(cls, tables: Sequence["RowTable"]) -> "RowTable":
        """The rows of ``tables`` one after another (their parts are shared, not copied)."""
        parts, index, luts = [], [], []
        for t in tables:
            base = len(parts)
            parts += t.parts
            luts += t.luts
            index += [(base + p, r) for p, r in t.index]
        return cls(parts, index, luts)

    def with_lut(self, lut: torch.Tensor) -> "RowTable":
        """The same rows read through ``lut`` (``lut[value]``; replaces any table already set)."""
        return RowTable(self.parts, self.index, [lut] * len(self.parts))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key) -> torch.Tensor:
        key = key if isinstance(key, tuple) else (key,)
        first, rest = key[0], key[1:]
        if isinstance(first, torch.Tensor) and first.dim() == 0:
            first = int(first)
        if isinstance(first, int):
            p, r = self.index[first]
            out = self.parts[p][(r, *rest)]
            lut = self.luts[p]
            if lut is None:
                return out
            return lut.index_select(0, out.reshape(-1).int()).view(out.shape)  # 3x faster than lut[out.long()]
        if isinstance(first, slice):
            first = range(len(self))[first]
        rows = first.tolist() if isinstance(first, torch.Tensor) else list(first)
        return torch.stack([self[(int(i), *rest)] for i in rows])

    def materialize(self) -> torch.Tensor:
        """Every row as one in-memory tensor (for small sets, tests and scripts)."""
        return self[range(len(self))]


@dataclass
class CachedFeatures:
    """Features of one dataset: ``level_rows[i]`` is a table ``(N, V, C_i, h_i, w_i)`` fp16 and ``mask_rows``
    ``(N, V, S, S)`` uint8, both read from the memory-mapped shards (see :class:`RowTable`)."""

    ids: list[str]
    level_rows: list[RowTable]
    mask_rows: RowTable
    path: Path          # the store folder
    hit: bool           # every id came from verified shards (nothing computed)
    computed: int = 0   # images computed in this call (by this process)

    @property
    def levels(self) -> list[torch.Tensor]:
        """Every level as one in-memory tensor ``(N, V, C_i, h_i, w_i)`` (a copy: for small sets)."""
        return [t.materialize() for t in self.level_rows]

    @property
    def masks(self) -> torch.Tensor:
        """The masks as one in-memory tensor ``(N, V, S, S)`` (a copy: for small sets)."""
        return self.mask_rows.materialize()


def _classes_key(ds) -> object:
    meta = getattr(ds, "meta", None)
    if isinstance(meta, dict) and "classes" in meta:
        return [meta.get("classes"), meta.get("background_values"), meta.get("ignore_values")]
    return [list(ds.class_names), getattr(ds, "novel_as_ignore", None), getattr(ds, "fold", None)]


def store_dir(ds, encoder: ImageEncoder, size: int, views: int, cache_dir: str | Path | None = None) -> Path:
    """Folder of the shards of ``ds`` at ``size`` px with ``views`` views for ``encoder``."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = root / f"{encoder.spec.name.replace('/', '_').replace(':', '_')}-{encoder.spec.fingerprint}"
    h = hashlib.sha256(json.dumps([str(Path(ds.root).resolve()), _classes_key(ds), size, views]).encode())
    return folder / f"{ds.name}-{h.hexdigest()[:12]}-s{size}-v{views}"


def _disk_error(e: OSError, what: Path) -> CacheError:
    err = CacheError(f"could not write the feature cache {what}: {write_failure_reason(e)}; free space or pass "
                     f"--cache-dir on another disk (nothing half-written was kept)")
    err.errno = e.errno
    return err


def _scan(store: Path) -> dict[str, dict]:
    """Shard entries of a store: {shard file name: entry}; shards without an entry are left out."""
    out = {}
    if not store.is_dir():
        return out
    for j in sorted(store.glob("shard-*.json")):
        try:
            e = json.loads(j.read_text())
            if e.get("format") == FORMAT and (store / e["file"]).name:
                out[e["file"]] = e
        except (OSError, ValueError, KeyError):
            warnings.warn(f"feature cache: unreadable index entry {j}; its shard will be recomputed", stacklevel=3)
    return out


def _load_verified(store: Path, entry: dict, _retry: bool = True) -> dict[str, torch.Tensor] | None:
    """The shard's tensors, memory-mapped (``safetensors.safe_open``: no copy into the process), if its bytes match
    the recorded sha256, else None (after a warning; the bad shard and its entry are removed so that it is
    recomputed). The bytes are hashed through a read-only mapping of the same file (same inode) that is then
    opened: a shard replaced in between (shards change only by rename) is verified again."""
    f = store / entry["file"]
    problem = None
    tensors = None
    try:
        with open(f, "rb") as fh:
            inode = os.fstat(fh.fileno()).st_ino
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                problem = "empty (0 bytes on disk; truncated)"
            else:
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    if hashlib.sha256(m).hexdigest() != entry.get("sha256"):
                        problem = f"checksum mismatch ({size} bytes on disk; truncated or corrupted)"
        if problem is None:
            try:
                with safe_open(str(f), framework="pt") as so:
                    if os.stat(f).st_ino != inode:  # replaced since it was hashed: verify the new file
                        return _load_verified(store, entry, _retry=False) if _retry else None
                    tensors = {k: so.get_tensor(k) for k in so.keys()}
            except (SafetensorError, ValueError, KeyError, TypeError) as e:
                problem = f"not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    except OSError as e:
        problem = f"unreadable ({getattr(e, 'strerror', None) or e})"
    if problem is not None:
        warnings.warn(f"feature cache: shard {f} is {problem}; recomputing its {len(entry.get('ids', []))} images",
                      stacklevel=3)
        for p in (f, f.with_suffix(".json")):
            try:
                p.unlink(missing_ok=True)
            except OSError:
                pass
        return None
    return tensors


def _locate(entries: dict[str, dict]) -> dict[str, tuple[str, int]]:
    """Image id -> (shard file, row) over a store's index entries (the first shard listing an id wins)."""
    where: dict[str, tuple[str, int]] = {}
    for fname, e in entries.items():
        for row, i in enumerate(e["ids"]):
            where.setdefault(i, (fname, row))
    return where


def _shard_name(ids: Sequence[str]) -> str:
    return "shard-" + hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()[:16]


@torch.no_grad()
def _compute_shard(ds, positions: Sequence[int], encoder: ImageEncoder, size: int, views: int, batch_size: int,
                   device, bar) -> dict[str, torch.Tensor]:
    n = len(positions)
    levels: list[torch.Tensor] | None = None
    masks = torch.empty(n, views, size, size, dtype=torch.uint8)
    for start in range(0, n, batch_size):
        xs, ms = [], []
        for p in positions[start:start + batch_size]:
            s = ds[p]
            x, m = prepare_training_pair(s.image, s.mask, size, encoder.mean, encoder.std)
            xs.append(x)
            ms.append(m)
        x, m = torch.stack(xs), torch.stack(ms)
        for v, (xv, mv) in enumerate(list(zip([x, x.flip(-1)], [m, m.flip(-1)]))[:views]):
            outs = encoder(xv.to(device))
            if levels is None:
                levels = [torch.empty(n, views, *o.shape[1:], dtype=torch.float16) for o in outs]
            for lv, o in zip(levels, outs):
                lv[start:start + len(xs), v] = o.to("cpu", torch.float16)
            masks[start:start + len(xs), v] = mv
        if bar is not None:
            bar.update(len(xs))
    assert levels is not None
    t = {f"level{i}": lv.contiguous() for i, lv in enumerate(levels)}
    t["masks"] = masks
    return t


def _write_shard(store: Path, ids: list[str], tensors: dict[str, torch.Tensor], seconds: float) -> None:
    name = _shard_name(ids)
    try:
        store.mkdir(parents=True, exist_ok=True)
        data = save_bytes(tensors, metadata={"ids": json.dumps(ids)})
        write_atomic(store / f"{name}.safetensors", data)
        entry = {"format": FORMAT, "file": f"{name}.safetensors", "ids": ids,
                 "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "seconds": round(seconds, 2),
                 "shapes": {k: list(v.shape) for k, v in tensors.items()}}
        write_atomic(store / f"{name}.json", json.dumps(entry).encode())
    except CacheError:
        raise
    except OSError as e:
        raise _disk_error(e, store / f"{name}.safetensors") from None


@torch.no_grad()
def cache_features(ds, encoder: ImageEncoder, size: int = 320, views: int = 2,
                   cache_dir: str | Path | None = None, batch_size: int = 16, device: str | torch.device = "cpu",
                   progress: bool = True, shard_size: int = DEFAULT_SHARD_SIZE, rank: int = 0, world_size: int = 1,
                   barrier: Callable[[], None] | None = None) -> CachedFeatures:
    """Compute (or load) the cached encoder maps of every image of ``ds`` at ``size`` px (longer side, padded square).

    ``ds`` is any dataset with ``root``, ``name``, ``ids``, ``class_names`` and ``ds[i] -> Sample``. Ids that no
    verified shard holds are computed in shards of ``shard_size`` images; under DDP (``world_size > 1``) rank r
    computes missing shards r, r + world_size, ... and ``barrier`` is called before everyone reads.
    """
    if len(ds) == 0:
        raise ValueError(f"{ds.name}: no images to cache")
    store = store_dir(ds, encoder, size, views, cache_dir)
    want = list(ds.ids)
    entries = _scan(store)
    where = _locate(entries)
    missing = [p for p, i in enumerate(want) if i not in where]
    computed = 0
    if missing:
        chunks = [missing[s:s + shard_size] for s in range(0, len(missing), shard_size)]
        mine = chunks[rank::world_size]
        encoder = encoder.to(device)
        total = sum(len(c) for c in mine)
        bar = tqdm(total=total, desc=f"caching {ds.name} at {size} px", unit="img",
                   disable=not progress or total == 0, dynamic_ncols=True)
        for c in mine:
            t0 = time.time()
            tensors = _compute_shard(ds, c, encoder, size, views, batch_size, device, bar)
            _write_shard(store, [want[p] for p in c], tensors, time.time() - t0)
            computed += len(c)
        bar.close()
    if world_size > 1 and barrier is not None:
        barrier()
    if missing:
        entries = _scan(store)
        where = _locate(entries)
    rest = [p for p, i in enumerate(want) if i not in where]
    if rest:  # other ranks' shares when no one else built them (no barrier), or shards lost meanwhile
        encoder = encoder.to(device)
        for s in range(0, len(rest), shard_size):
            c = rest[s:s + shard_size]
            t0 = time.time()
            _write_shard(store, [want[p] for p in c], _compute_shard(ds, c, encoder, size, views, batch_size, device,
                                                                      None), time.time() - t0)
            computed += len(c)
        entries = _scan(store)
        where = _locate(entries)
    # Read every needed shard once, verifying it; a bad shard is recomputed here (by whoever finds it).
    rows_by_shard: dict[str, list[tuple[int, int]]] = {}
    for p, i in enumerate(want):
        f, row = where[i]
        rows_by_shard.setdefault(f, []).append((p, row))
    parts: list[dict[str, torch.Tensor]] = []
    index: list[tuple[int, int] | None] = [None] * len(want)
    hit = not missing
    for f, pairs in rows_by_shard.items():
        t = _load_verified(store, entries[f]) if f in entries else None
        if t is None:  # corrupt or vanished: recompute exactly these images into a fresh shard
            hit = False
            ids = entries[f]["ids"] if f in entries else None
            pos = {i: p for p, i in enumerate(want)}
            recompute_ids = ids if ids and all(i in pos for i in ids) else [want[p] for p, _ in pairs]
            t0 = time.time()
            t = _compute_shard(ds, [pos[i] for i in recompute_ids], encoder.to(device), size, views, batch_size,
                               device, None)
            _write_shard(store, list(recompute_ids), t, time.time() - t0)
            computed += len(recompute_ids)
            rowmap = {i: r for r, i in enumerate(recompute_ids)}
            pairs = [(p, rowmap[want[p]]) for p, _ in pairs]
        for p, row in pairs:
            index[p] = (len(parts), row)
        parts.append(t)
    assert parts and all(i is not None for i in index)
    n_levels = len([k for k in parts[0] if k.startswith("level")])
    level_rows = [RowTable([t[f"level{k}"] for t in parts], index) for k in range(n_levels)]  # type: ignore[arg-type]
    mask_rows = RowTable([t["masks"] for t in parts], index)  # type: ignore[arg-type]
    return CachedFeatures(want, level_rows, mask_rows, store, hit, computed)


def verify_store(store: str | Path) -> tuple[int, list[str]]:
    """Check every shard of a store: -> (good shard count, list of bad shard files, which were removed)."""
    store = Path(store)
    good, bad = 0, []
    for f, e in _scan(store).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = _load_verified(store, e)
        if t is None:
            bad.append(f)
        else:
            good += 1
    return good, bad


# --------------------------------------------------------------------------------------------- text side
def _text_file(root: Path, name: str, fingerprint: str, templates) -> Path:
    # Keyed by the resolved template list, so editing a named set never reuses stale embeddings.
    from ..encoders.templates import resolve_templates
    t = hashlib.sha256(json.dumps(resolve_templates(templates)).encode()).hexdigest()[:12]
    return root / "text" / f"{name.replace('/', '_').replace(':', '_')}-{fingerprint}-{t}.safetensors"


def _read_text_store(f: Path) -> dict[str, torch.Tensor]:
    """A text-embedding file's tensors; {} when it is absent or unreadable (then recomputed and rewritten)."""
    if not f.is_file():
        return {}
    try:
        return load_file(str(f))
    except Exception:  # noqa: BLE001 - a damaged file is only a cache miss
        warnings.warn(f"text cache: {f} is unreadable; its embeddings are recomputed", stacklevel=3)
        return {}


_unwritable_warned: set[str] = set()


def cached_text_embeddings(names: list[str], templates, cache_dir: str | Path | None = None,
                           encoder=None, encoder_name: str | None = None,
                           must_persist: bool = True) -> tuple[torch.Tensor, "object"]:
    """Embeddings ``(N, dim)`` of ``names`` from the on-disk text cache, computing only the missing ones.

    Give a built ``encoder``, or just ``encoder_name``: if the cache already holds every name for the spec last
    recorded under that name, the text model is not even loaded. Returns (embeddings, EncoderSpec).
    ``must_persist=False`` (inference): a cache folder that cannot be written is warned about once and the
    embeddings are used anyway; otherwise (training) it raises :class:`CacheError`.
    """
    from ..encoders.base import EncoderSpec, build_text_encoder
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    index_path = root / "text" / "index.json"
    try:
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    except (OSError, ValueError):
        index = {}  # rewritten below
    name = encoder.spec.name if encoder is not None else encoder_name
    spec = encoder.spec if encoder is not None else (EncoderSpec(**index[name]) if name in index else None)
    store: dict[str, torch.Tensor] = {}
    if spec is not None:
        f = _text_file(root, spec.name, spec.fingerprint, templates)
        store = _read_text_store(f)
    missing = [n for n in names if n not in store]
    if missing:
        if encoder is None:
            encoder = build_text_encoder(name)
            spec = encoder.spec
            f = _text_file(root, spec.name, spec.fingerprint, templates)
            store = _read_text_store(f)
            missing = [n for n in names if n not in store]
        if missing:
            emb = encoder.encode(missing, templates).float().cpu()
            store.update({n: e.contiguous() for n, e in zip(missing, emb)})
        index[spec.name] = spec.to_dict()
        target = f
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            if missing:
                write_atomic(f, save_bytes(store))
            target = index_path
            write_atomic(index_path, json.dumps(index, indent=1).encode())
        except OSError as e:
            if must_persist:
                raise _disk_error(e, target) from None
            if str(root) not in _unwritable_warned:
                _unwritable_warned.add(str(root))
                warnings.warn(f"text embeddings are not kept on disk: {root} is not writable "
                              f"({e.strerror or e}); set FUSIONSEG_CACHE to a writable folder", stacklevel=2)
    return torch.stack([store[n] for n in names]), spec
