"""Command line: ``fusionseg segment | train | pseudo-label | cache | evaluate | info | serve``.

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

EXIT_USAGE = 2
#: ``segment``: some images were written and some could not be read (each failure is one line on stderr and an
#: "error" entry in the run's summary JSON). All failed: EXIT_USAGE.
EXIT_PARTIAL = 3
#: Exit code after SIGTERM (128 + 15); Ctrl-C (SIGINT) gives 130.
EXIT_TERMINATED = 143
#: ``segment`` writes this in --out: every input with its status ("ok" / "error" / "not done") and outputs.
SUMMARY_FILE = "fusionseg-summary.json"


class CLIError(ValueError):
    pass


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that the command unwinds like Ctrl-C (workers stopped, no partial file)."""


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's contract for its own errors too: one line on stderr, exit 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _check_device(device: str | None, flag: str = "--device") -> None:
    """cpu, cuda, cuda:N or mps (torch-free: the string only; :func:`_check_device_here` also checks it exists)."""
    import re
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", str(device)):
        raise CLIError(f"{flag} must be cpu, cuda, cuda:N or mps, got {device!r}")


def _check_device_here(device: str | None, flag: str = "--device") -> None:
    """:func:`_check_device`, and the device exists on this machine (imports torch): CUDA or MPS available, cuda:N
    within the device count."""
    _check_device(device, flag)
    if device is None or device == "cpu":
        return
    import torch
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CLIError(f"{flag} {device} was asked for but CUDA is not available here; use {flag} cpu")
        n = torch.cuda.device_count()
        if int(device.partition(":")[2] or 0) >= n:
            raise CLIError(f"{flag} {device}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    elif device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise CLIError(f"{flag} mps was asked for but MPS is not available here; use {flag} cpu")


#: Flags naming a file or folder: an empty value ("" from an unset shell variable) is refused rather than read as
#: the current folder (where segment, export and pseudo-label would write) or ignored.
PATH_FLAGS = ("images", "out", "model", "data", "config", "json", "report", "classes_file", "cache_dir", "init",
              "resume", "teacher")


def _check_no_blank_paths(a: argparse.Namespace) -> None:
    for attr in PATH_FLAGS:
        v = getattr(a, attr, None)
        if any(isinstance(x, str) and not x.strip() for x in (v if isinstance(v, list) else [v])):
            what = "an image path" if attr == "images" else "--" + attr.replace("_", "-")
            raise CLIError(f"{what} is empty (an unset shell variable?); give a file or folder")


def _check_number(a: argparse.Namespace, attr: str, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
                  flag: str | None = None) -> None:
    """Refuse ``a.attr`` (when given) outside [lo, hi] (or the open ends), or not finite, naming the flag."""
    import math
    v = getattr(a, attr, None)
    if v is None:
        return
    flag = flag or "--" + attr.replace("_", "-")
    ok = isinstance(v, int) or math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        rng = (f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}"
               f"{')' if hi_open else ']'}")
        raise CLIError(f"{flag} must be in {rng}, got {v}")


