"""Non-finite losses are skipped and stop the run after max_bad_steps; the metrics log and its PNG plot."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import fusionseg.engine.trainer as trainer_mod
from fusionseg.engine.config import TrainConfig
from fusionseg.engine.plots import plot_metrics
from fusionseg.engine.train import TrainError, train

from conftest import make_shapes_dataset


def cfg(tmp_path, data, **kw):
    base = dict(data=[str(data)], out=str(tmp_path / "run"), image_encoder="test-pool", text_encoder="test-hash",
                preset="tiny", steps=6, batch_size=2, size=64, val_fraction=0.0, checkpoint_every=0,
                cache_dir=str(tmp_path / "cache"), progress=False, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def test_nan_loss_skips_the_step_and_stops_after_k(tmp_path, monkeypatch, capsys):
    data = make_shapes_dataset(tmp_path / "shapes", n=4, size=64)
    real = trainer_mod.bce_terms
    calls = {"n": 0}
    snapshots = []

    def poisoned(logits, *a, **k):
        calls["n"] += 1
        s, c = real(logits, *a, **k)
        if calls["n"] in (3, 4):  # steps 2 and 3 give NaN
            s = s * float("nan")
        return s, c
    monkeypatch.setattr(trainer_mod, "bce_terms", poisoned)
    orig_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (snapshots.append(calls["n"]), orig_step(self, *a, **k))[1])
    train(cfg(tmp_path, data, progress=True))
    assert snapshots == [1, 2, 5, 6]  # the optimiser never stepped on the NaN steps
    out = capsys.readouterr().out
    assert "step 2: non-finite loss" in out and "step skipped" in out
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [2, 3]
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["head"].values())

    # always NaN: stop after max_bad_steps in a row with a clear message
    monkeypatch.setattr(trainer_mod, "bce_terms", lambda logits, *a, **k: (real(logits, *a, **k)[0] * float("nan"), torch.tensor(1)))
    with pytest.raises(TrainError, match="3 non-finite losses in a row .*max_bad_steps = 3"):
        train(cfg(tmp_path, data, out=str(tmp_path / "run2"), max_bad_steps=3))


def test_metrics_log_and_png(tmp_path):
    data = make_shapes_dataset(tmp_path / "shapes", n=8, size=64)
    train(cfg(tmp_path, data, steps=8, checkpoint_every=4, val_fraction=0.25))
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    loss_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_mean" in r]
    assert [r["step"] for r in loss_rows] == list(range(8)) and all(r["lr"] > 0 for r in loss_rows)
    assert [r["step"] for r in val_rows] == [4, 8] and 0 <= val_rows[-1]["val_mean"] <= 1
    assert set(val_rows[-1]["val_miou"]) == {"shapes"}
    png = tmp_path / "run" / "metrics.png"
    im = np.asarray(Image.open(png).convert("RGB"))
    assert im.shape == (620, 900, 3)
    top, bottom = im[:310], im[310:]
    red = (top[..., 0] > 150) & (top[..., 1] < 90)  # the loss curve
    blue = (bottom[..., 2] > 150) & (bottom[..., 0] < 90)  # the mIoU curve
    assert red.sum() > 50 and blue.sum() > 20
    # an empty log draws nothing
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_metrics(tmp_path / "empty.jsonl", tmp_path / "x.png") is None
