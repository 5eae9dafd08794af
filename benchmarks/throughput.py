"""``fusionseg segment`` over a folder against a naive one-at-a-time loop, same images, same outputs.

The folder: the first ``--images`` images of ``--data`` (default: the shared MSRC-v2 images), linked (not
copied) into a temporary folder. Both sides load the default model, then write the label PNG, the overlay
and the JSON for every image:

* naive: ``load_image`` -> ``Segmenter.predict`` -> ``label_png`` / ``overlay`` / ``summary`` -> three atomic
  writes, one image after the other (what the CLI did before);
* ``fusionseg segment``: decoding in DataLoader worker processes, same-shape batches, a writer thread.

Runs alternate (naive, CLI, naive, CLI, ...); the median wall time of each gives images/s and the ratio.

Usage: python benchmarks/throughput.py [--images 200] [--batch-size 8] [--workers 2] [--repeats 1]
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common as C

DATA = C.shared_data() / "msrc_v2" / "images"


def naive(paths: list[Path], names: list[str], out: Path) -> None:
    from fusionseg.data.io import load_image, save_png_atomic, write_text_atomic
    from fusionseg.segmenter import Segmenter
    from fusionseg.visualize import label_png, overlay
    seg = Segmenter.from_pretrained("default", device="cpu")
    for p in paths:
        img = load_image(p)
        pred = seg.predict(img, names)
        save_png_atomic(label_png(pred.labels, len(names)), out / f"{p.stem}.png")
        save_png_atomic(overlay(img, pred.labels, names), out / f"{p.stem}_overlay.png")
        write_text_atomic(json.dumps(pred.summary(), indent=1), out / f"{p.stem}.json")


def main() -> None:
    ap = C.parser(__doc__)
    ap.add_argument("--data", default=str(DATA), help="a folder of images")
    ap.add_argument("--images", type=int, default=200, help="how many images of the folder (1..10000)")
    ap.add_argument("--classes", default="grass, cow, sky, tree, building, water, sheep, aeroplane, face, car")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.set_defaults(repeats=1)
    C.add_json_arg(ap, "throughput")
    a = ap.parse_args()
    C.setup(a)
    C.in_range(a.images, "--images", 1, 10000)
    C.in_range(a.batch_size, "--batch-size", 1, 1024)
    C.in_range(a.workers, "--workers", 0, 64)
    data = Path(a.data)
    if not data.is_dir():
        C.fail(f"no image folder at {data}; pass --data FOLDER")
    from fusionseg.cli import main as cli
    from fusionseg.data.datasets import IMAGE_SUFFIXES
    files = sorted(p for p in data.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[: a.images]
    if len(files) < a.images:
        C.fail(f"{data} holds {len(files)} images, fewer than --images {a.images}")
    tmp = Path(tempfile.mkdtemp(prefix="fusionseg-throughput-"))
    folder = tmp / "images"
    folder.mkdir()
    for p in files:
        os.symlink(p.resolve(), folder / p.name)
    names = [n.strip() for n in a.classes.split(",")]
    links = sorted(folder.iterdir())

    def run_naive():
        out = tmp / "naive"
        shutil.rmtree(out, ignore_errors=True); out.mkdir()
        naive(links, names, out)

    def run_cli():
        out = tmp / "cli"
        shutil.rmtree(out, ignore_errors=True)
        saved = sys.stdout
        sys.stdout = open(os.devnull, "w")
        try:
            code = cli(["segment", str(folder), "--classes", a.classes, "--out", str(out), "--threads", str(a.threads),
                        "--batch-size", str(a.batch_size), "--workers", str(a.workers)])
        finally:
            sys.stdout.close()
            sys.stdout = saved
        if code:
            raise SystemExit(f"fusionseg segment failed with exit code {code}")

    t = C.interleaved({"naive": run_naive, "cli": run_cli}, a.repeats, warmup=0)
    n_out = len(list((tmp / "cli").glob("*_overlay.png")))
    try:
        shown = data.relative_to(C.shared_data())
    except ValueError:
        shown = data.name
    settings = (f"{len(files)} images from {shown}; {len(names)} names; {a.threads} threads; batch {a.batch_size}, "
                f"{a.workers} workers; repeats {a.repeats}; outputs per side: {n_out} x (label PNG, overlay, JSON)")
    print(settings)
    header = ["pipeline", "wall s (incl. model load)", "images/s"]
    rows = [["naive one-at-a-time loop", f"{t['naive']:.1f}", f"{len(files) / t['naive']:.2f}"],
            ["fusionseg segment", f"{t['cli']:.1f}", f"{len(files) / t['cli']:.2f}"]]
    print(C.table(header, rows))
    note = f"Ratio (fusionseg segment / naive images/s): {t['naive'] / t['cli']:.2f}x."
    print(note)
    C.save_results(a.json, "throughput", settings, [{"header": header, "rows": rows}], [note])
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
