"""A fresh process segmenting one photo with the default model: fusionseg's load path against the same load with
the text encoder built through transformers (what fusionseg did before ``lean_bert``; the peer).

Each repeat starts two new Pythons in turn (A, B, A, B, ...) that import fusionseg, load the default model and
segment the demo photo once with ``--classes``. Each reports its own phases: import, model load, first
prediction, and the wall time of the whole child process. The text-embedding disk cache points at an empty
temporary folder in every child unless ``--warm-cache`` is given (then a first untimed child fills it, as a
user's second call would find it).

Usage: python benchmarks/cold_start.py [--repeats 5] [--classes "cat, toilet, sink"] [--warm-cache]
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import _common as C

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[2]))
from fusionseg.encoders import hf_text
if sys.argv[1] == "transformers":
    def _no_lean(folder):
        raise RuntimeError("benchmark peer: build through transformers")
    hf_text._minilm_lean = _no_lean
from fusionseg import Segmenter
t1 = time.perf_counter()
seg = Segmenter.from_pretrained("default", device="cpu")
t2 = time.perf_counter()
pred = seg.predict(sys.argv[3], [n.strip() for n in sys.argv[4].split(",") if n.strip()])
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "predict": t3 - t2, "encoder": type(seg.model.text_encoder.model).__name__,
                  "transformers_imported": "transformers" in sys.modules, "labels": pred.labels.tolist()[::97][:5]}))
"""


def child(kind: str, threads: int, photo: str, classes: str, cache: str) -> dict:
    env = dict(os.environ, FUSIONSEG_CACHE=cache, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(C.ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, kind, str(threads), photo, classes], capture_output=True,
                       text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        C.fail(f"the {kind} child failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["wall"] = wall
    return out


def main() -> None:
    ap = C.parser(__doc__)
    ap.add_argument("--classes", default="cat, toilet, sink", help="comma-separated names (1..100)")
    ap.add_argument("--image", default=str(C.ROOT / "examples" / "cat_toilet.jpg"), help="photo to segment")
    ap.add_argument("--warm-cache", action="store_true", help="children share a text cache filled beforehand")
    C.add_json_arg(ap, "cold_start")
    a = ap.parse_args()
    C.in_range(a.threads, "--threads", 1, 256)
    C.in_range(a.repeats, "--repeats", 1, 100)
    names = [n for n in a.classes.split(",") if n.strip()]
    C.in_range(len(names), "number of --classes", 1, 100)
    if not os.path.isfile(a.image):
        C.fail(f"--image {a.image} is not a file")
    runs: dict[str, list[dict]] = {"fusionseg": [], "transformers": []}
    with tempfile.TemporaryDirectory() as tmp:
        shared = os.path.join(tmp, "shared")
        if a.warm_cache:
            child("lean", a.threads, a.image, a.classes, shared)
        for i in range(a.repeats):
            for label, kind in (("fusionseg", "lean"), ("transformers", "transformers")):
                cache = shared if a.warm_cache else os.path.join(tmp, f"{kind}{i}")
                runs[label].append(child(kind, a.threads, a.image, a.classes, cache))
    same = all(r["labels"] == runs["fusionseg"][0]["labels"] for rs in runs.values() for r in rs)
    med = {k: {p: statistics.median(r[p] for r in rs) for p in ("import", "load", "predict", "wall")}
           for k, rs in runs.items()}
    settings = (f"default model, {len(names)} names ({a.classes}), {a.threads} threads, {a.repeats} fresh processes "
                f"per side, text cache {'warm' if a.warm_cache else 'empty'}; medians in seconds")
    print(settings)
    rows = [[k, runs[k][0]["encoder"], runs[k][0]["transformers_imported"]] +
            [f"{med[k][p]:.2f}" for p in ("import", "load", "predict", "wall")] for k in runs]
    header = ["side", "text model", "transformers imported", "import s", "load s", "first predict s",
              "whole process s"]
    print(C.table(header, rows))
    f, t = med["fusionseg"], med["transformers"]
    note = (f"Load: {t['load'] / f['load']:.1f}x faster; whole process: {t['wall'] / f['wall']:.2f}x faster "
            f"({t['wall'] - f['wall']:.2f} s saved); same labels: {'yes' if same else 'NO'}.")
    print(note)
    C.save_results(a.json, "cold_start", settings, [{"header": header, "rows": rows}], [note])


if __name__ == "__main__":
    main()
