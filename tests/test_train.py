import json

import numpy as np
import pytest
import torch

from fusionseg.data.datasets import FolderDataset
from fusionseg.data.features import cache_features
from fusionseg.engine.train import TrainConfig, build_vocabulary, train
from fusionseg.model.checkpoint import CheckpointError, load_model, read_checkpoint
from fusionseg.segmenter import Segmenter

from conftest import PoolEncoder, make_shapes_dataset


def test_cache_hit_is_bit_identical(shapes_dataset, tmp_path):
    ds = FolderDataset(shapes_dataset)
    enc = PoolEncoder().freeze()
    a = cache_features(ds, enc, size=64, cache_dir=tmp_path / "c", progress=False)
    b = cache_features(ds, enc, size=64, cache_dir=tmp_path / "c", progress=False)
    assert not a.hit and b.hit and a.path == b.path
    for x, y in zip(a.levels, b.levels):
        assert x.dtype == torch.float16 and torch.equal(x, y)
    assert torch.equal(a.masks, b.masks)
    assert a.levels[0].shape == (len(ds), 2, 8, 8, 8)  # (N, views, C, 64/8, 64/8)
    # the flipped view really is the flip
    assert torch.equal(a.masks[:, 1], a.masks[:, 0].flip(-1))
    # another encoder (other fingerprint) gets another cache entry
    other = PoolEncoder("test-pool-2").freeze()
    c = cache_features(ds, other, size=64, cache_dir=tmp_path / "c", progress=False)
    assert not c.hit and c.path != a.path


