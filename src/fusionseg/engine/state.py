"""What a run folder keeps between processes: the training state file (weights, optimiser, step, config,
random generators) written atomically, and the checkpoints, whose write errors leave the previous ones intact
and say so."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import torch

from .._atomic import write_atomic, write_failure_reason
from ..model.checkpoint import save_checkpoint

STATE_FILE = "state.pt"
CONFIG_FILE = "config.toml"  # the resolved config, as TOML (`fusionseg train --resume RUN_DIR` reads it)


class CheckpointWriteError(OSError):
    """A checkpoint or state file could not be written; the previous one is intact."""


def rng_states() -> dict:
    """The random generators this process draws from (Python, NumPy, torch, CUDA), for the state file."""
    st = np.random.get_state()
    out = {"python": json.dumps(random.getstate()), "torch": torch.get_rng_state(),
           "numpy": [st[0], torch.from_numpy(np.asarray(st[1]).astype(np.int64)), int(st[2]), int(st[3]), float(st[4])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(st: dict) -> None:
    """Put back generators saved by :func:`rng_states`."""
    py = json.loads(st["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_state(path: Path, state: dict) -> None:
    """``torch.save`` to memory, then an atomic write (temp file + fsync + rename): a kill or a full disk during
    the write leaves the previous state file as it was. Raises :class:`CheckpointWriteError`."""
    buf = io.BytesIO()
    torch.save(state, buf)
    try:
        write_atomic(path, buf.getvalue())
    except OSError as e:
        reason = write_failure_reason(e)
        err = CheckpointWriteError(f"could not write the training state {path}: {reason}; the previous "
                                   f"checkpoint is intact; free space and resume with --resume")
        err.errno = e.errno
        raise err from None


def load_state(path: Path, device) -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path} is not a readable training state ({type(e).__name__}); it was not written by this "
                         f"version, or it is damaged") from None


def write_checkpoint(path: Path, head, image_spec, text_spec, meta: dict) -> None:
    """:func:`~fusionseg.model.checkpoint.save_checkpoint`, its failures as :class:`CheckpointWriteError`."""
    try:
        save_checkpoint(path, head, image_spec, text_spec, meta)
    except Exception as e:  # noqa: BLE001 - OSError or the safetensors writer's own error type
        reason = write_failure_reason(e)
        err = CheckpointWriteError(f"could not write checkpoint {path}: {reason}; the previous checkpoint "
                                   f"is intact; free space and resume with --resume")
        err.errno = getattr(e, "errno", None)
        raise err from None
