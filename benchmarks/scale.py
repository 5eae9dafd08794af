"""Throughput at scale: images/s of the local CLI, ``--engine ray`` with 1 and 2 actors, and onnxruntime against
PyTorch, all in one run over the same shared images, written to JSON and rendered into the README.

    .venv/bin/python benchmarks/scale.py --images 200 --json docs/bench/scale.json
    .venv/bin/python benchmarks/scale.py --render README.md --json docs/bench/scale.json   # table only

Engines (end to end, as a user runs them: process start, model load and, for Ray, starting a local Ray
instance and its actors are included; ``--no-overlay``; the default working size): ``fusionseg segment DIR``
vs ``fusionseg segment DIR --engine ray --actors 1|2``. Runtimes (in one process, interleaved image by image
so machine load hits both alike): ``Segmenter`` PyTorch vs ``Segmenter(runtime="onnx")`` at ``--size`` px
with ``--names`` class names, mode ``fusion`` (both graphs do all the work). Ratios are what to read; the
absolute numbers move with the machine's load, which is recorded (1-minute load average before and after).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, fail, shared_data, write_between  # noqa: E402

BEGIN, END = "<!-- scale:begin -->", "<!-- scale:end -->"
NAMES20 = ["grass", "cow", "sky", "building", "tree", "car", "road", "person", "bicycle", "dog", "horse",
           "water", "flower", "sheep", "bird", "boat", "chair", "cat", "sign", "book"]


def pick_images(n: int) -> list[Path]:
    """n shared photos of mixed sizes: MSRC (320x213 and 213x320), CamVid (480x360), COCO (various)."""
    d = shared_data()
    pools = [sorted((d / "msrc_v2/images").glob("*.jpg")), sorted((d / "camvid/images").glob("*")),
             sorted((d / "coco2017_mini/images").glob("*"))]
    if not all(pools):
        fail(f"shared images not found under {d}")
    out, i = [], 0
    while len(out) < n:
        pool = pools[i % 3]
        k = i // 3
        if k < len(pool):
            out.append(pool[k])
        i += 1
        if i > 3 * max(map(len, pools)):
            break
    return out[:n]


def load() -> float:
    return round(os.getloadavg()[0], 2)


def run_cli(args: list[str], env) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "fusionseg.cli", *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"fusionseg {' '.join(args[:3])} ... failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return time.perf_counter() - t0


def bench_engines(folder: Path, n: int, names: str, tmp: Path, actors: list[int]) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    rows = []
    wall = run_cli(["segment", str(folder), "--classes", names, "--out", str(tmp / "local"), "--no-overlay"], env)
    rows.append({"engine": "local CLI (fusionseg segment)", "wall_s": round(wall, 1), "images_per_s": round(n / wall, 2)})
    for k in actors:
        wall = run_cli(["segment", str(folder), "--classes", names, "--out", str(tmp / f"ray{k}"), "--no-overlay",
                        "--engine", "ray", "--actors", str(k)], env)
        rows.append({"engine": f"--engine ray, {k} actor{'s' if k > 1 else ''}", "wall_s": round(wall, 1),
                     "images_per_s": round(n / wall, 2)})
    base = rows[0]["images_per_s"]
    for r in rows:
        r["ratio_vs_local"] = round(r["images_per_s"] / base, 2)
    return rows


def bench_runtimes(images: list[Path], size: int, names: list[str], tmp: Path, threads: int) -> dict:
    import torch
    from fusionseg.export.onnx import export_onnx
    from fusionseg.segmenter import Segmenter
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    export_onnx("default", tmp / "onnx", classes=names)
    export_s = time.perf_counter() - t0
    pt = Segmenter.from_pretrained("default", device="cpu", size=size, mode="fusion")
    ort = Segmenter.from_pretrained(tmp / "onnx", runtime="onnx", size=size, mode="fusion", threads=threads)
    preps = [pt.prepare(p) for p in images]  # decoding is the same code for both: left out of the timing
    for s in (pt, ort):
        s.predict(preps[0], names)  # warm-up (first-call allocations, ORT's first run)
    times = {"pytorch": 0.0, "onnxruntime": 0.0}
    agree = []
    for p in preps:
        t = time.perf_counter()
        a = pt.predict(p, names)
        times["pytorch"] += time.perf_counter() - t
        t = time.perf_counter()
        b = ort.predict(p, names)
        times["onnxruntime"] += time.perf_counter() - t
        agree.append(float((a.labels == b.labels).mean()))
    n = len(preps)
    return {"size": size, "names": len(names), "images": n, "export_s": round(export_s, 1),
            "pytorch_images_per_s": round(n / times["pytorch"], 2),
            "onnxruntime_images_per_s": round(n / times["onnxruntime"], 2),
            "ratio_onnx_vs_pytorch": round(times["pytorch"] / times["onnxruntime"], 2),
            "min_label_agreement": round(min(agree), 6), "threads": torch.get_num_threads()}


def render(res: dict) -> str:
    m = res["machine"]
    lines = [f"Measured by `benchmarks/scale.py` on {m['cpus']} CPU cores ({m['platform']}), {res['images']} shared "
             f"photos of mixed sizes, {res['names_engines']} names, default working size, no overlay; 1-minute load "
             f"average {m['load_before']} before, {m['load_after']} after (a shared machine: read the ratios). "
             f"End to end, start-up included.", "",
             "| engine | wall (s) | images/s | vs local CLI |", "|---|---:|---:|---:|"]
    for r in res.get("engines", []):
        lines.append(f"| {r['engine']} | {r['wall_s']} | {r['images_per_s']} | {r['ratio_vs_local']}x |")
    o = res.get("runtimes")
    if o:
        lines += ["", f"onnxruntime vs PyTorch, one process, {o['threads']} threads, {o['images']} photos at {o['size']} px "
                      f"with {o['names']} names (decoding excluded, interleaved):", "",
                  "| runtime | images/s | ratio |", "|---|---:|---:|",
                  f"| PyTorch | {o['pytorch_images_per_s']} | 1.00x |",
                  f"| onnxruntime | {o['onnxruntime_images_per_s']} | {o['ratio_onnx_vs_pytorch']}x |", "",
                  f"Labels equal on at least {o['min_label_agreement']:.4%} of pixels of every photo; export took "
                  f"{o['export_s']} s."]
    lines += ["", f"GPU: {res['gpu']}"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=512, help="working size of the runtime comparison (default 512)")
    ap.add_argument("--names", type=int, default=20, help="class names in the runtime comparison (default 20)")
    ap.add_argument("--actors", default="1,2", help="Ray actor counts to measure (default 1,2)")
    ap.add_argument("--threads", type=int, default=0, help="torch/ORT threads for the runtime comparison")
    ap.add_argument("--skip-engines", action="store_true")
    ap.add_argument("--skip-runtimes", action="store_true")
    ap.add_argument("--json", default=str(ROOT / "docs/bench/scale.json"))
    ap.add_argument("--render", default=None, help="rewrite the table between the scale markers of this file")
    a = ap.parse_args()
    if not 1 <= a.images <= 10000:
        fail(f"--images must be 1..10000, got {a.images}")
    if not 1 <= a.names <= len(NAMES20):
        fail(f"--names must be 1..{len(NAMES20)}, got {a.names}")
    out = Path(a.json)
    measure = not (a.render and a.skip_engines and a.skip_runtimes)
    if measure:
        images = pick_images(a.images)
        res = {"images": len(images), "names_engines": 5, "gpu": "not measured: no GPU was lent to this task",
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(terse=True),
                           "load_before": load()}}
        with tempfile.TemporaryDirectory() as td:
            tmp = Path(td)
            folder = tmp / "images"
            folder.mkdir()
            for p in images:
                (folder / f"{p.parent.parent.name}_{p.name}").symlink_to(p)
            if not a.skip_engines:
                actors = [int(v) for v in a.actors.split(",") if v.strip()]
                res["engines"] = bench_engines(folder, len(images), ", ".join(NAMES20[:5]), tmp, actors)
                print(json.dumps(res["engines"], indent=1), flush=True)
            if not a.skip_runtimes:
                res["runtimes"] = bench_runtimes(images, a.size, NAMES20[:a.names], tmp, a.threads)
                print(json.dumps(res["runtimes"], indent=1), flush=True)
        res["machine"]["load_after"] = load()
        if out.is_file():  # keep the parts not measured this time
            old = json.loads(out.read_text())
            for k in ("engines", "runtimes"):
                if k not in res and k in old:
                    res[k] = old[k]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {out}")
    else:
        if not out.is_file():
            fail(f"no results at {out}: run the benchmark first")
        res = json.loads(out.read_text())
    if a.render:
        write_between(Path(a.render), render(res), BEGIN, END)
        print(f"rendered into {a.render}")


if __name__ == "__main__":
    main()