def test_vocabulary_matches_names_across_datasets(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", n=2)
    b = make_shapes_dataset(tmp_path / "b", n=2)
    meta = json.loads((b / "dataset.json").read_text())
    meta["classes"] = {"1": "Square", "2": "star_shape"}
    (b / "dataset.json").write_text(json.dumps(meta))
    vocab, maps, unknown = build_vocabulary([FolderDataset(a), FolderDataset(b)], exclude=["disc", "unicorn"])
    assert vocab == ["square", "star shape"]
    assert maps == [[0, -1], [0, 1]]
    assert unknown == ["unicorn"]


def iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


@pytest.mark.slow  # 500 steps: ~140 s on 2 idle cores; the default suite trains in test_train_watch/_resume
def test_tiny_model_overfits_two_class_dataset(shapes_dataset, tmp_path):
    torch.manual_seed(0)
    cfg = TrainConfig(data=[str(shapes_dataset)], out=str(tmp_path / "run"), image_encoder="test-pool",
                      text_encoder="test-hash", preset="tiny", steps=500, batch_size=8, lr=3e-3, warmup=20,
                      size=128, val_fraction=0.0, checkpoint_every=100, cache_dir=str(tmp_path / "cache"),
                      progress=False)
    final = train(cfg)
    assert final.name == "final.safetensors" and final.is_file()
    assert (tmp_path / "run" / "step100.safetensors").is_file()
    _, meta = read_checkpoint(final)
    assert meta["image_encoder"]["name"] == "test-pool" and meta["text_encoder"]["name"] == "test-hash"
    assert meta["training"]["steps"] == 500 and meta["config"]["preset"] == "tiny"
    assert meta["training"]["vocabulary"] == ["square", "disc"]
    seg = Segmenter.from_pretrained(tmp_path / "run", device="cpu")
    ds = FolderDataset(shapes_dataset)
    ious = {1: [], 2: []}
    for s in ds:
        pred = seg.predict(s.image, ["square", "disc"])
        assert pred.labels.shape == s.mask.shape
        for k in (1, 2):
            ious[k].append(iou(pred.labels == k, s.mask == k))
    m = {k: float(np.mean(v)) for k, v in ious.items()}
    assert m[1] > 0.9 and m[2] > 0.9, m


def test_resume_continues_from_state(shapes_dataset, tmp_path, monkeypatch):
    """In-process and fast: a run stopped after its step-5 checkpoint and resumed ends bitwise where an
    uninterrupted run ends (the SIGKILL version, through the CLI in fresh processes, is the slow test in
    test_train_resume.py); then the run is extended to 15 steps."""
    from safetensors.torch import load_file
    from fusionseg.engine.trainer import Trainer
    base = dict(data=[str(shapes_dataset)], image_encoder="test-pool", text_encoder="test-hash", preset="tiny",
                batch_size=4, size=64, val_fraction=0.0, cache_dir=str(tmp_path / "cache"), progress=False, lr=3e-3,
                warmup=2)
    straight = train(TrainConfig(out=str(tmp_path / "a"), steps=10, checkpoint_every=5, **base))

    class Stop(Exception):
        pass

    real_step = Trainer.step

    def stop_at_7(self, step):
        if step == 7:
            raise Stop
        return real_step(self, step)
    monkeypatch.setattr(Trainer, "step", stop_at_7)
    with pytest.raises(Stop):
        train(TrainConfig(out=str(tmp_path / "r"), steps=10, checkpoint_every=5, **base))
    monkeypatch.setattr(Trainer, "step", real_step)
    assert torch.load(tmp_path / "r" / "state.pt", weights_only=True)["step"] == 5
    final = train(TrainConfig(out=str(tmp_path / "r"), steps=10, resume=True, checkpoint_every=5, **base))
    a, b = load_file(str(straight)), load_file(str(final))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mid = load_file(str(tmp_path / "a" / "step5.safetensors"))
    assert any(not torch.equal(mid[k], a[k]) for k in a)  # steps 5..9 did change the weights
    final = train(TrainConfig(out=str(tmp_path / "r"), steps=15, resume=True, checkpoint_every=0, **base))
    _, meta = read_checkpoint(final)
    assert meta["training"]["steps"] == 15
    assert len((tmp_path / "r" / "log.jsonl").read_text().splitlines()) >= 2


def test_checkpoint_for_other_encoders_is_refused(shapes_dataset, tmp_path):
    cfg = TrainConfig(data=[str(shapes_dataset)], out=str(tmp_path / "run"), image_encoder="test-pool",
                      text_encoder="test-hash", preset="tiny", steps=2, batch_size=2, size=64,
                      val_fraction=0.0, cache_dir=str(tmp_path / "cache"), progress=False)
    final = train(cfg)
    with pytest.raises(CheckpointError, match="test-pool.*test-pool-2"):
        load_model(final, image_encoder=PoolEncoder("test-pool-2").freeze())
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(final.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_checkpoint(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_text("hello")
    with pytest.raises(CheckpointError):
        read_checkpoint(junk)


def test_validation_and_evaluate_share_the_semantic_report():
    """One whole-vocabulary mIoU: engine/metrics.semantic_scores, by hand counts (rows truth, columns prediction)."""
    from fusionseg.engine.metrics import semantic_scores
    cm = torch.tensor([[5, 1, 0, 0],   # none
                       [2, 3, 0, 0],   # cat: TP 3, union column 5 + row 5 - 3 = 7
                       [0, 0, 0, 0],   # dog: never in truth nor prediction -> None, left out of the mean
                       [0, 1, 0, 2]])  # bird: TP 2, union 2 + 3 - 2 = 3
    r = semantic_scores(cm, ["cat", "dog", "bird"])
    assert r["per_class"] == {"cat": 0.4286, "dog": None, "bird": 0.6667}
    assert r["miou"] == pytest.approx((0.4286 + 0.6667) / 2, abs=1e-4) and r["pixel_accuracy"] == round(10 / 14, 4)
    assert semantic_scores(torch.zeros(2, 2, dtype=torch.long), ["cat"])["miou"] is None
    with pytest.raises(ValueError, match="cannot hold 2 names"):
        semantic_scores(cm, ["cat", "dog"])
    # both callers go through it (a second implementation beside it would not be seen here)
    import inspect
    from fusionseg.engine import evaluate, trainer
    assert "semantic_scores(" in inspect.getsource(evaluate.evaluate_semantic)
    assert "semantic_scores(" in inspect.getsource(trainer.validate)
    assert "iou_from_confusion" not in inspect.getsource(trainer)


def test_repeat_factors_draw_images_of_rare_classes_more_often():
    import random
    from fusionseg.engine.sampling import plan_batch, repeat_factors
    # class 0 in 89 of 100 images, class 1 in 10, class 2 in 1 (image 99), image 98 shows nothing
    names = [{0} for _ in range(89)] + [{1} for _ in range(9)] + [set(), {1, 2}]
    w = repeat_factors(names, 0.1)
    assert w[0] == 1.0 and w[98] == 1.0  # common class, empty image: weight 1
    assert w[89] == pytest.approx(1.0)  # class 1 in 10% of images = the threshold: no repeat
    assert w[99] == pytest.approx((0.1 / 0.01) ** 0.5)  # its rarest class decides: sqrt(10)
    cum = list(__import__("itertools").accumulate(w))
    rng = random.Random(0)
    draws = [i for _ in range(400) for i in plan_batch(rng, 100, 2, 10, 10, 16, cum).idx]
    share = draws.count(99) / len(draws)
    assert share == pytest.approx(w[99] / sum(w), rel=0.25) and share > 2.5 / 100
    # without weights the draw is the uniform one it always was (old runs reproduce)
    a = plan_batch(random.Random(1), 100, 2, 10, 10, 16)
    r = random.Random(1)
    r.randint(7, 10)  # the crop side is drawn first
    assert a.idx == [r.randrange(100) for _ in range(16)]
