"""Test-time augmentation (``tta_scales`` / ``tta_flip``): the views, how they are put back, and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

from fusionseg.segmenter import Preparer, Segmenter, check_tta_scales
from conftest import run_cli, train_tiny

NAMES = ["square", "disc"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ckpt, ds = train_tiny(tmp_path_factory.mktemp("tta"), steps=20)
    return ckpt, ds


def photo(w: int = 100, h: int = 70) -> Image.Image:
    """An asymmetric picture whose width and height are not multiples of 32 (the canvas has padding)."""
    img = Image.new("RGB", (w, h), (128, 128, 128))
    d = ImageDraw.Draw(img)
    d.rectangle((8, 10, 40, 50), fill=(220, 30, 30))
    d.ellipse((60, 30, 90, 60), fill=(30, 30, 220))
    return img


def test_one_unflipped_view_is_the_plain_prediction(tiny):
    seg = Segmenter.from_pretrained(tiny[0], device="cpu")
    assert not seg.tta
    p = seg.prepare(photo())
    a = seg.tta_logits(p, NAMES, seg.text_embeddings(NAMES))
    b = seg.logits_from(seg.encode(p), NAMES)
    assert a.shape == b.shape == (2, *p.valid)
    assert torch.allclose(a, b, atol=1e-5)


def test_the_mirrored_view_is_mirrored_back(tiny):
    seg = Segmenter.from_pretrained(tiny[0], device="cpu", tta_flip=True)
    img = photo()
    p, q = seg.predict(img, NAMES), seg.predict(ImageOps.mirror(img), NAMES)
    np.testing.assert_array_equal(p.labels, q.labels[:, ::-1])
    np.testing.assert_allclose(p.scores, q.scores[:, ::-1], atol=1e-5)
    # and the mirrored view does take part: the averaged logits are not the plain ones
    plain = Segmenter.from_pretrained(tiny[0], device="cpu")
    pp = plain.prepare(img)
    t = plain.text_embeddings(NAMES)
    assert float((seg.tta_logits(pp, NAMES, t) - plain.tta_logits(pp, NAMES, t)).abs().max()) > 1e-4


def test_each_scale_is_read_at_its_own_working_size(tiny):
    seg = Segmenter.from_pretrained(tiny[0], device="cpu", size=64, tta_scales=(1.0, 1.5))
    p = seg.prepare(photo(100, 70))
    assert p.valid == (45, 64) and p.views[96][1] == (67, 96)  # decoded once, resized for each scale
    seen = []
    enc = seg.model.encode_image

    def spy(x):
        seen.append(tuple(x.shape[-2:]))
        return enc(x)

    seg.model.encode_image = spy
    pred = seg.predict(photo(100, 70), NAMES)
    assert pred.labels.shape == (70, 100)
    assert sorted(seen) == [(64, 64), (96, 96)]  # padded to the encoder's multiple of 32
    # a Prepared made without the views (elsewhere) is resampled to the other scale instead
    seen.clear()
    enc_ = seg.model.image_encoder
    bare = Preparer(64, tuple(enc_.mean), tuple(enc_.std))(photo(100, 70))
    assert not bare.views
    seg.predict(bare, NAMES)
    assert sorted(seen) == [(64, 64), (96, 96)]


def test_scales_change_the_labels_and_the_original_size_is_kept(tiny):
    img = photo(100, 70)
    one = Segmenter.from_pretrained(tiny[0], device="cpu", size=64).predict(img, NAMES)
    two = Segmenter.from_pretrained(tiny[0], device="cpu", size=64, tta_scales=(1.0, 2.0)).predict(img, NAMES)
    assert two.labels.shape == one.labels.shape == (70, 100)
    assert not np.array_equal(one.scores, two.scores)


@pytest.mark.parametrize("bad, words", [("1,abc", "numbers"), ("0.1", "between"), ("", "numbers"),
                                        ("1,1", "differ"), ("1,2,3,1.5,2.5,3.5,1.2", "at most"), ("nan", "between")])
def test_bad_scales_are_one_sentence(bad, words):
    with pytest.raises(ValueError, match=words):
        check_tta_scales(bad)


def test_good_scales_parse():
    assert check_tta_scales("1, 1.4") == (1.0, 1.4)
    assert check_tta_scales([0.5, 2]) == (0.5, 2.0)


def test_cli_segment_with_tta_and_its_bad_input(tiny, tmp_path, capsys):
    src = tmp_path / "in.png"
    photo().save(src)
    code, out, err = run_cli(["segment", src, "--model", tiny[0], "--classes", "square, disc", "--out",
                              tmp_path / "o", "--tta-scales", "1,1.5", "--tta-flip", "--workers", "0"], capsys)
    assert code == 0, err
    labels = np.asarray(Image.open(tmp_path / "o" / "in.png"))
    assert labels.shape == (70, 100)
    summary = json.loads((tmp_path / "o" / "fusionseg-summary.json").read_text())
    assert summary["test_time"] == {"scales": [1.0, 1.5], "flip": True, "bridge_size": 320}  # the run says how it read the photos
    code, out, err = run_cli(["segment", src, "--model", tiny[0], "--classes", "square", "--out", tmp_path / "p",
                              "--tta-scales", "1,x"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--tta-scales" in err
    assert not (tmp_path / "p").exists()


def test_encoded_views_give_the_same_logits_as_prediction(tiny):
    """encode + logits_from (what episodes, the novel-names protocol and a model teacher read) average the same
    views as predict: one name's map is the same either way, so every protocol honours the flags."""
    seg = Segmenter.from_pretrained(tiny[0], device="cpu", size=64, tta_scales=(1.0, 1.5), tta_flip=True)
    p = seg.prepare(photo())
    e = seg.encode(p)
    assert e.visual is None and len(e.views) == 4 and [f for _, f in e.views] == [False, True, False, True]
    a = seg.logits_from(e, NAMES)
    b = seg.tta_logits(p, NAMES, seg.text_embeddings(NAMES))
    assert a.shape == (2, *p.valid) and torch.allclose(a, b, atol=1e-5)
    plain = Segmenter.from_pretrained(tiny[0], device="cpu", size=64)
    assert not torch.allclose(a, plain.logits_from(plain.encode(p), NAMES), atol=1e-4)


