"""The fast inference paths give the plain path's results: batching, skipped identity resampling, the LRU
text cache, sliding-window encoding, the banded summary, and the segment command's pipeline."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import REPO, HashText, PoolEncoder, run_cli as run, train_tiny
from fusionseg.model.fusioner import FusionHead, Fusioner, FusionerConfig
from fusionseg.segmenter import (Prediction, Segmenter, TextCache, labels_from_logits, upsample_rows)

NAMES = ["square", "disc", "grass", "sky"]


def tiny_segmenter(size: int = 96, **kw) -> Segmenter:
    torch.manual_seed(0)
    enc, txt = PoolEncoder().freeze(), HashText().freeze()
    head = FusionHead(FusionerConfig.from_preset("tiny", enc.strides, enc.channels, txt.dim)).eval()
    with torch.no_grad():  # a non-zero bias and temperature spread so the threshold matters
        head.head.bias.fill_(0.1)
    return Segmenter(Fusioner(enc, txt, head), {"image_size": size}, "cpu", size=size, **kw)


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


@torch.no_grad()
def plain_logits(seg: Segmenter, image) -> tuple[torch.Tensor, tuple[int, int]]:
    """The unoptimised path: encoder, head straight to the padded size, crop (as before the speed work)."""
    p = seg.prepare(image)
    visual = seg.model.image_encoder(p.x)
    text = seg.model.encode_text(NAMES)
    lg = seg.model.head(visual, text, tuple(p.x.shape[-2:]))
    h, w = p.valid
    return lg[0, :, :h, :w], p.orig


def plain_labels(lg: torch.Tensor, size, thr: float):
    W, H = size
    up = F.interpolate(lg[None], size=(H, W), mode="bilinear", align_corners=False)[0] \
        if tuple(lg.shape[-2:]) != (H, W) else lg
    best, idx = up.max(0)
    prob = best.sigmoid()
    lab = torch.where(prob >= thr, idx + 1, torch.zeros_like(idx))
    return lab.numpy().astype(np.uint16), prob.numpy()


@pytest.mark.parametrize("wh", [(96, 64), (70, 50), (300, 200)])
def test_optimised_logits_match_plain_path(wh):
    seg = tiny_segmenter()
    img = photo(*wh)
    want, _ = plain_logits(seg, img)
    got, orig = seg.logits(img, NAMES)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert orig == wh


def test_predict_matches_plain_labels_at_working_size():
    """Image already at the working size: the resampling is skipped (identity), labels and scores unchanged."""
    seg = tiny_segmenter(size=96)
    img = photo(96, 64, seed=3)
    lg, orig = plain_logits(seg, img)
    want_lab, want_sc = plain_labels(lg, orig, seg.threshold)
    pred = seg.predict(img, NAMES)
    assert 0 < (pred.labels > 0).mean() < 1  # the test can tell labels apart
    assert np.array_equal(pred.labels, want_lab)
    assert np.allclose(pred.scores, want_sc, atol=1e-5)


def test_identity_skip_equals_grid_sample():
    lg = torch.randn(5, 24, 40)
    a_lab, a_sc = labels_from_logits(lg, (40, 24), 0.5)
    b_lab, b_sc = labels_from_logits(lg, (40, 24), 0.5, region=(40, 24))  # forces the grid_sample path
    assert np.array_equal(a_lab, b_lab)
    assert np.allclose(a_sc, b_sc, atol=1e-5)


def test_batch_equals_one_at_a_time():
    seg = tiny_segmenter()
    imgs = [photo(96, 64, s) for s in range(3)] + [photo(64, 96, 7), photo(80, 60, 8)]
    single = [seg.predict(im, NAMES) for im in imgs]
    batch = seg.predict_batch(imgs, NAMES)
    assert len(batch) == len(imgs)
    for s, b in zip(single, batch):
        assert np.array_equal(s.labels, b.labels)
        assert np.allclose(s.scores, b.scores, atol=1e-4)
        assert b.class_names == NAMES


class CountingText(HashText):
    def __init__(self):
        super().__init__()
        self.calls: list[list[str]] = []

    def encode(self, class_names, templates="default"):
        self.calls.append(list(class_names))
        return super().encode(class_names, templates)


def test_text_cache_encodes_each_name_once():
    seg = tiny_segmenter()
    seg.model.text_encoder = CountingText()
    seg.text_cache = TextCache(maxsize=8)
    img = photo(96, 64)
    first = seg.predict(img, ["cat", "dog"])
    seg.predict(img, ["dog", "cat", "bird"])
    again = seg.predict(img, ["cat", "dog"])
    assert seg.model.text_encoder.calls == [["cat", "dog"], ["bird"]]
    assert np.array_equal(first.labels, again.labels)
    assert seg.text_cache.hits >= 4


def test_text_cache_lru_bound_and_key():
    c = TextCache(maxsize=2)
    k = [TextCache.key("fp", "default", n) for n in "abc"]
    c.put(k[0], torch.zeros(1)); c.put(k[1], torch.ones(1))
    assert c.get(k[0]) is not None  # a is now most recent
    c.put(k[2], torch.ones(1))  # evicts b, the least recently used
    assert k[1] not in c and k[0] in c and k[2] in c and len(c) == 2
    # Everything the embedding depends on is in the key.
    assert TextCache.key("fp", "default", "a") != TextCache.key("fp2", "default", "a")
    assert TextCache.key("fp", "default", "a") != TextCache.key("fp", ["a {}."], "a")
    assert TextCache.key("fp", ["x {}"], "a") == TextCache.key("fp", ("x {}",), "a")
    with pytest.raises(ValueError):
        TextCache(0)


def test_shared_cache_keyed_by_encoder_fingerprint():
    cache = TextCache()
    a, b = tiny_segmenter(text_cache=cache), tiny_segmenter(text_cache=cache)
    b.model.text_encoder = HashText("test-hash-other", dim=16)
    ea, eb = a.text_embeddings(["cat"]), b.text_embeddings(["cat"])
    assert len(cache) == 2 and ea.shape == eb.shape == (1, 16)  # one entry per encoder, none shared
    a.text_embeddings(["cat"])
    assert len(cache) == 2 and cache.hits == 1


def test_tiled_encoding_matches_untiled():
    """PoolEncoder is local (strided pooling), so stitched window features equal the whole image's."""
    whole = tiny_segmenter(size=320, tile=0)
    tiled = tiny_segmenter(size=320, tile=128)
    img = photo(320, 224, seed=5)
    p = whole.prepare(img)
    assert tiled._tile_for(p) == 128 and whole._tile_for(p) == 0
    a, b = whole.predict(img, NAMES), tiled.predict(img, NAMES)
    assert (a.labels == b.labels).mean() >= 0.99
    assert np.abs(a.scores - b.scores).max() < 1e-3


