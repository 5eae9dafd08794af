"""MaskCLIP's dense map on a tiny random CLIP, against a hand computation from the state dict: the tower up to the
last layer, that layer's value path, post-norm, projection, the prompt ensemble, softmax at temperature 0.01."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download in tests

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fusionseg.encoders.base import EncoderError, build_image_encoder, build_text_encoder

transformers = pytest.importorskip("transformers")

from fusionseg.model.maskclip import (LOGIT_CAP, MaskCLIPBridge, log_odds, require_maskclip,  # noqa: E402
                                      supports_maskclip)

TEMPLATES = ["a photo of a {}.", "{}"]
NAMES = ["cat", "dog", "car"]
WIDTH, HEADS, PATCH, PROJ = 32, 4, 8, 24


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A random CLIP (width 32, 2 layers, image 32, patch 8, projection 24) with a character-level tokenizer."""
    from conftest import make_tiny_clip
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def full(clip_folder):
    from transformers import CLIPModel
    return CLIPModel.from_pretrained(clip_folder, local_files_only=True).eval()


@pytest.fixture(scope="module")
def clip_enc(clip_folder):
    return build_image_encoder(f"hf:{clip_folder}")


@pytest.fixture(scope="module")
def clip_text(clip_folder):
    return build_text_encoder(f"hf:{clip_folder}")


@pytest.fixture()
def bridge(clip_enc, clip_text, tmp_path):
    b = MaskCLIPBridge(clip_enc, clip_text, templates=TEMPLATES, cache_dir=tmp_path / "cache")
    yield b
    b.close()


