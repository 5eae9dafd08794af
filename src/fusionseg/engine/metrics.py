"""Segmentation metrics as plain tensor functions.

Confusion matrices have rows = ground truth, columns = prediction. IoU of a class absent from both the
ground truth and the prediction is NaN and left out of means.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """pred, target: integer tensors of one shape -> ``(K, K)`` int64 counts; ``ignore_index`` pixels skipped."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes or target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) apart from ignore {ignore_index}")
    return torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes).view(num_classes, num_classes)


def iou_from_confusion(cm: Tensor) -> Tensor:
    """``(K, K)`` -> ``(K,)`` float64 IoU; NaN where a class is in neither ground truth nor prediction."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def miou(cm: Tensor, classes: Sequence[int] | None = None) -> float:
    """Mean IoU over ``classes`` (default all), NaNs left out; NaN if none is defined."""
    iou = iou_from_confusion(cm)
    if classes is not None:
        iou = iou[list(classes)]
    iou = iou[~iou.isnan()]
    return float(iou.mean()) if iou.numel() else float("nan")


def pixel_accuracy(cm: Tensor) -> float:
    total = cm.sum()
    return float(cm.diag().sum().double() / total) if total > 0 else float("nan")


class SemanticMeter:
    """Accumulates a confusion matrix over images (whole-vocabulary protocol)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.cm += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def compute(self) -> dict:
        iou = iou_from_confusion(self.cm)
        return {"miou": miou(self.cm), "pixel_accuracy": pixel_accuracy(self.cm), "per_class_iou": iou.tolist()}


class EpisodeMeter:
    """One-class episodes (HSNet / LSeg protocol).

    Per class, intersection and union of the foreground are summed over that class's episodes; the class IoU
    is their ratio and mIoU the mean over classes. FB-IoU follows HSNet: foreground and background IoU are
    each accumulated per class in the same way, averaged over classes, and FB-IoU is the mean of the two.
    """

    def __init__(self):
        self.fg_i: dict[int, float] = {}
        self.fg_u: dict[int, float] = {}
        self.bg_i: dict[int, float] = {}
        self.bg_u: dict[int, float] = {}

    def update(self, class_id: int, pred_fg: Tensor, gt_fg: Tensor, ignore: Tensor | None = None) -> None:
        p, g = pred_fg.bool(), gt_fg.bool()
        keep = ~ignore.bool() if ignore is not None else torch.ones_like(g)
        p, g = p & keep, g & keep
        pb, gb = (~p) & keep, (~g) & keep
        for d, v in ((self.fg_i, (p & g).sum()), (self.fg_u, (p | g).sum()),
                     (self.bg_i, (pb & gb).sum()), (self.bg_u, (pb | gb).sum())):
            d[class_id] = d.get(class_id, 0.0) + float(v)

    def compute(self, classes: Sequence[int] | None = None) -> dict:
        cls = list(classes) if classes else sorted(self.fg_u)
        def ratio(i, u, c):
            return i.get(c, 0.0) / u[c] if u.get(c, 0.0) > 0 else float("nan")
        fg = {c: ratio(self.fg_i, self.fg_u, c) for c in cls}
        bg = {c: ratio(self.bg_i, self.bg_u, c) for c in cls}
        def mean(d):
            v = [x for x in d.values() if x == x]
            return sum(v) / len(v) if v else float("nan")
        m_fg, m_bg = mean(fg), mean(bg)
        return {"miou": m_fg, "fbiou": (m_fg + m_bg) / 2, "per_class": fg, "background_iou": m_bg}
