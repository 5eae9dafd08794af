"""Helpers shared by the ``transformers``-backed encoders (:mod:`.hf_text`, :mod:`.hf_vision`): resolving an
``hf:`` name to a hub id or folder, finding optional files, quiet loading, one-line errors."""
from __future__ import annotations

import re
from pathlib import Path

from .base import EncoderError


def quiet() -> None:
    """Silence transformers' progress bars and load reports (we raise our own one-line errors)."""
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - older transformers
        pass


def one_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return lines[0] if lines else type(e).__name__


def resolve_ref(name: str, kind: str) -> tuple[str, bool]:
    """``"hf:<ref>"`` -> (ref, is_local_folder). A ref that looks like a path must exist.

    Hub ids are ``name`` or ``owner/name``; anything starting with ``/``, ``.``, ``~`` or a drive letter,
    or with more than one ``/``, is a folder.
    """
    ref = name[3:] if name.startswith("hf:") else name
    example = "hf:openai/clip-vit-base-patch16" if kind == "text" else "hf:facebook/dino-vitb16"
    if not ref.strip():
        raise EncoderError(f"give a hub id or folder after 'hf:', e.g. {example}")
    p = Path(ref).expanduser()
    if p.exists():
        if not p.is_dir():
            raise EncoderError(f"{name}: {p} is a file; give the folder that holds config.json")
        if not (p / "config.json").is_file():
            raise EncoderError(f"{name}: the folder {p} has no config.json; give a transformers model folder")
        return str(p), True
    if ref.startswith(("/", ".", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", ref) or ref.count("/") > 1:
        raise EncoderError(f"{name}: no folder {p}; give an existing model folder or a hub id such as {example}")
    return ref, False


def optional_file(ref: str, filename: str, local: bool) -> Path | None:
    """Path of ``filename`` in a folder or hub repo, or None if it is not there (never raises)."""
    if local:
        p = Path(ref) / filename
        return p if p.is_file() else None
    try:
        from transformers.utils import cached_file
        got = cached_file(ref, filename, _raise_exceptions_for_missing_entries=False,
                          _raise_exceptions_for_connection_errors=False)
        return Path(got) if got else None
    except Exception:
        return None
