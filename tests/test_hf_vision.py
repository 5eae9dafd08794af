"""hf: vision encoders on tiny random CLIP / ViT / DINOv2 / SigLIP folders: shapes at any size, norms, frozen, errors."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download in tests

from pathlib import Path

import numpy as np
import pytest
import torch

from fusionseg.encoders.base import EncoderError, build_image_encoder
from fusionseg.encoders.hf_vision import CLIP_MEAN, IMAGENET_MEAN, HFVisionEncoder

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _save(model, folder: Path, preprocessor: dict | None = None) -> Path:
    model.save_pretrained(folder)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


def _check(enc: HFVisionEncoder, channels: int, patch: int = 8, size=(48, 64)):
    h, w = size
    x = torch.randn(2, 3, h, w)
    out = enc(x)
    assert isinstance(out, list) and len(out) == 1
    assert out[0].shape == (2, channels, h // patch, w // patch) and out[0].dtype == torch.float32
    assert enc.strides == (patch,) and enc.channels == (channels,) and enc.size_multiple == patch
    assert all(not p.requires_grad for p in enc.parameters()) and not enc.training
    enc.train()  # frozen encoders stay in eval mode
    assert not enc.training
    assert torch.isfinite(out[0]).all()
    # batch items are independent
    assert torch.allclose(enc(x[1:])[0], out[0][1:], atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the patch"):
        enc(torch.randn(1, 3, h + 1, w))
    return out[0]


def test_clip_vision_tower_with_projection(tmp_path):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=50, max_position_embeddings=16, **SMALL),
                     vision_config=dict(image_size=32, patch_size=8, **SMALL), projection_dim=24)
    full = CLIPModel(cfg).eval()
    folder = _save(full, tmp_path / "clip")
    enc = build_image_encoder(f"hf:{folder}")
    assert enc.kind == "clip" and enc.native_size == 32 and enc.mean == pytest.approx(CLIP_MEAN)
    assert not any("text" in k for k in enc.state_dict())  # only the vision tower is kept
    fmap = _check(enc, 24)
    # the patch tokens after post_layernorm and visual_projection, CLS dropped, from the full model directly
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        t = full.vision_model(pixel_values=x).last_hidden_state
        want = full.visual_projection(full.vision_model.post_layernorm(t))[:, 1:]
    got = enc(x)[0].flatten(2).transpose(1, 2)
    assert torch.allclose(got, want, atol=1e-5)
    assert fmap.shape[-2:] == (6, 8)


def test_clip_vision_only_checkpoint(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(0)
    m = CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=32, patch_size=8, projection_dim=16, **SMALL))
    enc = build_image_encoder(f"hf:{_save(m, tmp_path / 'clipv')}")
    _check(enc, 16)


def test_vit_dino_style(tmp_path):
    from transformers import ViTConfig, ViTModel
    torch.manual_seed(0)
    m = ViTModel(ViTConfig(image_size=32, patch_size=8, **SMALL), add_pooling_layer=False).eval()
    folder = _save(m, tmp_path / "vit", {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]})
    enc = build_image_encoder(f"hf:{folder}")
    assert enc.kind == "vit" and enc.mean == pytest.approx(IMAGENET_MEAN) and enc.n_skip == 1
    _check(enc, 32)
    x = torch.randn(1, 3, 32, 32)  # ViTModel's last_hidden_state is already after its final layernorm
    with torch.no_grad():
        want = m(pixel_values=x).last_hidden_state[:, 1:]
    assert torch.allclose(enc(x)[0].flatten(2).transpose(1, 2), want, atol=1e-5)


def test_preprocessor_stats_are_used(tmp_path):
    from transformers import ViTConfig, ViTModel
    folder = _save(ViTModel(ViTConfig(image_size=32, patch_size=8, **SMALL)), tmp_path / "vit",
                   {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]})
    enc = build_image_encoder(f"hf:{folder}")
    assert enc.mean == pytest.approx((0.1, 0.2, 0.3)) and enc.std == pytest.approx((0.4, 0.5, 0.6))


@pytest.mark.parametrize("registers", [0, 2])
def test_dinov2(tmp_path, registers):
    if registers:
        from transformers import Dinov2WithRegistersConfig as Cfg, Dinov2WithRegistersModel as Model
        cfg = Cfg(image_size=28, patch_size=7, num_register_tokens=registers, **SMALL)
    else:
        from transformers import Dinov2Config as Cfg, Dinov2Model as Model
        cfg = Cfg(image_size=28, patch_size=7, **SMALL)
    torch.manual_seed(0)
    m = Model(cfg).eval()
    enc = build_image_encoder(f"hf:{_save(m, tmp_path / 'dinov2')}")
    assert enc.n_skip == 1 + registers and enc.native_size == 28
    _check(enc, 32, patch=7, size=(42, 56))
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        want = m(pixel_values=x).last_hidden_state[:, 1 + registers:]
    assert torch.allclose(enc(x)[0].flatten(2).transpose(1, 2), want, atol=1e-5)


def test_siglip_vision_tower(tmp_path):
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(0)
    m = SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, **SMALL)).eval()
    enc = build_image_encoder(f"hf:{_save(m, tmp_path / 'siglip')}")
    assert enc.kind == "siglip" and enc.n_skip == 0 and enc.mean == pytest.approx((0.5, 0.5, 0.5))
    _check(enc, 32)
    x = torch.randn(1, 3, 32, 32)  # every token, after post_layernorm; no class token
    with torch.no_grad():
        want = m(pixel_values=x).last_hidden_state
    assert torch.allclose(enc(x)[0].flatten(2).transpose(1, 2), want, atol=1e-5)
    # a full SigLIP checkpoint (text + vision): the vision tower alone, same tokens as the full model's
    full = SiglipModel(SiglipConfig(text_config=dict(vocab_size=50, max_position_embeddings=16, **SMALL),
                                    vision_config=dict(image_size=32, patch_size=8, **SMALL))).eval()
    enc = build_image_encoder(f"hf:{_save(full, tmp_path / 'siglip_full')}")
    assert not any("text" in k for k in enc.state_dict())
    with torch.no_grad():
        want = full.vision_model(pixel_values=x).last_hidden_state
    assert torch.allclose(enc(x)[0].flatten(2).transpose(1, 2), want, atol=1e-5)


def test_fingerprint_tracks_weights(tmp_path):
    from transformers import ViTConfig, ViTModel
    folders = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        folders.append(_save(ViTModel(ViTConfig(image_size=32, patch_size=8, **SMALL)), tmp_path / f"v{len(folders)}"))
    fps = [build_image_encoder(f"hf:{f}").spec.fingerprint for f in folders]
    assert fps[0] == fps[1] != fps[2]


def test_errors_are_one_line(tmp_path):
    for name in ("hf:/nonexistent", f"hf:{tmp_path / 'missing'}", "hf:"):
        with pytest.raises(EncoderError) as ei:
            build_image_encoder(name)
        assert "\n" not in str(ei.value)
    from transformers import BertConfig, BertModel  # a text model is not an image encoder
    folder = _save(BertModel(BertConfig(vocab_size=10, max_position_embeddings=8, **SMALL)), tmp_path / "bert")
    with pytest.raises(EncoderError, match="not supported as an image encoder"):
        build_image_encoder(f"hf:{folder}")


def test_clip_quick_gelu_swapped_bitwise_same(tmp_path):
    """The frozen CLIP towers get the in-place QuickGELU (a CPU speed-up): every one is swapped, the output is
    bitwise the one of transformers' own activation, and with gradients it falls back to the plain form."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.activations import QuickGELUActivation
    from fusionseg.encoders.base import InplaceQuickGELU
    torch.manual_seed(0)
    m = CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=32, patch_size=8, projection_dim=16, **SMALL))
    ref = CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=32, patch_size=8, projection_dim=16, **SMALL))
    ref.load_state_dict(m.state_dict())
    enc = build_image_encoder(f"hf:{_save(m, tmp_path / 'clipv')}")
    kinds = [type(x).__name__ for x in enc.modules()]
    assert kinds.count("InplaceQuickGELU") == SMALL["num_hidden_layers"] and "QuickGELUActivation" not in kinds
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = ref.visual_projection(ref.vision_model.post_layernorm(ref.vision_model(pixel_values=x).last_hidden_state))
    assert torch.equal(enc(x)[0].flatten(2).transpose(1, 2), want[:, 1:])
    z = torch.randn(4, 64, requires_grad=True)
    act, plain = InplaceQuickGELU(), QuickGELUActivation()
    assert torch.equal(act(z), plain(z))
    from fusionseg.runtime import fast_paths_as
    with torch.no_grad():
        zz = torch.randn(4, 64)
        with fast_paths_as(False):  # the plain reference: a fresh product, the sigmoid's buffer untouched
            off = act(zz)
        assert torch.equal(off, act(zz)) and torch.equal(off, plain(zz))
    act(z).sum().backward()  # the in-place form would break this backward; the fallback does not
    g = z.grad.clone()
    z.grad = None
    plain(z).sum().backward()
    assert torch.allclose(g, z.grad)


