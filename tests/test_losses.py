"""The training losses (``--loss bce | bce+dice | focal``) against hand computations, and a run with each."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import fusionseg.engine.trainer as trainer_mod
from fusionseg.engine.config import TrainConfig
from fusionseg.engine.train import train

from conftest import make_shapes_dataset


def _case():
    # one image, 2 x 2 mask sampled at stride 1 (mask value g + 1 is class g, 0 none, -1 ignore): class 0 on the
    # top row, class 1 at (1, 1), (1, 0) ignored, class 2 nowhere
    masks = torch.tensor([[[1, 1], [-1, 2]]], dtype=torch.int16)
    known = torch.tensor([[True, True, True]])
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 0.0]],     # class 0
                            [[-3.0, -2.0], [4.0, 1.0]],    # class 1
                            [[0.3, 0.1], [0.2, -0.4]]]])   # class 2: in no pixel
    return logits, masks, known, [0, 1, 2]


def test_dice_counts_only_the_classes_an_image_shows():
    logits, masks, known, classes = _case()
    s, c = trainer_mod.dice_terms(logits, masks, known, classes, stride=1)
    valid = torch.tensor([[1., 1.], [0., 1.]])
    expect = 0.0
    for k, target in ((0, torch.tensor([[1., 1.], [0., 0.]])), (1, torch.tensor([[0., 0.], [0., 1.]]))):
        p = torch.sigmoid(logits[0, k]) * valid
        t = target * valid
        expect += 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    assert int(c) == 2  # class 2 is shown nowhere: no dice term for it
    assert float(s) == pytest.approx(float(expect), rel=1e-6)
    # the ignored pixel plays no part: changing its logit changes nothing
    logits2 = logits.clone()
    logits2[0, :, 1, 0] = 9.0
    assert float(trainer_mod.dice_terms(logits2, masks, known, classes, 1)[0]) == pytest.approx(float(s), rel=1e-6)


def test_focal_is_bce_at_gamma_zero_and_smaller_on_easy_pixels():
    logits, masks, known, classes = _case()
    b, bc = trainer_mod.bce_terms(logits, masks, known, classes, 1)
    f0, fc = trainer_mod.focal_terms(logits, masks, known, classes, 1, gamma=0.0)
    assert int(bc) == int(fc) == 9 and float(f0) == pytest.approx(float(b), rel=1e-6)
    f2, _ = trainer_mod.focal_terms(logits, masks, known, classes, 1, gamma=2.0)
    # by hand over the 9 valid (pixel, class) pairs: -log(p_t) * (1 - p_t) ** 2
    labels = {(0, 0): 1, (0, 1): 1, (1, 1): 2}  # pixel -> mask value
    expect = 0.0
    for k in range(3):
        for (i, j) in ((0, 0), (0, 1), (1, 1)):
            p = 1 / (1 + math.exp(-float(logits[0, k, i, j])))
            p_t = p if labels[(i, j)] == k + 1 else 1 - p
            expect += -math.log(p_t) * (1 - p_t) ** 2
    assert float(f2) == pytest.approx(expect, rel=1e-5)
    assert float(f2) < float(b)


def test_unknown_loss_is_refused():
    from fusionseg.engine.config import _coerce
    with pytest.raises(ValueError, match="config key 'loss' must be one of bce, bce\\+dice, focal, got 'hinge'"):
        _coerce("loss", "hinge")
    assert _coerce("loss", "focal") == "focal"


@pytest.mark.parametrize("loss", ["bce+dice", "focal"])
def test_a_run_with_each_loss_learns(tmp_path, loss, monkeypatch):
    data = make_shapes_dataset(tmp_path / "shapes", n=4, size=64)
    seen = []
    real = trainer_mod.dice_terms if loss == "bce+dice" else trainer_mod.focal_terms
    name = "dice_terms" if loss == "bce+dice" else "focal_terms"
    monkeypatch.setattr(trainer_mod, name, lambda *a, **k: (seen.append(1), real(*a, **k))[1])
    cfg = TrainConfig(data=[str(data)], out=str(tmp_path / "run"), image_encoder="test-pool", text_encoder="test-hash",
                      preset="tiny", steps=4, batch_size=2, size=64, val_fraction=0.0, checkpoint_every=0,
                      cache_dir=str(tmp_path / "cache"), progress=False, log_every=1, loss=loss)
    train(cfg)
    assert len(seen) == 4  # the chosen loss was used at every step
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    cfg_text = (tmp_path / "run" / "config.toml").read_text()
    assert f'loss = "{loss}"' in cfg_text


def test_bce_plus_dice_samples_the_targets_once_a_step(tmp_path, monkeypatch):
    """The two terms share one resampling of the logits and targets (it was made twice a step)."""
    data = make_shapes_dataset(tmp_path / "shapes", n=4, size=64)
    real, calls = trainer_mod.sampled_targets, []
    monkeypatch.setattr(trainer_mod, "sampled_targets", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    cfg = TrainConfig(data=[str(data)], out=str(tmp_path / "run"), image_encoder="test-pool", text_encoder="test-hash",
                      preset="tiny", steps=3, batch_size=2, size=64, val_fraction=0.0, checkpoint_every=0,
                      cache_dir=str(tmp_path / "cache"), progress=False, loss="bce+dice")
    train(cfg)
    assert len(calls) == 3
