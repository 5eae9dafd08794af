"""The label map of a photo larger than the working size: candidate resampling vs resampling every class.

The default model's logits for a real photo (``examples/cat_toilet.jpg`` and the web demo's elephant, scaled to
each ``--sizes`` entry) at the default working size are turned into the label map and scores at the photo's
size two ways, A/B interleaved:

* ``fusionseg``: :func:`fusionseg.segmenter.labels_from_logits`, which resamples per cell only the classes
  that can win there (:mod:`fusionseg.labelmap`);
* ``dense`` (the peer: what fusionseg did before, and what a plain implementation does): every class map
  resampled to full size in row bands (``grid_sample``), then the arg-max over classes.

It also checks the two label maps are equal and the scores within 1e-5, and prints a whole ``predict`` for
scale.

Usage: python benchmarks/labels.py [--sizes 1024x768,4000x3000] [--classes 20] [--repeats 3]
"""
from __future__ import annotations

import time

import _common as C
import numpy as np
import torch
from PIL import Image


def dense(lg: torch.Tensor, size: tuple[int, int], threshold: float):
    from fusionseg.segmenter import upsample_rows
    W, H = size
    labels = np.empty((H, W), dtype=np.uint16)
    scores = np.empty((H, W), dtype=np.float32)
    for y0, y1, up in upsample_rows(lg, size, max(1, 4_000_000 // max(1, W * lg.shape[0]))):
        best, idx = up.max(0)
        prob = best.sigmoid()
        lab = torch.where(prob >= threshold, idx + 1, torch.zeros_like(idx))
        labels[y0:y1] = lab.numpy().astype(np.uint16)
        scores[y0:y1] = prob.numpy()
    return labels, scores


def main() -> None:
    ap = C.parser(__doc__)
    ap.add_argument("--sizes", default="1024x768,4000x3000", help="photo sizes WxH, comma-separated (16..20000)")
    ap.add_argument("--classes", type=int, default=20, help="names from the model's vocabulary (1..98)")
    ap.set_defaults(repeats=3)
    C.add_json_arg(ap, "labels")
    a = ap.parse_args()
    C.setup(a)
    sizes = C.sizes(a.sizes, "--sizes", 16, 20000)
    from fusionseg.segmenter import labels_from_logits
    seg = C.default_segmenter(320)
    vocab = seg.meta.get("training", {}).get("vocabulary") or []
    C.in_range(a.classes, "--classes", 1, len(vocab))
    names = list(vocab[:a.classes])
    photos = [C.ROOT / "examples" / "cat_toilet.jpg", C.ROOT / "src" / "fusionseg" / "serve" / "examples" / "elephant.jpg"]
    print(f"default model, working size {seg.size}; {a.classes} names; {a.threads} threads; repeats {a.repeats}")
    rows = []
    for path in photos:
        src = Image.open(path).convert("RGB")
        for size in sizes:
            img = src.resize(size, Image.BILINEAR)
            lg, orig = seg.logits(img, names)

            def ours():
                return labels_from_logits(lg, orig, seg.threshold)

            def peer():
                return dense(lg, orig, seg.threshold)

            (la, sa), (lb, sb) = ours(), peer()
            same = bool(np.array_equal(la, lb)) and float(np.abs(sa - sb).max()) < 1e-5
            t = C.interleaved({"fusionseg": ours, "dense": peer}, a.repeats)
            t0 = time.perf_counter()
            seg.predict(img, names)
            whole = time.perf_counter() - t0
            rows.append([path.name, f"{size[0]}x{size[1]}", f"{t['fusionseg'] * 1000:.0f}", f"{t['dense'] * 1000:.0f}",
                         f"{t['dense'] / t['fusionseg']:.1f}x", "yes" if same else "NO", f"{whole * 1000:.0f}"])
            print(f"  {path.name} {size[0]}x{size[1]}: fusionseg {t['fusionseg'] * 1000:.0f} ms, dense "
                  f"{t['dense'] * 1000:.0f} ms", flush=True)
    header = ["photo", "size", "fusionseg labels ms", "every class resampled ms", "speed-up", "same labels",
              "whole predict ms"]
    print(C.table(header, rows))
    C.save_results(a.json, "labels", f"default model, working size {seg.size}, {a.classes} names, {a.threads} threads, "
                   f"{a.repeats} repeats, real photos scaled to {a.sizes}", [{"header": header, "rows": rows}])


if __name__ == "__main__":
    main()