# ------------------------------------------------------------------------------------ hand computation
def _ln(x, sd, key, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[key + ".weight"] + sd[key + ".bias"]


def _lin(x, sd, key):
    y = x @ sd[key + ".weight"].T
    return y + sd[key + ".bias"] if key + ".bias" in sd else y


def hand_last_input(sd: dict, x: torch.Tensor, layers: int = 2) -> torch.Tensor:
    """Pixels ``(B, 3, 32, 32)`` -> the last layer's input ``(B, 1 + 16, WIDTH)`` in float64, by hand: patch
    embedding as a matrix product, CLS + positions, pre-norm, every layer but the last in full (attention,
    quick-GELU MLP, residuals)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    b, g = x.shape[0], x.shape[-1] // PATCH
    v = "vision_model."
    patches = x.reshape(b, 3, g, PATCH, g, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * PATCH * PATCH)
    emb = patches @ sd[v + "embeddings.patch_embedding.weight"].reshape(WIDTH, -1).T
    cls = sd[v + "embeddings.class_embedding"].expand(b, 1, WIDTH)
    h = torch.cat([cls, emb], 1) + sd[v + "embeddings.position_embedding.weight"]
    h = _ln(h, sd, v + "pre_layrnorm")
    hd = WIDTH // HEADS
    for i in range(layers - 1):
        p = f"{v}encoder.layers.{i}."
        a = _ln(h, sd, p + "layer_norm1")
        q, k, vv = (_lin(a, sd, p + f"self_attn.{n}_proj").reshape(b, -1, HEADS, hd).transpose(1, 2)
                    for n in ("q", "k", "v"))
        att = ((q @ k.transpose(-1, -2)) * hd ** -0.5).softmax(-1) @ vv
        h = h + _lin(att.transpose(1, 2).reshape(b, -1, WIDTH), sd, p + "self_attn.out_proj")
        m = _lin(_ln(h, sd, p + "layer_norm2"), sd, p + "mlp.fc1")
        h = h + _lin(m * torch.sigmoid(1.702 * m), sd, p + "mlp.fc2")
    return h


def hand_tokens(sd: dict, x: torch.Tensor, layers: int = 2) -> torch.Tensor:
    """-> MaskCLIP tokens ``(B, 1 + 16, PROJ)`` (CLS first, not normalised): the last layer's value path
    (layer_norm1, v_proj, out_proj), post-norm and the visual projection, on :func:`hand_last_input`."""
    h = hand_last_input(sd, x, layers)
    sd = {k: v.double() for k, v in sd.items()}
    v, p = "vision_model.", f"vision_model.encoder.layers.{layers - 1}."
    val = _lin(_lin(_ln(h, sd, p + "layer_norm1"), sd, p + "self_attn.v_proj"), sd, p + "self_attn.out_proj")
    return _ln(val, sd, v + "post_layernorm") @ sd["visual_projection.weight"].T


def hand_dense(sd, x):
    t = hand_tokens(sd, x)[:, 1:]  # CLS dropped
    g = x.shape[-1] // PATCH
    return F.normalize(t, dim=-1).transpose(1, 2).reshape(x.shape[0], PROJ, g, g)


def hand_text(full, tokenizer, names):
    """Prompt ensemble straight from the full CLIP model: each sentence's projected end-of-text embedding,
    normalised, averaged over the templates, normalised again."""
    out = []
    for n in names:
        es = []
        for t in TEMPLATES:
            b = tokenizer([t.replace("{}", n)], return_tensors="pt")
            with torch.no_grad():
                e = full.text_projection(full.text_model(**b).pooler_output)[0]
            es.append(e.double() / e.double().norm())
        m = torch.stack(es).mean(0)
        out.append(m / m.norm())
    return torch.stack(out)


def _pixels(b=2, h=32, w=32, seed=1):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ tests
def test_hand_forward_is_right(full):
    """The hand tower reproduces transformers' input of the last layer (so the hand computation is a reference)."""
    x = _pixels()
    with torch.no_grad():
        want = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    assert want.shape == (2, 17, WIDTH)
    assert torch.allclose(hand_last_input(full.state_dict(), x).float(), want, atol=1e-5)


def test_dense_map_matches_hand_computation(bridge, full):
    x = _pixels()
    got = bridge.dense_embeddings(x)
    assert got.shape == (2, PROJ, 4, 4) and got.dtype == torch.float32
    assert torch.allclose(got.norm(dim=1), torch.ones(2, 4, 4), atol=1e-5)
    want = hand_dense(full.state_dict(), x)
    assert torch.allclose(got.double(), want, atol=1e-5)
    # the class token is dropped, not the last patch: the hand tokens shifted by one do not match
    t = F.normalize(hand_tokens(full.state_dict(), x)[:, :-1], dim=-1).transpose(1, 2).reshape(2, PROJ, 4, 4)
    assert not torch.allclose(got.double(), t, atol=1e-3)
    # and it is not the tower's ordinary output (attention and MLP of the last layer left out)
    ordinary = F.normalize(bridge.image_encoder(x)[0], dim=1)
    assert (got - ordinary).abs().max() > 1e-2


def test_maps_of_a_live_forward_give_the_same_map(bridge):
    x = _pixels(seed=2)
    maps = bridge.image_encoder(x)
    assert torch.allclose(bridge.dense_embeddings(maps), bridge.dense_embeddings(x), atol=1e-6)
    other = bridge.image_encoder(_pixels(seed=3))  # a later pass does not replace the earlier one's entry
    assert torch.allclose(bridge.dense_embeddings(maps), bridge.dense_embeddings(x), atol=1e-6)
    assert not torch.allclose(bridge.dense_embeddings(other), bridge.dense_embeddings(x), atol=1e-3)
    with pytest.raises(ValueError, match="give the pixels"):
        bridge.dense_embeddings([maps[0].clone()])  # copied maps cannot be traced back
    # non-square input (position embeddings interpolated): shapes follow the grid
    y = _pixels(1, 32, 48, seed=4)
    assert bridge.dense_embeddings(y).shape == (1, PROJ, 4, 6)
    assert torch.allclose(bridge.dense_embeddings(bridge.image_encoder(y)), bridge.dense_embeddings(y), atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the patch"):
        bridge.dense_embeddings(_pixels(1, 30, 32))


def test_weights_that_matter_and_weights_that_do_not(bridge):
    """The last layer's value path and every earlier layer change the map; the last layer's query, key and MLP
    (skipped by MaskCLIP) do not."""
    b, enc = bridge, bridge.image_encoder
    x = _pixels()
    base = b.dense_embeddings(x)
    last, first = enc.model.encoder.layers[-1], enc.model.encoder.layers[0]
    for param, matters in [(last.self_attn.q_proj.weight, False), (last.self_attn.k_proj.weight, False),
                           (last.mlp.fc1.weight, False), (last.layer_norm2.weight, False),
                           (last.self_attn.v_proj.weight, True), (last.self_attn.out_proj.weight, True),
                           (last.layer_norm1.weight, True), (enc.model.post_layernorm.weight, True),
                           (enc.projection.weight, True), (first.self_attn.q_proj.weight, True),
                           (first.mlp.fc2.weight, True)]:
        saved = param.detach().clone()
        with torch.no_grad():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(5)))
        changed = (b.dense_embeddings(x) - base).abs().max().item()
        with torch.no_grad():
            param.copy_(saved)
        assert (changed > 1e-3) == matters, (tuple(param.shape), changed)