def _image_paths(items: Sequence[str]) -> list[Path]:
    from .data.datasets import IMAGE_SUFFIXES
    out: list[Path] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CLIError(f"folder {p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif p.is_file():
            out.append(p)
        elif p.exists():  # a pipe (<(...), /dev/stdin from a pipe) or a device: read once, by name, it cannot be
            raise CLIError(f"{p} is not a regular file (a pipe or a device); save the image to a file first")
        else:
            raise CLIError(f"no such file or folder: {p}")
    seen: set[Path] = set()  # one image named twice (a folder and a file in it, a repeated glob) is read once
    out = [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]
    stems = {}
    for p in out:
        if p.stem in stems and stems[p.stem] != p:
            raise CLIError(f"two inputs share the name {p.stem!r} ({stems[p.stem]} and {p}); their outputs would collide")
        stems[p.stem] = p
    return out


def _check_writable(folder: Path) -> None:
    from ._atomic import unwritable_reason
    why = unwritable_reason(folder)
    if why:
        raise CLIError(f"cannot write to output folder {folder}: {why}")


def _check_cache_dir(cache_dir) -> None:
    """The feature cache folder can be made (else found only after the first shard's features were computed)."""
    from ._atomic import unwritable_reason
    from .data.features import default_cache_dir
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    if folder.is_dir():  # a cache that is there may be read-only and still hold every shard a run reads
        return
    why = unwritable_reason(folder)
    if why:
        raise CLIError(f"cannot write to the feature cache folder {folder}: {why}; pass --cache-dir with a writable "
                       f"folder")


#: The overlay picture is drawn at most this many px on its longer side (the label PNG stays full size).
OVERLAY_MAX_SIDE = 4096
#: zlib level of the overlay PNG (a photo-like picture: level 6 took 3.5x as long for a ~25% smaller file;
#: at 4000x3000 that was about 4 s per image). The label PNG keeps the default (it compresses well and fast).
OVERLAY_PNG_LEVEL = 1


class _SegmentInputs:
    """Map-style dataset for the DataLoader: decoding and resizing run in worker processes.

    item i -> (i, Prepared or None, overlay picture or None, error line or None); errors travel as text so the
    CLI can print one line instead of a worker traceback."""

    def __init__(self, paths: list[Path], prepare, overlay: bool, max_pixels: int | None = None):
        from .data.io import DEFAULT_MAX_PIXELS
        self.paths, self.prepare, self.overlay = paths, prepare, overlay
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from .data.io import load_image
        try:
            prep = self.prepare(self.paths[i])
            ov = load_image(self.paths[i], max_side=OVERLAY_MAX_SIDE, max_pixels=self.max_pixels) if self.overlay else None
            return i, prep, ov, None
        except (ValueError, OSError) as e:
            return i, None, None, (str(e).strip().splitlines() or [type(e).__name__])[0]


def _identity(x):
    return x


def _worker_init(_worker_id: int) -> None:
    """A decode worker: one torch thread; it dies with its parent (Linux PR_SET_PDEATHSIG), and leaves Ctrl-C
    to the parent, which stops the workers itself (a terminal sends SIGINT to the whole group)."""
    import signal
    import torch
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _write_outputs(p: Path, out: Path, pred, ov_img, names: list[str], info_extra: dict, overlay: bool) -> str:
    """Label PNG (full size), overlay (bounded size), JSON; each written atomically. -> the line to print."""
    import numpy as np
    from PIL import Image
    from .data.io import save_png_atomic, write_text_atomic
    from .visualize import label_png, overlay as draw_overlay
    lab_img = label_png(pred.labels, len(names))
    ov = None
    if overlay and ov_img is not None:
        labels = pred.labels
        if ov_img.size != (labels.shape[1], labels.shape[0]):  # huge image: overlay drawn at bounded size
            labels = np.asarray(Image.fromarray(labels).resize(ov_img.size, Image.NEAREST))
        ov = draw_overlay(ov_img, labels, names)
    info = pred.summary()
    info.update(info_extra)
    save_png_atomic(lab_img, out / f"{p.stem}.png")
    del lab_img
    if ov is not None:
        save_png_atomic(ov, out / f"{p.stem}_overlay.png", compress_level=OVERLAY_PNG_LEVEL)
    write_text_atomic(json.dumps(info, indent=1), out / f"{p.stem}.json")
    found = ", ".join(f"{n} {v['pixel_fraction']:.1%}" for n, v in info["per_class"].items() if v["pixel_fraction"] > 0)
    return (f"{p.name}: {found or 'none of the classes'} -> {out / (p.stem + '.png')}"
            f"{'' if ov is None else ', ' + str(out / (p.stem + '_overlay.png'))}, {out / (p.stem + '.json')}")


def _class_list(value: str, flag: str = "--classes", file_flag: str | None = None) -> list[str]:
    """A class-list flag under the one policy (fusionseg.names); ``@names.txt`` (the usual spelling of "read this
    file" elsewhere) is refused rather than taken as one class named "@names.txt"."""
    from .names import parse_class_names
    v = value.strip()
    if v.startswith("@"):
        raise CLIError(f"{flag} {v!r} is read as class names, not as a file; "
                       + (f"give {file_flag} {v[1:]}" if file_flag else "list the names themselves"))
    return parse_class_names(value)


def _segment_names(a: argparse.Namespace) -> list[str]:
    """--classes (comma-separated, or a JSON list for names with commas) or --classes-file (one name a line)."""
    from .names import read_classes_file
    if (a.classes is None) == (a.classes_file is None):
        raise CLIError("give the class names with exactly one of --classes \"cat, sofa\" or --classes-file FILE")
    return (_class_list(a.classes, file_flag="--classes-file") if a.classes is not None
            else read_classes_file(a.classes_file))


def _check_segment_args(a: argparse.Namespace) -> None:
    _check_number(a, "batch_size", 1)
    _check_number(a, "workers", 0, 64)
    _check_number(a, "threads", 0, 1024)
    _check_number(a, "threshold", 0.0, 1.0)
    _check_number(a, "max_megapixels", 0.0, 100_000.0, lo_open=True)
    if a.tile is not None and a.tile != 0 and a.tile < 64:
        raise CLIError(f"--tile must be 0 (off) or at least 64 px, got {a.tile}")
    if a.size is not None and not 8 <= a.size <= 16384:
        raise CLIError(f"--size must be between 8 and 16384 px, got {a.size}")
    if a.background and a.threshold is not None:
        raise CLIError("--background uses the plain arg-max, so --threshold would be ignored: give one of them")
    _check_decision(a)
    _check_device(a.device)
    _check_tta(a)


def _check_tta(a: argparse.Namespace) -> None:
    """--tta-scales "1,1.4" -> a.tta_scales as a tuple (one line on a bad list)."""
    from .segmenter import check_bridge_size, check_tta_scales
    try:
        a.tta_scales = check_tta_scales("1" if a.tta_scales is None else a.tta_scales)
    except ValueError as e:
        raise CLIError(f"--tta-scales: {e}") from None
    try:
        check_bridge_size(a.bridge_size)
    except ValueError as e:
        raise CLIError(f"--bridge-size: {e}") from None


def _tta_kw(a: argparse.Namespace) -> dict:
    return dict(tta_scales=a.tta_scales, tta_flip=a.tta_flip, bridge_size=a.bridge_size)


def _add_tta_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bridge-size", type=int, default=None, metavar="PX",
                   help="the training-free bridge reads a view larger than this many px (longer side) at this size "
                        "(default 320); with --tta-scales, a larger value lets it read the larger views at their own "
                        "size")
    p.add_argument("--tta-scales", default=None, metavar="LIST",
                   help="test-time augmentation: also read the image at these multiples of the working size and "
                        "average the logits, e.g. 1,1.4 (default 1: one pass; each scale costs a pass)")
    p.add_argument("--tta-flip", action="store_true",
                   help="test-time augmentation: also read every scale mirrored (twice the passes)")


def _check_decision(a: argparse.Namespace) -> None:
    if a.decision == "relative" and a.threshold is not None:
        raise CLIError("--decision relative measures each name against its own peak: --threshold would be ignored")
    if a.decision is not None and getattr(a, "background", False):
        raise CLIError("--background uses the plain arg-max, so --decision would be ignored: give one of them")


def _output_names(stem: str, overlay: bool) -> list[str]:
    return [f"{stem}.png", f"{stem}.json"] + ([f"{stem}_overlay.png"] if overlay else [])


def _check_outputs(paths: list[Path], out: Path, overlay: bool, overwrite: bool) -> None:
    """Refuse before any work when an output would land on an input image, on another output of this call, or
    (without --overwrite) on a file already there."""
    inputs = {p.resolve(): p for p in paths}
    targets: dict[Path, Path] = {}
    for p in paths:
        for n in _output_names(p.stem, overlay):
            t = (out / n).resolve()
            if t in targets:
                raise CLIError(f"{targets[t]} and {p} would both write {out / n}; rename one of them")
            targets[t] = p
    summary = (out / SUMMARY_FILE).resolve()
    if summary in targets:
        raise CLIError(f"{targets[summary]} would write {out / SUMMARY_FILE}, the run summary's name; rename it")
    for t, p in targets.items():
        if t in inputs:
            raise CLIError(f"{out / t.name} is the input image {inputs[t]}: its label map would overwrite it; give "
                           f"another --out folder")
    if summary in inputs:
        raise CLIError(f"{out / SUMMARY_FILE} is an input; give another --out folder")
    if not overwrite:
        there = [t for t in list(targets) + [summary] if t.exists()]
        if there:
            raise CLIError(f"{out} already holds {len(there)} file(s) this run would write (e.g. {there[0].name}); "
                           f"pass --overwrite to replace them, or give another --out folder")


