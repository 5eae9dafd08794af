"""The novel-names protocol (discrimination, episodes, wrong-name AUC gap) and the bridge scoring modes."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fusionseg.cli import main
from fusionseg.data.datasets import FolderDataset
from fusionseg.engine.evaluate import evaluate_novel_names, roc_auc
from fusionseg.engine.train import TrainConfig, train
from fusionseg.model.imagenet_groups import imagenet_groups
from fusionseg.segmenter import Segmenter

from conftest import make_shapes_dataset, train_tiny

REPO = Path(__file__).resolve().parents[1]


def test_roc_auc_hand_counted():
    t = torch.tensor
    assert roc_auc(t([3.0, 4.0]), t([1.0, 2.0])) == 1.0
    assert roc_auc(t([1.0, 2.0]), t([3.0, 4.0])) == 0.0
    assert roc_auc(t([1.0]), t([1.0])) == 0.5                      # a tie counts half
    assert roc_auc(t([2.0, 0.0]), t([1.0])) == 0.5                 # one pair won, one lost
    assert roc_auc(t([2.0, 1.0]), t([1.0, 0.0])) == pytest.approx((2 + 1.5) / 4)  # 3 wins + 1 tie of 4 pairs
    assert np.isnan(roc_auc(t([]), t([1.0])))


class OracleSegmenter:
    """Scores from the ground truth: ``meaning=True`` knows which object each name means; ``meaning=False``
    scores every object high for every name (objectness without meaning)."""

    threshold = 0.5

    def __init__(self, ds, meaning: bool):
        self.ds, self.meaning = ds, meaning
        self.by_size = {}

    def encode(self, image):
        arr = np.asarray(image)
        for i in range(len(self.ds)):  # find the sample by its pixels
            s = self.ds[i]
            if np.array_equal(np.asarray(s.image), arr):
                return torch.from_numpy(s.mask.astype(np.int64))
        raise AssertionError("unknown image")

    def logits_from(self, mask, names):
        out = []
        for n in names:
            k = self.ds.class_names.index(n) + 1
            fg = (mask == k) if self.meaning else (mask > 0) & (mask < 255)
            out.append(torch.where(fg, 10.0, -10.0))
        return torch.stack(out).float()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return FolderDataset(make_shapes_dataset(tmp_path_factory.mktemp("nn") / "shapes", n=4))


def test_novel_names_measures_meaning(shapes):
    r = evaluate_novel_names(OracleSegmenter(shapes, True), shapes, ["square", "disc"], progress=False)
    assert r["discrimination"] == 1.0 and r["chance"] == 0.5
    assert r["miou"] == 1.0 and r["fbiou"] == 1.0 and r["episodes"] == 8 and r["images"] == 4
    # the right name ranks its object perfectly; the wrong name ranks it below the other object (which it
    # means) and level with the background: AUC = half the background's share of the negatives, below 0.5
    assert r["auc_right"] == 1.0 and 0.3 < r["auc_wrong"] < 0.5 and r["auc_gap"] == pytest.approx(1 - r["auc_wrong"], abs=1e-3)
    assert r["shuffled_miou"] == 0.0
    assert 0 < r["trivial_miou"] < 0.5  # the whole image: each shape covers a small part of it
    assert set(r["per_class"]) == {"square", "disc"} and r["per_class"]["disc"]["discrimination"] == 1.0


def test_novel_names_objectness_is_not_meaning(shapes):
    r = evaluate_novel_names(OracleSegmenter(shapes, False), shapes, ["square", "disc"], progress=False)
    assert r["auc_gap"] == 0.0  # both names find every object equally well
    assert r["discrimination"] == 0.5  # ties: every pixel goes to the first name
    assert r["miou"] == r["shuffled_miou"] < 1.0


def test_novel_names_bad_input(shapes):
    seg = OracleSegmenter(shapes, True)
    with pytest.raises(ValueError, match="at least two names"):
        evaluate_novel_names(seg, shapes, ["square"], progress=False)
    with pytest.raises(ValueError, match="no class 'cow'.*square, disc"):
        evaluate_novel_names(seg, shapes, ["square", "cow"], progress=False)


def test_imagenet_groups_cover_the_animal_ranges():
    g = imagenet_groups()
    assert len(g) == 1000
    assert "dog" in g[207] and "cat" in g[281] and "sheep" in g[348] and "cow" in g[345]
    assert "boat" in g[472] and "car" in g[817] and g[999] == ()
    assert all(g[i] for i in range(398))  # every animal class has a group word


# ------------------------------------------------------------------ scoring modes on the shipped model
@pytest.fixture(scope="module")
def demo():
    from PIL import Image
    img = Image.open(REPO / "examples" / "cat_toilet.jpg").convert("RGB")
    gt = np.asarray(Image.open(REPO / "examples" / "cat_toilet_mask.png")) == 16  # COCO cat
    return img, gt


def test_bridge_mode_finds_the_cat_untrained(demo):
    img, gt = demo
    seg = Segmenter.from_pretrained("default", device="cpu", mode="bridge")
    pred = seg.predict(img, ["cat", "dog", "car"])
    assert pred.labels.shape == gt.shape
    cat = pred.labels == 1
    iou = (cat & gt).sum() / (cat | gt).sum()
    # measured 0.25 (recall 0.33; 12% of the other pixels also called cat, mostly the cat's mirror image)
    assert iou > 0.2, iou
    assert (pred.labels[~gt] == 2).mean() < 0.05 and (pred.labels[~gt] == 3).mean() < 0.05
    arg = seg.predict(img, ["cat", "dog", "car"], background=True).labels
    share = [(arg[gt] == k).mean() for k in (1, 2, 3)]
    assert share[0] > 0.5 and share[0] == max(share), share  # measured 0.55 / 0.29 / 0.16


def test_vocabulary_names_are_known_without_embedding_the_vocabulary():
    """Names that are themselves training names are known at once: the 98-name vocabulary (about 2 s of text
    encoding) is embedded only when some name is not one of them, and the answer is the same either way."""
    seg = Segmenter.from_pretrained("default", device="cpu")
    assert seg.known_names(["cat", "toilet", "sink"]) == [True, True, True]
    assert seg._vocab_emb is None and seg.text_cache.misses == 0
    assert seg.known_names(["cat", "wombat"]) == [True, False]
    assert seg._vocab_emb is not None
    vocab = seg.meta["training"]["vocabulary"]
    q = seg.text_embeddings(["cat", "toilet", "sink"]).float()
    from fusionseg.segmenter import KNOWN_NAME_SIMILARITY
    assert bool(((q @ seg._vocab_emb.T).max(1).values >= KNOWN_NAME_SIMILARITY).all())  # what the full check says
    assert {"cat", "toilet", "sink"} <= set(vocab)


def test_fusion_plus_bridge_routes_known_and_unknown_names(demo):
    img, _ = demo
    fusion = Segmenter.from_pretrained("default", device="cpu", mode="fusion")
    bridge = Segmenter.from_pretrained("default", device="cpu", mode="bridge")
    both = Segmenter.from_pretrained("default", device="cpu", mode="fusion+bridge")
    names = ["cat", "toilet", "wombat"]  # the default saw cat and toilet in training, never wombat
    assert both.known_names(names) == [True, True, False]
    # the default mode "auto" is fusion+bridge wherever the image encoder has a named classifier head
    assert Segmenter.from_pretrained("default", device="cpu", mode="auto").mode == "fusion+bridge"
    enc = fusion.encode(img)
    lg = both.logits_from(enc, names)
    # known names: the model and the bridge mixed by the training images that showed each (model/scoring.py)
    from fusionseg.model.scoring import SUPPORT_PRIOR
    vocab = both.scorer.vocabulary
    n = both.scorer.support_counts[[vocab.index("cat"), vocab.index("toilet")]]
    w = (n / (n + SUPPORT_PRIOR)).view(-1, 1, 1)
    assert (n > 0).all()
    want_known = w * fusion.logits_from(enc, names[:2]) + (1 - w) * bridge.logits_from(enc, names[:2])
    assert torch.allclose(lg[:2], want_known, atol=1e-4)
    # the unknown name: the bridge, sharpened by the model's own map of it where the bridge already sees it
    from fusionseg.model.bridge import refine_with_model
    from fusionseg.segmenter import _frac, upsample_crop
    t, tk = both.text_embeddings(names[2:]), both.text_embeddings(names[:2])
    with torch.inference_mode():  # where the model sees cat or toilet, wombat gets no boost
        wl = w[None].to(torch.float32)
        known_low = wl * fusion.low_logits(enc.visual, names[:2], tk) + (1 - wl) * bridge.low_logits(enc.visual, names[:2], tk)
        claimed = known_low.sigmoid().amax(1)
        low = refine_with_model(bridge.low_logits(enc.visual, names[2:], t), fusion.low_logits(enc.visual, names[2:], t),
                                [_frac(enc.valid, enc.padded)], claimed=claimed)
    want = upsample_crop(low, enc.padded, enc.valid)[0]
    assert torch.allclose(lg[2:], want, atol=1e-4)
    assert not torch.allclose(lg[2:], bridge.logits_from(enc, names[2:]), atol=1e-2)


def test_refine_with_model_is_gated_and_standardized():
    from fusionseg.model.bridge import REFINE_WEIGHT, refine_with_model, standardize
    torch.manual_seed(0)
    model = torch.randn(2, 3, 8, 10) * 5 + 7
    z = standardize(model, [(1.0, 1.0), (0.5, 0.5)])
    assert torch.allclose(z[0].flatten(1).mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z[0].flatten(1).std(1, unbiased=False), torch.ones(3), atol=1e-5)
    # item 1: stats over its valid top-left 4x5 only (padding left out)
    assert torch.allclose(z[1, :, :4, :5].flatten(1).mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(standardize(model * 3 - 2), standardize(model), atol=1e-4)  # level and scale drop out
    far = torch.full((2, 3, 8, 10), -20.0)  # the bridge says "not this name": the model's map adds ~nothing
    assert (refine_with_model(far, model) - far).abs().max() < 1e-6
    sure = torch.full((2, 3, 8, 10), 20.0)  # the bridge says "this name": its shape comes from the model
    assert torch.allclose(refine_with_model(sure, model) - sure, REFINE_WEIGHT * standardize(model), atol=1e-4)
    claimed = torch.zeros(2, 8, 10)
    claimed[:, :4] = 1.0  # a known name sure in the top half: no boost there, the full boost below
    d = refine_with_model(sure, model, claimed=claimed) - sure
    assert d[:, :, :4].abs().max() < 1e-6
    assert torch.allclose(d[:, :, 4:], REFINE_WEIGHT * standardize(model)[:, :, 4:], atol=1e-4)


def test_cli_novel_names_and_bridge_mode(tmp_path, capsys):
    ckpt, ds = train_tiny(tmp_path, n=4, steps=2, batch_size=2)  # test encoders: no classifier head
    code = main(["evaluate", "--data", str(ds), "--protocol", "novel-names", "--classes", "square"])
    err = capsys.readouterr().err
    assert code == 2 and "at least two" in err and len(err.strip().splitlines()) == 1
    code = main(["evaluate", "--data", str(ds), "--protocol", "novel-names"])
    err = capsys.readouterr().err
    assert code == 2 and "--classes" in err
    code = main(["evaluate", "--data", str(ds), "--protocol", "novel-names", "--classes", "square, disc",
                 "--mode", "bridge", "--json", str(tmp_path / "n.json")])
    out = capsys.readouterr().out
    assert code == 0
    rep = json.loads((tmp_path / "n.json").read_text())
    for k in ("discrimination", "miou", "fbiou", "auc_gap"):
        assert k in rep
    assert rep["protocol"] == "novel-names" and rep["mode"] == "bridge" and "chance 0.500" in out
    # a model whose image encoder has no classifier head: one line naming the encoders that have one
    assert Segmenter.from_pretrained(ckpt, device="cpu").mode == "fusion"  # auto: no classifier head, no bridge
    code = main(["segment", str(REPO / "examples" / "cat_toilet.jpg"), "--classes", "cat, dog", "--model", str(ckpt),
                 "--mode", "bridge", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "efficientnet-lite0" in err and len(err.strip().splitlines()) == 1


def test_bridge_prior_model_trains_saves_and_serves_unknown_names(tmp_path):
    """--bridge-prior: the bridge's map is a model input, trained with name dropout; the checkpoint round-trips
    and, in fusion+bridge mode, names outside the training vocabulary go through the unknown-name token."""
    from fusionseg.model.checkpoint import read_checkpoint
    ds = make_shapes_dataset(tmp_path / "shapes", n=4, size=64)
    cfg = TrainConfig(data=[str(ds)], out=str(tmp_path / "run"), preset="tiny", steps=3, batch_size=2, size=64,
                      val_fraction=0.25, cache_dir=str(tmp_path / "cache"), progress=False, bridge_prior=True,
                      name_dropout=0.5)
    ckpt = train(cfg)
    w, meta = read_checkpoint(ckpt)
    assert meta["config"]["prior"] is True and "prior_refine.weight" in w and "unknown_token" in w
    seg = Segmenter.from_pretrained(ckpt, device="cpu", mode="fusion+bridge")
    assert seg.known_names(["square", "wombat"]) == [True, False]
    enc = seg.encode(REPO / "examples" / "cat_toilet.jpg")
    lg = seg.logits_from(enc, ["square", "wombat"])
    assert lg.shape[0] == 2 and torch.isfinite(lg).all()
    plain = Segmenter.from_pretrained(ckpt, device="cpu", mode="fusion").logits_from(enc, ["square", "wombat"])
    assert not torch.allclose(lg[1], plain[1])  # the unknown name was decoded with the unknown-name token


def test_bridge_reads_the_classifier_at_its_own_size(demo):
    """Above BRIDGE_SIZE the bridge runs the encoder once more on the image at that size (the ImageNet head
    loses whole objects in the stride-32 cells of a large canvas); at or below it, nothing extra is computed."""
    from fusionseg.model.bridge import BRIDGE_SIZE
    img, gt = demo
    small = Segmenter.from_pretrained("default", device="cpu", mode="bridge", size=BRIDGE_SIZE)
    large = Segmenter.from_pretrained("default", device="cpu", mode="bridge", size=2 * BRIDGE_SIZE)
    assert small.encode(img).bridge_visual is None
    e = large.encode(img)
    assert max(e.bridge_visual[-1].shape[-2:]) * 32 == BRIDGE_SIZE  # the head map of the 320-px canvas
    assert Segmenter.from_pretrained("default", device="cpu", mode="fusion", size=640).encode(img).bridge_visual is None
    # auto mode without per-name training counts (the switch): the extra pass waits until a name needs the
    # bridge; names the model knows never pay for it
    auto = Segmenter.from_pretrained("default", device="cpu", size=2 * BRIDGE_SIZE)
    auto.scorer.support_counts = None
    e = auto.encode(img)
    auto.logits_from(e, ["cat", "dog"])
    assert e._bridge_visual is None and e.bridge_fn is not None
    auto.logits_from(e, ["cat", "wombat"])
    assert e.bridge_fn is None and max(e._bridge_visual[-1].shape[-2:]) * 32 == BRIDGE_SIZE
    # with the counts (the shipped default), known names are mixed with the bridge, so they read it too
    auto = Segmenter.from_pretrained("default", device="cpu", size=2 * BRIDGE_SIZE)
    e = auto.encode(img)
    auto.logits_from(e, ["cat", "dog"])
    assert e.bridge_fn is None and max(e._bridge_visual[-1].shape[-2:]) * 32 == BRIDGE_SIZE
    ious = []
    for seg in (small, large):
        cat = seg.predict(img, ["cat", "dog", "car"]).labels == 1
        ious.append((cat & gt).sum() / (cat | gt).sum())
    assert ious[1] > 0.2 and abs(ious[1] - ious[0]) < 0.1, ious  # the same reading at twice the working size
