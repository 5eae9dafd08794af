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
        meta = getattr(dataset, "meta", {})
        background = not meta.get("background_values", [0])
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
