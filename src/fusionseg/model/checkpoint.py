"""Checkpoints: one safetensors file holding the trainable weights, with JSON metadata in its header.

Metadata (``fusionseg`` key of the safetensors header):
``{"format": "fusionseg-checkpoint/1", "config": FusionerConfig, "image_encoder": EncoderSpec,
"text_encoder": EncoderSpec, "templates": ..., "image_size": int, "threshold": float, "training": {...}}``.
The frozen encoders are not stored: they are rebuilt by name and their fingerprints must match.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
try:
    from safetensors import SafetensorError as SafetensorsError
except ImportError:  # older releases
    SafetensorsError = Exception  # type: ignore[misc,assignment]
from safetensors.torch import load_file, save

from .._atomic import write_atomic
from ..encoders.base import EncoderSpec, ImageEncoder, TextEncoder, build_image_encoder, build_text_encoder
from .fusioner import FusionHead, Fusioner, FusionerConfig

FORMAT = "fusionseg-checkpoint/1"
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "default.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit (message says which and why)."""


def save_checkpoint(path: str | Path, head: FusionHead, image_spec: EncoderSpec, text_spec: EncoderSpec,
                    meta: dict[str, Any] | None = None, half: bool = False) -> Path:
    """Write weights + metadata atomically (:func:`fusionseg._atomic.write_atomic`: temp file, fsync, rename; a
    failure leaves any previous ``path`` as it was). ``half`` stores fp16 weights."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT, "config": head.cfg.to_dict(), "image_encoder": image_spec.to_dict(),
              "text_encoder": text_spec.to_dict()}
    header.update(meta or {})
    tensors = {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).contiguous().cpu()
               for k, v in head.state_dict().items()}
    return write_atomic(path, save(tensors, metadata={"fusionseg": json.dumps(header)}))


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    if str(name_or_path) == "default":
        if not DEFAULT_WEIGHTS.is_file():
            raise CheckpointError(f"the shipped default weights are missing ({DEFAULT_WEIGHTS}); reinstall fusionseg")
        return DEFAULT_WEIGHTS
    p = Path(name_or_path)
    if p.is_dir() and (p / "final.safetensors").is_file():
        p = p / "final.safetensors"
    elif p.is_dir() and (p / "fusionseg-onnx.json").is_file():
        raise CheckpointError(f"{p} is an ONNX export (fusionseg export), not a checkpoint: run it with segment "
                              f"--runtime onnx --model {p}, or give the checkpoint it was exported from")
    elif p.is_dir() and ((p / "config.toml").is_file() or any(p.glob("step*.safetensors"))):
        steps = sorted(p.glob("step*.safetensors"), key=lambda q: int("0" + "".join(filter(str.isdigit, q.stem))))
        hint = (f"give its latest intermediate checkpoint {steps[-1]}" if steps else
                f"finish it with fusionseg train --resume {p}" if (p / "state.pt").is_file() else "it holds no weights")
        raise CheckpointError(f"{p} is a training run folder without final.safetensors (the run has not finished); "
                              f"{hint}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p} (give 'default', a .safetensors file or a training run folder)")
    return p


def read_checkpoint(name_or_path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """-> (state dict, metadata). Raises :class:`CheckpointError` on a missing, truncated or foreign file."""
    p = resolve_checkpoint(name_or_path)
    try:
        from safetensors import safe_open
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get("fusionseg")
        state = load_file(str(p))
    except (SafetensorsError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{p} is not a readable safetensors checkpoint (truncated or another format): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if raw is None:
        raise CheckpointError(f"{p} is a safetensors file but not a fusionseg checkpoint (no 'fusionseg' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{p}: its fusionseg metadata is not valid JSON") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p}: unsupported checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    meta["path"] = str(p)
    return state, meta


def check_encoders(meta: dict, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> None:
    """Raise :class:`CheckpointError` naming both sides if the encoders are not the ones the checkpoint was trained on."""
    for kind, enc in (("image", image_encoder), ("text", text_encoder)):
        want = meta[f"{kind}_encoder"]
        have = enc.spec
        if want["name"] != have.name or want["fingerprint"] != have.fingerprint:
            raise CheckpointError(
                f"checkpoint {Path(meta.get('path', '?')).name} was trained for {kind} encoder {want['name']} "
                f"(fingerprint {want['fingerprint']}), but {kind} encoder {have.name} (fingerprint {have.fingerprint}) "
                f"was given; use the encoders named in the checkpoint or retrain")


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """Raise :class:`CheckpointError` when any floating-point weight is NaN or infinite (such a model answers
    "none of the classes" everywhere without a word), naming how many tensors and the first few."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} of {len(state)} weight tensors hold NaN or infinite values "
                              f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); the run that wrote it "
                              f"diverged: use an earlier checkpoint or retrain")


def load_model(name_or_path: str | Path = "default", device: str | torch.device = "cpu",
               image_encoder: ImageEncoder | None = None, text_encoder: TextEncoder | None = None) -> tuple[Fusioner, dict]:
    """Rebuild a :class:`Fusioner` from a checkpoint (encoders by name unless given) -> (model, metadata)."""
    state, meta = read_checkpoint(name_or_path)
    check_finite(state, meta["path"])
    if image_encoder is None:
        image_encoder = build_image_encoder(meta["image_encoder"]["name"])
    if text_encoder is None:
        text_encoder = build_text_encoder(meta["text_encoder"]["name"])
    check_encoders(meta, image_encoder, text_encoder)
    cfg = FusionerConfig.from_dict(meta["config"])
    head = FusionHead(cfg)
    try:
        head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{meta['path']}: weights do not fit the stored config ({str(e).splitlines()[0]})") from None
    head.eval()
    model = Fusioner(image_encoder, text_encoder, head, meta.get("templates", "default")).to(device)
    return model, meta
