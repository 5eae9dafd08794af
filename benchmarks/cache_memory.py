"""Memory of the training feature cache under several ranks: memory-mapped shards against an in-memory copy.

A store of ``--images`` images is written with the default encoder's shapes (EfficientNet-Lite0 maps at
strides 8/16/32/32 with 40/112/320/1280 channels, 2 views, fp16, plus uint8 masks; random values, since only
the size matters), as ``fusionseg cache`` would. Then ``--ranks`` processes at once do what each rank of a
``torchrun`` job does before and during training: read the store (every shard verified against its sha256),
build the training pool and gather ``--steps`` random cached batches. Two ways, measured in one run:

* ``mapped`` (what training does): shards are memory-mapped; the pool reads rows through ``RowTable``.
* ``in-memory copy`` (the peer; what training did before): every level concatenated into one tensor per
  process and the masks re-indexed into an int16 copy.

Reported per rank: anonymous memory (the process's own), proportional set size (PSS: shared pages divided
among the processes that map them; the sum over ranks is what the job really uses) and the time per gathered
batch. Linux only (reads /proc/self/status and smaps_rollup).

Usage: python benchmarks/cache_memory.py [--images 1500] [--size 320] [--ranks 2] [--steps 50] [--batch 16]
"""
from __future__ import annotations

import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import _common as C
import torch

CHANNELS, STRIDES = (40, 112, 320, 1280), (8, 16, 32, 32)  # efficientnet-lite0, as the default model uses


class _Stub:
    """A dataset as the cache sees it (nothing is ever computed: the store holds every id)."""

    def __init__(self, root: Path, n: int):
        self.root, self.name = root, "synthetic"
        self.ids = [f"img{i:06d}" for i in range(n)]
        self.class_names = [f"class {k}" for k in range(20)]

    def __len__(self) -> int:
        return len(self.ids)


class _Enc:
    def __init__(self):
        from fusionseg.encoders.base import EncoderSpec
        self.spec = EncoderSpec("efficientnet-lite0-shapes", "benchmark", "cachemem")

    def to(self, device):
        return self