def test_tiling_is_automatic_only_for_large_working_sizes():
    from fusionseg.segmenter import AUTO_TILE_ABOVE, DEFAULT_TILE
    small = tiny_segmenter(size=320)
    big = tiny_segmenter(size=AUTO_TILE_ABOVE + 64)
    assert small._tile_for(small.prepare(photo(64, 48))) == 0
    assert big._tile_for(big.prepare(photo(64, 48))) == DEFAULT_TILE
    with pytest.raises(ValueError, match="tile"):
        tiny_segmenter(tile=10)


def test_summary_in_bands_matches_direct_count():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 4, (301, 7000)).astype(np.uint16)
    sc = rng.random((301, 7000), dtype=np.float32)
    s = Prediction(lab, sc, ["a", "b", "c"]).summary()
    for k, n in enumerate(["a", "b", "c"], start=1):
        m = lab == k
        assert s["per_class"][n]["pixel_fraction"] == round(m.mean(), 6)
        assert s["per_class"][n]["mean_score"] == round(float(sc[m].astype(np.float64).mean()), 4)


def test_upsample_rows_region_maps_padding_out():
    """region < the map: the image covers only the top-left part (the rest is padding)."""
    lg = torch.zeros(1, 4, 8)
    lg[..., :6] = 1.0  # image part
    lg[..., 6:] = -50.0  # padding
    (_, _, band), = list(upsample_rows(lg, (30, 10), 100, region=(6, 4)))
    assert band.shape == (1, 10, 30)
    # Output columns whose source point lies inside the image part read only image values (1.0); only the
    # last ones, within half a source pixel of the border, blend in padding (as upsample-then-crop does).
    src = (torch.arange(30) + 0.5) / 30 * 6 - 0.5
    inside = src <= 5
    assert band[..., inside].min() > 0.99 and band[..., ~inside].max() < 0.99 and inside.sum() >= 27


# ------------------------------------------------------------------------------------------- CLI pipeline
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("speed"), n=6, steps=5)


def test_segment_pipeline_equals_one_at_a_time(tiny_model, tmp_path, capsys):
    ckpt, ds = tiny_model
    base = ["segment", ds / "images", "--classes", "square, disc", "--model", ckpt]
    code, out, err = run(base + ["--out", tmp_path / "a", "--batch-size", "4", "--workers", "2"], capsys)
    assert code == 0, err
    assert out.count("->") == 6
    code, _, err = run(base + ["--out", tmp_path / "b", "--batch-size", "1", "--workers", "0"], capsys)
    assert code == 0, err
    for f in sorted((tmp_path / "b").glob("img*.png")):
        if f.stem.endswith("_overlay"):
            continue
        assert np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(tmp_path / "a" / f.name)))
        ja = json.loads((tmp_path / "a" / f"{f.stem}.json").read_text())
        jb = json.loads(f.with_suffix(".json").read_text())
        assert ja["per_class"] == jb["per_class"]