def test_cli_evaluate_with_tta_every_protocol(tiny, capsys):
    for protocol in ("episodes", "present"):
        code, out, err = run_cli(["evaluate", "--model", tiny[0], "--data", tiny[1], "--protocol", protocol,
                                  "--tta-flip", "--tta-scales", "1,1.5"], capsys)
        assert code == 0, err
        assert "miou" in out.lower()


def test_the_bridge_reads_a_larger_view_at_its_own_size_up_to_bridge_size():
    """A test-time view larger than ``bridge_size`` costs the bridge one more encoder pass at that size; with
    ``bridge_size`` at least the view's size the bridge reads the view's own maps (no extra pass)."""
    img = Image.open(Path(__file__).resolve().parents[1] / "examples" / "cat_toilet.jpg").convert("RGB")
    seen = {}
    for bs in (None, 448):
        seg = Segmenter.from_pretrained("default", device="cpu", mode="bridge", tta_scales=(1.0, 1.4), bridge_size=bs)
        assert seg.bridge_size == (320 if bs is None else 448)
        enc, shapes = seg.model.encode_image, []
        seg.model.encode_image = lambda x, enc=enc, shapes=shapes: shapes.append(max(x.shape[-2:])) or enc(x)
        seg.predict(img, ["cat", "toilet"])
        seen[bs] = sorted(shapes)
    assert seen[None] == [320, 320, 448]  # the 448 view's bridge pass at 320
    assert seen[448] == [320, 448]
    with pytest.raises(ValueError, match="bridge size"):
        Segmenter.from_pretrained("default", device="cpu", bridge_size=8)


def test_a_run_records_its_reading_only_when_it_is_not_one_plain_pass(tiny, tmp_path, capsys):
    """One rule (segmenter.test_time_field) for every record that describes a run: a `segment` summary names its
    reading when it differs from one plain pass, whatever flags spelled it (--bridge-size 320 is the plain one)."""
    from fusionseg.segmenter import test_time_field
    assert test_time_field((1.0,), False, None) == {} and test_time_field((1.0,), False, 320) == {}
    assert test_time_field((1.0,), False, 448) == {"test_time": {"scales": [1.0], "flip": False, "bridge_size": 448}}
    assert test_time_field((1.0,), True, None)["test_time"]["flip"] is True
    src = tmp_path / "in.png"
    photo().save(src)
    for i, extra in enumerate(([], ["--bridge-size", "320"], ["--tta-scales", "1"], ["--bridge-size", "448"])):
        out = tmp_path / f"o{i}"
        code, _, err = run_cli(["segment", src, "--model", tiny[0], "--classes", "square", "--out", out, "--workers", "0",
                                *extra], capsys)
        assert code == 0, err
        summary = json.loads((out / "fusionseg-summary.json").read_text())
        assert ("test_time" in summary) == (i == 3), extra
    assert summary["test_time"]["bridge_size"] == 448