LABELS = {0: "tabby, tabby cat", 1: "golden retriever", 2: "sports car, sport car"}


def test_image_classification_checkpoint_keeps_its_head_for_the_bridge(tmp_path):
    """A transformers image-classification checkpoint (ViT) with real id2label names: the encoder keeps the
    classifier, reads it at every patch token, and names its classes from id2label (split at commas)."""
    from transformers import ViTConfig, ViTForImageClassification
    from fusionseg.model.bridge import has_classifier
    torch.manual_seed(0)
    m = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, id2label=LABELS,
                                            label2id={v: k for k, v in LABELS.items()}, **SMALL)).eval()
    enc = build_image_encoder(f"hf:{_save(m, tmp_path / 'vitcls')}")
    assert has_classifier(enc) and enc.class_names == tuple(LABELS.values())
    assert enc.class_synonyms() == [["tabby", "tabby cat"], ["golden retriever"], ["sports car", "sport car"]]
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        fmap = enc(x)
        dense = enc.classify_maps(fmap)
        tokens = m.vit(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 1:]
        want = m.classifier(tokens)  # (B, 24, 3): the head on each patch token
    assert dense.shape == (2, 3, 4, 6)
    assert torch.allclose(dense.flatten(2).transpose(1, 2), want, atol=1e-5)
    # a checkpoint without real names (LABEL_0, ...) is a plain encoder: no bridge
    plain = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, num_labels=3, **SMALL))
    assert not has_classifier(build_image_encoder(f"hf:{_save(plain, tmp_path / 'vitplain')}"))


