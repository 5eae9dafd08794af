"""The frozen encoders a training run (or ``fusionseg cache``) builds; a hub model that cannot be had offline
says how to get it, in one place for the image encoder, the text encoder and the text-embedding cache."""
from __future__ import annotations

from pathlib import Path

from ..encoders.base import EncoderError, build_image_encoder, build_text_encoder


def offline_hint(name: str, kind: str) -> str:
    ref = name[3:] if name.startswith("hf:") else name
    return (f"; to train offline, download it once with `hf download {ref}` (stored under $HF_HOME, "
            f"default ~/.cache/huggingface; then set HF_HUB_OFFLINE=1) or point {kind}_encoder at a local folder: "
            f"\"hf:/path/to/{ref.split('/')[-1]}\"")


def with_offline_hint(e: EncoderError, name: str, kind: str) -> EncoderError:
    """``e`` with :func:`offline_hint` in place of its generic advice, when ``name`` is a hub model (not a local
    folder) and the message does not already say how to download it."""
    msg = str(e)
    if name.startswith("hf:") and not Path(name[3:]).expanduser().exists() and "download" not in msg:
        msg = msg.split("; check")[0] + offline_hint(name, kind)
    return EncoderError(msg)


def build_encoder_for_training(name: str, kind: str = "image"):
    """Build a frozen encoder (``kind`` "image" or "text"); a hub model that cannot be loaded says how to get it."""
    try:
        return build_image_encoder(name) if kind == "image" else build_text_encoder(name)
    except EncoderError as e:
        raise with_offline_hint(e, name, kind) from None
