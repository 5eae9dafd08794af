"""The scoring policy (model/scoring.py): modes, the known-names test, and a replaceable fusion+bridge combination."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusionseg.model.scoring import (KNOWN_NAME_SIMILARITY, NameScores, Scorer, known_from_similarity,
                                     resolve_mode, support_weighted, switch_at_similarity)
from fusionseg.segmenter import Segmenter

REPO = Path(__file__).resolve().parents[1]
IMG = REPO / "examples" / "cat_toilet.jpg"


def test_known_from_similarity_and_modes():
    assert known_from_similarity(None, 3) == [True, True, True]  # no recorded vocabulary: every name known
    sim = torch.tensor([1.0, KNOWN_NAME_SIMILARITY, KNOWN_NAME_SIMILARITY - 1e-3])
    assert known_from_similarity(sim, 3) == [True, True, False]
    assert known_from_similarity(sim, 3, threshold=0.9) == [True, False, False]
    assert resolve_mode("auto", True) == "fusion+bridge" and resolve_mode("auto", False) == "fusion"
    assert resolve_mode("bridge", False) == "bridge"
    with pytest.raises(ValueError, match="scoring mode"):
        Scorer(None, "auto")


@pytest.fixture(scope="module")
def seg():
    return Segmenter.from_pretrained("default", device="cpu", mode="fusion+bridge")


def test_similarity_skips_embedding_for_vocabulary_names(seg):
    """Names all in the vocabulary: similarity 1 without embedding anything (the provider is not called)."""
    vocab = seg.meta["training"]["vocabulary"]
    calls = []
    sc = Scorer(seg.model.head, "fusion+bridge", vocabulary=vocab,
                vocabulary_embeddings=lambda: calls.append(1) or torch.zeros(len(vocab), 384))
    assert torch.equal(sc.similarity(vocab[:2], lambda: calls.append("text")), torch.ones(2))
    assert calls == []
    assert Scorer(seg.model.head, "fusion").similarity(["x"], torch.zeros(1, 4)) is None


def test_the_combination_is_one_replaceable_function(seg):
    """fusion+bridge scores through ``scorer.combine``: a combination taking the bridge for every name gives
    bridge mode's logits; the default switch gives the model's for known names, unchanged by unknown ones."""
    names = ["cat", "toilet", "bathtub mat"]
    enc = seg.encode(IMG)
    counts, seg.scorer.support_counts = seg.scorer.support_counts, None  # the switch, for the known-only check
    try:
        default = seg.logits_from(enc, names)
    finally:
        seg.scorer.support_counts = counts
    bridge = Segmenter.from_pretrained("default", device="cpu", mode="bridge")
    want = bridge.logits_from(bridge.encode(IMG), names)
    seen = []

    def all_bridge(s: NameScores) -> torch.Tensor:
        seen.append((s.n, s.known()))
        return s.bridge()

    # the default combination, and the shipped checkpoint records its per-name training images
    assert seg.scorer.combine is support_weighted and seg.scorer.support_counts is not None
    seg.scorer.combine = all_bridge
    try:
        got = seg.logits_from(seg.encode(IMG), names)
    finally:
        seg.scorer.combine = support_weighted
    assert seen == [(3, [True, True, False])]
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(default, want, atol=1e-2)  # the default really differs
    fusion = Segmenter.from_pretrained("default", device="cpu", mode="fusion")
    known_only = fusion.logits_from(fusion.encode(IMG), names[:2])
    assert torch.allclose(default[:2], known_only, atol=1e-5)


def test_fusioner_forward_takes_a_scorer(seg):
    """Fusioner.forward / score, the model's entry points, run the same policy the Segmenter uses."""
    p = seg.prepare(IMG)
    names = ["cat", "toilet"]
    text = seg.text_embeddings(names)
    with torch.inference_mode():
        visual = seg.model.encode_image(p.x)
        low = seg.model.score(visual, text, seg.scorer, names)
        assert torch.equal(low, seg.low_logits(visual, names, text))
        assert torch.equal(seg.model.score(visual, text), seg.model.head(visual, text))
        full = seg.model(p.x, names, scorer=seg.model.scorer("fusion"))
        plain = seg.model(p.x, names)
    assert full.shape == plain.shape == (1, 2, *p.x.shape[-2:])
    assert torch.allclose(full, plain, atol=1e-4)


def test_support_weighted_mixes_model_and_bridge_by_training_images(seg):
    """Known names: w * model + (1 - w) * bridge with w = n / (n + SUPPORT_PRIOR), n the training images of the
    nearest training name; unknown names as the switch gives them; no counts: the switch itself."""
    from fusionseg.model.scoring import SUPPORT_PRIOR
    names = ["cat", "toilet", "bathtub mat"]
    enc = seg.encode(IMG)
    shipped, seg.scorer.support_counts = seg.scorer.support_counts, None
    switch = seg.logits_from(enc, names)
    vocab = seg.scorer.vocabulary
    counts = torch.zeros(len(vocab))
    counts[vocab.index("cat")], counts[vocab.index("toilet")] = 30.0, 0.0
    fusion = Segmenter.from_pretrained("default", device="cpu", mode="fusion")
    bridge = Segmenter.from_pretrained("default", device="cpu", mode="bridge")
    f = fusion.logits_from(fusion.encode(IMG), names[:2])
    b = bridge.logits_from(bridge.encode(IMG), names[:2])
    seg.scorer.support_counts = counts
    try:
        got = seg.logits_from(seg.encode(IMG), names)
    finally:
        seg.scorer.support_counts = None
    try:
        assert torch.allclose(seg.logits_from(seg.encode(IMG), names), switch)  # counts gone: the switch again
    finally:
        seg.scorer.support_counts = shipped
    w = 30.0 / (30.0 + SUPPORT_PRIOR)
    assert torch.allclose(got[0], w * f[0] + (1 - w) * b[0], atol=1e-4)
    assert torch.allclose(got[1], b[1], atol=1e-4)  # never seen in training images: the bridge's map
    assert not torch.allclose(got[0], switch[0], atol=1e-2)
