"""The sharded, checksummed feature cache: reuse across subsets, corruption detected and recomputed, rank
sharding, a full disk."""
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
    ref_levels, ref_masks = a.levels, a.masks  # copies: a's own tables map the files damaged in place below
    shard = sorted(a.path.glob("shard-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte inside the tensor data: still parses, checksum fails
    shard.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="checksum mismatch"):
        b = cache_features(ds, enc, 64, cache_dir=tmp_path / "c", progress=False, shard_size=3)
    assert not b.hit and b.computed == len(json.loads(shard.with_suffix(".json").read_text())["ids"])
    for x, y in zip(ref_levels, b.levels):
        assert torch.equal(x, y)  # recomputed, never the corrupted bytes
    assert torch.equal(b.masks, ref_masks)  # the flipped byte lies in the masks (stored last)
    # truncated (a partial copy): detected the same way
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.warns(UserWarning, match="truncated or corrupted"):
        c = cache_features(ds, enc, 64, cache_dir=tmp_path / "c", progress=False, shard_size=3)
    assert torch.equal(c.masks, ref_masks)
    assert verify_store(a.path) == (3, [])


def test_shard_with_matching_checksum_but_not_safetensors_is_recomputed(ds, tmp_path):
    import hashlib
    enc = PoolEncoder().freeze()
    a = cache_features(ds, enc, 64, cache_dir=tmp_path / "c", progress=False, shard_size=4)
    ref_masks = a.masks  # a copy: a's own tables map the file overwritten below
    shard = sorted(a.path.glob("shard-*.safetensors"))[0]
    entry_file = shard.with_suffix(".json")
    entry = json.loads(entry_file.read_text())
    bad = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\x00" * 64
    shard.write_bytes(bad)
    entry["sha256"] = hashlib.sha256(bad).hexdigest()   # the bytes are the recorded ones: only parsing fails
    entry_file.write_text(json.dumps(entry))
    with pytest.warns(UserWarning, match="not a readable safetensors file"):
        b = cache_features(ds, enc, 64, cache_dir=tmp_path / "c", progress=False, shard_size=4)
    assert b.computed == len(entry["ids"]) and torch.equal(b.masks, ref_masks)
    assert verify_store(a.path) == (2, [])


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


@pytest.mark.parametrize("what", ["shard", "entry"])
def test_disk_full_half_way_while_caching(ds, tmp_path, monkeypatch, what):
    """The disk fills up in the middle of a real write of a shard (or of its index entry, written after it):
    a CacheError says so, nothing half-written is kept, and the next run computes what is missing."""
    from fulldisk import disk_fills_after, leftovers
    enc = PoolEncoder().freeze()
    first = cache_features(ds.subset(ds.ids[:3]), enc, 64, cache_dir=tmp_path / "c", progress=False, shard_size=3)
    before = {p.name: p.read_bytes() for p in first.path.iterdir()}
    budget = 500 if what == "shard" else 50
    rec = disk_fills_after(monkeypatch, budget, nth=1 if what == "shard" else 2)   # shard, then its .json entry
    with pytest.raises(CacheError, match="disk is full.*--cache-dir.*nothing half-written"):
        cache_features(ds, enc, 64, cache_dir=tmp_path / "c", progress=False, shard_size=3)
    assert rec["bytes_on_disk"] == budget and not rec["temp"].exists() and leftovers(tmp_path / "c") == []
    after = {p.name: p.read_bytes() for p in first.path.iterdir()}
    assert {k: after[k] for k in before} == before                    # the earlier shard and entry untouched
    extra = sorted(set(after) - set(before))
    if what == "shard":
        assert extra == []
    else:  # the new shard made it, its entry did not: such a shard is never read
        assert len(extra) == 1 and extra[0].endswith(".safetensors")
    monkeypatch.undo()
    again = cache_features(ds, enc, 64, cache_dir=tmp_path / "c", progress=False, shard_size=3)
    assert again.computed == 4                                        # an entry-less shard is not trusted
    ref = cache_features(ds, enc, 64, cache_dir=tmp_path / "fresh", progress=False, shard_size=3)
    for x, y in zip(again.levels, ref.levels):
        assert torch.equal(x[:], y[:])


def test_disk_full_half_way_while_saving_text_embeddings(tmp_path, monkeypatch):
    from conftest import HashText
    from fulldisk import disk_fills_after, leftovers
    enc = HashText()
    first, _ = features.cached_text_embeddings(["cat", "dog"], "none", tmp_path, encoder=enc)
    store = next((tmp_path / "text").glob("*.safetensors"))
    old = store.read_bytes()
    rec = disk_fills_after(monkeypatch, 64, target=store.name)
    with pytest.raises(CacheError, match="disk is full"):
        features.cached_text_embeddings(["cat", "dog", "sky"], "none", tmp_path, encoder=enc)
    assert rec["bytes_on_disk"] == 64 and store.read_bytes() == old and leftovers(tmp_path) == []
    monkeypatch.undo()
    again, _ = features.cached_text_embeddings(["dog", "cat"], "none", tmp_path, encoder=enc)
    assert torch.equal(again, first.flip(0))                          # the old store still reads


def test_empty_dataset_is_an_error(ds, tmp_path):
    with pytest.raises(ValueError, match="no images"):
        cache_features(ds.subset([]), PoolEncoder().freeze(), 64, cache_dir=tmp_path / "c", progress=False)


# ------------------------------------------------------------------------- memory-mapped shards, RowTable
def test_row_table_reads_like_the_concatenated_tensor():
    from fusionseg.data.features import RowTable
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 2, 4, 5, generator=g), torch.randn(2, 2, 4, 5, generator=g)
    # rows in a shuffled order over two parts, as shards hold them
    t = RowTable([a, b], [(1, 1), (0, 2), (0, 0), (1, 0), (0, 1)])
    full = torch.stack([b[1], a[2], a[0], b[0], a[1]])
    assert t.shape == full.shape and len(t) == 5 and t.dtype == a.dtype
    assert torch.equal(t.materialize(), full)
    assert torch.equal(t[3, 1, :, 2:4], full[3, 1, :, 2:4])
    assert t[1].data_ptr() == a[2].data_ptr()  # one row is a view of its part, not a copy
    assert torch.equal(t[[4, 0], 0], full[[4, 0], 0])
    assert torch.equal(t[torch.tensor([2, 3]), 1], full[[2, 3], 1])
    assert torch.equal(t[1:4], full[1:4])
    both = RowTable.concat([t, RowTable.of(a)])
    assert torch.equal(both.materialize(), torch.cat([full, a]))
    masks = RowTable.of(torch.tensor([[0, 1, 2, 7]], dtype=torch.uint8))
    lut = torch.full((256,), -1, dtype=torch.int16)
    lut[0], lut[1], lut[2] = 0, 5, 9
    m = masks.with_lut(lut)
    assert m.dtype == torch.int16 and m[0].tolist() == [0, 5, 9, -1]
    with pytest.raises(ValueError):
        RowTable([], [])


