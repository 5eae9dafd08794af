"""`evaluate --protocol present`: each image named with exactly its ground-truth classes; `--split val`."""
from __future__ import annotations

import numpy as np
import pytest

from fusionseg.engine.evaluate import evaluate_present, heldout_subset
from fusionseg.data.datasets import FolderDataset, split_ids
from fusionseg.segmenter import Prediction


class _Stub:
    """Predicts, for the names it is given, a fixed rule: the first name everywhere the ground truth has any
    class, none elsewhere; records the names asked per image."""

    threshold = 0.5

    def __init__(self, ds):
        self.ds, self.asked, self.i = ds, [], 0

    def predict(self, image, names, threshold=None, background=False):
        self.asked.append(list(names))
        mask = self.ds[self.i].mask
        self.i += 1
        labels = np.where((mask > 0) & (mask < 255), 1, 0).astype(np.uint16)
        return Prediction(labels, np.zeros(labels.shape, np.float32), list(names))


def test_present_names_only_and_labels_mapped_back(shapes_dataset):
    ds = FolderDataset(shapes_dataset)
    stub = _Stub(ds)
    rep = evaluate_present(stub, ds, progress=False, max_images=4)
    # every shapes image shows both classes, in mask order: square (1), disc (2)
    assert stub.asked == [["square", "disc"]] * 4
    # the stub paints both objects as its first name, "square": square IoU = |sq| / |sq u disc|, disc 0
    sq = sum(int((ds[i].mask == 1).sum()) for i in range(4))
    di = sum(int((ds[i].mask == 2).sum()) for i in range(4))
    assert rep["per_class"]["square"] == pytest.approx(sq / (sq + di), abs=1e-4)
    assert rep["per_class"]["disc"] == 0.0
    assert rep["low_iou_classes"] == ["disc"] and rep["classes_evaluated"] == 2
    assert rep["miou"] == pytest.approx((sq / (sq + di)) / 2, abs=1e-4)
    # the per-image counting: each image's own (square IoU + 0) / 2, averaged over images
    per = [float((ds[i].mask == 1).sum()) / float(((ds[i].mask == 1) | (ds[i].mask == 2)).sum()) / 2 for i in range(4)]
    assert rep["mean_image_miou"] == pytest.approx(np.mean(per), abs=1e-4)
    # where the pixels went: every disc pixel was given "square", none left unlabelled
    assert rep["errors"]["disc"] == {"missed": 0.0, "confused": 1.0, "confused_with": "square"}
    assert rep["errors"]["square"] == {"missed": 0.0, "confused": 0.0, "confused_with": None}
    assert rep["low_iou_pixels"] == {"missed": 0.0, "confused": 1.0}


def test_pixel_errors_split_missed_from_confused():
    import torch
    from fusionseg.engine.evaluate import _table, pixel_errors
    # rows: truth (0 none, 1 cat, 2 dog, 3 car), columns: prediction
    cm = torch.tensor([[50, 1, 0, 0],
                       [6, 10, 4, 0],   # cat: 6 missed, 4 taken by dog
                       [0, 1, 9, 0],    # dog: 1 taken by cat
                       [0, 0, 0, 0]])   # car: no pixels
    err, low = pixel_errors(cm, ["cat", "dog", "car"], low=["cat"])
    assert err["cat"] == {"missed": 0.3, "confused": 0.2, "confused_with": "dog"}
    assert err["dog"] == {"missed": 0.0, "confused": 0.1, "confused_with": "cat"}
    assert "car" not in err
    assert low == {"missed": 0.3, "confused": 0.2}
    err2, low2 = pixel_errors(cm, ["cat", "dog", "car"], low=["cat", "dog"])
    assert low2 == {"missed": pytest.approx(6 / 30, abs=1e-4), "confused": pytest.approx(5 / 30, abs=1e-4)}
    assert pixel_errors(cm, ["cat", "dog", "car"])[1] is None
    rep = {"protocol": "present", "per_class": {"cat": 0.5, "dog": 0.8, "car": None}, "miou": 0.65,
           "errors": err, "low_iou_pixels": low, "low_iou": 0.05, "low_iou_classes": [], "classes_evaluated": 2}
    t = _table(rep)
    assert "| cat | 0.500 | 0.30 | 0.20 (dog) |" in t and "| car | n/a | | |" in t
    assert "missed / given another class | 0.30 / 0.20 |" in t


def test_heldout_subset_recomputes_the_recorded_validation_split(shapes_dataset):
    ds = FolderDataset(shapes_dataset)
    meta = {"training": {"data": ["/elsewhere/shapes"], "config": {"val_fraction": 0.25, "seed": 3,
                                                                     "holdout": ["img000"]}}}
    sub = heldout_subset(ds, meta)
    _, val = split_ids([i for i in ds.ids if i != "img000"], 0.25, 3)
    assert sub.ids == sorted(set(val) | {"img000"})
    other = {"training": {"data": ["/x/msrc_v2"], "config": {"val_fraction": 0.25}}}
    assert heldout_subset(ds, other).ids == ds.ids  # a folder the model never trained on: every image