def _kill_workers(keep: set) -> None:
    """Stop the worker processes this command started (the DataLoader's decoders: children not in ``keep``)
    now, so that an interrupt ends fast."""
    import multiprocessing
    ours = [ch for ch in multiprocessing.active_children() if ch.pid not in keep]
    for ch in ours:
        ch.terminate()
    for ch in ours:
        ch.join(timeout=1.0)


def cmd_segment(a: argparse.Namespace) -> int:
    """Decode in DataLoader workers, batch images of one padded shape, write files in a writer thread.

    Every argument, every input's declared size and every output name is checked before the model loads; an
    unreadable image is an error line and a summary entry while the other images are written (EXIT_PARTIAL)."""
    from .data.io import DEFAULT_MAX_PIXELS, ImageError, declared_size, write_text_atomic

    _check_segment_args(a)
    names = _segment_names(a)
    if a.engine == "ray":  # Ray actors (fusionseg.scale.ray_engine)
        return _segment_ray(a, names)
    paths = _image_paths(a.images)
    if a.runtime == "torch":
        _check_device_here(a.device)
    out = Path(a.out)
    overlay = not a.no_overlay
    _check_outputs(paths, out, overlay, a.overwrite)
    max_pixels = DEFAULT_MAX_PIXELS if a.max_megapixels is None else int(a.max_megapixels * 1e6)
    from PIL import Image
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels  # this program's own choice (--max-megapixels), above Pillow's
    status: list[dict] = [{"image": str(p), "status": "not done"} for p in paths]

    def fail(i: int, msg: str) -> None:
        status[i].update(status="error", error=msg)
        print(f"fusionseg segment: error: {msg}", file=sys.stderr, flush=True)

    for i, p in enumerate(paths):  # header only: a bomb or a non-image costs no model load and no memory
        try:
            declared_size(p, max_pixels)
        except ImageError as e:
            fail(i, str(e))
    todo = [i for i, st in enumerate(status) if st["status"] == "not done"]
    if not todo:
        return EXIT_USAGE
    created = not out.exists()
    _check_writable(out)
    summary_path = out / SUMMARY_FILE

    def finish(code: int, interrupted: str | None = None) -> int:
        ok = sum(st["status"] == "ok" for st in status)
        bad = sum(st["status"] == "error" for st in status)
        if created and ok == 0 and not any(out.iterdir()):
            out.rmdir()  # a run that wrote nothing leaves no empty folder behind
            return code
        info = {"command": "segment", "classes": names, "model": str(a.model), "out": str(out), "ok": ok,
                "failed": bad, "not_done": len(status) - ok - bad, "exit_code": code, "images": status}
        from .segmenter import test_time_field
        info.update(test_time_field(a.tta_scales, a.tta_flip, a.bridge_size))
        if interrupted:
            info["interrupted"] = interrupted
        write_text_atomic(json.dumps(info, indent=1), summary_path)
        if bad and code == EXIT_PARTIAL:
            print(f"fusionseg segment: {bad} of {len(status)} images failed, {ok} written; see {summary_path}",
                  file=sys.stderr)
        return code

    import multiprocessing
    children = {ch.pid for ch in multiprocessing.active_children()}  # the caller's own, never stopped here
    try:
        code = _segment_run(a, names, paths, todo, out, overlay, max_pixels, status, fail)
    except KeyboardInterrupt as e:
        _kill_workers(children)
        finish(EXIT_TERMINATED if isinstance(e, _Terminated) else 130,
               "SIGTERM" if isinstance(e, _Terminated) else "SIGINT")
        raise
    except BaseException:
        _kill_workers(children)
        if created and not any(st["status"] == "ok" for st in status):
            import shutil
            if out.exists() and not [f for f in out.iterdir() if not f.name.startswith(".")]:
                shutil.rmtree(out, ignore_errors=True)
        raise
    return finish(code)


def _segment_run(a, names, paths, todo, out, overlay, max_pixels, status, fail) -> int:
    import collections
    from concurrent.futures import ThreadPoolExecutor
    import torch
    from torch.utils.data import DataLoader
    from .segmenter import Segmenter
    if a.threads:
        torch.set_num_threads(a.threads)
    seg = Segmenter.from_pretrained(a.model, device=a.device, size=a.size, tile=a.tile, mode=a.mode,
                                    max_pixels=max_pixels, runtime=a.runtime, decision=a.decision, **_tta_kw(a))
    thr = seg.threshold if a.threshold is None else a.threshold
    sub = [paths[i] for i in todo]
    workers = a.workers if len(sub) >= 4 else 0  # starting processes does not pay for a few images
    ds = _SegmentInputs(sub, seg.preparer(), overlay, max_pixels)
    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
                        worker_init_fn=_worker_init if workers else None,
                        prefetch_factor=max(2, a.batch_size) if workers else None)
    pending: collections.deque = collections.deque()
    buckets: dict[tuple, list] = {}

    def drain(limit: int) -> None:
        while len(pending) > limit:
            print(pending.popleft().result(), flush=True)  # re-raises a writer error here

    def written(i: int):
        def done(fut) -> None:  # in the writer thread, as soon as the files are complete
            if not fut.cancelled() and fut.exception() is None:
                status[i].update(status="ok", outputs=[str(out / n) for n in _output_names(paths[i].stem, overlay)])
        return done

    writer = ThreadPoolExecutor(max_workers=1)
    try:
        def flush(items: list) -> None:
            t0 = time.time()
            preds = seg.predict_batch([it[1] for it in items], names, threshold=a.threshold, background=a.background)
            secs = round((time.time() - t0) / len(items), 3)
            for (i, _, ov_img), pred in zip(items, preds):
                extra = dict(image=str(paths[i]), model=str(a.model), threshold=thr, decision=seg.decision,
                             seconds=secs)
                fut = writer.submit(_write_outputs, paths[i], out, pred, ov_img, names, extra, overlay)
                fut.add_done_callback(written(i))
                pending.append(fut)
            drain(2 * a.batch_size)  # bounded queue: memory stays flat however many images

        for j, prep, ov_img, err in loader:
            i = todo[j]
            if err is not None:
                fail(i, err)
                continue
            key = tuple(prep.x.shape[-2:])
            buckets.setdefault(key, []).append((i, prep, ov_img))
            if len(buckets[key]) >= a.batch_size:
                flush(buckets.pop(key))
        for key in list(buckets):
            flush(buckets.pop(key))
        drain(0)
    finally:  # on an interrupt: the write in progress completes (atomic), the queued ones are dropped
        writer.shutdown(wait=True, cancel_futures=True)
    ok = sum(st["status"] == "ok" for st in status)
    bad = sum(st["status"] == "error" for st in status)
    return 0 if not bad else (EXIT_PARTIAL if ok else EXIT_USAGE)