def test_pool_over_two_datasets_matches_the_concatenated_copy(ds, tmp_path):
    """Training's pool reads mapped shards of two datasets through their own label tables: every crop equals
    what the in-memory concatenation (what training held before) gives."""
    from fusionseg.data.features import RowTable
    from fusionseg.engine.train import Plan, _global_masks, _mask_lut, _Pool, gather_batch
    enc = PoolEncoder().freeze()
    ds2 = FolderDataset(make_shapes_dataset(tmp_path / "shapes2", n=4, size=64, seed=3))
    a = cache_features(ds, enc, 64, cache_dir=tmp_path / "c", progress=False, shard_size=3)
    b = cache_features(ds2, enc, 64, cache_dir=tmp_path / "c", progress=False, shard_size=3)
    maps = [[0, 1, 2], [2, -1, 3]]
    known = torch.ones(11, 4, dtype=torch.bool)
    mapped = _Pool([RowTable.concat([x, y]) for x, y in zip(a.level_rows, b.level_rows)],
                   RowTable.concat([a.mask_rows.with_lut(_mask_lut(maps[0])), b.mask_rows.with_lut(_mask_lut(maps[1]))]),
                   known, 64)
    copied = _Pool([torch.cat([x, y]) for x, y in zip(a.levels, b.levels)],
                   torch.cat([_global_masks(a.masks, maps[0]), _global_masks(b.masks, maps[1])]), known, 64)
    plan = Plan(0, 1, [0, 10, 3, 7, 8], [0, 1, 1, 0, 1], [(0, 0), (1, 0), (0, 1), (1, 1), (0, 0)])
    x, y = gather_batch(mapped, plan, range(5), 32), gather_batch(copied, plan, range(5), 32)
    for u, v in zip(x[0], y[0]):
        assert torch.equal(u, v)
    assert x[1].dtype == torch.int16 and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
    assert int(x[1].min()) >= -1 and bool((x[1] == -1).any()) == bool((y[1] == -1).any())


def _rss_anon_mb() -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def test_shards_are_memory_mapped_not_read_into_the_process(tmp_path):
    """A verified 96 MB shard is hashed and served from a file mapping: the process's own (anonymous) memory
    does not grow by its size, so ranks on one machine share one copy in the page cache."""
    if _rss_anon_mb() is None:
        pytest.skip("needs /proc/self/status (Linux) to read the process's anonymous memory")
    store = tmp_path / "store"
    big = torch.arange(48 * 2**20, dtype=torch.int32).to(torch.float16).view(-1, 1024)  # 96 MB of fp16
    masks = torch.ones(4, 2, 8, 8, dtype=torch.uint8)
    features._write_shard(store, ["a", "b", "c", "d"], {"level0": big, "masks": masks}, 0.0)
    expect_row = big[1234].clone()
    del big
    entry = json.loads(next(store.glob("shard-*.json")).read_text())
    before = _rss_anon_mb()
    t = features._load_verified(store, entry)
    lv = t["level0"]
    s = sum(float(lv[i:i + 2048].float().abs().sum()) for i in range(0, lv.shape[0], 2048))  # touch every page
    grown = _rss_anon_mb() - before
    assert s > 0 and torch.equal(t["level0"][1234], expect_row) and torch.equal(t["masks"], masks)
    assert grown < 48, f"loading grew anonymous memory by {grown:.0f} MB (read into the process, not mapped)"
