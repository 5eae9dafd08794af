"""The sharded, checksummed feature cache: reuse across subsets, corruption detected and recomputed, rank
sharding, a full disk."""
import errno
import json

import pytest
import torch

import fusionseg.data.features as features
from fusionseg.data.datasets import FolderDataset
from fusionseg.data.features import CacheError, cache_features, verify_store

from conftest import PoolEncoder, make_shapes_dataset


@pytest.fixture
def ds(tmp_path):
    return FolderDataset(make_shapes_dataset(tmp_path / "shapes", n=7, size=64))


def test_shards_index_and_subset_reuse(ds, tmp_path):
    enc = PoolEncoder().freeze()
    a = cache_features(ds, enc, 64, cache_dir=tmp_path / "c", progress=False, shard_size=3)
    assert not a.hit and a.computed == 7
    entries = [json.loads(p.read_text()) for p in sorted(a.path.glob("shard-*.json"))]
    assert sorted(len(e["ids"]) for e in entries) == [1, 3, 3]
    assert all(len(e["sha256"]) == 64 and (a.path / e["file"]).is_file() for e in entries)
    # a subset (e.g. the training split) reads the shards that hold its ids, computes nothing
    sub = ds.subset(ds.ids[2:6])
    b = cache_features(sub, enc, 64, cache_dir=tmp_path / "c", progress=False, shard_size=3)
    assert b.hit and b.computed == 0 and b.path == a.path
    for x, y in zip(a.levels, b.levels):
        assert torch.equal(x[2:6], y)
    assert torch.equal(a.masks[2:6], b.masks)


def test_corrupt_shard_is_detected_and_recomputed(ds, tmp_path):
    enc = PoolEncoder().freeze()
    a = cache_features(ds, enc, 64, cache_dir=tmp_path / "c", progress=False, shard_size=3)
    shard = sorted(a.path.glob("shard-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte inside the tensor data: still parses, checksum fails
    shard.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="checksum mismatch"):
        b = cache_features(ds, enc, 64, cache_dir=tmp_path / "c", progress=False, shard_size=3)
    assert not b.hit and b.computed == len(json.loads(shard.with_suffix(".json").read_text())["ids"])
    for x, y in zip(a.levels, b.levels):
        assert torch.equal(x, y)  # recomputed, never the corrupted bytes
    # truncated (a partial copy): detected the same way
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.warns(UserWarning, match="truncated or corrupted"):
        c = cache_features(ds, enc, 64, cache_dir=tmp_path / "c", progress=False, shard_size=3)
    assert torch.equal(c.masks, a.masks)
    assert verify_store(a.path) == (3, [])


def test_shard_without_index_entry_is_ignored(ds, tmp_path):
    """A kill between writing a shard and its entry leaves a shard nobody trusts: it is recomputed."""
    enc = PoolEncoder().freeze()
    a = cache_features(ds, enc, 64, cache_dir=tmp_path / "c", progress=False, shard_size=4)
    entry = sorted(a.path.glob("shard-*.json"))[0]
    n = len(json.loads(entry.read_text())["ids"])
    entry.unlink()
    b = cache_features(ds, enc, 64, cache_dir=tmp_path / "c", progress=False, shard_size=4)
    assert b.computed == n and torch.equal(a.levels[0], b.levels[0])


def test_rank_without_barrier_fills_in_the_rest(ds, tmp_path):
    enc = PoolEncoder().freeze()
    r1 = cache_features(ds, enc, 64, cache_dir=tmp_path / "c", progress=False, shard_size=2, rank=1, world_size=2)
    assert r1.computed == 7  # its chunks 1 and 3, then the ones no other rank wrote
    again = cache_features(ds, enc, 64, cache_dir=tmp_path / "c", progress=False, shard_size=2)
    assert again.hit and torch.equal(again.levels[2], r1.levels[2])


def test_ranks_split_work_with_barrier(ds, tmp_path):
    import threading
    enc = PoolEncoder().freeze()
    b = threading.Barrier(2)
    out = {}

    def run(rank):
        out[rank] = cache_features(ds, enc, 64, cache_dir=tmp_path / "c", progress=False, shard_size=2,
                                   rank=rank, world_size=2, barrier=b.wait)
    ts = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert out[0].computed == 4 and out[1].computed == 3  # chunks 0,2 (2+2) and 1,3 (2+1)
    assert torch.equal(out[0].levels[0], out[1].levels[0])


def test_disk_full_while_caching(ds, tmp_path, monkeypatch):
    enc = PoolEncoder().freeze()

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(features, "write_atomic", full)
    with pytest.raises(CacheError, match="disk is full.*--cache-dir"):
        cache_features(ds, enc, 64, cache_dir=tmp_path / "c", progress=False)
    monkeypatch.undo()
    store = features.store_dir(ds, enc, 64, 2, tmp_path / "c")
    assert not list(store.glob("shard-*"))  # nothing half-written kept
    assert not list(store.glob("*.tmp"))


def test_empty_dataset_is_an_error(ds, tmp_path):
    with pytest.raises(ValueError, match="no images"):
        cache_features(ds.subset([]), PoolEncoder().freeze(), 64, cache_dir=tmp_path / "c", progress=False)
