"""Evaluation protocols -> report dicts (JSON-ready; IoU as fractions in [0, 1])."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..data.datasets import IGNORE
from .metrics import SemanticMeter


def evaluate_semantic(segmenter, dataset, class_names: Sequence[str] | None = None, background: bool | None = None,
                      threshold: float | None = None, progress: bool = True, max_images: int | None = None) -> dict:
    """Whole-vocabulary semantic segmentation: every class of ``dataset`` named at once.

    ``background``: plain arg-max (no "none of these"); by default chosen from the dataset: datasets whose
    every pixel is a class (no background values, e.g. MSRC, CamVid) use the arg-max, others the threshold.
    mIoU is the mean over the named classes that occur in the ground truth or the prediction.
    """
    names = list(class_names or dataset.class_names)
    if background is None:
        background = bool(getattr(dataset, "every_pixel_labelled", False))
    meter = SemanticMeter(len(names) + 1, ignore_index=IGNORE)
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    t0 = time.time()
    for i in tqdm(range(n), desc=f"evaluating {getattr(dataset, 'name', '')}", unit="img", disable=not progress,
                  dynamic_ncols=True):
        s = dataset[i]
        pred = segmenter.predict(s.image, names, threshold=threshold, background=background)
        meter.update(torch.from_numpy(pred.labels.astype(np.int64)), torch.from_numpy(s.mask.astype(np.int64)))
    r = meter.compute()
    per = r["per_class_iou"]
    per_class = {name: (None if per[k] != per[k] else round(float(per[k]), 4)) for k, name in enumerate(names, start=1)}
    vals = [v for v in per_class.values() if v is not None]
    return {"protocol": "semantic", "miou": round(float(np.mean(vals)), 4) if vals else None,
            "pixel_accuracy": round(float(r["pixel_accuracy"]), 4), "per_class": per_class, "images": n,
            "argmax": bool(background), "seconds": round(time.time() - t0, 1)}


def make_episodes(dataset, classes: Sequence[int] | None = None, n: int | None = None, seed: int = 0) -> list[tuple[int, int]]:
    """One-class episodes (image index, 1-based class index) for every class present in an image.

    Datasets with their own episode list (PASCAL-5i / COCO-20i: ``episodes(n, seed)``) use it; otherwise
    every (image, present class) pair, restricted to ``classes``, and cycled to ``n`` if given.
    """
    if hasattr(dataset, "episodes"):  # the benchmark's own episode list (n=None: its standard count)
        return list(dataset.episodes(n=n, seed=seed))
    allowed = set(classes) if classes else None
    eps = []
    for i in range(len(dataset)):
        mask = dataset.load_mask(dataset.ids[i]) if hasattr(dataset, "load_mask") else dataset[i].mask
        for c in np.unique(mask):
            c = int(c)
            if 0 < c < IGNORE and (allowed is None or c in allowed):
                eps.append((i, c))
    if n and eps:
        eps = [eps[k % len(eps)] for k in range(n)]
    return eps


def evaluate_episodes(segmenter, dataset, classes: Sequence[int] | None = None, n: int | None = None,
                      threshold: float | None = None, progress: bool = True, keep_examples: int = 0) -> dict:
    """LSeg/HSNet one-class episodes: each (image, class present) is segmented with that one name alone.

    Intersection and union are summed per class over all episodes; mIoU is the mean over ``classes`` (default:
    the dataset's novel classes if it has folds, else every class with an episode); FB-IoU the mean of the
    foreground and background IoU.
    """
    from .metrics import EpisodeMeter
    classes = list(classes or getattr(dataset, "novel_classes", None) or [])
    eps = make_episodes(dataset, classes or None, n)
    if not eps:
        raise ValueError(f"{getattr(dataset, 'name', 'dataset')}: no episode (no image shows any of the evaluated classes)")
    thr = segmenter.threshold if threshold is None else threshold
    names = list(dataset.class_names)
    meter = EpisodeMeter()
    by_image: dict[int, list[int]] = {}
    for i, c in eps:
        by_image.setdefault(i, []).append(c)
    examples = []
    t0 = time.time()
    bar = tqdm(total=len(eps), desc="episodes", unit="ep", disable=not progress, dynamic_ncols=True)
    for i, cs in by_image.items():
        s = dataset[i]
        enc = segmenter.encode(s.image)
        target = torch.from_numpy(s.mask.astype(np.int64))
        ignore = target == IGNORE
        for c in cs:
            fg = segmenter.foreground(enc, names[c - 1], thr)
            meter.update(c, fg, target == c, ignore)
            if len(examples) < keep_examples:
                examples.append((s.image, (target == c).numpy().astype(np.uint8) + ignore.numpy() * 254,
                                 fg.numpy().astype(np.uint8), names[c - 1]))
            bar.update(1)
    bar.close()
    r = meter.compute(classes or None)
    per = r["per_class"]
    per_class = {names[int(c) - 1]: (None if v is None or v != v else round(float(v), 4)) for c, v in per.items()}
    out = {"protocol": "episodes", "miou": round(float(r["miou"]), 4), "fbiou": round(float(r["fbiou"]), 4),
           "per_class": per_class, "episodes": len(eps), "seconds": round(time.time() - t0, 1)}
    if keep_examples:
        out["_examples"] = examples
    return out


def _table(rep: dict) -> str:
    lines = ["| class | IoU |", "|---|---|"]
    for n, v in rep["per_class"].items():
        lines.append(f"| {n} | {'n/a' if v is None else f'{v:.3f}'} |")
    lines.append(f"| **mean (mIoU)** | **{rep['miou']:.3f}** |" if rep.get("miou") is not None else "| mean | n/a |")
    if "fbiou" in rep:
        lines.append(f"| FB-IoU | {rep['fbiou']:.3f} |")
    if "pixel_accuracy" in rep:
        lines.append(f"| pixel accuracy | {rep['pixel_accuracy']:.3f} |")
    return "\n".join(lines)


def _figure(examples, path) -> None:
    from ..data.io import save_png_atomic
    from ..visualize import grid, overlay
    rows = []
    for img, gt, pred, name in examples:
        names = [name] if isinstance(name, str) else list(name)
        gt_v = np.where(gt == 255, 0, gt)
        rows.append([img, overlay(img, gt_v, names, legend=False), overlay(img, pred, names)])
    save_png_atomic(grid(rows, ["image", "ground truth", "prediction"]), path)


def evaluate(model="default", data: str = "", protocol: str = "semantic", fold: int | None = None,
             threshold: float | None = None, device: str = "cpu", json_path: str | None = None,
             report_path: str | None = None, max_images: int | None = None, episodes: int | None = None,
             progress: bool = True, examples: int = 4) -> dict:
    """Evaluate a model on a dataset; returns the report dict (also written as JSON / Markdown if asked)."""
    import json
    from pathlib import Path
    from ..data.benchmarks import open_dataset
    from ..data.io import write_text_atomic
    from ..segmenter import Segmenter
    if protocol not in ("semantic", "episodes"):
        raise ValueError(f"unknown protocol {protocol!r}; use 'episodes' or 'semantic'")
    ds = open_dataset(data, fold=fold)
    seg = model if isinstance(model, Segmenter) else Segmenter.from_pretrained(model, device=device)
    if protocol == "semantic":
        rep = evaluate_semantic(seg, ds, threshold=threshold, progress=progress, max_images=max_images)
        ex = []
        for i in range(min(examples, len(ds)) if report_path else 0):
            s = ds[i]
            p = seg.predict(s.image, list(ds.class_names), threshold=threshold, background=rep["argmax"])
            ex.append((s.image, s.mask, p.labels, list(ds.class_names)))
    else:
        rep = evaluate_episodes(seg, ds, n=episodes, threshold=threshold, progress=progress,
                                keep_examples=examples if report_path else 0)
        ex = rep.pop("_examples", [])
    rep.update(model=str(model if not isinstance(model, Segmenter) else seg.meta.get("path")), data=str(data),
               fold=fold, threshold=seg.threshold if threshold is None else threshold)
    rep["table"] = _table(rep)
    if json_path:
        write_text_atomic(json.dumps({k: v for k, v in rep.items() if k != "table"}, indent=1), json_path)
    if report_path:
        rp = Path(report_path)
        fig = rp.with_suffix(".png")
        if ex:
            _figure(ex, fig)
        body = [f"# fusionseg evaluation: {rep['protocol']}", "",
                f"- model: `{rep['model']}`", f"- data: `{rep['data']}`" + (f", fold {fold}" if fold is not None else ""),
                f"- threshold: {rep['threshold']}", f"- time: {rep.get('seconds')} s", "", rep["table"], ""]
        if ex:
            body += [f"![image | ground truth | prediction]({fig.name})", ""]
        write_text_atomic("\n".join(body), rp)
    return rep
