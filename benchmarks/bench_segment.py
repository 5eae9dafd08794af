"""Speed of one image + N class names: fusionseg (encoder once, all names in one fusion pass) against the
CLIPSeg-style peer (the image encoder and the decoder run once per class name), same weights, same run.

Usage: python benchmarks/bench_segment.py [--size 512] [--classes 1,5,20] [--repeats 5] [--threads 2]
Prints ms per image for both and the ratio peer / ours.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from fusionseg.segmenter import Segmenter  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (twice: first calls allocate)
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000


def main() -> None:
    from fusionseg.runtime import tune_malloc; tune_malloc()  # noqa: E702 - as the CLI does (an entry point)
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--classes", default="1,5,20")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    C.add_json_arg(ap, "bench_segment")
    a = ap.parse_args()
    C.in_range(a.size, "--size", 64, 2048)  # bad input: one line, exit 2 (README, Performance)
    counts = C.int_list(a.classes, "--classes", 1, 1000)
    C.in_range(a.repeats, "--repeats", 1, 1000)
    C.in_range(a.threads, "--threads", 1, 256)
    torch.set_num_threads(a.threads)
    seg = Segmenter.from_pretrained(a.model, device=a.device)
    model = seg.model
    enc = model.image_encoder
    x = torch.rand(1, 3, a.size, a.size, device=a.device)
    params = sum(p.numel() for p in model.head.parameters())
    settings = (f"model {a.model} (head {params:,} parameters), image {a.size}x{a.size}, {a.threads} threads, "
                f"{a.device}, {a.repeats} repeats")
    print(settings)
    header = ["classes", "ours: encoder once + one fusion pass (ms)", "peer: encoder + head per class (ms)",
              "peer / ours"]
    rows = []
    vocab = [f"class {i}" for i in range(max(counts))]
    for n in counts:
        names = vocab[:n]
        text = seg.text_embeddings(names)

        @torch.no_grad()
        def ours():
            model.head(enc(enc.normalize(x)), text, (a.size, a.size))

        @torch.no_grad()
        def peer():
            for i in range(n):
                model.head(enc(enc.normalize(x)), text[i:i + 1], (a.size, a.size))

        t_ours = timed(ours, a.repeats)
        t_peer = timed(peer, max(1, a.repeats // 2))
        rows.append([n, f"{t_ours:.0f}", f"{t_peer:.0f}", f"{t_peer / t_ours:.2f}x"])
        print(f"  {n} names: ours {t_ours:.0f} ms, peer {t_peer:.0f} ms", flush=True)
    print(C.table(header, rows))
    C.save_results(a.json, "bench_segment", settings, [{"header": header, "rows": rows}])


if __name__ == "__main__":
    main()
