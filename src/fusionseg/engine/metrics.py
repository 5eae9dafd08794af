"""Segmentation metrics as plain tensor functions.

Two protocols (DESIGN.md, "Evaluation protocols"):

* **Whole vocabulary** — one confusion matrix over all images: :func:`confusion_matrix`,
  :func:`iou_from_confusion`, :func:`miou`, :func:`pixel_accuracy`, accumulated by :class:`SemanticMeter`.
  Confusion matrices have rows = ground truth, columns = prediction. The IoU of a class absent from both the
  ground truth and the prediction is NaN and left out of means; a class in the ground truth that is never
  predicted has IoU 0 and counts. :func:`semantic_scores` is the report both ``fusionseg evaluate`` and the
  training validation give (label 0 = "none of these", label k = the k-th name).
* **One-class episodes** (HSNet / LSeg) — :class:`EpisodeMeter`: each episode is one image and one class; the
  prediction is a foreground mask for that class. Definitions are written out in the class docstring.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["confusion_matrix", "iou_from_confusion", "miou", "pixel_accuracy", "semantic_scores", "SemanticMeter",
           "EpisodeMeter"]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Count (ground truth, prediction) label pairs.

    Args:
        pred: integer labels, any shape (e.g. ``(H, W)`` or ``(B, H, W)``), values in ``[0, num_classes)``.
        target: integer labels of the same shape; pixels equal to ``ignore_index`` are skipped (whatever
            ``pred`` says there).
        num_classes: K.

    Returns:
        ``(K, K)`` int64 tensor ``cm`` with ``cm[t, p]`` = number of kept pixels with target ``t`` and
        prediction ``p``.

    Raises:
        ValueError: shapes differ, or a kept label lies outside ``[0, K)``.
    """
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if pred.numel():
        lo = min(int(pred.min()), int(target.min()))
        hi = max(int(pred.max()), int(target.max()))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}) apart from the ignore value {ignore_index} "
                             f"in the target; got values from {lo} to {hi}")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def iou_from_confusion(cm: Tensor) -> Tensor:
    """``(K, K)`` confusion matrix -> ``(K,)`` float64 IoU = TP / (TP + FP + FN).

    NaN where the class is in neither the ground truth nor the prediction (union 0).
    """
    cm = torch.as_tensor(cm).double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def miou(cm: Tensor, classes: Sequence[int] | None = None) -> float:
    """Mean IoU over ``classes`` (row indices of ``cm``, default all), NaNs left out; NaN if none is defined."""
    iou = iou_from_confusion(cm)
    if classes is not None:
        iou = iou[torch.as_tensor(list(classes), dtype=torch.long)]
    iou = iou[~iou.isnan()]
    return float(iou.mean()) if iou.numel() else float("nan")


def pixel_accuracy(cm: Tensor) -> float:
    """Fraction of counted pixels whose prediction equals the ground truth (NaN if nothing was counted)."""
    cm = torch.as_tensor(cm)
    total = cm.sum()
    return float(cm.diag().sum().double() / total) if total > 0 else float("nan")


def semantic_scores(cm: Tensor, class_names: Sequence[str]) -> dict:
    """The whole-vocabulary report of a ``(K+1, K+1)`` confusion matrix whose label 0 is "none of these" and
    label k is ``class_names[k-1]``, rounded to 4 places:

    * ``per_class``: name -> IoU, None for a class in neither the ground truth nor the prediction;
    * ``miou``: the mean of the ``per_class`` values that are not None (None if all are), row 0 left out;
    * ``pixel_accuracy``: over every counted pixel, "none of these" included.
    """
    iou = iou_from_confusion(cm).tolist()
    if len(iou) != len(class_names) + 1:
        raise ValueError(f"a confusion matrix of {len(iou)} labels cannot hold {len(class_names)} names and 'none'")
    per_class = {name: (None if iou[k] != iou[k] else round(float(iou[k]), 4))
                 for k, name in enumerate(class_names, start=1)}
    vals = [v for v in per_class.values() if v is not None]
    return {"miou": round(float(np.mean(vals)), 4) if vals else None, "per_class": per_class,
            "pixel_accuracy": round(float(pixel_accuracy(cm)), 4)}