def test_scores_probabilities_and_logits_match_hand_computation(bridge, full):
    x = _pixels()
    text = hand_text(full, bridge.text_encoder.tokenizer, NAMES)
    dense = hand_dense(full.state_dict(), x)
    cos = torch.einsum("bdhw,nd->bnhw", dense, text)
    p = (100 * cos).softmax(1)
    logit = torch.log(p) - torch.log1p(-p)
    # names embedded by the bridge itself, or given as (N, D) embeddings: the same result
    emb = bridge.embed_names(NAMES)
    assert emb.shape == (3, PROJ) and torch.allclose(emb.double(), text, atol=1e-5)
    for queries in (NAMES, text.float()):
        assert torch.allclose(bridge.scores(x, queries).double(), cos, atol=1e-5)
    s = bridge.scores(x, NAMES)
    assert s.shape == (2, 3, 4, 4) and s.abs().max() <= 1 + 1e-6
    got_p = bridge.probabilities(x, NAMES)
    assert torch.allclose(got_p.double(), p, atol=1e-4)
    assert torch.allclose(got_p.sum(1), torch.ones(2, 4, 4), atol=1e-5)
    assert torch.allclose(bridge.dense_probabilities(x, NAMES), got_p)
    lg = bridge.logits(x, text.float())
    ok = p.clamp(1e-6, 1 - 1e-6) == p  # compare where the log-odds are well within the cap
    assert torch.allclose(lg.double()[ok], logit[ok], atol=1e-3)
    assert torch.allclose(torch.sigmoid(lg.double()), p, atol=1e-5)
    # at another size: similarities resampled, then the softmax; the sigmoids still sum to 1 at every pixel
    up = bridge.logits(x, NAMES, (32, 24))
    p_up = F.interpolate(100 * cos, size=(32, 24), mode="bilinear", align_corners=False).softmax(1)
    assert up.shape == (2, 3, 32, 24)
    assert torch.allclose(torch.sigmoid(up.double()), p_up, atol=1e-5)
    assert torch.allclose(torch.sigmoid(up).sum(1), torch.ones(2, 32, 24), atol=1e-4)
    # the maps path (what the Segmenter hands over) gives the same logits
    assert torch.allclose(bridge.logits(bridge.image_encoder(x), text.float()), lg, atol=1e-4)
    with pytest.raises(ValueError, match="embeddings from the CLIP text tower"):
        bridge.scores(x, torch.randn(3, PROJ + 1))


def test_background_names_compete_but_are_not_returned(clip_enc, clip_text, full, tmp_path):
    b = MaskCLIPBridge(clip_enc, clip_text, templates=TEMPLATES, background=["sky", "road"], cache_dir=tmp_path)
    x = _pixels()
    names = ["cat"]
    text = hand_text(full, b.text_encoder.tokenizer, names + ["sky", "road"])
    cos = torch.einsum("bdhw,nd->bnhw", hand_dense(full.state_dict(), x), text)
    p = (100 * cos).softmax(1)[:, :1]
    got = b.probabilities(x, names)
    assert got.shape == (2, 1, 4, 4) and torch.allclose(got.double(), p, atol=1e-4)
    assert (got < 1 - 1e-3).any()
    assert torch.allclose(torch.sigmoid(b.logits(x, names).double()), p, atol=1e-5)
    b.close()


def test_embed_classes_averages_synonyms(bridge):
    got = bridge.embed_classes([["cat", "kitten"], ["car"]])
    e = bridge.embed_names(["cat", "kitten", "car"])
    assert got.shape == (2, PROJ)
    assert torch.allclose(got[0], F.normalize(e[0] + e[1], dim=0), atol=1e-6)
    assert torch.allclose(got[1], e[2], atol=1e-6)
    p = bridge.dense_probabilities(_pixels(), got)  # a teacher over classes with several names
    assert p.shape == (2, 2, 4, 4) and torch.allclose(p.sum(1), torch.ones(2, 4, 4), atol=1e-5)


def test_one_name_without_background_is_everywhere(bridge):
    lg = bridge.logits(_pixels(), ["cat"])
    assert torch.all(lg == LOGIT_CAP)


def test_log_odds_is_exact_and_stable():
    z = torch.tensor([[0.0, 1.0, 2.0], [50.0, -50.0, 0.0], [0.0, 0.0, 0.0], [100.0, 99.0, -100.0]])[..., None, None]
    z = z.permute(0, 1, 2, 3)  # (B=4, K=3, 1, 1)
    got = log_odds(z).double()[..., 0, 0]
    zd = z.double()[..., 0, 0]
    want = torch.stack([zd[:, n] - torch.cat([zd[:, :n], zd[:, n + 1:]], 1).logsumexp(1) for n in range(3)], 1)
    assert torch.allclose(got, want.clamp(-LOGIT_CAP, LOGIT_CAP), atol=1e-4)
    assert log_odds(z, 2).shape == (4, 2, 1, 1)
    assert torch.isfinite(log_odds(z)).all()


