"""Segmenting many images with the same class names: text embeddings from the LRU cache vs recomputed.

The default model (MiniLM text encoder, 32 prompt templates per name) segments ``--images`` images with the
same ``--classes`` names: once with the Segmenter's text cache (names encoded once, then looked up by
(encoder fingerprint, templates, name)), once with the cache emptied before every image (what a pipeline
without it pays). The two runs alternate image by image (A/B interleaved).

Usage: python benchmarks/text_cache.py [--images 50] [--classes 20] [--size 320]
"""
from __future__ import annotations

import time

import _common as C
import numpy as np
from PIL import Image


def main() -> None:
    ap = C.parser(__doc__)
    ap.add_argument("--images", type=int, default=50, help="number of images (1..10000)")
    ap.add_argument("--classes", type=int, default=20, help="number of class names (1..1000)")
    ap.add_argument("--size", type=int, default=320, help="image side in px (32..2048)")
    C.add_json_arg(ap, "text_cache")
    a = ap.parse_args()
    C.setup(a)
    C.in_range(a.images, "--images", 1, 10000)
    C.in_range(a.classes, "--classes", 1, 1000)
    C.in_range(a.size, "--size", 32, 2048)
    from fusionseg.segmenter import TextCache

    seg = C.default_segmenter(a.size)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (a.size * 3 // 4, a.size, 3), dtype=np.uint8)) for _ in range(a.images)]
    names = [f"object {i}" for i in range(a.classes)]
    cached, plain = TextCache(), TextCache()
    seg.text_cache = cached
    seg.predict(imgs[0], names)  # warm-up (first calls allocate); the cache starts empty below
    cached.clear()
    t_with, t_without = 0.0, 0.0
    for im in imgs:
        seg.text_cache = cached
        t0 = time.perf_counter()
        seg.predict(im, names)
        t_with += time.perf_counter() - t0
        seg.text_cache = plain
        plain.clear()
        t0 = time.perf_counter()
        seg.predict(im, names)
        t_without += time.perf_counter() - t0
    settings = f"default model, {a.images} random images {a.size}x{a.size * 3 // 4}, {a.classes} names, {a.threads} threads"
    header = ["text embeddings", "total s", "ms per image", "text encoder calls (names encoded)"]
    rows = [["LRU cache", f"{t_with:.2f}", f"{t_with / a.images * 1000:.0f}", f"{cached.misses}"],
            ["recomputed per image", f"{t_without:.2f}", f"{t_without / a.images * 1000:.0f}", f"{a.images * a.classes}"]]
    note = f"Speed-up with the cache: {t_without / t_with:.2f}x."
    print(settings)
    print(C.table(header, rows))
    print(note)
    C.save_results(a.json, "text_cache", settings, [{"header": header, "rows": rows}], [note])


if __name__ == "__main__":
    main()