class SemanticMeter:
    """Accumulates one confusion matrix over images (whole-vocabulary protocol).

    ``update(pred, target)`` takes integer label maps of one shape (``(H, W)`` or batched); ``compute()``
    returns ``{"miou", "pixel_accuracy", "per_class_iou"}`` with ``per_class_iou`` a list of K floats (NaN
    for classes never seen nor predicted) and ``miou`` their NaN-mean over ``classes`` (default all K rows,
    background row 0 included when label 0 is background: pass ``classes=range(1, K)`` to leave it out).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.cm = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    def reset(self) -> None:
        self.cm.zero_()

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.cm += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def compute(self, classes: Sequence[int] | None = None) -> dict:
        iou = iou_from_confusion(self.cm)
        return {"miou": miou(self.cm, classes), "pixel_accuracy": pixel_accuracy(self.cm),
                "per_class_iou": iou.tolist()}


class EpisodeMeter:
    """One-class episodes, accumulated as in HSNet's evaluation (the protocol LSeg and Fusioner report).

    Each ``update(class_id, pred_fg, gt_fg, ignore)`` is one episode: boolean ``(H, W)`` masks (any one shape)
    of the predicted and true foreground of class ``class_id``; pixels where ``ignore`` is true (e.g. the VOC
    boundary, value 255) count for nothing. For the episode four pixel counts are added to that class:

    * foreground: ``I_fg = |P ∩ G|``, ``U_fg = |P ∪ G|``
    * background: ``I_bg = |¬P ∩ ¬G|``, ``U_bg = |¬P ∪ ¬G|`` (complements taken inside the kept pixels)

    ``compute(classes)`` (default: every class with an episode) returns

    * ``per_class[c] = ΣI_fg(c) / ΣU_fg(c)`` — sums over the episodes of class c (not a mean of episode IoUs);
      NaN for a class in ``classes`` with no episode (or only empty unions).
    * ``miou`` = mean of ``per_class`` over ``classes``, NaNs left out. (HSNet divides by ``max(U, 1)`` and so
      counts a class without episodes as 0; with its 1,000 episodes per fold every class has some.)
    * ``foreground_iou = Σ_c ΣI_fg / Σ_c ΣU_fg`` and ``background_iou = Σ_c ΣI_bg / Σ_c ΣU_bg``: pooled over
      all episodes of ``classes`` (HSNet ``common/logger.py``: it sums the per-class buffers over the classes
      of interest before dividing — not a mean over classes).
    * ``fbiou`` = (``foreground_iou`` + ``background_iou``) / 2 — HSNet's FB-IoU.
    * ``background_iou_classwise`` = mean over classes of ΣI_bg(c) / ΣU_bg(c), and ``fbiou_classwise`` =
      (``miou`` + that) / 2: the per-class variant some papers describe, reported alongside for comparison.
    * ``episodes`` = number of episodes counted for ``classes``.
    """

    def __init__(self):
        self._stats: dict[int, list[int]] = {}  # class -> [I_fg, U_fg, I_bg, U_bg, episodes]

    def reset(self) -> None:
        self._stats.clear()

    def update(self, class_id: int, pred_fg: Tensor, gt_fg: Tensor, ignore: Tensor | None = None) -> None:
        p, g = torch.as_tensor(pred_fg).bool(), torch.as_tensor(gt_fg).bool()
        if p.shape != g.shape:
            raise ValueError(f"pred_fg and gt_fg must have one shape, got {tuple(p.shape)} and {tuple(g.shape)}")
        if ignore is not None:
            keep = ~torch.as_tensor(ignore).bool()
            if keep.shape != g.shape:
                raise ValueError(f"ignore must have the shape of gt_fg {tuple(g.shape)}, got {tuple(keep.shape)}")
            p, g = p & keep, g & keep
            n = int(keep.sum())
        else:
            n = g.numel()
        i_fg = int((p & g).sum())
        u_fg = int((p | g).sum())
        # Within the kept pixels: background intersection = kept - union_fg; background union = kept - I_fg.
        i_bg = n - u_fg
        u_bg = n - i_fg
        s = self._stats.setdefault(int(class_id), [0, 0, 0, 0, 0])
        s[0] += i_fg
        s[1] += u_fg
        s[2] += i_bg
        s[3] += u_bg
        s[4] += 1

    @property
    def classes(self) -> list[int]:
        """Classes with at least one episode, ascending."""
        return sorted(self._stats)

    def compute(self, classes: Sequence[int] | None = None) -> dict:
        cls = [int(c) for c in classes] if classes else self.classes
        zero = [0, 0, 0, 0, 0]
        per_fg: dict[int, float] = {}
        per_bg: dict[int, float] = {}
        tot = [0, 0, 0, 0, 0]
        for c in cls:
            s = self._stats.get(c, zero)
            per_fg[c] = s[0] / s[1] if s[1] > 0 else float("nan")
            per_bg[c] = s[2] / s[3] if s[3] > 0 else float("nan")
            tot = [a + b for a, b in zip(tot, s)]

        def nanmean(values) -> float:
            v = [x for x in values if not math.isnan(x)]
            return sum(v) / len(v) if v else float("nan")

        fg = tot[0] / tot[1] if tot[1] > 0 else float("nan")
        bg = tot[2] / tot[3] if tot[3] > 0 else float("nan")
        m = nanmean(per_fg.values())
        bg_cw = nanmean(per_bg.values())
        return {"miou": m, "fbiou": (fg + bg) / 2, "per_class": per_fg,
                "foreground_iou": fg, "background_iou": bg,
                "background_iou_classwise": bg_cw, "fbiou_classwise": (m + bg_cw) / 2,
                "episodes": tot[4]}
