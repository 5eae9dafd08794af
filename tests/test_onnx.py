"""`fusionseg export --format onnx` and the onnxruntime path against PyTorch on real photos."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PoolEncoder, run_cli, shared_data, train_tiny

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fusionseg.encoders.base import register_image_encoder  # noqa: E402
from fusionseg.export.onnx import export_onnx  # noqa: E402
from fusionseg.segmenter import Segmenter  # noqa: E402

EXPORTED = ["grass", "cow", "sky", "building"]
NAMES = ["grass", "cow", "sky", "building", "tree", "car"]  # the last two are not precomputed


class UntraceableEncoder(PoolEncoder):
    """PoolEncoder with an op the ONNX exporter has no translation for (aten::erfinv)."""

    def forward(self, pixels):
        outs = super().forward(pixels)
        return [torch.erfinv(outs[0].tanh() * 0.5)] + outs[1:]


register_image_encoder("test-untraceable")(lambda name: UntraceableEncoder(name))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    info = export_onnx("default", d, classes=", ".join(EXPORTED))
    assert info["classes"] == EXPORTED and (d / "image_encoder.onnx").is_file()
    return d


@pytest.fixture(scope="module")
def photos():
    msrc = sorted(shared_data("msrc_v2/images").glob("*.jpg"))
    camvid = sorted(shared_data("camvid/images").glob("*"))
    return [msrc[1], msrc[40], camvid[0]]


@pytest.fixture(scope="module")
def torch_seg():
    return Segmenter.from_pretrained("default", device="cpu", mode="fusion")


@pytest.fixture(scope="module")
def ort_seg(export_dir):
    return Segmenter.from_pretrained(export_dir, runtime="onnx", mode="fusion")


def test_onnx_matches_pytorch_on_real_photos(photos, torch_seg, ort_seg):
    """mode fusion: every pixel's score comes from the two exported graphs (the bridge is PyTorch either way)."""
    assert ort_seg.runtime == "onnx"
    assert ort_seg.text_cache.get(ort_seg._text_key("cow")) is not None  # precomputed: no text encoder call
    agree = []
    for size in (320, 448):  # the default working size and another one on the encoder's grid
        ref = Segmenter(torch_seg.model, torch_seg.meta, "cpu", size=size, mode="fusion")
        ort = Segmenter(ort_seg.model, ort_seg.meta, "cpu", size=size, mode="fusion")
        for p in photos:
            la, orig = ref.logits(p, NAMES)
            lb, _ = ort.logits(p, NAMES)
            assert la.shape == lb.shape == (len(NAMES), *la.shape[-2:])
            assert float((la - lb).abs().max()) < 1e-3
            a, b = ref.predict(p, NAMES).labels, ort.predict(p, NAMES).labels
            assert a.shape == (orig[1], orig[0])
            agree.append(float((a == b).mean()))
            assert len(np.unique(a)) > 1  # a real map, not all "none"
    assert min(agree) >= 0.999, agree


def test_onnx_batches_and_any_number_of_names(photos, torch_seg, ort_seg, monkeypatch):
    two = [photos[0], photos[1]]  # MSRC photos of one shape: one batch of 2 through both graphs
    calls = {"encoder": 0, "head": 0}
    ort_models = ort_seg.model.head.ort
    enc, head = ort_models.encoder.run, ort_models.head.run

    def counted(kind, fn):
        def run(*a, **k):
            calls[kind] += 1
            return fn(*a, **k)
        return run

    monkeypatch.setattr(ort_models.encoder, "run", counted("encoder", enc), raising=False)
    monkeypatch.setattr(ort_models.head, "run", counted("head", head), raising=False)
    for names in (["grass"], NAMES + ["person", "road", "bicycle", "horse", "water", "flower"]):
        got = ort_seg.predict_batch(two, names)
        want = torch_seg.predict_batch(two, names)
        for g, w in zip(got, want):
            assert g.labels.shape == w.labels.shape and (g.labels == w.labels).mean() >= 0.999
    assert calls == {"encoder": 2, "head": 2}  # onnxruntime did the work: one batch of 2 per name list


