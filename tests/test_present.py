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


def test_heldout_subset_recomputes_the_recorded_validation_split(shapes_dataset):
    ds = FolderDataset(shapes_dataset)
    meta = {"training": {"data": ["/elsewhere/shapes"], "config": {"val_fraction": 0.25, "seed": 3,
                                                                     "holdout": ["img000"]}}}
    sub = heldout_subset(ds, meta)
    _, val = split_ids([i for i in ds.ids if i != "img000"], 0.25, 3)
    assert sub.ids == sorted(set(val) | {"img000"})
    other = {"training": {"data": ["/x/msrc_v2"], "config": {"val_fraction": 0.25}}}
    assert heldout_subset(ds, other).ids == ds.ids  # a folder the model never trained on: every image
