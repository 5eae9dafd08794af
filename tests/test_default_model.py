"""The shipped default model, end to end on a real photo, offline."""
import json
import resource
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusionseg.cli import main
from fusionseg.model.checkpoint import DEFAULT_WEIGHTS, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
CAT = REPO / "examples" / "cat_toilet.jpg"
CAT_MASK = REPO / "examples" / "cat_toilet_mask.png"  # COCO: 16 = cat, 62 = toilet (class index + 1)

pytestmark = pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="default weights not built yet")


def test_shipped_weights_are_small_fp16_and_described():
    assert DEFAULT_WEIGHTS.stat().st_size <= 10 * 1024 * 1024
    state, meta = read_checkpoint("default")
    assert all(v.dtype.is_floating_point is False or str(v.dtype) == "torch.float16" for v in state.values())
    assert meta["image_encoder"]["name"] == "efficientnet-lite0" and meta["text_encoder"]["name"] == "minilm-l6"
    assert "cat" in meta["training"]["vocabulary"]
    assert (DEFAULT_WEIGHTS.parent / "MODEL_CARD.md").is_file()


def test_cli_segments_the_cat(tmp_path, capsys):
    """The named cat covers its region: IoU with the COCO mask above 0.6 (measured 0.68; the photo is held out of
    training; the cat's reflection in the mirror, unlabelled in COCO, is also called cat)."""
    code = main(["segment", str(CAT), "--classes", "cat, toilet, sink", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert str(tmp_path / "cat_toilet.png") in out
    labels = np.asarray(Image.open(tmp_path / "cat_toilet.png"))
    gt = np.asarray(Image.open(CAT_MASK))
    assert labels.shape == gt.shape
    cat = labels == 1
    iou = (cat & (gt == 16)).sum() / (cat | (gt == 16)).sum()
    assert iou > 0.6, iou
    # The toilet (rare in the training data) is not found by the shipped model; only the cat is bounded here.
    info = json.loads((tmp_path / "cat_toilet.json").read_text())
    assert info["per_class"]["cat"]["pixel_fraction"] > 0.15
    assert Image.open(tmp_path / "cat_toilet_overlay.png").width > 640


def test_python_api_matches_cli(tmp_path):
    from fusionseg import Segmenter
    seg = Segmenter.from_pretrained("default", device="cpu")
    pred = seg.predict(CAT, "cat, toilet, sink")
    assert pred.labels.shape == (522, 640) and pred.scores.dtype == np.float32
    assert pred.class_names == ["cat", "toilet", "sink"]
    assert 0 <= pred.scores.min() and pred.scores.max() <= 1
    # EXIF orientation is respected: a JPEG tagged "rotate 90" gives the label map of its upright pixels.
    img = Image.open(CAT)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    from PIL import ImageOps
    upright = ImageOps.exif_transpose(Image.open(tmp_path / "rot.jpg"))
    upright.save(tmp_path / "upright.png")
    rot = seg.predict(tmp_path / "rot.jpg", "cat, toilet, sink")
    ref = seg.predict(tmp_path / "upright.png", "cat, toilet, sink")
    assert rot.labels.shape == (640, 522) == ref.labels.shape
    assert (rot.labels == ref.labels).mean() > 0.99
    assert (rot.labels == 1).mean() > 0.15  # the cat is still found when the photo stands upright


def test_huge_image_within_memory(tmp_path):
    from fusionseg import Segmenter
    big = Image.open(CAT).resize((10_000, 8_000), Image.BILINEAR)
    big.save(tmp_path / "big.jpg", quality=80)
    del big
    seg = Segmenter.from_pretrained("default", device="cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pred = seg.predict(tmp_path / "big.jpg", ["cat", "toilet"])
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert pred.labels.shape == (8_000, 10_000)
    assert (pred.labels == 1).mean() > 0.1
    assert grew_mb < 2500, grew_mb


def test_tiny_image(tmp_path):
    from fusionseg import Segmenter
    Image.new("RGB", (1, 1), (90, 90, 90)).save(tmp_path / "one.png")
    seg = Segmenter.from_pretrained("default", device="cpu")
    pred = seg.predict(tmp_path / "one.png", ["cat"])
    assert pred.labels.shape == (1, 1)
