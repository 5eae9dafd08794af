"""Training on cached frozen features: only the fusion module, decoder and head learn.

Several folder datasets are mixed in one run; class names are matched across them by their normalised
form. A class name is scored on an image only if that image's dataset annotates it (a COCO "person" is not
a negative on a Weizmann horse photo, whose dataset labels horses only).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.datasets import IGNORE, DatasetError, FolderDataset, normalize_name, split_ids
from ..data.features import cache_features, cached_text_embeddings
from ..encoders.base import build_image_encoder
from ..encoders.templates import resolve_templates
from ..model.checkpoint import save_checkpoint
from ..model.fusioner import DEFAULT_PRESET, FusionerConfig, FusionHead

DEFAULT_IMAGE_ENCODER = "efficientnet-lite0"
DEFAULT_TEXT_ENCODER = "minilm-l6"


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    image_encoder: str = DEFAULT_IMAGE_ENCODER
    text_encoder: str = DEFAULT_TEXT_ENCODER
    preset: str = DEFAULT_PRESET
    steps: int = 3000
    batch_size: int = 16
    lr: float = 4e-4
    weight_decay: float = 0.05
    warmup: int = 150
    size: int = 320
    scales: list[int] | None = None  # cached scales sampled per batch; default: 0.8x, 1x, 1.2x size (>= 160 px)
    max_classes: int = 24
    val_fraction: float = 0.15
    holdout: list[str] = field(default_factory=list)  # image ids always kept out of training
    exclude_classes: list[str] = field(default_factory=list)
    templates: str = "default"
    checkpoint_every: int = 1000
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # bf16 autocast on CUDA
    cache_dir: str | None = None
    loss_stride: int = 4
    fusion: bool = True
    pos_embed: str = "none"
    bridge_prior: bool = False  # the bridge's per-class map as a model input (model/prior.py)
    name_dropout: float = 0.5   # with bridge_prior: share of a batch's classes given the unknown-name token
    resume: bool = False
    progress: bool = True


class _Pool:
    """All cached training features in memory with masks re-indexed to the global vocabulary (int16, -1 ignore)."""

    def __init__(self, feats, masks_global: torch.Tensor, known: torch.Tensor, size: int):
        self.size = size               # images were resized (longer side) and padded to size x size
        self.levels = feats            # list of (N, V, C, h, w) fp16
        self.masks = masks_global      # (N, V, S, S) int16: -1 ignore, 0 none, g+1 = vocab[g]
        self.known = known             # (N, G) bool: which vocabulary names the image's dataset annotates


def build_vocabulary(datasets: Sequence[FolderDataset], exclude: Sequence[str] = ()) -> tuple[list[str], list[list[int]], list[str]]:
    """Global vocabulary (normalised names, first spelling kept) and, per dataset, local index -> global index
    (-1 for excluded). Returns (vocab, maps, excluded names that no dataset has)."""
    excl = {normalize_name(n) for n in exclude if n.strip()}
    vocab: list[str] = []
    index: dict[str, int] = {}
    maps = []
    seen_excl = set()
    for ds in datasets:
        m = []
        for name in ds.class_names:
            key = normalize_name(name)
            if key in excl:
                seen_excl.add(key)
                m.append(-1)
                continue
            if key not in index:
                index[key] = len(vocab)
                vocab.append(key)
            m.append(index[key])
        maps.append(m)
    return vocab, maps, sorted(excl - seen_excl)


def _global_masks(local: torch.Tensor, lmap: list[int]) -> torch.Tensor:
    lut = torch.full((256,), -1, dtype=torch.int16)
    lut[0] = 0
    for k, g in enumerate(lmap, start=1):
        lut[k] = g + 1 if g >= 0 else -1  # excluded classes become ignore
    return lut[local.long()]


def default_scales(size: int) -> list[int]:
    """0.8x, 1x and 1.2x the training size on the 32-px grid (just ``size`` below 160 px)."""
    if size < 160:
        return [size]
    return sorted({int(size * 0.8) // 32 * 32, size, -(-int(size * 1.2) // 32) * 32})


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def sample_batch(pool: _Pool, cfg: TrainConfig, rng: random.Random, token_stride: int):
    """Random images, views and a random crop of the token grid (crop size varies per batch, at most the
    training size's grid, so larger scales give zoomed-in crops)."""
    n, views = pool.masks.shape[:2]
    grid = pool.size // token_stride
    top = min(grid, max(2, cfg.size // token_stride))
    k = rng.randint(max(2, int(top * 0.7)), top)
    idx = [rng.randrange(n) for _ in range(cfg.batch_size)]
    vis = [rng.randrange(views) for _ in idx]
    offs = [(rng.randint(0, grid - k), rng.randint(0, grid - k)) for _ in idx]
    out_levels = []
    for lv in pool.levels:
        f = lv.shape[-1] // grid  # cells of this level per token
        crops = [lv[i, v, :, oy * f:(oy + k) * f, ox * f:(ox + k) * f] for i, v, (oy, ox) in zip(idx, vis, offs)]
        out_levels.append(torch.stack(crops))
    px = token_stride
    masks = torch.stack([pool.masks[i, v, oy * px:(oy + k) * px, ox * px:(ox + k) * px] for i, v, (oy, ox) in zip(idx, vis, offs)])
    known = pool.known[idx]
    # Classes: every one present in the batch, then negatives the batch's datasets annotate, up to max_classes.
    present = (torch.unique(masks[masks > 0]).long() - 1).tolist()
    rng.shuffle(present)
    chosen = present[: cfg.max_classes]
    taken = set(chosen)
    rest = [c for c in torch.nonzero(known.any(0)).flatten().tolist() if c not in taken]
    rng.shuffle(rest)
    chosen += rest[: max(0, cfg.max_classes - len(chosen))]
    return out_levels, masks, known, chosen


def bce_loss(logits: torch.Tensor, masks: torch.Tensor, known: torch.Tensor, classes: list[int], stride: int) -> torch.Tensor:
    """Per-class BCE. logits ``(B, N, h, w)``, masks ``(B, S, S)`` int16 global ids (-1 ignore), known ``(B, G)``."""
    m = masks[:, stride // 2::stride, stride // 2::stride].long()
    logits = F.interpolate(logits.float(), size=m.shape[-2:], mode="bilinear", align_corners=False)
    cls = torch.tensor(classes, device=m.device) + 1
    target = (m[:, None] == cls[None, :, None, None]).float()
    valid = (m >= 0)[:, None] & known[:, classes][:, :, None, None]
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (loss * valid).sum() / valid.sum().clamp(min=1)


@torch.no_grad()
def validate(head: FusionHead, val_sets: list, text_by_dataset: list[torch.Tensor], device, batch_size: int = 16,
             bridge=None) -> dict:
    """Whole-vocabulary mIoU of each validation split on cached features (training resolution, view 0).

    A fast proxy for ``fusionseg evaluate`` (which works at the original resolution): datasets whose every
    pixel is a class use the arg-max, others the 0.5 threshold.
    """
    from .metrics import SemanticMeter
    was_training = head.training
    head.eval()
    out = {}
    for (ds, cf), text in zip(val_sets, text_by_dataset):
        argmax = ds.every_pixel_labelled
        k = len(ds.class_names)
        meter = SemanticMeter(k + 1, ignore_index=IGNORE)
        for s in range(0, len(ds), batch_size):
            levels = [lv[s:s + batch_size, 0].to(device).float() for lv in cf.levels]
            masks = cf.masks[s:s + batch_size, 0].to(device).long()
            prior = bridge.logits(levels, text) if bridge is not None else None
            lg = head(levels, text, tuple(masks.shape[-2:]), prior=prior)
            best, idx = lg.max(1)
            lab = idx + 1
            if not argmax:
                lab = torch.where(best.sigmoid() >= 0.5, lab, torch.zeros_like(lab))
            meter.update(lab.cpu(), masks.cpu())
        r = meter.compute()
        per = [float(v) for v in r["per_class_iou"]][1:]
        vals = [v for v in per if v == v]
        out[ds.name] = {"miou": round(float(np.mean(vals)), 4) if vals else None, "images": len(ds),
                        "per_class": {n: (round(v, 4) if v == v else None) for n, v in zip(ds.class_names, per)}}
    head.train(was_training)
    return out


def open_datasets(paths: Sequence[str]) -> list[FolderDataset]:
    if not paths:
        raise DatasetError("give at least one --data folder")
    return [FolderDataset(p) for p in paths]


def train(cfg: TrainConfig) -> Path:
    """Run a training job; returns the path of ``final.safetensors``."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    t_start = time.time()

    datasets = open_datasets(cfg.data)
    vocab, maps, unknown_excl = build_vocabulary(datasets, cfg.exclude_classes)
    if unknown_excl:
        print(f"warning: --exclude-classes names no dataset has: {', '.join(unknown_excl)}")
    splits = {}
    train_sets = []
    holdout = set(cfg.holdout)
    for ds in datasets:
        tr, va = split_ids([i for i in ds.ids if i not in holdout], cfg.val_fraction, cfg.seed)
        va = sorted(set(va) | (holdout & set(ds.ids)))
        splits[ds.name] = {"root": str(ds.root), "train": tr, "val": va}
        train_sets.append(ds.subset(tr))
    (out / "splits.json").write_text(json.dumps(splits, indent=1))

    image_encoder = build_image_encoder(cfg.image_encoder)

    scales = sorted(set(cfg.scales or default_scales(cfg.size)))
    for sc in scales:
        if sc % 32:
            raise ValueError(f"training scales must be multiples of 32, got {sc}")
    pools = []
    for sc in scales:
        feats, gmasks, known = None, [], []
        for d, ds in enumerate(train_sets):
            cf = cache_features(ds, image_encoder, sc, 2, cfg.cache_dir, device=device, progress=cfg.progress)
            if cfg.progress:
                print(f"{ds.name} at {sc} px: {len(ds)} images, features {'from cache' if cf.hit else 'computed'} ({cf.path})")
            feats = [[lv] for lv in cf.levels] if feats is None else [f + [lv] for f, lv in zip(feats, cf.levels)]
            gmasks.append(_global_masks(cf.masks, maps[d]))
            kn = torch.zeros(len(ds), len(vocab), dtype=torch.bool)
            kn[:, [g for g in maps[d] if g >= 0]] = True
            known.append(kn)
        pools.append(_Pool([torch.cat(f) for f in feats], torch.cat(gmasks), torch.cat(known), sc))
        del feats
    all_names = sorted({normalize_name(n) for ds in datasets for n in ds.class_names} | set(vocab))
    text_all, text_spec = cached_text_embeddings(all_names, cfg.templates, cfg.cache_dir, encoder_name=cfg.text_encoder)
    row = {n: i for i, n in enumerate(all_names)}
    text = text_all[[row[n] for n in vocab]].to(device)
    val_sets, val_text = [], []
    for ds in datasets:
        va = splits[ds.name]["val"]
        if va:
            vds = ds.subset(va)
            val_sets.append((vds, cache_features(vds, image_encoder, cfg.size, 1, cfg.cache_dir, device=device,
                                                 progress=cfg.progress)))
            val_text.append(text_all[[row[normalize_name(n)] for n in ds.class_names]].to(device))

    mcfg = FusionerConfig.from_preset(cfg.preset, image_encoder.strides, image_encoder.channels, text.shape[1],
                                      fusion=cfg.fusion, pos_embed=cfg.pos_embed, prior=cfg.bridge_prior)
    bridge = None
    if cfg.bridge_prior:
        from ..encoders.base import build_text_encoder
        from ..model.bridge import ClassifierBridge
        bridge = ClassifierBridge(image_encoder, build_text_encoder(cfg.text_encoder), cache_dir=cfg.cache_dir)
    head = FusionHead(mcfg).to(device)
    decay = [p for n, p in head.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in head.named_parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    start = 0
    state_path = out / "state.pt"
    if cfg.resume and state_path.is_file():
        st = torch.load(state_path, map_location=device)
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        start = st["step"]
        rng.setstate(st["rng"])
        print(f"resumed from step {start}")

    n_params = sum(p.numel() for p in head.parameters())
    meta_base = {
        "templates": resolve_templates(cfg.templates), "image_size": cfg.size, "threshold": 0.5,
        "training": {"data": [str(d.root) for d in datasets], "vocabulary": vocab,
                     "excluded_classes": sorted(normalize_name(c) for c in cfg.exclude_classes),
                     "train_images": sum(len(d) for d in train_sets), "config": asdict(cfg), "parameters": n_params},
    }

    def checkpoint(path: Path, step: int) -> None:
        meta = json.loads(json.dumps(meta_base))
        meta["training"].update(steps=step, wall_seconds=round(time.time() - t_start, 1))
        if val_sets:
            rep = validate(head, val_sets, val_text, device, bridge=bridge)
            meta["training"]["validation"] = rep
            msg = ", ".join(f"{n} {r['miou']:.3f}" for n, r in rep.items() if r["miou"] is not None)
            tqdm.write(f"step {step}: validation mIoU {msg}")
        save_checkpoint(path, head, image_encoder.spec, text_spec, meta)
        torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "step": step, "rng": rng.getstate()}, state_path)

    use_amp = cfg.amp and device.type == "cuda"
    head.train()
    bar = tqdm(range(start, cfg.steps), desc="training", unit="step", disable=not cfg.progress, dynamic_ncols=True,
               initial=start, total=cfg.steps)
    ema = None
    log = open(out / "log.jsonl", "a")
    for step in bar:
        levels, masks, kn, classes = sample_batch(rng.choice(pools), cfg, rng, mcfg.token_stride)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        levels = [lv.to(device, non_blocking=True).float() for lv in levels]
        masks, kn = masks.to(device), kn.to(device)
        prior = unknown = None
        if bridge is not None:
            with torch.no_grad():
                prior = bridge.logits(levels, text[classes])
            unknown = torch.tensor([rng.random() < cfg.name_dropout for _ in classes], device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = head(levels, text[classes], prior=prior, unknown=unknown)
        loss = bce_loss(logits, masks, kn, classes, cfg.loss_stride)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
        if step % 50 == 0 or step == cfg.steps - 1:
            log.write(json.dumps({"step": step, "loss": round(ema, 5), "t": round(time.time() - t_start, 1)}) + "\n")
            log.flush()
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            checkpoint(out / f"step{step + 1}.safetensors", step + 1)
    bar.close()
    log.close()
    head.eval()
    final = out / "final.safetensors"
    checkpoint(final, cfg.steps)
    if cfg.progress:
        print(f"trained {cfg.steps} steps in {time.time() - t_start:.0f} s; checkpoint: {final}")
    return final