def test_segment_runtime_onnx_cli(export_dir, photos, torch_seg, tmp_path, capsys):
    code, _, err = run_cli(["segment", photos[0], "--classes", ", ".join(NAMES), "--out", tmp_path,
                            "--runtime", "onnx", "--model", export_dir, "--no-overlay", "--mode", "fusion"], capsys)
    assert code == 0, err
    got = np.array(Image.open(tmp_path / f"{photos[0].stem}.png"))
    want = torch_seg.predict(photos[0], NAMES).labels
    assert (got == want).mean() >= 0.999


def test_missing_or_mismatched_export_is_named(export_dir, tmp_path, capsys):
    code, _, err = run_cli(["segment", "x.jpg", "--classes", "cow", "--out", tmp_path / "o", "--runtime", "onnx",
                            "--model", tmp_path / "nowhere"], capsys)
    assert code == 2  # the input is checked first
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    code, _, err = run_cli(["segment", img, "--classes", "cow", "--out", tmp_path / "o", "--runtime", "onnx",
                            "--model", tmp_path / "nowhere"], capsys)
    assert code == 2 and err.count("\n") == 1 and "no ONNX export" in err and "fusionseg-onnx.json missing" in err

    def broken(edit):
        d = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(export_dir, d)
        meta = json.loads((d / "fusionseg-onnx.json").read_text())
        edit(d, meta)
        (d / "fusionseg-onnx.json").write_text(json.dumps(meta))
        return d

    d = broken(lambda d, m: m.update(head_fingerprint="0" * 16))
    with pytest.raises(ValueError, match="fusion head's weights differ"):
        Segmenter.from_pretrained(d, runtime="onnx")
    d = broken(lambda d, m: m["image_encoder"].update(fingerprint="feedfeedfeedfeed"))
    with pytest.raises(ValueError, match="image_encoder efficientnet-lite0 \\(feedfeedfeedfeed\\) in the export"):
        Segmenter.from_pretrained(d, runtime="onnx")
    d = broken(lambda d, m: (d / "fusion_head.onnx").unlink())
    with pytest.raises(ValueError, match="incomplete: fusion_head.onnx is missing"):
        Segmenter.from_pretrained(d, runtime="onnx")
    d = broken(lambda d, m: m.update(maps=["a", "b", "c", "d"]))
    with pytest.raises(ValueError, match="do not match fusionseg-onnx.json"):
        Segmenter.from_pretrained(d, runtime="onnx")


def test_export_of_an_untraceable_encoder_names_it(tmp_path, capfd):
    ckpt, _ = train_tiny(tmp_path, steps=2, image_encoder="test-untraceable")
    from fusionseg.cli import main
    code = main(["export", "--format", "onnx", "--out", str(tmp_path / "x"), "--model", str(ckpt)])
    err = capfd.readouterr().err
    assert code == 2
    assert "the image encoder test-untraceable cannot be exported to ONNX" in err and "erfinv" in err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, err


def test_export_bad_format_and_unwritable_out(tmp_path, capsys):
    code, _, err = run_cli(["export", "--format", "tflite", "--out", tmp_path], capsys)
    assert code == 2 and "--format must be onnx" in err
    blocker = tmp_path / "f"
    blocker.write_text("x")
    code, _, err = run_cli(["export", "--out", blocker / "sub"], capsys)
    assert code == 2 and "cannot write to output folder" in err


def test_onnxruntime_missing_names_the_extra(export_dir, tmp_path, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ValueError, match=r"pip install 'fusionseg\[onnx\]'"):
        Segmenter.from_pretrained(export_dir, runtime="onnx")
    code, _, err = run_cli(["export", "--out", tmp_path / "e"], capsys)
    assert code == 2 and "needs onnxruntime" in err and err.count("\n") == 1