def _check_train_config(cfg, a: argparse.Namespace) -> None:
    """Every value a run uses, from flags, --config and --set alike, checked before any data is read."""
    c = argparse.Namespace(**{k: getattr(cfg, k) for k in ("steps", "batch_size", "lr", "size", "val_fraction",
                                                           "checkpoint_every", "workers", "fold", "name_dropout",
                                                           "max_classes", "warmup", "weight_decay", "clip_grad",
                                                           "shard_size", "log_every", "seed")},
                           **{k: getattr(cfg, k, None) for k in ("copy_paste", "repeat_factor", "synonym_rate",
                                                                 "dice_weight", "focal_gamma", "copy_paste_jitter")})
    c.threads = a.threads
    _check_number(c, "steps", 1)
    _check_number(c, "batch_size", 1)
    _check_number(c, "lr", 0.0, 1.0, lo_open=True)
    _check_number(c, "size", 32, 4096)
    _check_number(c, "val_fraction", 0.0, 1.0, hi_open=True)
    _check_number(c, "checkpoint_every", 0)  # 0: no intermediate checkpoints
    _check_number(c, "workers", 0, 64)
    _check_number(c, "fold", 0, 3)
    _check_number(c, "name_dropout", 0.0, 1.0)
    _check_number(c, "max_classes", 1)
    _check_number(c, "warmup", 0)
    _check_number(c, "weight_decay", 0.0)
    _check_number(c, "clip_grad", 0.0, lo_open=True)
    _check_number(c, "shard_size", 1)
    _check_number(c, "log_every", 1)
    _check_number(c, "seed", 0)
    _check_number(c, "threads", 0, 1024)
    _check_number(c, "copy_paste", 0.0, 1.0)
    _check_number(c, "repeat_factor", 0.0, 1.0)
    _check_number(c, "synonym_rate", 0.0, 1.0)
    _check_number(c, "dice_weight", 0.0)
    _check_number(c, "focal_gamma", 0.0)
    _check_number(c, "copy_paste_jitter", 0.0, 10.0)
    if c.copy_paste and getattr(cfg, "cache", False):
        from .engine.config import COPY_PASTE_NEEDS_NO_CACHE
        raise CLIError(COPY_PASTE_NEEDS_NO_CACHE)
    for sc in cfg.scales or []:
        if not 32 <= sc <= 4096:
            raise CLIError(f"--scales must be sizes in [32, 4096] px, got {sc}")
    _check_device(cfg.device)
    if cfg.data is not None:
        from .engine.train import open_datasets
        open_datasets(cfg.data, cfg.fold)  # reads only the manifests: a wrong --data answers before any work


#: Files a training run writes in its folder (``--overwrite`` removes exactly these before starting afresh).
RUN_FILES = ("final.safetensors", "state.pt", "config.toml", "log.jsonl", "splits.json", "metrics.png")