def test_dinov2_classifier_reads_token_and_mean(tmp_path):
    from transformers import Dinov2Config, Dinov2ForImageClassification
    torch.manual_seed(0)
    m = Dinov2ForImageClassification(Dinov2Config(image_size=28, patch_size=7, id2label=LABELS,
                                                  label2id={v: k for k, v in LABELS.items()}, **SMALL)).eval()
    enc = build_image_encoder(f"hf:{_save(m, tmp_path / 'dinocls')}")
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        fmap = enc(x)[0]
        dense = enc.classify_maps([fmap])
        t = fmap.flatten(2).transpose(1, 2)[0]  # (16, C)
        want = m.classifier(torch.cat([t, t.mean(0, keepdim=True).expand_as(t)], dim=1))
    assert torch.allclose(dense[0].flatten(1).T, want, atol=1e-5)


def test_bridge_mode_with_an_id2label_classifier(tmp_path):
    """`--mode bridge` works with any encoder that has a named classifier, not only EfficientNet-Lite."""
    from transformers import ViTConfig, ViTForImageClassification
    from fusionseg.encoders.base import build_text_encoder
    from fusionseg.model.fusioner import FusionHead, Fusioner, FusionerConfig
    from fusionseg.segmenter import Segmenter
    torch.manual_seed(0)
    m = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, id2label=LABELS,
                                            label2id={v: k for k, v in LABELS.items()}, **SMALL)).eval()
    enc = build_image_encoder(f"hf:{_save(m, tmp_path / 'vitcls')}")
    text = build_text_encoder("minilm-l6")
    head = FusionHead(FusionerConfig.from_preset("tiny", enc.strides, enc.channels, text.dim)).eval()
    seg = Segmenter(Fusioner(enc, text, head), {"image_size": 64}, "cpu", size=64, mode="bridge")
    img = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    lg = seg.logits(img, ["cat", "dog", "car"])[0]
    assert lg.shape[0] == 3 and torch.isfinite(lg).all()
    probs = seg.bridge.probabilities(seg.encode(img).visual)  # the bridge reads the id2label classes
    assert probs.shape[1] == 3 and torch.allclose(probs.sum(1), torch.ones(1), atol=1e-5)
