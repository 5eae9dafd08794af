"""The folder dataset format: re-indexing, undeclared values, layout errors, splits."""
import json

import numpy as np
import pytest
from PIL import Image

from fusionseg.data.datasets import DatasetError, FolderDataset, normalize_name, split_ids

from conftest import make_shapes_dataset


def test_reindexing_and_present_classes(tmp_path):
    root = make_shapes_dataset(tmp_path / "d", n=3)
    meta = json.loads((root / "dataset.json").read_text())
    meta["classes"] = {"7": "square", "9": "disc"}  # raw values re-indexed to 1..K in ascending raw value
    meta["background_values"] = [0]
    (root / "dataset.json").write_text(json.dumps(meta))
    for p in (root / "masks").glob("*.png"):
        a = np.asarray(Image.open(p)).copy()
        a[a == 1], a[a == 2] = 7, 9
        Image.fromarray(a).save(p)
    ds = FolderDataset(root)
    s = ds[0]
    assert ds.class_names == ("square", "disc") and set(np.unique(s.mask)) <= {0, 1, 2}
    assert s.present() == [1, 2] and s.mask.shape == (s.image.height, s.image.width)


def test_undeclared_mask_value_names_file_and_value(tmp_path):
    root = make_shapes_dataset(tmp_path / "d", n=2)
    p = sorted((root / "masks").glob("*.png"))[1]
    a = np.asarray(Image.open(p)).copy()
    a[0, 0] = 42
    Image.fromarray(a).save(p)
    ds = FolderDataset(root)
    with pytest.raises(DatasetError, match=rf"{p.name}.*42"):
        ds[1]


def test_layout_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        FolderDataset(tmp_path / "missing")
    (tmp_path / "e").mkdir()
    with pytest.raises(DatasetError, match="dataset.json"):
        FolderDataset(tmp_path / "e")
    root = make_shapes_dataset(tmp_path / "d", n=2)
    (root / "dataset.json").write_text("{nope")
    with pytest.raises(DatasetError, match="not valid JSON"):
        FolderDataset(root)


def test_split_is_deterministic_and_disjoint():
    ids = [f"i{k}" for k in range(100)]
    tr, va = split_ids(ids, 0.15, seed=0)
    assert len(va) == 15 and not set(tr) & set(va) and sorted(tr + va) == sorted(ids)
    assert split_ids(ids, 0.15, seed=0) == (tr, va) and split_ids(ids, 0.15, seed=1) != (tr, va)
    assert normalize_name("  Sign_Symbol ") == "sign symbol"
