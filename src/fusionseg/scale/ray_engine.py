"""``fusionseg segment --engine ray``: the same per-image outputs as the local CLI, computed by Ray actors.

Each actor holds one :class:`~fusionseg.batch.BatchPredictor` (the model loads once per actor), reads its
images (local paths or any URI :mod:`pyarrow.fs` understands), and writes the label PNG, the overlay and the
JSON of each image straight into the output folder, exactly as ``fusionseg segment`` does (so the folder must
be one every node sees: local for a one-machine cluster, a shared mount on a real one). The driver hands out
chunks of paths (two in flight per actor), appends one row per image to ``OUT/index.jsonl`` as chunks come
back -- ``path``, ``status`` ("ok"/"error"), ``error``, ``size`` [W, H], per-class ``fractions``,
``none_fraction`` -- shows progress, and at the end rewrites the index with exactly one row per input, in
input order.

Resumable: an image whose JSON and label PNG are both in the output folder is complete (the JSON is written
last, atomically), so a rerun skips it -- even when the job was killed before its index row was written -- and
retries every image that failed. A bad image becomes an error row, never a failed job; an actor that dies
turns its chunk into error rows (rerun to retry them) and the others go on.

Ray is optional: ``pip install 'fusionseg[ray]'``.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections import deque
from pathlib import Path, PurePosixPath
from typing import Sequence

INDEX = "index.jsonl"
RAY_HINT = "pip install 'fusionseg[ray]'"
#: Seconds to wait for a HOST:PORT address to accept a connection before giving up.
CONNECT_TIMEOUT = 3.0
#: Path chunks in flight per actor (one computing, one queued: the actor never waits for the driver).
IN_FLIGHT = 2


class EngineError(ValueError):
    """Bad input or an unreachable cluster: the CLI prints the message as one line and exits 2."""


def _is_uri(s: str) -> bool:
    return "://" in s and not s.startswith("file://")


def list_inputs(items: Sequence[str]) -> list[str]:
    """Folders (their images, sorted), text files of paths (``.txt``/``.lst``: one per line, ``#`` comments),
    single images, and URIs :mod:`pyarrow.fs` understands (a file or a folder) -> paths/URIs, in order."""
    from ..data.datasets import IMAGE_SUFFIXES
    out: list[str] = []
    for it in items:
        it = str(it)
        if _is_uri(it):
            out += _list_uri(it, IMAGE_SUFFIXES)
            continue
        p = Path(it[7:] if it.startswith("file://") else it)
        if p.is_dir():
            found = sorted(str(q) for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise EngineError(f"folder {p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif p.is_file() and p.suffix.lower() in (".txt", ".lst"):
            lines = [ln.strip() for ln in p.read_text(encoding="utf-8", errors="replace").splitlines()]
            out += [ln for ln in lines if ln and not ln.startswith("#")]
        elif p.is_file():
            out.append(str(p))
        else:
            raise EngineError(f"no such file or folder: {p}")
    if not out:
        raise EngineError("the input list is empty: give image files, folders, a .txt list of paths or URIs")
    stems: dict[str, str] = {}
    for s in out:
        st = PurePosixPath(s).stem if _is_uri(s) else Path(s).stem
        if st in stems and stems[st] != s:
            raise EngineError(f"two inputs share the name {st!r} ({stems[st]} and {s}); their outputs would collide")
        stems[st] = s
    return list(dict.fromkeys(out))


def _list_uri(uri: str, suffixes) -> list[str]:
    try:
        from pyarrow import fs
    except ImportError:
        raise EngineError(f"reading {uri} needs pyarrow: {RAY_HINT}") from None
    try:
        filesystem, path = fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(path)
        if info.type == fs.FileType.File:
            return [uri]
        if info.type != fs.FileType.Directory:
            raise EngineError(f"no such file or folder: {uri}")
        scheme = uri.split("://", 1)[0]
        found = [f for f in filesystem.get_file_info(fs.FileSelector(path, recursive=False))
                 if f.type == fs.FileType.File and PurePosixPath(f.path).suffix.lower() in suffixes]
        return sorted(f"{scheme}://{f.path}" for f in found)
    except EngineError:
        raise
    except Exception as e:  # pyarrow raises OSError / ArrowInvalid subclasses with long messages
        raise EngineError(f"cannot list {uri}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None


def stem_of(path: str) -> str:
    return PurePosixPath(path).stem if _is_uri(path) else Path(path).stem


# ---------------------------------------------------------------------------------------------- cluster
def import_ray():
    try:
        import ray
    except ImportError:
        raise EngineError(f"--engine ray needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


def connect(address: str | None, num_cpus: int | None = None):
    """Start or join a Ray cluster -> (ray module, whether this call started it). An already initialised Ray
    (a test, a notebook) is used as it is. ``address``: None/"local" (a fresh local instance), "auto" (the
    cluster this machine belongs to), ``HOST:PORT`` or ``ray://HOST:PORT``; one that does not answer within
    :data:`CONNECT_TIMEOUT` seconds is an :class:`EngineError`."""
    import logging
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    kw = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if address in (None, "", "local"):
        ray.init(num_cpus=num_cpus, **kw)
        return ray, True
    if address != "auto":
        hostport = address.split("://", 1)[-1]
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise EngineError(f"--address must be auto, local, HOST:PORT or ray://HOST:PORT, got {address!r}")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
        except OSError as e:
            raise EngineError(f"no Ray cluster answers at {address} ({e.strerror or e}); start one with "
                              f"'ray start --head' or check the address") from None
    try:
        ray.init(address=address, **kw)
    except Exception as e:  # ConnectionError, or a RuntimeError when "auto" finds nothing
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EngineError(f"cannot join the Ray cluster at {address}: {msg}") from None
    return ray, False


# ---------------------------------------------------------------------------------------------- actor
class SegmentWorker:
    """The per-actor state: a BatchPredictor and the output folder. ``run(paths)`` -> one row per path."""

    def __init__(self, predictor_kwargs: dict, out: str, overlay: bool, info: dict):
        from ..batch import BatchPredictor
        self.predictor = BatchPredictor(**predictor_kwargs, output="none")
        self.out, self.overlay, self.info = Path(out), overlay, info

    def ready(self) -> bool:
        return True

    def run(self, paths: list[str]) -> list[dict]:
        import io
        from ..batch import read_uri
        from ..cli import OVERLAY_MAX_SIDE, _write_outputs
        from ..data.io import load_image
        blobs: list = []
        rows: list[dict | None] = [None] * len(paths)
        for i, p in enumerate(paths):
            try:
                blobs.append(read_uri(p))
            except OSError as e:
                blobs.append(None)
                rows[i] = error_row(p, f"{p}: {e.strerror or e}")
        idx = [i for i, b in enumerate(blobs) if b is not None]
        t0 = time.time()
        preds, errors = self.predictor.predict({"bytes": [blobs[i] for i in idx], "id": [paths[i] for i in idx]})
        secs = round((time.time() - t0) / max(1, len(idx)), 3)
        names = self.predictor.classes
        for i, pred, err in zip(idx, preds, errors):
            p = paths[i]
            if pred is None:
                rows[i] = error_row(p, err or "unknown error")
                continue
            try:
                ov = None
                if self.overlay:
                    f = io.BytesIO(blobs[i])
                    f.name = p
                    ov = load_image(f, max_side=OVERLAY_MAX_SIDE)
                extra = dict(image=p, threshold=self.predictor.threshold, seconds=secs, **self.info)
                _write_outputs(Path(stem_of(p) + ".x"), self.out, pred, ov, names, extra, self.overlay)
                rows[i] = ok_row(p, pred.summary())
            except (ValueError, OSError) as e:
                rows[i] = error_row(p, f"{p}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}")
        return rows  # type: ignore[return-value]


def ok_row(path: str, summary: dict) -> dict:
    return {"path": path, "status": "ok", "error": None, "size": [summary["width"], summary["height"]],
            "fractions": {n: v["pixel_fraction"] for n, v in summary["per_class"].items()},
            "none_fraction": summary["none_fraction"]}


def error_row(path: str, error: str) -> dict:
    return {"path": path, "status": "error", "error": error, "size": None, "fractions": None, "none_fraction": None}


# ---------------------------------------------------------------------------------------------- resume
def read_index(path: Path) -> dict[str, dict]:
    """index.jsonl -> {path: last row}; a line cut short by a kill is ignored."""
    rows: dict[str, dict] = {}
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
                rows[r["path"]] = r
            except (ValueError, KeyError, TypeError):
                continue
    return rows


def completed(out: Path, path: str, names: list[str]) -> dict | None:
    """The ok row of an image whose outputs are all in ``out`` for these class names, else None."""
    st = stem_of(path)
    js, png = out / f"{st}.json", out / f"{st}.png"
    if not (js.is_file() and png.is_file()):
        return None
    try:
        info = json.loads(js.read_text(encoding="utf-8"))
        if info.get("classes") != names or info.get("image") != path:
            return None  # another run's output (other names or another input of that name): redo it
        return ok_row(path, info)
    except (ValueError, KeyError, OSError):
        return None


# ---------------------------------------------------------------------------------------------- driver
def run(items: Sequence[str], out: str | os.PathLike, predictor_kwargs: dict, address: str | None = None,
        actors: int = 2, gpus_per_actor: float = 0.0, cpus_per_actor: int | None = None, batch_size: int = 8,
        overlay: bool = True, info: dict | None = None, progress: bool = True, num_cpus: int | None = None,
        log=None) -> dict:
    """Segment every input with ``actors`` Ray actors; -> {"total", "ok", "skipped", "errors", "index"}.

    ``predictor_kwargs``: :class:`~fusionseg.batch.BatchPredictor`'s (``classes``, ``model``, ``size``, ...)."""
    from ..segmenter import parse_class_names
    if actors < 1:
        raise EngineError(f"--actors must be at least 1, got {actors}")
    if gpus_per_actor < 0:
        raise EngineError(f"--gpus-per-actor must be 0 or more, got {gpus_per_actor}")
    if batch_size < 1:
        raise EngineError(f"--batch-size must be at least 1, got {batch_size}")
    names = parse_class_names(predictor_kwargs["classes"])
    predictor_kwargs = dict(predictor_kwargs, classes=names)
    paths = list_inputs(items)
    if _is_uri(str(out)):
        raise EngineError(f"cannot write to {out}: --out must be a folder path (a shared mount on a cluster), "
                          f"not a URI")
    out = Path(out)
    _check_writable(out)
    index = out / INDEX
    prev = read_index(index)
    final: dict[str, dict] = {}
    todo: list[str] = []
    for p in paths:
        row = completed(out, p, names)
        if row is not None:
            final[p] = row
        else:
            todo.append(p)
    skipped = len(final)
    with open(index, "a", encoding="utf-8") as f:  # rows of images finished before a kill, index not written
        for p, row in final.items():
            if prev.get(p, {}).get("status") != "ok":
                f.write(json.dumps(row) + "\n")

    started = False
    ray = None
    workers = []
    try:
        if todo:
            ray, started = connect(address, num_cpus)
            cpa = cpus_per_actor or _cpus_per_actor(ray, actors, gpus_per_actor)
            kwargs = dict(predictor_kwargs)
            kwargs.setdefault("threads", cpa)
            if gpus_per_actor > 0:
                kwargs["device"] = "cuda"
            Remote = ray.remote(SegmentWorker)
            workers = [Remote.options(num_cpus=cpa, num_gpus=gpus_per_actor).remote(kwargs, str(out), overlay,
                                                                                     dict(info or {}))
                       for _ in range(actors)]
            _wait_ready(ray, workers)
            _drive(ray, workers, todo, batch_size, index, final, progress, len(paths), skipped)
    finally:
        if ray is not None:
            for w in workers:
                ray.kill(w)
            if started:
                ray.shutdown()
    from ..data.io import write_text_atomic
    rows = [final[p] for p in paths if p in final]
    write_text_atomic("".join(json.dumps(r) + "\n" for r in rows), index)  # one row per input, input order
    errors = sum(r["status"] != "ok" for r in rows)
    return {"total": len(paths), "ok": len(rows) - errors, "skipped": skipped, "errors": errors,
            "index": str(index)}


def _check_writable(folder: Path) -> None:
    from .._atomic import unwritable_reason
    why = unwritable_reason(folder)
    if why:
        raise EngineError(f"cannot write to output folder {folder}: {why}")


def _cpus_per_actor(ray, actors: int, gpus: float) -> int:
    """CPUs per actor: the cluster's CPUs shared out, never more than the largest node has."""
    if gpus > 0:
        return 1
    total = int(ray.cluster_resources().get("CPU", 1))
    biggest = max([int(n.get("Resources", {}).get("CPU", 1)) for n in ray.nodes() if n.get("Alive")] or [1])
    return max(1, min(biggest, total // actors))


def _cause(e: BaseException) -> str:
    c = getattr(e, "cause", None) or e
    lines = [ln.strip() for ln in str(c).strip().splitlines() if ln.strip()]
    if getattr(c, "actor_init_failed", False) and len(lines) > 1:
        # "The actor died because of an error raised in its creation task, ray::...(pid=...)" then the actor's
        # traceback: its own error, on the last line ("ValueError: checkpoint not found: ..."), is the cause
        kind, sep, msg = lines[-1].partition(": ")
        return msg if sep and kind.replace(".", "").replace("_", "").isalnum() else lines[-1]
    return (lines or [type(c).__name__])[0]


def _wait_ready(ray, workers) -> None:
    try:
        ray.get([w.ready.remote() for w in workers])
    except Exception as e:  # the model or the names failed to load in an actor: the same error for all
        raise EngineError(f"the actors could not start: {_cause(e)}") from None


def _drive(ray, workers, todo, batch_size, index, final, progress, total, skipped) -> None:
    from tqdm import tqdm
    chunks = deque(todo[i:i + batch_size] for i in range(0, len(todo), batch_size))
    pending: dict = {}
    alive = list(workers)

    def submit(w) -> None:
        if chunks:
            c = chunks.popleft()
            pending[w.run.remote(c)] = (w, c)

    for w in alive:
        for _ in range(IN_FLIGHT):
            submit(w)
    bar = tqdm(total=total, initial=skipped, unit="img", file=sys.stderr, disable=not progress,
               desc="segment (ray)", dynamic_ncols=True)
    try:
        with open(index, "a", encoding="utf-8") as f:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                ref = ready[0]
                w, chunk = pending.pop(ref)
                try:
                    rows = ray.get(ref)
                except Exception as e:  # the actor died (out of memory, node lost) or a bug: its chunk fails
                    msg = _cause(e)
                    rows = [error_row(p, f"{p}: worker failed: {msg}") for p in chunk]
                    if type(e).__name__ in ("RayActorError", "ActorDiedError", "ActorUnavailableError"):
                        alive.remove(w) if w in alive else None
                        w = None
                for r in rows:
                    final[r["path"]] = r
                    f.write(json.dumps(r) + "\n")
                f.flush()
                bar.update(len(rows))
                if w is not None:
                    submit(w)
                elif not alive and chunks:
                    rest = [p for c in chunks for p in c]
                    chunks.clear()
                    for p in rest:
                        final[p] = error_row(p, f"{p}: no worker left (every actor died); rerun to retry")
                        f.write(json.dumps(final[p]) + "\n")
                    bar.update(len(rest))
    finally:
        bar.close()
