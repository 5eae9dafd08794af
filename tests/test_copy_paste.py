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


def _rare_disc(tmp_path):
    """Six shapes images of which only the first labels its disc (the others' disc pixels are background)."""
    from PIL import Image
    root = make_shapes_dataset(tmp_path / "rare", n=6, size=64)
    for p in sorted((root / "masks").glob("*.png"))[1:]:
        m = np.array(Image.open(p))
        m[m == 2] = 0
        Image.fromarray(m).save(p)
    return FolderDataset(root)


def test_class_first_paste_draws_a_rare_class_as_often_as_a_common_one(tmp_path):
    """--copy-paste-by class: a class of the folder is drawn first, then an image showing it; by image, a class
    shown in one image of six is pasted about a tenth of the time instead of half."""
    from fusionseg.engine.sampling import image_names, paste_classes
    ds = _rare_disc(tmp_path)
    lmap = [0, 1]
    names = image_names([ds], [lmap])
    assert names == [{0, 1}] + [{0}] * 5
    assert paste_classes(names, lmap) == [(1, [0, 1, 2, 3, 4, 5]), (2, [0])]
    x, m = prepare_training_pair(ds[3].image, ds[3].mask, 64, MEAN, STD)
    assert not (m == 2).any()

    def disc_share(by):
        cfg = TrainConfig(data=["x"], out="o", copy_paste=1.0, copy_paste_by=by, size=64, batch_size=1, steps=10)
        st = _UncachedSteps([ds], [lmap], 2, [64], cfg, 8, MEAN, STD, rows=[0], names=names)
        got = [bool((st._paste(s, 0, 0, 3, x, m, 64)[1] == 2).any()) for s in range(120)]
        return sum(got) / len(got)

    by_class, by_image = disc_share("class"), disc_share("image")
    assert 0.35 < by_class < 0.65, by_class
    assert by_image < 0.2, by_image
    # the only image showing the rare class is never pasted onto itself
    cfg = TrainConfig(data=["x"], out="o", copy_paste=1.0, copy_paste_by="class", size=64, batch_size=1, steps=10)
    st = _UncachedSteps([ds], [lmap], 2, [64], cfg, 8, MEAN, STD, rows=[0], names=names)
    x0, m0 = prepare_training_pair(ds[0].image, ds[0].mask, 64, MEAN, STD)
    for s in range(30):
        x2, m2 = st._paste(s, 0, 0, 0, x0, m0, 64)
        assert torch.equal(m2 == 2, m0 == 2) or not (m2 != m0).any() or (m2[m2 != m0] == 1).all()


def test_class_first_paste_needs_masks_by_id():
    import pytest
    cfg = TrainConfig(data=["x"], out="o", copy_paste=0.5, copy_paste_by="class", size=64, batch_size=1, steps=10)
    with pytest.raises(ValueError, match="--copy-paste-by class needs"):
        _UncachedSteps([[]], [[0]], 1, [64], cfg, 8, MEAN, STD, rows=[0], names=None)


def test_jitter_paste_rescales_the_class_and_places_it_inside_the_image():
    """--copy-paste-jitter J: the pasted class keeps its look, is scaled within [1/(1+J), 1+J] and lands inside
    the target's unpadded box."""
    import random
    from fusionseg.engine.sampling import jitter_paste
    x = torch.zeros(3, 64, 64)
    x[:, 10:20, 30:50] = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)  # a 10 x 20 box of one colour
    sel = torch.zeros(64, 64, dtype=torch.bool)
    sel[10:20, 30:50] = True
    valid = torch.zeros(64, 64, dtype=torch.bool)
    valid[:40, :] = True  # the target's bottom rows are padding
    areas, places = [], set()
    for seed in range(40):
        px, ps = jitter_paste(random.Random(seed), x, sel, valid, 1.0)
        assert ps.any() and not ps[40:].any()  # never onto the padding
        assert torch.allclose(px[:, ps], torch.tensor([1.0, 2.0, 3.0]).view(3, 1).expand(3, int(ps.sum())))
        ys, xs = torch.nonzero(ps, as_tuple=True)
        h, w = int(ys.max() - ys.min()) + 1, int(xs.max() - xs.min()) + 1
        assert abs(w / h - 2.0) < 0.35  # the aspect is kept
        areas.append(int(ps.sum()) / 200)
        places.add((int(ys.min()), int(xs.min())))
    assert min(areas) >= 0.25 * 0.85 and max(areas) <= 4.0 * 1.15
    assert min(areas) < 0.8 and max(areas) > 1.25  # it really scales both ways
    assert len(places) > 20  # and moves
