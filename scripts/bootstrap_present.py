"""How sure is a present-names mIoU on a few dozen held-out images? A paired bootstrap over images.

Each model segments each held-out image of ``--data`` with exactly the classes its ground truth shows
(``evaluate --protocol present --split val``); each image's confusion matrix is kept, and the images are
resampled with replacement (the same resample for every model, so differences are paired). Printed: each model's
mIoU, and its difference to the first model with the central interval of the resampled differences and the share
of resamples in which it is above zero. No interval is given for a model's own mIoU: a resample drops the classes
shown in one image only, which on a few dozen images shifts the resampled mIoU itself (on COCO 2017 mostly
below the full sample's); paired differences carry much less of that shift.

Usage:
  python scripts/bootstrap_present.py --model default --model runs/ft448_cpc/final.safetensors --size 320 \\
      --decision relative --data ../shared/data/coco2017_mini [--samples 2000] [--json out.json]
MODEL ``default@REV`` is the default shipped at git revision REV (as in ``scripts/everyday_study.py``);
``MODEL:TTA[:BRIDGE[:SIZE]]`` reads with test-time augmentation (``1,1.4+flip``: scales, ``+flip`` to mirror
too), the bridge's reading size BRIDGE px (``--bridge-size``) and this model's own working size SIZE px (over
``--size``), so ``--model default --model default:1,1.4+flip`` asks
whether the test-time views' gain is resolved.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def image_matrices(model: str, data: str, size: int | None, decision: str | None) -> tuple[np.ndarray, dict]:
    """-> (per-image confusion matrices (N, K+1, K+1), the evaluation report) of one model on one folder."""
    from fusionseg.data.benchmarks import open_dataset
    from fusionseg.engine.evaluate import evaluate_present, heldout_subset
    from fusionseg.segmenter import Segmenter
    from everyday_study import resolve_model, tta_args
    path, _, rest = model.partition(":")
    tta, _, rest = rest.partition(":")
    bridge, _, own = rest.partition(":")
    scales, flip = tta_args(tta or None)
    seg = Segmenter.from_pretrained(resolve_model(path), device="cpu", size=int(own) if own else size,
                                    decision=decision,
                                    tta_scales=scales, tta_flip=flip, bridge_size=int(bridge) if bridge else None)
    ds = heldout_subset(open_dataset(data), seg.meta)
    cms: list = []
    rep = evaluate_present(seg, ds, progress=False, image_cms=cms)
    return torch.stack(cms).numpy().astype(np.int64), rep


def miou_of(cm: np.ndarray) -> float:
    """Mean IoU over the classes (row 0, "none", left out) with a non-empty union, as ``semantic_scores``."""
    from fusionseg.engine.metrics import miou
    return miou(torch.from_numpy(cm), range(1, cm.shape[0]))


def paired_bootstrap(stacks: list[np.ndarray], samples: int, seed: int = 0) -> np.ndarray:
    """``stacks``: per model, (N, K+1, K+1) per-image matrices over the same N images -> (samples, models) mIoU,
    every model scored on the same resample in each row."""
    n = stacks[0].shape[0]
    if any(s.shape[0] != n for s in stacks):
        raise ValueError("every model must be scored on the same images")
    rng = np.random.default_rng(seed)
    out = np.empty((samples, len(stacks)))
    for b in range(samples):
        idx = rng.integers(0, n, n)
        counts = np.bincount(idx, minlength=n).astype(np.int64)
        for m, st in enumerate(stacks):
            out[b, m] = miou_of(np.tensordot(counts, st, axes=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="repeatable; the first is the reference")
    ap.add_argument("--data", required=True, help="a dataset folder the models hold out a validation split of")
    ap.add_argument("--size", type=int, default=None, help="working size for every model (default: each model's)")
    ap.add_argument("--decision", default=None, choices=["threshold", "relative"])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--interval", type=float, default=0.9, help="central share of the resamples (default 0.9)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.samples < 1 or not 0 < a.interval < 1:
        raise SystemExit("--samples must be at least 1 and --interval in (0, 1)")
    if a.threads:
        torch.set_num_threads(a.threads)
    stacks, reports = [], []
    for m in a.model:
        st, rep = image_matrices(m, a.data, a.size, a.decision)
        stacks.append(st)
        reports.append(rep)
        print(f"{m}: mIoU {rep['miou']:.3f} on {st.shape[0]} images", flush=True)
    boot = paired_bootstrap(stacks, a.samples, a.seed)
    lo, hi = (1 - a.interval) / 2 * 100, (1 + a.interval) / 2 * 100
    rows = []
    print(f"\n| model | mIoU | minus the first | {a.interval:.0%} interval | share of resamples above 0 |\n"
          f"|---|---|---|---|---|")
    for m, model in enumerate(a.model):
        d = boot[:, m] - boot[:, 0]
        row = {"model": model, "miou": reports[m]["miou"], "low_iou_classes": len(reports[m]["low_iou_classes"]),
               "difference": round(float(reports[m]["miou"] - reports[0]["miou"]), 4),
               "difference_interval": [round(float(np.percentile(d, lo)), 4), round(float(np.percentile(d, hi)), 4)],
               "above_zero": round(float(np.mean(d > 0)), 4)}
        rows.append(row)
        print(f"| {model} | {row['miou']:.3f} | " + ("reference | | |" if m == 0 else
              f"{row['difference']:+.3f} | {row['difference_interval'][0]:+.3f} to "
              f"{row['difference_interval'][1]:+.3f} | {row['above_zero']:.2f} |"))
    if a.json:
        Path(a.json).write_text(json.dumps({"data": a.data, "size": a.size, "decision": a.decision,
                                            "samples": a.samples, "interval": a.interval, "seed": a.seed,
                                            "images": int(stacks[0].shape[0]), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