def test_segment_bad_image_in_worker_is_one_line(tiny_model, tmp_path, capsys):
    ckpt, ds = tiny_model
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((ds / "images").iterdir())[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "zz_broken.png").write_bytes(b"not an image")
    code, _, err = run(["segment", folder, "--classes", "square", "--model", ckpt, "--out", tmp_path / "o",
                        "--workers", "2"], capsys)
    lines = err.strip().splitlines()  # the other images are written: exit 3 (some failed), not 2
    assert code == 3 and "zz_broken.png" in lines[0] and len(lines) == 2 and "1 of 5 images failed" in lines[1]
    assert len(list((tmp_path / "o").glob("img*.json"))) == 4


@pytest.mark.parametrize("flag,value,msg", [("--batch-size", "0", "batch-size"), ("--workers", "-1", "workers"),
                                            ("--tile", "10", "tile"), ("--size", "4", "size")])
def test_segment_bad_speed_options(tiny_model, tmp_path, capsys, flag, value, msg):
    ckpt, ds = tiny_model
    code, _, err = run(["segment", ds / "images" / "img000.png", "--classes", "square", "--model", ckpt,
                        "--out", tmp_path / "o", flag, value], capsys)
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1


def test_overlay_drawn_at_bounded_size(tiny_model, tmp_path, capsys, monkeypatch):
    import fusionseg.cli as cli
    monkeypatch.setattr(cli, "OVERLAY_MAX_SIDE", 64)
    ckpt, _ = tiny_model
    big = tmp_path / "big.png"
    photo(200, 150).save(big)
    code, _, err = run(["segment", big, "--classes", "square, disc", "--model", ckpt, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "o" / "big.png").size == (200, 150)  # labels stay full size
    ov = Image.open(tmp_path / "o" / "big_overlay.png")
    assert ov.height < 150 and ov.width < 200 + 200


SLOW = pytest.mark.slow  # each case starts a Python with torch: one case runs by default, the rest with -m slow


@pytest.mark.parametrize("script,args,msg", [
    ("overhead.py", ["--classes", "0"], "--classes 0 is out of range"),
    pytest.param("infer_vs_clipseg.py", ["--size", "100"], "multiple of 16", marks=SLOW),
    pytest.param("infer_vs_clipseg.py", ["--classes", "1,500"], "out of range", marks=SLOW),
    pytest.param("memory.py", ["--sizes", "10x10"], "out of range", marks=SLOW),
    pytest.param("text_cache.py", ["--images", "0"], "out of range", marks=SLOW),
    pytest.param("throughput.py", ["--batch-size", "0"], "out of range", marks=SLOW),
    pytest.param("gpu.py", ["--batch", "0"], "out of range", marks=SLOW),
    pytest.param("labels.py", ["--sizes", "4000"], "must look like 4000x3000", marks=SLOW),
    pytest.param("labels.py", ["--sizes", "10x10"], "width 10 is out of range", marks=SLOW),
    pytest.param("cold_start.py", ["--classes", " , "], "number of --classes 0 is out of range", marks=SLOW),
    pytest.param("cold_start.py", ["--image", "nope.jpg"], "is not a file", marks=SLOW),
])
def test_benchmark_bad_arguments_exit_2(script, args, msg):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_gpu_benchmark_skips_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the GPU benchmark would run for real")
    out = tmp_path / "gpu.json"  # not docs/bench/gpu.json: a test leaves the checkout as it was
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--json", str(out)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "skipped" in r.stdout and "CUDA is not available" in r.stdout
    res = json.loads(out.read_text())
    assert res["measured"] is False and "CUDA is not available" in res["reason"] and res["tables"] == []


def test_foreground_above_the_working_size_matches_the_dense_mask():
    """foreground() resamples its one name through labelmap for images much larger than the working size: the
    same mask as the sigmoid of the densely resampled logits."""
    seg = tiny_segmenter(size=64)
    e = seg.encode(photo(300, 220, seed=5))
    lg = seg.logits_from(e, [NAMES[1]])
    (_, _, band), = list(upsample_rows(lg, e.orig, 10 ** 9))
    want = band[0].sigmoid() >= seg.threshold
    got = seg.foreground(e, NAMES[1])
    assert got.shape == want.shape == (220, 300) and got.dtype == torch.bool
    assert 0 < int(want.sum()) < want.numel()  # both classes of pixel occur
    assert torch.equal(got, want)
