"""Metrics against hand-counted tiny examples."""
from __future__ import annotations

import math

import pytest
import torch

from fusionseg.engine.metrics import (EpisodeMeter, SemanticMeter, confusion_matrix, iou_from_confusion, miou,
                                      pixel_accuracy)

T = torch.tensor


def test_confusion_matrix_hand_counted():
    target = T([[0, 0, 1], [1, 2, 255]])
    pred = T([[0, 1, 1], [1, 1, 0]])  # last pixel ignored whatever it predicts
    cm = confusion_matrix(pred, target, 3)
    assert cm.dtype == torch.int64
    # rows = target, cols = pred
    assert cm.tolist() == [[1, 1, 0],
                           [0, 2, 0],
                           [0, 1, 0]]
    iou = iou_from_confusion(cm)
    # class 0: TP 1, FP 0, FN 1 -> 1/2; class 1: TP 2, FP 2 (one 0, one 2), FN 0 -> 2/4; class 2: TP 0 -> 0
    assert iou.tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert miou(cm) == pytest.approx(1 / 3)
    assert miou(cm, classes=[1, 2]) == pytest.approx(0.25)
    assert pixel_accuracy(cm) == pytest.approx(3 / 5)


def test_batched_shapes_and_errors():
    cm = confusion_matrix(T([[[0, 1]], [[1, 1]]]), T([[[0, 1]], [[0, 1]]]), 2)
    assert cm.tolist() == [[1, 1], [0, 2]]
    with pytest.raises(ValueError, match="one shape"):
        confusion_matrix(T([0, 1]), T([0, 1, 1]), 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        confusion_matrix(T([0, 5]), T([0, 1]), 2)


def test_empty_class_is_nan_and_left_out_of_the_mean():
    target = T([0, 0, 1, 1])
    pred = T([0, 0, 1, 0])
    cm = confusion_matrix(pred, target, 3)  # class 2: in neither
    iou = iou_from_confusion(cm)
    assert math.isnan(iou[2])
    assert iou[0] == pytest.approx(2 / 3) and iou[1] == pytest.approx(1 / 2)
    assert miou(cm) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert math.isnan(miou(cm, classes=[2]))


def test_class_in_ground_truth_never_predicted_has_iou_zero():
    cm = confusion_matrix(T([0, 0, 0, 0]), T([0, 0, 2, 2]), 3)
    iou = iou_from_confusion(cm)
    assert iou[2] == 0.0 and iou[0] == pytest.approx(0.5) and math.isnan(iou[1])
    assert miou(cm) == pytest.approx(0.25)


def test_perfect_prediction_and_all_ignore_image():
    m = SemanticMeter(3)
    y = T([[0, 1], [2, 2]])
    m.update(y, y)
    before = m.cm.clone()
    m.update(T([[1, 1], [0, 0]]), torch.full((2, 2), 255))  # all ignore: counts unchanged
    assert torch.equal(m.cm, before)
    r = m.compute()
    assert r["miou"] == 1.0 and r["pixel_accuracy"] == 1.0 and r["per_class_iou"] == [1.0, 1.0, 1.0]
    assert m.compute(classes=[1, 2])["miou"] == 1.0
    m.reset()
    assert int(m.cm.sum()) == 0 and math.isnan(m.compute()["pixel_accuracy"])


def test_episode_meter_fb_iou_by_hand():
    m = EpisodeMeter()
    # Episode 1, class 1, 2x3 image, last pixel ignored:
    #   gt   = 1 1 0 / 0 0 [ign]      pred = 1 0 0 / 1 0 [1]
    # kept 5 pixels. fg: I = 1, U = 3.  bg: not-pred & not-gt = (0,2),(1,1) -> I = 2; U = 5 - I_fg = 4.
    gt = T([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    pred = T([[1, 0, 0], [1, 0, 1]], dtype=torch.bool)
    ign = T([[0, 0, 0], [0, 0, 1]], dtype=torch.bool)
    m.update(1, pred, gt, ign)
    # Episode 2, class 1, 1x4: gt = 1 1 1 0, pred = 1 1 1 1 -> fg I 3, U 4; bg I 0, U 1.
    m.update(1, T([1, 1, 1, 1], dtype=torch.bool), T([1, 1, 1, 0], dtype=torch.bool))
    # Episode 3, class 2, 1x4: gt = 1 0 0 0, pred = 0 0 0 0 -> fg I 0, U 1; bg I 3, U 4.
    m.update(2, torch.zeros(4, dtype=torch.bool), T([1, 0, 0, 0], dtype=torch.bool))
    # Episode 4, class 3, all pixels ignored: counts nothing for class 3.
    m.update(3, torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    r = m.compute(classes=[1, 2])
    # per class: class 1 = (1 + 3) / (3 + 4) = 4/7 (sum I / sum U, not the mean of 1/3 and 3/4); class 2 = 0.
    assert r["per_class"][1] == pytest.approx(4 / 7) and r["per_class"][2] == 0.0
    assert r["miou"] == pytest.approx(2 / 7)
    # pooled over all episodes of classes 1, 2: fg = (1+3+0)/(3+4+1) = 4/8; bg = (2+0+3)/(4+1+4) = 5/9
    assert r["foreground_iou"] == pytest.approx(0.5)
    assert r["background_iou"] == pytest.approx(5 / 9)
    assert r["fbiou"] == pytest.approx((0.5 + 5 / 9) / 2)
    # class-wise variant: bg per class 1: 2/5, class 2: 3/4
    assert r["background_iou_classwise"] == pytest.approx((2 / 5 + 3 / 4) / 2)
    assert r["fbiou_classwise"] == pytest.approx((2 / 7 + (2 / 5 + 3 / 4) / 2) / 2)
    assert r["episodes"] == 3
    # class 3 had one all-ignore episode: no union -> NaN, left out of the mean
    r3 = m.compute()
    assert math.isnan(r3["per_class"][3]) and r3["miou"] == pytest.approx(2 / 7) and r3["episodes"] == 4
    # a requested class without any episode is NaN and does not change the mean
    r5 = m.compute(classes=[1, 2, 5])
    assert math.isnan(r5["per_class"][5]) and r5["miou"] == pytest.approx(2 / 7)


def test_episode_meter_perfect_and_errors():
    m = EpisodeMeter()
    g = T([[1, 0], [0, 1]], dtype=torch.bool)
    m.update(7, g, g)
    r = m.compute()
    assert r["miou"] == 1.0 and r["fbiou"] == 1.0 and r["per_class"] == {7: 1.0}
    with pytest.raises(ValueError, match="one shape"):
        m.update(7, g, g.reshape(-1))
