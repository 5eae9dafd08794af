"""The shipped default model, end to end on a real photo, offline."""
import json
import subprocess
import sys
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
    """The named cat and the toilet are found (the photo is held out of training): cat IoU with the COCO mask above
    0.4 and toilet IoU above 0.2. Measured with the default fine-tuned with copy-paste (a4fb871 row): cat 0.435,
    toilet 0.245; the default before it: cat 0.578, toilet 0.183 (it missed the toilet under the cat, this one
    finds part of it and loses the cat's lower body to it)."""
    code = main(["segment", str(CAT), "--classes", "cat, toilet, sink", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert str(tmp_path / "cat_toilet.png") in out
    labels = np.asarray(Image.open(tmp_path / "cat_toilet.png"))
    gt = np.asarray(Image.open(CAT_MASK))
    assert labels.shape == gt.shape
    cat = labels == 1
    iou = (cat & (gt == 16)).sum() / (cat | (gt == 16)).sum()
    assert iou > 0.4, iou
    toilet = labels == 2
    t_iou = (toilet & (gt == 62)).sum() / (toilet | (gt == 62)).sum()
    assert t_iou > 0.2, t_iou
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


_HUGE_PROBE = """
import sys
import numpy as np
def hwm_mb():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM'):
                return int(line.split()[1]) / 1024
from fusionseg import Segmenter
seg = Segmenter.from_pretrained("default", device="cpu")
seg.predict(np.zeros((64, 64, 3), np.uint8), ["cat", "toilet"])  # warm: the text model, the kernels
base = hwm_mb()
pred = seg.predict(sys.argv[1], ["cat", "toilet"])
print(*pred.labels.shape, float((pred.labels == 1).mean()), round(hwm_mb() - base), round(hwm_mb()))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for peak RSS")
def test_huge_image_within_memory(tmp_path):
    big = Image.open(CAT).resize((10_000, 8_000), Image.BILINEAR)
    big.save(tmp_path / "big.jpg", quality=80)
    del big
    # A fresh process: its peak RSS (VmHWM) is not already raised by the 240 MB image made above, which would
    # hide up to that much of the growth measured here.
    r = subprocess.run([sys.executable, "-c", _HUGE_PROBE, str(tmp_path / "big.jpg")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    h, w, cat, grew_mb, peak_mb = r.stdout.split()
    assert (int(h), int(w)) == (8_000, 10_000)
    assert float(cat) > 0.1
    # measured here: +539 MB, peak 982 MB (the 10000x8000 label map alone is 80 MB, the decoded RGB 240 MB)
    assert int(grew_mb) < 1500 and int(peak_mb) < 2048, \
        f"segmenting a 10000x8000 photo raised peak RSS by {grew_mb} MB to {peak_mb} MB"


def test_tiny_image(tmp_path):
    from fusionseg import Segmenter
    Image.new("RGB", (1, 1), (90, 90, 90)).save(tmp_path / "one.png")
    seg = Segmenter.from_pretrained("default", device="cpu")
    pred = seg.predict(tmp_path / "one.png", ["cat"])
    assert pred.labels.shape == (1, 1)
