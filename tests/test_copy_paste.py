"""Copy-paste augmentation (``--copy-paste P --no-cache``): one class of another image of the same folder is pasted
onto the training image, pixels and mask together."""
import numpy as np
import torch

from fusionseg.data.datasets import FolderDataset
from fusionseg.data.transforms import prepare_training_pair
from fusionseg.engine.config import TrainConfig
from fusionseg.engine.sampling import _UncachedSteps
from fusionseg.engine.train import train

from conftest import make_shapes_dataset

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _steps(ds, rate):
    cfg = TrainConfig(data=["x"], out="o", copy_paste=rate, size=64, batch_size=2, steps=10)
    return _UncachedSteps([ds], [[-1, 0, 1]], 2, [64], cfg, 8, MEAN, STD, rows=[0, 1])


def test_paste_moves_one_class_of_another_image_pixels_and_mask(tmp_path):
    ds = FolderDataset(make_shapes_dataset(tmp_path / "s", n=5, size=64))
    st = _steps(ds, 1.0)
    x, m = prepare_training_pair(ds[0].image, ds[0].mask, 64, MEAN, STD)
    pasted = 0
    for step in range(6):
        x2, m2 = st._paste(step, 0, 0, 0, x, m, 64)
        changed = m2 != m
        assert changed.any() or (x2 != x).any()  # rate 1: something was pasted every time
        # the pasted region is one class of one other image, and the pixels came with it
        srcs = []
        for k in range(1, 5):
            xo, mo = prepare_training_pair(ds[k].image, ds[k].mask, 64, MEAN, STD)
            for c in (1, 2):
                sel = mo == c
                if torch.equal(m2[sel], mo[sel]) and torch.equal(x2[:, sel], xo[:, sel]) and \
                        torch.equal(m2[~sel], m[~sel]) and torch.equal(x2[:, ~sel], x[:, ~sel]):
                    srcs.append((k, c))
        assert srcs, f"step {step}: the change is not one class of one other image"
        pasted += 1
    assert torch.equal(st._paste(0, 0, 0, 0, x, m, 64)[1], st._paste(0, 0, 0, 0, x, m, 64)[1])  # seeded per step
    none = _steps(ds, 0.0)
    x0, m0 = none._paste(0, 0, 0, 0, x, m, 64)
    assert x0 is x and m0 is m  # rate 0: untouched


def test_a_run_with_copy_paste_trains_and_pastes(tmp_path, monkeypatch):
    data = make_shapes_dataset(tmp_path / "shapes", n=4, size=64)
    calls = []
    real = _UncachedSteps._paste
    monkeypatch.setattr(_UncachedSteps, "_paste", lambda self, *a: (calls.append(1), real(self, *a))[1])
    cfg = TrainConfig(data=[str(data)], out=str(tmp_path / "run"), image_encoder="test-pool", text_encoder="test-hash",
                      preset="tiny", steps=3, batch_size=2, size=64, val_fraction=0.0, checkpoint_every=0,
                      cache=False, cache_dir=str(tmp_path / "cache"), progress=False, copy_paste=1.0)
    train(cfg)
    assert len(calls) == 3 * 2  # every image of every step
    assert (tmp_path / "run" / "final.safetensors").is_file()


def test_copy_paste_on_cached_features_is_refused(tmp_path):
    import pytest
    data = make_shapes_dataset(tmp_path / "shapes", n=4, size=64)
    cfg = TrainConfig(data=[str(data)], out=str(tmp_path / "run"), image_encoder="test-pool", text_encoder="test-hash",
                      preset="tiny", steps=2, batch_size=2, size=64, val_fraction=0.0, checkpoint_every=0,
                      cache_dir=str(tmp_path / "cache"), progress=False, copy_paste=0.5)
    with pytest.raises(ValueError, match="--copy-paste needs --no-cache"):
        train(cfg)