def write_store(ds: _Stub, size: int, cache_dir: Path, shard: int = 256) -> float:
    """Random features of every image in shards, as ``fusionseg cache`` writes them; -> GB on disk."""
    from fusionseg.data import features
    store = features.store_dir(ds, _Enc(), size, 2, cache_dir)
    g = torch.Generator().manual_seed(0)
    total = 0
    for s in range(0, len(ds), shard):
        ids = ds.ids[s:s + shard]
        n = len(ids)
        t = {f"level{i}": torch.randn(n, 2, c, size // st, size // st, generator=g).to(torch.float16)
             for i, (c, st) in enumerate(zip(CHANNELS, STRIDES))}
        t["masks"] = torch.randint(0, 21, (n, 2, size, size), dtype=torch.uint8, generator=g)
        features._write_shard(store, ids, t, 0.0)
        total += sum(v.numel() * v.element_size() for v in t.values())
    return total / 1e9


def _status() -> dict[str, float]:
    out = {}
    for path, keys in (("/proc/self/status", ("RssAnon", "RssFile")), ("/proc/self/smaps_rollup", ("Pss",))):
        for line in open(path):
            k = line.split(":")[0]
            if k in keys:
                out[k] = int(line.split()[1]) / 1024
    return out


def worker(mode: str, root: str, n: int, size: int, steps: int, batch: int, barrier, queue) -> None:
    torch.set_num_threads(1)
    from fusionseg.data.features import cache_features
    from fusionseg.engine.train import _global_masks, _mask_lut, _Pool, gather_batch, plan_batch
    ds = _Stub(Path(root), n)
    lmap = list(range(20))
    cf = cache_features(ds, _Enc(), size, 2, Path(root) / "cache", progress=False)
    assert cf.hit, "the benchmark store should hold every image"
    known = torch.ones(n, 20, dtype=torch.bool)
    if mode == "mapped":
        pool = _Pool(cf.level_rows, cf.mask_rows.with_lut(_mask_lut(lmap)), known, size)
    else:
        pool = _Pool([t.materialize() for t in cf.level_rows], _global_masks(cf.mask_rows.materialize(), lmap),
                     known, size)
    del cf
    import random
    times = []
    for step in range(steps):
        plan = plan_batch(random.Random(step), n, 2, size // 32, size // 32, batch)
        t0 = time.perf_counter()
        levels, masks, _ = gather_batch(pool, plan, range(batch), 32)
        times.append(time.perf_counter() - t0)
    barrier.wait()  # every rank holds its pool now: measure while all are alive (PSS splits shared pages)
    st = _status()
    barrier.wait()
    queue.put({**st, "gather_ms": statistics.median(times) * 1000})


def run(mode: str, root: Path, a) -> list[dict]:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(a.ranks), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(mode, str(root), a.images, a.size, a.steps, a.batch, barrier, queue))
             for _ in range(a.ranks)]
    for p in procs:
        p.start()
    out = [queue.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a {mode} worker failed (exit {p.exitcode})")
    return out


def main() -> None:
    ap = C.parser(__doc__)
    ap.add_argument("--images", type=int, default=1500, help="images in the synthetic store (16..100000)")
    ap.add_argument("--size", type=int, default=320, help="cached training size in px (64..1024, a multiple of 32)")
    ap.add_argument("--ranks", type=int, default=2, help="processes reading the store at once (1..16)")
    ap.add_argument("--steps", type=int, default=50, help="batches gathered per rank (1..10000)")
    ap.add_argument("--batch", type=int, default=16, help="images per gathered batch (1..256)")
    C.add_json_arg(ap, "cache_memory")
    a = ap.parse_args()
    C.setup(a)
    C.in_range(a.images, "--images", 16, 100000)
    C.in_range(a.size, "--size", 64, 1024)
    if a.size % 32:
        C.fail(f"--size {a.size} must be a multiple of 32 (the default encoder's grid)")
    C.in_range(a.ranks, "--ranks", 1, 16)
    C.in_range(a.steps, "--steps", 1, 10000)
    C.in_range(a.batch, "--batch", 1, 256)
    try:
        open("/proc/self/smaps_rollup").close()
    except OSError:
        C.fail("needs Linux (/proc/self/smaps_rollup) to measure per-process memory")
    root = Path(tempfile.mkdtemp(prefix="fusionseg-cachemem-"))
    t0 = time.perf_counter()
    gb = write_store(_Stub(root, a.images), a.size, root / "cache")
    settings = (f"store: {a.images} images at {a.size} px, 2 views, {gb:.2f} GB of shards (written in "
                f"{time.perf_counter() - t0:.0f} s); {a.ranks} ranks, {a.steps} batches of {a.batch} each")
    print(settings)
    rows, pss = [], {}
    for mode in ("mapped", "in-memory copy"):
        res = run(mode, root, a)
        pss[mode] = sum(r["Pss"] for r in res)
        anon = max(r["RssAnon"] for r in res)
        rows.append([mode, f"{anon:.0f}", f"{max(r['RssFile'] for r in res):.0f}", f"{max(r['Pss'] for r in res):.0f}",
                     f"{pss[mode]:.0f}", f"{statistics.median(r['gather_ms'] for r in res):.1f}"])
        print(f"  {mode}: done", flush=True)
    header = ["pool", "anonymous MB per rank", "file-backed MB per rank", "PSS MB per rank",
              f"PSS MB, {a.ranks} ranks together", "ms per gathered batch"]
    print(C.table(header, rows))
    note = f"Memory of the job (sum of PSS), in-memory copy / mapped: {pss['in-memory copy'] / pss['mapped']:.1f}x."
    print(note)
    C.save_results(a.json, "cache_memory", settings, [{"header": header, "rows": rows}], [note])
    import shutil
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
