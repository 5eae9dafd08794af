"""``train --init``: a checkpoint's trained weights start a fine-tune; a plain checkpoint may start a
``--bridge-prior`` head (its own parts fresh), anything else that does not fit is one clear error."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fusionseg.engine.trainer import PRIOR_ONLY, TrainError, init_from
from fusionseg.model.checkpoint import load_model
from fusionseg.model.fusioner import FusionHead
from conftest import train_tiny


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    ckpt, _ = train_tiny(tmp_path_factory.mktemp("init"), steps=5)
    model, _ = load_model(ckpt, "cpu")
    return ckpt, model.head


def test_a_plain_checkpoint_starts_the_same_head_with_its_weights(plain):
    ckpt, head = plain
    fresh = FusionHead(head.cfg)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), head.state_dict().values()))
    init_from(fresh, str(ckpt))
    for k, v in head.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v.float()), k


def test_a_plain_checkpoint_starts_a_bridge_prior_head_with_its_own_parts_fresh(plain):
    ckpt, head = plain
    torch.manual_seed(0)
    prior = FusionHead(dataclasses.replace(head.cfg, prior=True))
    before = {k: v.clone() for k, v in prior.state_dict().items() if k.startswith(PRIOR_ONLY)}
    assert before and "unknown_token" in before
    init_from(prior, str(ckpt))
    got = prior.state_dict()
    for k, v in head.state_dict().items():
        assert torch.equal(got[k], v.float()), k  # every shared weight is the checkpoint's
    for k, v in before.items():
        assert torch.equal(got[k], v), k  # the prior-only parts keep their fresh values


def test_what_does_not_fit_is_one_error(plain, tmp_path, monkeypatch):
    ckpt, head = plain
    small, _ = train_tiny(tmp_path, steps=2, preset="small")  # another preset: other shapes
    with pytest.raises(TrainError, match="do not fit"):
        init_from(FusionHead(head.cfg), str(small))
    # a bridge-prior checkpoint has parts a plain head lacks: refused, not silently dropped
    import types
    import fusionseg.model.checkpoint as ck
    prior = FusionHead(dataclasses.replace(head.cfg, prior=True))
    monkeypatch.setattr(ck, "load_model", lambda spec, device: (types.SimpleNamespace(head=prior), {}))
    with pytest.raises(TrainError, match="unknown_token|prior_refine"):
        init_from(FusionHead(head.cfg), "prior.safetensors")
