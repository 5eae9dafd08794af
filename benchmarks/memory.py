"""Peak resident memory of ``fusionseg segment`` on huge images, and tiled vs untiled label agreement.

1. Peak RSS (``ru_maxrss`` of a fresh subprocess running the CLI, label PNG + overlay + JSON written) for a
   4000x3000 and a 10,000x8,000 JPEG (a shared photo enlarged, written to a temporary folder), with the
   default model: at the default working size (320), and at a large working size (``--size 2048``), which
   switches on sliding-window encoding automatically (768 px windows). Target: peak < 2 GB for every row.
   The label PNG must come out full size.
2. Agreement of the tiled label map with the untiled one on images small enough for both (``--agree-size``
   working size; windows of each of ``--agree-tiles``), over ``--agree-images`` shared photos. Target >= 99%
   (judged at the default window, 768 px).

Usage: python benchmarks/memory.py [--sizes 4000x3000,10000x8000] [--agree-size 1024] [--agree-tiles 512,640,768]
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as C
import numpy as np
from PIL import Image

CLASSES = "grass, cow, sky, tree, building, water, sheep, car"
WRAP = ("import resource, sys; from fusionseg.cli import main; code = main(sys.argv[1:]); "
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")


def peak_mb(img: Path, out: Path, extra: list[str], threads: int) -> tuple[float, tuple[int, int]]:
    env_path = str(C.ROOT / "src")
    import os
    env = dict(os.environ, PYTHONPATH=env_path + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", WRAP, "segment", str(img), "--classes", CLASSES, "--out", str(out),
                        "--threads", str(threads), "--overwrite", *extra], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"segment failed on {img.name}: {r.stderr.strip().splitlines()[-1:]}")
    kb = int(next(l for l in r.stdout.splitlines() if l.startswith("PEAK_KB")).split()[1])
    with Image.open(out / f"{img.stem}.png") as lab:
        size = lab.size
    return kb / 1024, size


def main() -> None:
    ap = C.parser(__doc__)
    ap.add_argument("--sizes", default="4000x3000,10000x8000", help="comma-separated WxH (each side 64..20000)")
    ap.add_argument("--agree-size", type=int, default=1024, help="working size for the agreement check (128..4096)")
    ap.add_argument("--agree-tiles", default="512,640,768", help="windows for the agreement check (64..4096)")
    ap.add_argument("--agree-images", type=int, default=10, help="shared photos in the agreement check (1..500)")
    ap.set_defaults(repeats=1)
    C.add_json_arg(ap, "memory")
    a = ap.parse_args()
    C.setup(a)
    sizes = C.sizes(a.sizes, "--sizes", 64, 20000)
    C.in_range(a.agree_size, "--agree-size", 128, 4096)
    tiles = C.int_list(a.agree_tiles, "--agree-tiles", 64, 4096)
    C.in_range(a.agree_images, "--agree-images", 1, 500)
    photos = sorted((C.shared_data() / "msrc_v2" / "images").glob("*.jpg"))
    if not photos:
        C.fail(f"no shared photos under {C.shared_data() / 'msrc_v2' / 'images'}")

    tmp = Path(tempfile.mkdtemp(prefix="fusionseg-memory-"))
    rows = []
    for w, h in sizes:
        img = tmp / f"photo_{w}x{h}.jpg"
        Image.open(photos[0]).convert("RGB").resize((w, h), Image.BILINEAR).save(img, quality=90)
        for mode, extra in (("default (working size 320)", []), ("--size 2048 (auto-tiled, 768 px windows)", ["--size", "2048"])):
            mb, lab_size = peak_mb(img, tmp / "out", extra, a.threads)
            ok = mb < 2048 and lab_size == (w, h)
            rows.append([f"{w}x{h}", mode, f"{mb:.0f}", f"{lab_size[0]}x{lab_size[1]}", "met" if ok else "NOT met"])
            print(f"  {w}x{h} {mode}: peak {mb:.0f} MB", flush=True)
        img.unlink()
    header = ["image", "run", "peak RSS MB", "label PNG", "< 2 GB, full-size labels"]
    print(C.table(header, rows))

    from fusionseg.segmenter import DEFAULT_TILE, Segmenter
    names = [n.strip() for n in CLASSES.split(",")]
    untiled = Segmenter.from_pretrained("default", device="cpu", size=a.agree_size, tile=0)
    ref = [untiled.predict(p, names).labels for p in photos[: a.agree_images]]
    agreement, arows = {}, []
    for t in tiles:
        tiled = Segmenter.from_pretrained("default", device="cpu", size=a.agree_size, tile=t)
        same = sum(int((r == tiled.predict(p, names).labels).sum()) for r, p in zip(ref, photos))
        agreement[t] = same / sum(r.size for r in ref)
        arows.append([t, f"{agreement[t]:.2%}", "(default)" if t == DEFAULT_TILE else ""])
    atitle = f"Tiled vs untiled label maps at working size {a.agree_size}, {len(ref)} photos, {len(names)} names:"
    aheader = ["window px", "pixel agreement", ""]
    print(atitle)
    print(C.table(aheader, arows))
    notes = []
    if DEFAULT_TILE in agreement:
        ok = agreement[DEFAULT_TILE] >= 0.99
        notes.append(f"Target >= 99% at the default window ({DEFAULT_TILE} px): {'met' if ok else 'NOT met'}.")
        print(notes[-1])
    agree = {str(k): round(v, 5) for k, v in agreement.items()}
    print(json.dumps({"peak_mb": {f"{r[0]} {r[1]}": float(r[2]) for r in rows}, "agreement": agree}))
    C.save_results(a.json, "memory", f"peak resident memory of `fusionseg segment` (label PNG + overlay + JSON) in a "
                   f"fresh process, default model, {a.threads} threads, sizes {a.sizes}",
                   [{"header": header, "rows": rows}, {"title": atitle, "header": aheader, "rows": arows}], notes)


if __name__ == "__main__":
    main()