def _run_steps(out: Path) -> int | None:
    """Steps a run folder's checkpoint was trained: final.safetensors' metadata, else the log's last step + 1."""
    import struct
    try:
        with open(out / "final.safetensors", "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            head = json.loads(f.read(min(n, 16 << 20)))
        return int(json.loads(head["__metadata__"]["fusionseg"])["training"]["steps"])
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        pass
    step = None
    try:
        for line in (out / "log.jsonl").read_text().splitlines():
            try:
                step = json.loads(line).get("step", step)
            except (json.JSONDecodeError, AttributeError):
                pass
    except OSError:
        pass
    return None if step is None else int(step) + 1


def _check_run_folder(out: Path, resume, overwrite: bool) -> None:
    """``train --out`` onto a folder holding a run: refused unless --resume or --overwrite, naming what is there.
    A run that stopped before its first step (bad input found after config.toml and splits.json were written)
    trained nothing: its files are replaced, so the corrected command runs as given."""
    found = [f for f in RUN_FILES if (out / f).exists()] + sorted(p.name for p in out.glob("step*.safetensors"))
    if not found or resume:
        if found and overwrite:
            raise CLIError("give --resume or --overwrite, not both")
        return
    trained = _run_steps(out) is not None or any(f == "state.pt" or f.startswith("step") for f in found)
    if not overwrite and trained:
        what = []
        try:
            from .engine.config import load_config_file
            saved = load_config_file(out / "config.toml") if (out / "config.toml").is_file() else {}
            if saved.get("image_encoder") or saved.get("text_encoder"):
                what.append(f"encoders {saved.get('image_encoder', '?')} + {saved.get('text_encoder', '?')}")
        except (ValueError, OSError):
            pass
        step = _run_steps(out)
        if step is not None:
            what.append(f"step {step}")
        what.append(f"{', '.join(found[:4])}{', ...' if len(found) > 4 else ''}")
        raise CLIError(f"{out} holds a training run ({'; '.join(what)}): pass --resume to continue it or "
                       f"--overwrite to start afresh there, or give another --out")
    for f in found:
        (out / f).unlink()


def _segment_ray(a: argparse.Namespace, names: list[str]) -> int:
    from .scale.ray_engine import run
    kw = dict(classes=names, model=a.model, size=a.size, threshold=a.threshold, mode=a.mode, tile=a.tile,
              runtime=a.runtime, background=a.background, device=a.device, decision=a.decision, **_tta_kw(a))
    if a.threads:
        kw["threads"] = a.threads
    r = run(a.images, a.out, kw, address=a.address, actors=a.actors, gpus_per_actor=a.gpus_per_actor,
            batch_size=a.batch_size, overlay=not a.no_overlay, info={"model": str(a.model)})
    print(f"{r['total']} images: {r['ok']} ok ({r['skipped']} already done), {r['errors']} errors -> {r['index']}")
    if r["errors"]:  # the local engine's exit codes: 3 some images failed, 2 none could be read
        print(f"fusionseg segment: {r['errors']} of {r['total']} images failed; see {r['index']}", file=sys.stderr)
        return EXIT_PARTIAL if r["ok"] else EXIT_USAGE
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .export.onnx import export_onnx
    if a.format != "onnx":
        raise CLIError(f"--format must be onnx, got {a.format!r}")
    _check_number(a, "size", 32, 4096)  # the traced example's side (0 read as the default, 100000 ran out of memory)
    try:  # torch's newest opset; the fusion head's attention needs 14 (an opset outside was a graph dump on stdout)
        from torch.onnx._constants import ONNX_MAX_OPSET as newest
    except ImportError:  # pragma: no cover - a torch without that constant
        newest = 20
    _check_number(a, "opset", 14, newest)
    if a.classes:
        _class_list(a.classes)
    info = export_onnx(a.model, a.out, classes=a.classes, size=a.size, opset=a.opset)
    print(f"exported {a.model} to {a.out}: {', '.join(info['files'])}")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    # the flags themselves first, before torch is imported (the merged config is checked again below)
    _check_train_config(argparse.Namespace(**{k: getattr(a, k, None) for k in (
        "steps", "batch_size", "lr", "size", "val_fraction", "checkpoint_every", "workers", "fold", "name_dropout",
        "seed", "device")}, max_classes=None, warmup=None, weight_decay=None, clip_grad=None, shard_size=None,
        log_every=None, scales=None, data=None), a)
    from .engine.config import flag_values, load_config_file, make_config, parse_set
    from .engine.train import CONFIG_FILE, TrainError, train
    values: dict = {}
    resume = a.resume
    if isinstance(resume, str) and not a.config and not a.data:
        saved = Path(resume) / CONFIG_FILE  # `fusionseg train --resume RUN_DIR`: the run's own config
        if not saved.is_file():
            raise CLIError(f"cannot resume {resume}: no {CONFIG_FILE} in it (give --config/--data as well, or a run folder)")
        values.update(load_config_file(saved))
    if a.config:
        values.update(load_config_file(a.config))
    for item in a.set or []:
        k, v = parse_set(item)
        values[k] = v
    values.update(flag_values(a))  # flags override --set and the config files
    if isinstance(resume, str) and a.out and Path(a.out).resolve() != Path(resume).resolve():
        raise CLIError(f"--resume {resume} continues that run folder; leave --out out or give the same folder")
    if isinstance(resume, str):
        values["out"] = resume
    cfg = make_config(values)
    scaled = None
    if "warmup" not in values and cfg.warmup > cfg.steps // 2 and cfg.steps >= 1:  # --steps 40, default 150
        import dataclasses
        scaled = cfg.warmup
        cfg = dataclasses.replace(cfg, warmup=min(max(1, cfg.steps // 20), cfg.steps - 1))  # --steps 1: none
    _check_train_config(cfg, a)
    _check_device_here(cfg.device)
    if cfg.cache:
        _check_cache_dir(cfg.cache_dir)
    if cfg.warmup >= cfg.steps:
        raise CLIError(f"warmup {cfg.warmup} is not shorter than the run ({cfg.steps} steps): the learning rate "
                       f"would never reach its peak; lower warmup or raise --steps")
    _check_run_folder(Path(cfg.out), cfg.resume, a.overwrite)
    if scaled is not None:
        import warnings
        warnings.warn(f"the default warm-up of {scaled} steps is more than half of this {cfg.steps}-step run (the "
                      f"learning rate would hardly reach its peak); using {cfg.warmup} (5%); --set warmup=N chooses")
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    try:
        train(cfg)
    except TrainError as e:  # the run stopped itself (e.g. non-finite losses): one line, exit 1
        print(f"fusionseg train: error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    if a.fold is not None and not 0 <= a.fold <= 3:
        raise CLIError(f"--fold must be 0, 1, 2 or 3, got {a.fold}")
    _check_number(a, "threshold", 0.0, 1.0)
    _check_decision(a)
    _check_number(a, "max_images", 1)
    _check_number(a, "episodes", 1)
    _check_number(a, "threads", 0, 1024)
    _check_device_here(a.device)
    _check_tta(a)
    if a.max_images is not None and a.protocol == "episodes":
        raise CLIError("--max-images applies to the semantic and novel-names protocols; bound episodes with --episodes")
    if a.episodes is not None and a.protocol != "episodes":
        raise CLIError(f"--episodes applies to --protocol episodes only (this is {a.protocol}); use --max-images")
    if a.classes is not None:
        if a.protocol != "novel-names":
            raise CLIError("--classes applies to --protocol novel-names only")
        a.classes = _class_list(a.classes)
    from .engine.evaluate import evaluate
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    for flag, p in (("--json", a.json), ("--report", a.report)):
        if p:
            if Path(p).is_dir():  # found only when the report is written, after the whole evaluation
                raise CLIError(f"{flag} {p} is a folder; give a file name")
            _check_writable(Path(p).resolve().parent)
    rep = evaluate(model=a.model, data=a.data, protocol=a.protocol, fold=a.fold, threshold=a.threshold,
                   device=a.device, json_path=a.json, report_path=a.report, max_images=a.max_images,
                   episodes=a.episodes, classes=a.classes, mode=a.mode, split=a.split, decision=a.decision,
                   **_tta_kw(a))
    print(rep["table"])
    for p in (a.json, a.report):
        if p:
            print(f"wrote {p}")
    return 0


def cmd_pseudo_label(a: argparse.Namespace) -> int:
    from .engine.pseudo_label import pseudo_label
    from .engine.teachers import build_teacher
    for name, v, lo, hi in (("--min-peak", a.min_peak, 0, 1), ("--min-confidence", a.min_confidence, 0, 1),
                            ("--known-fraction", a.known_fraction, 0, 1), ("--val-fraction", a.val_fraction, 0, 0.99)):
        if not lo <= v <= hi:
            raise CLIError(f"{name} must be in [{lo}, {hi}], got {v}")
    if a.max_images is not None and a.max_images < 1:
        raise CLIError(f"--max-images must be at least 1, got {a.max_images}")
    if a.examples < 0:
        raise CLIError(f"--examples must be 0 or more, got {a.examples}")
    _check_number(a, "threads", 0, 1024)
    _check_device_here(a.device)
    _check_tta(a)
    for d in a.data:
        if not Path(d).is_dir():
            raise CLIError(f"no such folder: {d}")
    names = None if a.names is None else _class_list(a.names, "--names")  # the one policy (blank, duplicate, long)
    out = Path(a.out)
    created = not out.exists()
    _check_writable(out)
    try:
        if a.threads:
            import torch
            torch.set_num_threads(a.threads)
        teacher = build_teacher(a.teacher, image_encoder=a.image_encoder, device=a.device, names=names, **_tta_kw(a))
        exclude = [c for c in (a.exclude_classes or "").split(",") if c.strip()]
        rep = pseudo_label(a.data, a.out, teacher, min_peak=a.min_peak, min_confidence=a.min_confidence,
                           known_fraction=a.known_fraction, exclude_classes=exclude, val_fraction=a.val_fraction,
                           seed=a.seed, holdout=a.holdout or [], examples=a.examples, max_images=a.max_images)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run stopped before writing anything (a bad --teacher, --image-encoder) leaves no folder
        raise
    print(f"labelled {rep['images']} images into {len(rep['parts'])} part(s) under {a.out} "
          f"({rep['classes_with_pixels']} of {rep['teacher_classes']} teacher classes with pixels, "
          f"{rep['ignored_fraction']:.0%} of pixels ignored); train with --data {a.out}")
    if rep.get("examples"):
        print(f"wrote {Path(a.out) / rep['examples']}")
    return 0


def cmd_cache(a: argparse.Namespace) -> int:
    _check_number(a, "size", 32, 4096)
    _check_number(a, "shard_size", 1)
    _check_number(a, "fold", 0, 3)
    _check_device(a.device)
    if a.scales:
        try:
            scales = [int(v) for v in a.scales.split(",") if v.strip()]
        except ValueError:
            raise CLIError(f"--scales must be comma-separated integers, got {a.scales!r}") from None
        if not scales or not all(32 <= v <= 4096 for v in scales):
            raise CLIError(f"--scales must be sizes in [32, 4096] px, got {a.scales!r}")
    from .engine.train import open_datasets
    open_datasets(a.data, a.fold)  # reads only the manifests: a wrong --data answers before any work
    _check_device_here(a.device)
    _check_cache_dir(a.cache_dir)
    from .data.features import cache_features
    from .engine.train import build_encoder_for_training, default_scales, init_distributed, open_datasets
    dist, device = init_distributed(a.device)  # under torchrun each rank computes its share of the shards
    try:
        enc = build_encoder_for_training(a.image_encoder, "image").to(device)
        sizes = [a.size] if not a.scales else [int(v) for v in a.scales.split(",") if v.strip()]
        if a.scales is None and a.train_scales:
            sizes = default_scales(a.size)
        for ds in open_datasets(a.data, a.fold):
            for sz in sizes:
                cf = cache_features(ds, enc, sz, 2, a.cache_dir, device=device, progress=dist.main,
                                    shard_size=a.shard_size, rank=dist.rank, world_size=dist.world,
                                    barrier=dist.barrier)
                if dist.main:
                    print(f"{ds.name} at {sz} px: {len(ds)} images {'already cached' if cf.hit else 'cached'} in "
                          f"{cf.path}" + ("" if cf.hit else f" ({cf.computed} computed by this process)"))
        if dist.enabled:
            dist.barrier()  # all ranks done before the process group is torn down
    finally:
        if dist.enabled:
            import torch
            torch.distributed.destroy_process_group()
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from . import __version__
    from .encoders.base import available_encoders
    from .model.checkpoint import read_checkpoint
    _, meta = read_checkpoint(a.model)
    tr = meta.get("training", {})
    print(f"fusionseg {__version__}")
    print(f"checkpoint: {meta['path']}")
    print(f"image encoder: {meta['image_encoder']['name']} ({meta['image_encoder']['fingerprint']})")
    print(f"text encoder:  {meta['text_encoder']['name']} ({meta['text_encoder']['fingerprint']})")
    c = meta["config"]
    print(f"preset: {c.get('preset')} (width {c['width']}, {c['layers']} layers, {c['heads']} heads), "
          f"{tr.get('parameters', '?')} parameters, trained {tr.get('steps', '?')} steps")
    if tr.get("vocabulary"):
        print(f"names seen in training ({len(tr['vocabulary'])}): {', '.join(tr['vocabulary'])}")
    enc = available_encoders()
    print(f"encoders: image {', '.join(enc['image'])}; text {', '.join(enc['text'])}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from .serve import ServeConfig, missing_dependencies, serve
    missing = missing_dependencies()
    if missing:
        raise CLIError(f"fusionseg serve needs {', '.join(missing)}: pip install 'fusionseg[serve]'")
    if not 0 <= a.port <= 65535:
        raise CLIError(f"--port must be 0..65535, got {a.port}")
    _check_device(a.device)
    if a.size is not None and not 8 <= a.size <= 16384:
        raise CLIError(f"--size must be between 8 and 16384 px, got {a.size}")
    _check_number(a, "workers", 1, 256)
    _check_number(a, "queue", 0, 100_000)
    _check_number(a, "max_upload_mb", 0.0, 4096.0, lo_open=True)
    _check_number(a, "max_megapixels", 0.0, 100_000.0, lo_open=True)
    _check_number(a, "max_classes", 1, 1000)
    _check_number(a, "timeout", 0.0, 86_400.0, lo_open=True)
    _check_number(a, "threads", 0, 1024)
    _check_tta(a)
    _check_device_here(a.device)
    cfg = ServeConfig(model=a.model, device=a.device, size=a.size, workers=a.workers, queue=a.queue,
                      max_upload_bytes=int(a.max_upload_mb * 1024 * 1024), max_pixels=int(a.max_megapixels * 1e6),
                      max_classes=a.max_classes, timeout=a.timeout, threads=a.threads, **_tta_kw(a)).check()

    def ready(url: str, app) -> None:
        info = app.state.service.model_info()
        print(f"fusionseg serve: model {a.model} ({info['image_encoder'].get('name')} + "
              f"{info['text_encoder'].get('name')}) on {url}  (page {url}/, API {url}/v1/segment, "
              f"{url}/openapi.json); Ctrl-C stops", flush=True)

    serve(cfg, host=a.host, port=a.port, access_log=not a.no_access_log, on_ready=ready)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .choices import DECISIONS, DEFAULT_IMAGE_ENCODER, MODES, PROTOCOLS, SPLITS
    from .engine.config import add_train_flags
    p = _Parser(prog="fusionseg", description="Open-vocabulary semantic segmentation on frozen encoders.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment images with any class names")
    s.add_argument("images", nargs="+", help="image files and/or folders of images")
    s.add_argument("--classes", default=None,
                   help='comma-separated names, e.g. "cat, sofa, potted plant"; names with commas as a JSON list: '
                        '\'["cat, kitten", "toilet"]\' (README: class names)')
    s.add_argument("--classes-file", default=None, help="a UTF-8 text file, one class name per line (instead of --classes)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--overwrite", action="store_true",
                   help="replace output files already in --out (an input image is never overwritten)")
    s.add_argument("--max-megapixels", type=float, default=None,
                   help="largest image, width x height as its header declares, in megapixels (default 120)")
    s.add_argument("--model", default="default", help="'default' or a checkpoint (.safetensors or run folder)")
    s.add_argument("--threshold", type=float, default=None, help="none-of-these threshold on the sigmoid score (default: the model's; 0.3 for the shipped one)")
    s.add_argument("--background", action="store_true", help="plain arg-max, no threshold (name a background class yourself)")
    s.add_argument("--decision", default=None, choices=list(DECISIONS), help="how \"none of these\" is decided: threshold (a pixel keeps its best name when that name's score reaches --threshold) or relative (each name measured against its own peak in the image; a name counts as present when that peak reaches 0.01 per name asked). Default: the model's (relative for the shipped one); giving --threshold means threshold")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--size", type=int, default=None, help="working size: longer image side in px (default: the model's)")
    s.add_argument("--no-overlay", action="store_true", help="skip the overlay picture")
    s.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    s.add_argument("--batch-size", type=int, default=8,
                   help="images of one shape run through the model together (default 8; 1 = one at a time)")
    s.add_argument("--workers", type=int, default=2,
                   help="processes decoding images ahead of the model (default 2; 0 = in the main process)")
    _add_tta_flags(s)
    s.add_argument("--tile", type=int, default=None,
                   help="sliding-window side in px at the working size (default: automatic above 1536 px; 0 = off)")
    s.add_argument("--mode", default="auto", choices=list(MODES),
                   help="fusion: the trained model; bridge: training-free, through the image encoder's classifier "
                        "classes; fusion+bridge: the model for names it was trained on, the bridge for new ones; "
                        "auto (default): fusion+bridge where the image encoder has a classifier head, else fusion")
    s.add_argument("--runtime", default="torch", choices=["torch", "onnx"],
                   help="torch (default) or onnx: onnxruntime on a `fusionseg export` folder given as --model")
    s.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local (default): this process; ray: Ray actors, resumable, with OUT/index.jsonl")
    s.add_argument("--address", default=None,
                   help="--engine ray: auto, HOST:PORT or ray://HOST:PORT of a cluster (default: a local one)")
    s.add_argument("--actors", type=int, default=2, help="--engine ray: model replicas (default 2)")
    s.add_argument("--gpus-per-actor", type=float, default=0.0, help="--engine ray: GPUs per actor (default 0)")
    s.set_defaults(func=cmd_segment)

    x = sub.add_parser("export", help="export the image encoder and fusion head as ONNX (for onnxruntime)")
    x.add_argument("--format", default="onnx", help="onnx (the only one for now)")
    x.add_argument("--out", required=True, help="folder for the graphs, embeddings and fusionseg-onnx.json")
    x.add_argument("--model", default="default", help="'default' or a checkpoint (.safetensors or run folder)")
    x.add_argument("--classes", default=None,
                   help='names whose text embeddings are stored with the export, e.g. "cat, sofa"')
    x.add_argument("--size", type=int, default=None, help="size of the example input for tracing (default: the model's)")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17; from 14, the attention's, to torch's newest)")
    x.set_defaults(func=cmd_export)

    t = sub.add_parser("train", help="train the fusion model (cached frozen features; torchrun for several GPUs)",
                       description="Flags override the --config file; --set key=value overrides any config key.")
    t.add_argument("--config", default=None, help="TOML recipe, e.g. configs/cpu-default.toml")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key (repeatable)")
    add_train_flags(t)  # one flag per TrainConfig field that has one (engine/config.py)
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out folder that holds a run (its run files are replaced)")
    t.add_argument("--threads", type=int, default=0)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="measure a model: all names, present names, one-class episodes or novel names")
    e.add_argument("--model", default="default")
    e.add_argument("--data", required=True, help="a dataset folder, or pascal5i:ROOT, coco20i:ROOT, fss1000:ROOT, mosaic4:ROOT")
    e.add_argument("--protocol", default="semantic", choices=list(PROTOCOLS),
                   help="semantic: all classes at once; present: each image with exactly the classes its ground "
                        "truth shows; episodes: one class per episode; novel-names: "
                        "discrimination, episodes and the wrong-name control for the names in --classes")
    e.add_argument("--split", default="all", choices=list(SPLITS),
                   help="all: every image; val: only the images the model never trained on (its recorded "
                        "validation split of a training folder; every image of any other folder)")
    e.add_argument("--classes", default=None, help="novel-names protocol: comma-separated class names of the dataset")
    e.add_argument("--mode", default="auto", choices=list(MODES), help="scoring mode (see segment --mode)")
    e.add_argument("--fold", type=int, default=None, help="PASCAL-5i / COCO-20i fold 0-3")
    e.add_argument("--episodes", type=int, default=None, help="episode count (default: 1,000 for folds, else all)")
    e.add_argument("--threshold", type=float, default=None)
    e.add_argument("--decision", default=None, choices=list(DECISIONS), help="as segment --decision")
    _add_tta_flags(e)
    e.add_argument("--max-images", type=int, default=None)
    e.add_argument("--json", default=None, help="write the report as JSON here")
    e.add_argument("--report", default=None, help="write a Markdown report (with a figure) here")
    e.add_argument("--device", default="cpu")
    e.add_argument("--threads", type=int, default=0)
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("cache", help="compute the frozen-feature cache of datasets (a separate pass; torchrun shards it)")
    c.add_argument("--data", action="append", required=True, help="dataset folder, pascal5i:ROOT or coco20i:ROOT")
    c.add_argument("--fold", type=int, default=None, help="PASCAL-5i / COCO-20i fold (its training split)")
    c.add_argument("--image-encoder", default=DEFAULT_IMAGE_ENCODER)
    c.add_argument("--size", type=int, default=320)
    c.add_argument("--scales", default=None, help="comma-separated sizes to cache (default: --size)")
    c.add_argument("--train-scales", action="store_true", help="cache the default training scales of --size (0.8x, 1x, 1.2x)")
    c.add_argument("--shard-size", type=int, default=256, help="images per shard")
    c.add_argument("--device", default="cpu")
    c.add_argument("--cache-dir", default=None)
    c.set_defaults(func=cmd_cache)

    q = sub.add_parser("pseudo-label", help="label images with a training-free teacher (self-training data for train)")
    q.add_argument("--data", action="append", required=True,
                   help="folder of images (with labels.csv: image-level labels) or a dataset folder (its ground truth wins); repeatable")
    q.add_argument("--out", required=True, help="output folder (a dataset collection that train --data reads)")
    q.add_argument("--teacher", default="bridge",
                   help="bridge (the image encoder's classifier over named classes), maskclip (hf: CLIP image towers) "
                        "or a model: default, a checkpoint or a run folder (self-training)")
    q.add_argument("--image-encoder", default=None, help=f"the bridge's / MaskCLIP's image encoder (default {DEFAULT_IMAGE_ENCODER})")
    q.add_argument("--names", default=None, help="comma-separated names for a model or MaskCLIP teacher (default: the model's training names)")
    q.add_argument("--min-peak", type=float, default=0.5, help="drop a class from an image when its peak probability is below this")
    q.add_argument("--min-confidence", type=float, default=0.3, help="label a pixel only when its best class reaches this probability")
    q.add_argument("--known-fraction", type=float, default=0.5,
                   help="image-level label: its class takes the pixels where its probability is at least this share of its peak")
    q.add_argument("--exclude-classes", default=None,
                   help="names never to label; teacher classes with one of them among their synonyms or group words too")
    q.add_argument("--val-fraction", type=float, default=0.0,
                   help="leave out each dataset folder's validation images (as train --val-fraction computes them)")
    q.add_argument("--seed", type=int, default=0, help="seed of that validation split (train --seed)")
    q.add_argument("--holdout", action="append", help="image id never labelled (repeatable, as train --holdout)")
    q.add_argument("--max-images", type=int, default=None)
    q.add_argument("--examples", type=int, default=8, help="images in the overlay grid examples.png (0: none)")
    q.add_argument("--device", default="cpu")
    q.add_argument("--threads", type=int, default=0)
    _add_tta_flags(q)  # a model teacher: its test-time augmentation
    q.set_defaults(func=cmd_pseudo_label)

    i = sub.add_parser("info", help="describe a checkpoint and the available encoders")
    i.add_argument("--model", default="default")
    i.set_defaults(func=cmd_info)

    v = sub.add_parser("serve", help="web page + REST API (POST /v1/segment) over one loaded model")
    v.add_argument("--model", default="default", help="'default' or a checkpoint (.safetensors or run folder)")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    v.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port)")
    v.add_argument("--device", default="cpu", help="cpu or cuda")
    v.add_argument("--size", type=int, default=None, help="working size: longer image side in px (default: the model's)")
    v.add_argument("--workers", type=int, default=1, help="requests computed at once (default 1)")
    v.add_argument("--queue", type=int, default=8, help="requests waiting beyond those; more get 503 (default 8)")
    v.add_argument("--max-upload-mb", type=float, default=20.0, help="largest image file in MiB (default 20)")
    v.add_argument("--max-megapixels", type=float, default=120.0,
                   help="largest image, width x height as its header declares, in megapixels (default 120)")
    v.add_argument("--max-classes", type=int, default=100, help="most class names per request (default 100)")
    v.add_argument("--timeout", type=float, default=60.0, help="seconds before a request gets 504 (default 60)")
    v.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    v.add_argument("--no-access-log", action="store_true", help="do not log every request")
    _add_tta_flags(v)
    v.set_defaults(func=cmd_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    from .runtime import tune_malloc
    tune_malloc()  # CPU speed: large buffers reused from the heap (see fusionseg.runtime)
    import warnings
    shown = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):  # not a source-line dump
        print(f"fusionseg {a.command}: warning: {message}", file=sys.stderr)

    warnings.showwarning = one_line
    import signal

    def on_term(_sig, _frame):
        raise _Terminated()

    try:
        prev_term = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (main() called from a thread): leave signals alone
        prev_term = None
    pil_warnings = warnings.catch_warnings()
    pil_warnings.__enter__()
    try:
        from PIL import Image  # the declared size is checked against our own limit; Pillow's warning is noise
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        _check_no_blank_paths(a)
        return a.func(a) or 0
    except (ValueError, OSError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError) and getattr(e, "filename", None) and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        print(f"fusionseg {a.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        term = isinstance(e, _Terminated)
        print(f"fusionseg {a.command}: {'terminated' if term else 'interrupted'}", file=sys.stderr)
        code = EXIT_TERMINATED if term else 130
        if argv is None:  # run as the program: everything is written and closed, so end now (tearing down torch
            sys.stdout.flush()  # and the stopped workers' queues took ~2 s more, past the 2 s promised)
            sys.stderr.flush()
            os._exit(code)
        return code
    finally:
        pil_warnings.__exit__(None, None, None)
        warnings.showwarning = shown
        if prev_term is not None:
            signal.signal(signal.SIGTERM, prev_term)


if __name__ == "__main__":
    sys.exit(main())
