"""The packaged all-MiniLM-L6-v2 without importing ``transformers``: BERT in plain torch, tokens from ``tokenizers``.

Why: the default model's text encoder is a 6-layer BERT, but building it through ``transformers`` meant importing
``transformers`` (its modelling utilities, kernels hub, generation, ...) and constructing its ``BertModel``: about
3.5 s of a 6 s ``fusionseg segment`` call on the 2-core test machine, for a model whose forward takes
milliseconds. Here the same weights are read from the package's ``model.safetensors`` into a module with the very
same parameter names (so the fingerprint, which hashes names and bytes, is the same), and the same
``tokenizer.json`` drives the Rust ``tokenizers`` library that ``transformers`` itself uses. Tests compare token ids
and embeddings against ``transformers``' ``BertModel`` and ``AutoTokenizer`` on the same folder.

Only what the frozen sentence encoder needs is here: absolute positions, one segment, no dropout, no cache, no
cross-attention. ``hf:`` names still go through ``transformers`` (:mod:`fusionseg.encoders.hf_text`).
"""
from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class BertConfig:
    """The fields of a BERT ``config.json`` that the forward reads."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_file(cls, path: Path) -> "BertConfig":
        d = json.loads(Path(path).read_text())
        if d.get("model_type") != "bert":
            raise ValueError(f"{path}: model_type {d.get('model_type')!r}, not bert")
        if d.get("hidden_act", "gelu") != "gelu" or d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only gelu activations and absolute positions are supported")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class BertOutput:
    last_hidden_state: Tensor


# Module and parameter names follow transformers' BertModel exactly: the state dict, and so the fingerprint, match.
# Parameters start uninitialised (torch.empty): every one is overwritten by the checkpoint, and nn.Linear's random
# initialisation would cost more than loading (a meta-device build would import torch._dynamo, ~1.5 s).
class _Linear(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c_out, c_in))
        self.bias = nn.Parameter(torch.empty(c_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class _LayerNorm(nn.Module):
    def __init__(self, c: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c))
        self.bias = nn.Parameter(torch.empty(c))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class _Embedding(nn.Module):
    def __init__(self, n: int, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, c))

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)


class _Embeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = _Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = _Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = _Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = _LayerNorm(c.hidden_size, c.layer_norm_eps)

    def forward(self, ids: Tensor, token_type_ids: Tensor) -> Tensor:
        pos = self.position_embeddings.weight[: ids.shape[1]]
        x = self.word_embeddings(ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + pos)


class _SelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = _Linear(c.hidden_size, c.hidden_size)
        self.key = _Linear(c.hidden_size, c.hidden_size)
        self.value = _Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        B, L, C = x.shape
        q, k, v = (m(x).view(B, L, self.heads, -1).transpose(1, 2) for m in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(C // self.heads))
        return out.transpose(1, 2).reshape(B, L, C)


class _DenseNorm(nn.Module):  # BertSelfOutput / BertOutput: dense, then LayerNorm over the residual sum
    def __init__(self, c_in: int, c: BertConfig):
        super().__init__()
        self.dense = _Linear(c_in, c.hidden_size)
        self.LayerNorm = _LayerNorm(c.hidden_size, c.layer_norm_eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _DenseNorm(c.hidden_size, c)


class _Dense(nn.Module):  # BertIntermediate (activation applied by the layer) and BertPooler: one "dense"
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.dense = _Linear(c_in, c_out)


class _Layer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Dense(c.hidden_size, c.intermediate_size)
        self.output = _DenseNorm(c.intermediate_size, c)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = self.attention.output(self.attention.self(x, mask), x)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class _Encoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class LeanBert(nn.Module):
    """BERT encoder forward: ``(input_ids, attention_mask, token_type_ids)`` -> :class:`BertOutput`."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.pooler = _Dense(config.hidden_size, config.hidden_size)  # unused by sentence pooling; kept so the
        # weights, and so the fingerprint, are complete

    @classmethod
    def from_folder(cls, folder: Path) -> "LeanBert":
        """``config.json`` + ``model.safetensors`` (transformers' names, with or without a ``bert.`` prefix)."""
        from safetensors.torch import load_file
        config = BertConfig.from_file(Path(folder) / "config.json")
        model = cls(config)
        state = {k.removeprefix("bert."): v for k, v in load_file(str(Path(folder) / "model.safetensors")).items()}
        state.pop("embeddings.position_ids", None)  # a non-persistent buffer in transformers
        model.load_state_dict(state, strict=True)
        return model.eval()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> BertOutput:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]  # keys that are padding are not attended to
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return BertOutput(x)


class Batch(dict):
    """Token ids etc. as transformers' ``BatchEncoding`` gives them: a dict with ``.to(device)``."""

    def to(self, device) -> "Batch":
        return Batch({k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.items()})


class FastTokenizer:
    """A ``tokenizer.json`` through the ``tokenizers`` library, called the way ``HFTextEncoder`` calls
    transformers' tokenizers: ``tok(texts, padding=..., truncation=..., max_length=..., return_tensors="pt")``."""

    def __init__(self, path: Path, model_max_length: int = 512):
        from tokenizers import Tokenizer
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.no_truncation()
        self._lock = threading.Lock()  # truncation is a setting of the shared Rust object
        self.model_max_length = int(model_max_length)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=False)
        pad = self._tok.token_to_id("[PAD]")
        self.pad_token_id = 0 if pad is None else int(pad)

    def __call__(self, texts: str | Sequence[str], padding: bool | str = False, truncation: bool = False,
                 max_length: int | None = None, return_tensors: str | None = None) -> Batch:
        texts = [texts] if isinstance(texts, str) else list(texts)
        with self._lock:
            if truncation:
                self._tok.enable_truncation(max_length=int(max_length or self.model_max_length))
            try:
                encs = self._tok.encode_batch(texts)
            finally:
                self._tok.no_truncation()
        rows = {"input_ids": [e.ids for e in encs], "token_type_ids": [e.type_ids for e in encs],
                "attention_mask": [e.attention_mask for e in encs]}
        if padding:
            n = int(max_length) if padding == "max_length" and max_length else max(map(len, rows["input_ids"]), default=0)
            for key, fill in (("input_ids", self.pad_token_id), ("token_type_ids", 0), ("attention_mask", 0)):
                rows[key] = [r + [fill] * (n - len(r)) for r in rows[key]]
        if return_tensors == "pt":
            return Batch({k: torch.tensor(v, dtype=torch.long) for k, v in rows.items()})
        if return_tensors is not None:
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        return Batch(rows)
