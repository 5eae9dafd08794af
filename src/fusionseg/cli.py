"""Command line: ``fusionseg segment | train | cache | evaluate | info``.

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


class CLIError(ValueError):
    pass


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
        else:
            raise CLIError(f"no such file or folder: {p}")
    stems = {}
    for p in out:
        if p.stem in stems and stems[p.stem] != p:
            raise CLIError(f"two inputs share the name {p.stem!r} ({stems[p.stem]} and {p}); their outputs would collide")
        stems[p.stem] = p
    return out


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".fusionseg-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CLIError(f"cannot write to output folder {folder}: {e.strerror or e}") from None


#: The overlay picture is drawn at most this many px on its longer side (the label PNG stays full size).
OVERLAY_MAX_SIDE = 4096
#: zlib level of the overlay PNG (a photo-like picture: level 6 took 3.5x as long for a ~25% smaller file;
#: at 4000x3000 that was about 4 s per image). The label PNG keeps the default (it compresses well and fast).
OVERLAY_PNG_LEVEL = 1


class _SegmentInputs:
    """Map-style dataset for the DataLoader: decoding and resizing run in worker processes.

    item i -> (i, Prepared or None, overlay picture or None, error line or None); errors travel as text so the
    CLI can print one line instead of a worker traceback."""

    def __init__(self, paths: list[Path], prepare, overlay: bool):
        self.paths, self.prepare, self.overlay = paths, prepare, overlay

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from .data.io import load_image
        try:
            prep = self.prepare(self.paths[i])
            ov = load_image(self.paths[i], max_side=OVERLAY_MAX_SIDE) if self.overlay else None
            return i, prep, ov, None
        except (ValueError, OSError) as e:
            return i, None, None, (str(e).strip().splitlines() or [type(e).__name__])[0]


def _identity(x):
    return x


def _one_thread(_worker_id: int) -> None:
    import torch
    torch.set_num_threads(1)


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


def cmd_segment(a: argparse.Namespace) -> int:
    """Decode in DataLoader workers, batch images of one padded shape, write files in a writer thread."""
    import collections
    from concurrent.futures import ThreadPoolExecutor
    import torch
    from torch.utils.data import DataLoader
    from .segmenter import Segmenter, parse_class_names

    if a.engine == "ray":  # Ray actors (fusionseg.scale.ray_engine)
        return _segment_ray(a)
    names = parse_class_names(a.classes)
    if a.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {a.batch_size}")
    if a.workers < 0:
        raise CLIError(f"--workers must be 0 or more, got {a.workers}")
    if a.tile is not None and a.tile != 0 and a.tile < 64:
        raise CLIError(f"--tile must be 0 (off) or at least 64 px, got {a.tile}")
    if a.size is not None and not 8 <= a.size <= 16384:
        raise CLIError(f"--size must be between 8 and 16384 px, got {a.size}")
    paths = _image_paths(a.images)
    out = Path(a.out)
    _check_writable(out)
    if a.threads:
        torch.set_num_threads(a.threads)
    seg = Segmenter.from_pretrained(a.model, device=a.device, size=a.size, tile=a.tile, mode=a.mode,
                                    runtime=a.runtime)
    thr = seg.threshold if a.threshold is None else a.threshold
    workers = a.workers if len(paths) >= 4 else 0  # starting processes does not pay for a few images
    ds = _SegmentInputs(paths, seg.preparer(), not a.no_overlay)
    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
                        worker_init_fn=_one_thread if workers else None,
                        prefetch_factor=max(2, a.batch_size) if workers else None)
    pending: collections.deque = collections.deque()
    buckets: dict[tuple, list] = {}

    def drain(limit: int) -> None:
        while len(pending) > limit:
            print(pending.popleft().result())  # re-raises a writer error here

    with ThreadPoolExecutor(max_workers=1) as writer:
        def flush(items: list) -> None:
            t0 = time.time()
            preds = seg.predict_batch([it[1] for it in items], names, threshold=a.threshold, background=a.background)
            secs = round((time.time() - t0) / len(items), 3)
            for (i, _, ov_img), pred in zip(items, preds):
                extra = dict(image=str(paths[i]), model=str(a.model), threshold=thr, seconds=secs)
                pending.append(writer.submit(_write_outputs, paths[i], out, pred, ov_img, names, extra,
                                             not a.no_overlay))
            drain(2 * a.batch_size)  # bounded queue: memory stays flat however many images

        for i, prep, ov_img, err in loader:
            if err is not None:
                raise CLIError(err)
            key = tuple(prep.x.shape[-2:])
            buckets.setdefault(key, []).append((i, prep, ov_img))
            if len(buckets[key]) >= a.batch_size:
                flush(buckets.pop(key))
        for key in list(buckets):
            flush(buckets.pop(key))
        drain(0)
    return 0


def _segment_ray(a: argparse.Namespace) -> int:
    from .scale.ray_engine import run
    kw = dict(classes=a.classes, model=a.model, size=a.size, threshold=a.threshold, mode=a.mode, tile=a.tile,
              runtime=a.runtime, background=a.background, device=a.device)
    if a.threads:
        kw["threads"] = a.threads
    r = run(a.images, a.out, kw, address=a.address, actors=a.actors, gpus_per_actor=a.gpus_per_actor,
            batch_size=a.batch_size, overlay=not a.no_overlay, info={"model": str(a.model)})
    print(f"{r['total']} images: {r['ok']} ok ({r['skipped']} already done), {r['errors']} errors -> {r['index']}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .export.onnx import export_onnx
    if a.format != "onnx":
        raise CLIError(f"--format must be onnx, got {a.format!r}")
    info = export_onnx(a.model, a.out, classes=a.classes, size=a.size, opset=a.opset)
    print(f"exported {a.model} to {a.out}: {', '.join(info['files'])}")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from .engine.train import CONFIG_FILE, TrainError, load_config_file, make_config, parse_set, train
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
    flags = {"data": a.data, "out": a.out, "image_encoder": a.image_encoder, "text_encoder": a.text_encoder,
             "preset": a.preset, "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "size": a.size,
             "val_fraction": a.val_fraction, "holdout": a.holdout, "checkpoint_every": a.checkpoint_every,
             "seed": a.seed, "device": a.device, "cache_dir": a.cache_dir, "pos_embed": a.pos_embed,
             "workers": a.workers, "fold": a.fold}
    values.update({k: v for k, v in flags.items() if v is not None})
    if a.steps is not None and a.steps < 1:
        raise CLIError("--steps must be at least 1")
    if a.exclude_classes is not None:
        values["exclude_classes"] = [c for c in a.exclude_classes.split(",") if c.strip()]
    if a.scales:
        try:
            values["scales"] = [int(v) for v in a.scales.split(",") if v.strip()]
        except ValueError:
            raise CLIError(f"--scales must be comma-separated integers, got {a.scales!r}") from None
    if a.no_fusion:
        values["fusion"] = False
    if a.no_cache:
        values["cache"] = False
    if a.compile:
        values["compile"] = True
    if resume is not None:
        values["resume"] = resume
    if isinstance(resume, str) and a.out and Path(a.out).resolve() != Path(resume).resolve():
        raise CLIError(f"--resume {resume} continues that run folder; leave --out out or give the same folder")
    if isinstance(resume, str):
        values["out"] = resume
    if a.bridge_prior:
        values["bridge_prior"] = True
    if a.name_dropout is not None:
        values["name_dropout"] = a.name_dropout
    cfg = make_config(values)
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
    from .engine.evaluate import evaluate
    if a.fold is not None and not 0 <= a.fold <= 3:
        raise CLIError(f"--fold must be 0, 1, 2 or 3, got {a.fold}")
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    for p in (a.json, a.report):
        if p:
            _check_writable(Path(p).resolve().parent)
    rep = evaluate(model=a.model, data=a.data, protocol=a.protocol, fold=a.fold, threshold=a.threshold,
                   device=a.device, json_path=a.json, report_path=a.report, max_images=a.max_images,
                   episodes=a.episodes, classes=a.classes, mode=a.mode)
    print(rep["table"])
    for p in (a.json, a.report):
        if p:
            print(f"wrote {p}")
    return 0


def cmd_cache(a: argparse.Namespace) -> int:
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
    cfg = ServeConfig(model=a.model, device=a.device, size=a.size, workers=a.workers, queue=a.queue,
                      max_upload_bytes=int(a.max_upload_mb * 1024 * 1024), max_pixels=int(a.max_megapixels * 1e6),
                      max_classes=a.max_classes, timeout=a.timeout, threads=a.threads).check()

    def ready(url: str, app) -> None:
        info = app.state.service.model_info()
        print(f"fusionseg serve: model {a.model} ({info['image_encoder'].get('name')} + "
              f"{info['text_encoder'].get('name')}) on {url}  (page {url}/, API {url}/v1/segment, "
              f"{url}/openapi.json); Ctrl-C stops", flush=True)

    serve(cfg, host=a.host, port=a.port, access_log=not a.no_access_log, on_ready=ready)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .choices import DEFAULT_IMAGE_ENCODER, DEFAULT_PRESET, DEFAULT_TEXT_ENCODER, MODES, PRESET_NAMES, PROTOCOLS
    p = argparse.ArgumentParser(prog="fusionseg", description="Open-vocabulary semantic segmentation on frozen encoders.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment images with any class names")
    s.add_argument("images", nargs="+", help="image files and/or folders of images")
    s.add_argument("--classes", required=True, help='comma-separated names, e.g. "cat, sofa, potted plant"')
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--model", default="default", help="'default' or a checkpoint (.safetensors or run folder)")
    s.add_argument("--threshold", type=float, default=None, help="none-of-these threshold on the sigmoid score (default 0.5)")
    s.add_argument("--background", action="store_true", help="plain arg-max, no threshold (name a background class yourself)")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--size", type=int, default=None, help="working size: longer image side in px (default: the model's)")
    s.add_argument("--no-overlay", action="store_true", help="skip the overlay picture")
    s.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    s.add_argument("--batch-size", type=int, default=8,
                   help="images of one shape run through the model together (default 8; 1 = one at a time)")
    s.add_argument("--workers", type=int, default=2,
                   help="processes decoding images ahead of the model (default 2; 0 = in the main process)")
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
    x.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    x.set_defaults(func=cmd_export)

    t = sub.add_parser("train", help="train the fusion model (cached frozen features; torchrun for several GPUs)",
                       description="Flags override the --config file; --set key=value overrides any config key.")
    t.add_argument("--config", default=None, help="TOML recipe, e.g. configs/cpu-default.toml")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key (repeatable)")
    t.add_argument("--data", action="append", default=None,
                   help="dataset folder (fusionseg-folder/1), pascal5i:ROOT or coco20i:ROOT (with --fold); repeat to mix")
    t.add_argument("--out", default=None, help="run folder; the final checkpoint is OUT/final.safetensors")
    t.add_argument("--image-encoder", default=None, help=f"default {DEFAULT_IMAGE_ENCODER}")
    t.add_argument("--text-encoder", default=None, help=f"default {DEFAULT_TEXT_ENCODER}")
    t.add_argument("--preset", default=None, choices=list(PRESET_NAMES), help=f"default {DEFAULT_PRESET}")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None, help="global batch (split over torchrun processes)")
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--size", type=int, default=None, help="training size (longer side, px)")
    t.add_argument("--scales", default=None, help="comma-separated training scales in px (default: 0.8x, 1x, 1.2x --size)")
    t.add_argument("--val-fraction", type=float, default=None, help="whole images per dataset kept out for validation")
    t.add_argument("--holdout", action="append", help="image id always kept out of training (repeatable)")
    t.add_argument("--exclude-classes", default=None, help="names never used in training; their pixels are ignored")
    t.add_argument("--fold", type=int, default=None, help="PASCAL-5i / COCO-20i fold 0-3 (novel classes left out)")
    t.add_argument("--checkpoint-every", type=int, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--device", default=None, help="cpu or cuda (default cpu)")
    t.add_argument("--cache-dir", default=None, help="feature cache folder (default ~/.cache/fusionseg or $FUSIONSEG_CACHE)")
    t.add_argument("--no-cache", action="store_true", help="run the frozen encoder every step (no feature cache)")
    t.add_argument("--workers", type=int, default=None, help="DataLoader workers for --no-cache")
    t.add_argument("--compile", action="store_true", help="torch.compile the trained head (GPU)")
    t.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                   help="continue from the last checkpoint: of OUT (no value) or of RUN_DIR")
    t.add_argument("--no-fusion", action="store_true", help="ablation: no fusion transformer")
    t.add_argument("--pos-embed", default=None, choices=["none", "fourier"])
    t.add_argument("--bridge-prior", action="store_true",
                   help="feed the semantic bridge's per-class map to the model, trained with name dropout")
    t.add_argument("--name-dropout", type=float, default=None,
                   help="with --bridge-prior: share of classes per batch given the unknown-name token (0.5)")
    t.add_argument("--threads", type=int, default=0)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="measure a model: one-class episodes or whole-vocabulary mIoU")
    e.add_argument("--model", default="default")
    e.add_argument("--data", required=True, help="a dataset folder, or pascal5i:ROOT, coco20i:ROOT, fss1000:ROOT, mosaic4:ROOT")
    e.add_argument("--protocol", default="semantic", choices=list(PROTOCOLS),
                   help="semantic: all classes at once; episodes: one class per episode; novel-names: "
                        "discrimination, episodes and the wrong-name control for the names in --classes")
    e.add_argument("--classes", default=None, help="novel-names protocol: comma-separated class names of the dataset")
    e.add_argument("--mode", default="auto", choices=list(MODES), help="scoring mode (see segment --mode)")
    e.add_argument("--fold", type=int, default=None, help="PASCAL-5i / COCO-20i fold 0-3")
    e.add_argument("--episodes", type=int, default=None, help="episode count (default: 1,000 for folds, else all)")
    e.add_argument("--threshold", type=float, default=None)
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
    v.add_argument("--max-megapixels", type=float, default=40.0, help="largest image in megapixels (default 40)")
    v.add_argument("--max-classes", type=int, default=100, help="most class names per request (default 100)")
    v.add_argument("--timeout", type=float, default=60.0, help="seconds before a request gets 504 (default 60)")
    v.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    v.add_argument("--no-access-log", action="store_true", help="do not log every request")
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
    try:
        return a.func(a) or 0
    except (ValueError, OSError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError) and getattr(e, "filename", None) and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        print(f"fusionseg {a.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
