"""Training on cached frozen features: only the fusion module, decoder and head learn.

Several datasets are mixed in one run (folder datasets, or the train split of a PASCAL-5i / COCO-20i fold);
class names are matched across them by their normalised form. A class name is scored on an image only if that
image's dataset annotates it (a COCO "person" is not a negative on a Weizmann horse photo).

Determinism: the batch of step ``s`` (scale, images, views, crop, class names) is drawn from a random
generator seeded by ``(seed, s)`` alone, so a resumed run, a run under ``torchrun`` (each rank takes its slice
of the same global batch) and a run without the feature cache (``cache = false``: the frozen encoder runs
every step on the same crops) all see the same batches as one uninterrupted process.

Augmentation: horizontal flips are cached views (``views = 2``); scale jitter is one cache store per training
scale (``scales``); random crops are taken on the cached token grid and the mask together. So augmentation
stays real with the cache; the no-cache path takes the same crops in pixel space and encodes them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.datasets import IGNORE, DatasetError, normalize_name, split_ids
from ..data.features import RowTable, cache_features, cached_text_embeddings, write_atomic
from ..encoders.base import EncoderError
from ..encoders.templates import resolve_templates
from ..model.fusioner import FusionerConfig, FusionHead
from .config import (RUNTIME_KEYS, TrainConfig, config_differences, config_keys, dump_config,  # noqa: F401
                     load_config_file, make_config, parse_set)
from .sampling import (BenchmarkSplit, Plan, _global_masks, _mask_lut, _Pool, _UncachedSteps,  # noqa: F401
                       build_vocabulary, choose_classes, default_scales, gather_batch, make_step_plan, open_datasets,
                       plan_batch, step_rng)
from .distributed import Dist, init_distributed, wrap_for_training  # noqa: F401
from .encoders import build_encoder_for_training, with_offline_hint
from .plots import plot_metrics
from .state import (STATE_FILE, CheckpointWriteError, load_state, rng_states, save_state,  # noqa: F401
                    set_rng_states, write_checkpoint)

CONFIG_FILE = "config.toml"


class TrainError(RuntimeError):
    """A run that cannot go on (non-finite losses, a checkpoint that cannot be written): says why and what to do."""


# ------------------------------------------------------------------------------------------------ validation
@torch.no_grad()
def validate(head: FusionHead, val_sets: list, text_by_dataset: list[torch.Tensor], device, batch_size: int = 16,
             dist: Dist | None = None, bridge=None) -> dict:
    """Whole-vocabulary mIoU of each validation split on cached features (training resolution, view 0).

    A fast proxy for ``fusionseg evaluate`` (which works at the original resolution): datasets whose every
    pixel is a class use the arg-max, others the 0.5 threshold. Under torchrun each rank takes every
    world-th image and the confusion matrices are summed.
    """
    from .metrics import SemanticMeter, iou_from_confusion
    dist = dist or Dist()
    was_training = head.training
    head.eval()
    out = {}
    for (ds, cf), text in zip(val_sets, text_by_dataset):
        argmax = getattr(ds, "every_pixel_labelled", False)
        k = len(ds.class_names)
        meter = SemanticMeter(k + 1, ignore_index=IGNORE)
        mine = torch.arange(dist.rank, len(ds), dist.world)
        for s in range(0, len(mine), batch_size):
            rows = mine[s:s + batch_size]
            levels = [lv[rows, 0].to(device).float() for lv in cf.level_rows]
            masks = cf.mask_rows[rows, 0].to(device).long()
            prior = bridge.logits(levels, text) if bridge is not None else None
            lg = head(levels, text, tuple(masks.shape[-2:]), prior=prior)
            best, idx = lg.max(1)
            lab = idx + 1
            if not argmax:
                lab = torch.where(best.sigmoid() >= 0.5, lab, torch.zeros_like(lab))
            meter.update(lab.cpu(), masks.cpu())
        dist.sum_(meter.cm)
        per = [float(v) for v in iou_from_confusion(meter.cm)][1:]
        vals = [v for v in per if v == v]
        out[ds.name] = {"miou": round(float(np.mean(vals)), 4) if vals else None, "images": len(ds),
                        "per_class": {n: (round(v, 4) if v == v else None) for n, v in zip(ds.class_names, per)}}
    head.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------ loss and schedule
def bce_terms(logits: torch.Tensor, masks: torch.Tensor, known: torch.Tensor, classes: list[int], stride: int):
    """Per-class BCE as (sum over valid (pixel, class) pairs, their count). logits ``(B, N, h, w)``, masks
    ``(B, S, S)`` int16 global ids (-1 ignore), known ``(B, G)``; ``masks`` sampled every ``stride`` px."""
    m = masks[:, stride // 2::stride, stride // 2::stride].long()
    logits = F.interpolate(logits.float(), size=m.shape[-2:], mode="bilinear", align_corners=False)
    cls = torch.tensor(classes, device=m.device) + 1
    target = (m[:, None] == cls[None, :, None, None]).float()
    valid = (m >= 0)[:, None] & known[:, classes][:, :, None, None]
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (loss * valid).sum(), valid.sum()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine decay to 0 at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


# ------------------------------------------------------------------------------------------------ training
def _resolve_resume(cfg: TrainConfig) -> tuple[Path, bool]:
    """(run folder, whether to resume). ``resume`` may be True (continue OUT) or a run folder."""
    if isinstance(cfg.resume, str) and cfg.resume not in ("", "true", "false"):
        run = Path(cfg.resume)
        if not (run / STATE_FILE).is_file():
            raise ValueError(f"cannot resume {run}: it holds no {STATE_FILE} (not a training run folder, or no "
                             f"checkpoint was written yet)")
        return run, True
    return Path(cfg.out), bool(cfg.resume) and cfg.resume != "false"


def train(cfg: TrainConfig) -> Path:
    """Run a training job; returns the path of ``final.safetensors``. Works alone or under ``torchrun``."""
    from ..runtime import tune_malloc
    tune_malloc()  # CPU speed: the encoder's and head's large buffers reused from the heap
    dist, device = init_distributed(cfg.device)
    try:
        final = _train(cfg, dist, device)
        if dist.enabled:  # every rank done (rank 0 writes last) before the group is torn down: a rank that
            dist.barrier()  # tore down while its peer still worked aborted once in gloo ("terminate called")
        return final
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, dist: Dist, device: torch.device) -> Path:
    out, resume = _resolve_resume(cfg)
    if str(out) != cfg.out:
        cfg = dataclasses.replace(cfg, out=str(out))
    show = cfg.progress and dist.main
    say = (lambda *a: tqdm.write(" ".join(str(x) for x in a))) if show else (lambda *a: None)
    if cfg.batch_size % dist.world:
        raise ValueError(f"batch_size {cfg.batch_size} (the global batch) must be divisible by the {dist.world} "
                         f"torchrun processes")
    if cfg.steps < 1:
        raise ValueError("steps must be at least 1")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    state_path = out / STATE_FILE
    state = None
    if resume and state_path.is_file():
        state = load_state(state_path, "cpu")
        diffs = config_differences(state.get("config", {}), asdict(cfg))
        if diffs:
            raise ValueError(f"cannot resume {out}: it was trained with a different config: {'; '.join(diffs)} "
                             f"(use the same settings, or a new --out folder)")
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    datasets = open_datasets(cfg.data, cfg.fold)
    auto_excl = [n for ds in datasets for n in getattr(ds, "novel_names", [])]
    vocab, maps, unknown_excl = build_vocabulary(datasets, list(cfg.exclude_classes) + auto_excl)
    unknown_excl = [n for n in unknown_excl if n not in {normalize_name(a) for a in auto_excl}]
    if unknown_excl:
        say(f"warning: --exclude-classes names no dataset has: {', '.join(unknown_excl)}")
    if not vocab:
        raise DatasetError("no class is left to train on (every class is excluded)")
    splits = {}
    train_sets = []
    holdout = set(cfg.holdout)
    for ds in datasets:
        tr, va = split_ids([i for i in ds.ids if i not in holdout], cfg.val_fraction, cfg.seed)
        va = sorted(set(va) | (holdout & set(ds.ids)))
        splits[ds.name] = {"root": str(ds.root), "train": tr, "val": va}
        if tr:
            train_sets.append((ds, ds.subset(tr)))
    if not train_sets:
        raise DatasetError(f"no training images left in {', '.join(cfg.data)} after the validation split "
                           f"(val_fraction {cfg.val_fraction}) and the holdout; lower val_fraction or add images")
    maps = [maps[datasets.index(ds)] for ds, _ in train_sets]
    train_only = [t for _, t in train_sets]
    if dist.main:
        write_atomic(out / "splits.json", json.dumps(splits, indent=1).encode())
        if state is None:
            write_atomic(out / CONFIG_FILE, dump_config(cfg).encode())

    image_encoder = build_encoder_for_training(cfg.image_encoder, "image").to(device)
    ts_probe = FusionerConfig.from_preset(cfg.preset, image_encoder.strides, image_encoder.channels, 1)
    token_stride = ts_probe.token_stride
    multiple = int(getattr(image_encoder, "size_multiple", 32))
    scales = sorted(set(cfg.scales or default_scales(cfg.size, multiple)))
    for sc in [cfg.size] + scales:
        if sc % multiple or sc % token_stride:
            raise ValueError(f"training size and scales must be multiples of {max(multiple, token_stride)} px for "
                             f"{cfg.image_encoder} (its input grid and token stride), got {sc}")
    n_train = sum(len(t) for t in train_only)
    cache_kw = dict(cache_dir=cfg.cache_dir, device=device, progress=show, shard_size=cfg.shard_size,
                    rank=dist.rank, world_size=dist.world, barrier=dist.barrier)
    pools: list[_Pool] = []
    if cfg.cache:
        for sc in scales:
            feats, gmasks, known = None, [], []
            for d, ds in enumerate(train_only):
                cf = cache_features(ds, image_encoder, sc, 2, **cache_kw)
                say(f"{ds.name} at {sc} px: {len(ds)} images, features "
                    f"{'from cache' if cf.hit else f'computed for {cf.computed} here'} ({cf.path})")
                feats = [[lv] for lv in cf.level_rows] if feats is None else \
                    [f + [lv] for f, lv in zip(feats, cf.level_rows)]
                gmasks.append(cf.mask_rows.with_lut(_mask_lut(maps[d])))
                kn = torch.zeros(len(ds), len(vocab), dtype=torch.bool)
                kn[:, [g for g in maps[d] if g >= 0]] = True
                known.append(kn)
            pools.append(_Pool([RowTable.concat(f) for f in feats], RowTable.concat(gmasks), torch.cat(known), sc))
            del feats
    all_names = sorted({normalize_name(n) for ds in datasets for n in ds.class_names} | set(vocab))

    def text_embeddings():
        try:
            return cached_text_embeddings(all_names, cfg.templates, cfg.cache_dir, encoder_name=cfg.text_encoder)
        except EncoderError as e:
            raise with_offline_hint(e, cfg.text_encoder, "text") from None
    if dist.main:
        text_all, text_spec = text_embeddings()
    dist.barrier()
    if not dist.main:
        text_all, text_spec = text_embeddings()
    row = {n: i for i, n in enumerate(all_names)}
    text = text_all[[row[n] for n in vocab]].to(device)
    val_sets, val_text = [], []
    for ds in datasets:
        va = splits[ds.name]["val"]
        if va:
            vds = ds.subset(va)
            val_sets.append((vds, cache_features(vds, image_encoder, cfg.size, 2, **cache_kw)))
            val_text.append(text_all[[row[normalize_name(n)] for n in ds.class_names]].to(device))

    mcfg = FusionerConfig.from_preset(cfg.preset, image_encoder.strides, image_encoder.channels, text.shape[1],
                                      fusion=cfg.fusion, pos_embed=cfg.pos_embed, prior=cfg.bridge_prior)
    bridge = None
    if cfg.bridge_prior:
        from ..encoders.base import build_text_encoder
        from ..model.bridge import ClassifierBridge
        bridge = ClassifierBridge(image_encoder, build_text_encoder(cfg.text_encoder), cache_dir=cfg.cache_dir)
    head = FusionHead(mcfg).to(device)
    params = [p for p in head.parameters() if p.requires_grad]
    decay = [p for n, p in head.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in head.named_parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    start, bad_run, ema = 0, 0, None
    if state is not None:
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
        bad_run = int(state.get("bad_steps", 0))
        ema = state.get("ema")
        if "rng" in state:
            set_rng_states(state["rng"])
        say(f"resumed {out} from step {start}")
    elif resume:
        say(f"no {STATE_FILE} in {out}: starting from step 0")
    if start >= cfg.steps and (out / "final.safetensors").is_file():
        say(f"{out} already trained {start} steps (steps = {cfg.steps}); nothing to do")
        return out / "final.safetensors"

    n_params = sum(p.numel() for p in head.parameters())
    meta_base = {
        "templates": resolve_templates(cfg.templates), "image_size": cfg.size, "threshold": 0.5,
        "training": {"data": [str(d.root) for d in datasets], "vocabulary": vocab,
                     "excluded_classes": sorted({normalize_name(c) for c in list(cfg.exclude_classes) + auto_excl}),
                     "train_images": n_train, "config": asdict(cfg), "parameters": n_params,
                     "world_size": dist.world},
    }
    log_f = open(out / "log.jsonl", "a") if dist.main else None

    def log(row: dict) -> None:
        if log_f is not None:
            log_f.write(json.dumps(row) + "\n")
            log_f.flush()

    def checkpoint(path: Path, step: int) -> None:
        rep = validate(head, val_sets, val_text, device, dist=dist, bridge=bridge) if val_sets else None
        if not dist.main:
            return
        meta = json.loads(json.dumps(meta_base))
        meta["training"].update(steps=step, wall_seconds=round(time.time() - t_start, 1))
        if rep is not None:
            meta["training"]["validation"] = rep
            vals = {n: r["miou"] for n, r in rep.items()}
            good = [v for v in vals.values() if v is not None]
            log({"step": step, "val_miou": vals, "val_mean": round(float(np.mean(good)), 4) if good else None})
            say(f"step {step}: validation mIoU " + ", ".join(f"{n} {v:.3f}" for n, v in vals.items() if v is not None))
        write_checkpoint(path, head, image_encoder.spec, text_spec, meta)
        save_state(state_path, {"head": head.state_dict(), "opt": opt.state_dict(), "step": step,
                                "config": asdict(cfg), "rng": rng_states(), "bad_steps": bad_run, "ema": ema})
        try:
            plot_metrics(out / "log.jsonl", out / "metrics.png")
        except OSError as e:
            say(f"warning: could not draw {out / 'metrics.png'}: {e}")

    per_rank = cfg.batch_size // dist.world
    rows = range(dist.rank * per_rank, (dist.rank + 1) * per_rank)
    loader = None
    if not cfg.cache:
        data = _UncachedSteps(train_only, maps, len(vocab), scales, cfg, token_stride, image_encoder.mean,
                              image_encoder.std, rows)
        loader = iter(torch.utils.data.DataLoader(
            data, batch_size=None, sampler=range(start, cfg.steps), num_workers=cfg.workers,
            pin_memory=device.type == "cuda", persistent_workers=False,
            prefetch_factor=2 if cfg.workers else None))
    # under torchrun, DDP sums the ranks' gradients of sum/global count: the global batch's gradient
    model = wrap_for_training(head, dist, device, find_unused=cfg.bridge_prior)
    fwd = torch.compile(model) if cfg.compile else model
    use_amp = cfg.amp and device.type == "cuda"
    pin = device.type == "cuda"
    head.train()
    bar = tqdm(range(start, cfg.steps), desc="training", unit="step", disable=not show, dynamic_ncols=True,
               initial=start, total=cfg.steps)
    try:
        for step in bar:
            if cfg.cache:
                plan = make_step_plan(step, cfg, n_train, scales, token_stride)
                levels, masks, kn = gather_batch(pools[plan.scale], plan, rows, token_stride)
                if pin:
                    levels = [lv.pin_memory() for lv in levels]
                levels = [lv.to(device, non_blocking=True).float() for lv in levels]
            else:
                _, pixels, masks, kn = next(loader)
                with torch.no_grad():
                    levels = [lv.float() for lv in image_encoder(pixels.to(device, non_blocking=True))]
            masks, kn = masks.to(device, non_blocking=True), kn.to(device, non_blocking=True)
            # Classes: chosen from the whole global batch (presence is OR-ed over ranks).
            pres = torch.zeros(len(vocab) + 1, dtype=torch.int32, device=device)
            pres[masks[masks > 0].long()] = 1
            ann = kn.any(0).to(torch.int32)
            flags = dist.max_(torch.cat([pres[1:], ann]))
            present = torch.nonzero(flags[:len(vocab)]).flatten().tolist()
            annotated = torch.nonzero(flags[len(vocab):]).flatten().tolist()
            classes = choose_classes(present, annotated, step_rng(cfg.seed, step, "classes"), cfg.max_classes)
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            prior = unknown = None
            if bridge is not None:  # the bridge's map per class; name dropout gives some the unknown-name token
                with torch.no_grad():
                    prior = bridge.logits(levels, text[classes])
                names_rng = step_rng(cfg.seed, step, "names")
                unknown = torch.tensor([names_rng.random() < cfg.name_dropout for _ in classes], device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = fwd(levels, text[classes], prior=prior, unknown=unknown)
            s, c = bce_terms(logits, masks, kn, classes, cfg.loss_stride)
            count = dist.sum_(c.detach().float().clone()).clamp(min=1)
            loss = s / count
            opt.zero_grad(set_to_none=True)
            loss.backward()  # (DDP: the gradients are summed over the ranks here)
            total = dist.sum_(loss.detach().clone())
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad) if cfg.clip_grad > 0 else torch.zeros(())
            if not (torch.isfinite(total) and torch.isfinite(gnorm)):
                bad_run += 1
                opt.zero_grad(set_to_none=True)
                what = "loss" if not torch.isfinite(total) else "gradient"
                if show:
                    tqdm.write(f"warning: step {step}: non-finite {what} ({float(total):.4g}); step skipped "
                               f"({bad_run} in a row, stopping at {cfg.max_bad_steps})")
                log({"step": step, "skipped": what})
                if bad_run >= cfg.max_bad_steps:
                    raise TrainError(f"stopped at step {step}: {bad_run} non-finite losses in a row (max_bad_steps = "
                                     f"{cfg.max_bad_steps}); lower lr, check the data for empty/odd masks, or turn "
                                     f"amp off; the last good checkpoint is in {out}")
            else:
                bad_run = 0
                opt.step()
                lv = float(total)
                ema = lv if ema is None else 0.98 * ema + 0.02 * lv
            if show and ema is not None:
                bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr:.1e}")
            if ema is not None and (step % cfg.log_every == 0 or step == cfg.steps - 1):
                log({"step": step, "loss": round(ema, 5), "lr": lr, "t": round(time.time() - t_start, 1)})
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                checkpoint(out / f"step{step + 1}.safetensors", step + 1)
        bar.close()
        head.eval()
        final = out / "final.safetensors"
        checkpoint(final, cfg.steps)
    finally:
        if log_f is not None:
            log_f.close()
    if show:
        print(f"trained {cfg.steps} steps in {time.time() - t_start:.0f} s; checkpoint: {final}; "
              f"metrics: {out / 'log.jsonl'}, {out / 'metrics.png'}")
    return final