def test_supports_and_errors(clip_folder, clip_enc, clip_text, tmp_path):
    from transformers import ViTConfig, ViTModel
    assert supports_maskclip(clip_enc)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4)).save_pretrained(tmp_path / "vit")
    vit = build_image_encoder(f"hf:{tmp_path / 'vit'}")
    assert not supports_maskclip(vit) and not supports_maskclip(object())
    for enc in (vit, object()):
        with pytest.raises(EncoderError, match="hf:openai/clip-vit-base-patch16") as ei:
            require_maskclip(enc)
        assert "\n" not in str(ei.value)
    with pytest.raises(EncoderError, match="CLIP ViT image tower"):
        MaskCLIPBridge(vit)
    with pytest.raises(EncoderError, match="CLIP text tower of the same checkpoint"):
        MaskCLIPBridge(clip_enc, text_encoder=_FakeText())
    # a vision-only CLIP checkpoint has no text tower to embed names with
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=32, patch_size=8, projection_dim=PROJ, hidden_size=32,
                                                   intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
                                  ).save_pretrained(tmp_path / "clipv")
    venc = build_image_encoder(f"hf:{tmp_path / 'clipv'}")
    assert supports_maskclip(venc)
    with pytest.raises(EncoderError, match="needs the CLIP text tower") as ei:
        MaskCLIPBridge(venc)
    assert "\n" not in str(ei.value)
    b = MaskCLIPBridge(venc, text_encoder=clip_text, templates=TEMPLATES, cache_dir=tmp_path)
    assert b.dense_embeddings(_pixels()).shape == (2, PROJ, 4, 4)
    b.close()


def test_hooks_go_away(clip_folder, clip_text, tmp_path):
    import gc
    enc = build_image_encoder(f"hf:{clip_folder}")
    layer = enc.model.encoder.layers[-1]
    b = MaskCLIPBridge(enc, templates=TEMPLATES, cache_dir=tmp_path)  # text tower built from the same name
    assert b.text_encoder.pooling == "clip" and b.text_encoder.dim == PROJ
    assert len(layer._forward_pre_hooks) == 1 and len(enc._forward_hooks) == 1
    b.close()
    assert len(layer._forward_pre_hooks) == 0 and len(enc._forward_hooks) == 0
    b = MaskCLIPBridge(enc, clip_text, templates=TEMPLATES, cache_dir=tmp_path)
    maps = enc(_pixels())
    assert len(b._seen) == 1
    del maps  # a pass is forgotten once its maps are freed
    gc.collect()
    assert len(b._seen) == 0
    del b
    gc.collect()
    assert len(layer._forward_pre_hooks) == 0 and len(enc._forward_hooks) == 0  # freed with the bridge
    enc(_pixels())  # and the encoder still runs


class _FakeText:
    pooling, dim = "mean", 16

    class spec:  # noqa: N801
        name = "minilm-like"


def test_maskclip_teacher_pseudo_labels_with_its_own_classes(clip_folder, tmp_path):
    """`pseudo-label --teacher maskclip`: the teacher's probabilities are the bridge's softmax over its names,
    and the written parts carry those names."""
    from PIL import Image
    from fusionseg.data.datasets import FolderDataset
    from fusionseg.engine.pseudo_label import expand_collection, pseudo_label
    from fusionseg.engine.teachers import build_teacher
    t = build_teacher("maskclip", image_encoder=f"hf:{clip_folder}", names=NAMES, size=32)
    img = Image.new("RGB", (40, 32), (200, 40, 40))
    p = t.probabilities(img)
    assert p.shape[0] == 3 and torch.allclose(p.sum(0), torch.ones_like(p[0]), atol=1e-5)
    (tmp_path / "photos").mkdir()
    img.save(tmp_path / "photos" / "a.png")
    rep = pseudo_label([str(tmp_path / "photos")], tmp_path / "out", t, min_peak=0.0, min_confidence=0.0,
                       progress=False, examples=0)
    assert rep["teacher"]["kind"] == "maskclip"
    ds = FolderDataset(expand_collection(tmp_path / "out")[0])
    assert ds.class_names == tuple(NAMES)
    top = int(p.mean((1, 2)).argmax())  # a uniform image: mostly the class the teacher favours overall
    assert (ds[0].mask == top + 1).mean() > 0.5
    with pytest.raises(EncoderError, match="hf: CLIP image tower"):
        build_teacher("maskclip", image_encoder=None)
