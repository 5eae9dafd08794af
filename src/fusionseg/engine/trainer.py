"""One training run as an object: :class:`Trainer` builds what the run needs (data, frozen features, text
embeddings, the trainable head and its optimiser, the resumed state) in ``__init__`` and keeps it in
attributes; :meth:`Trainer.run` takes the steps, validates and writes the checkpoints.

Only the fusion module, decoder and head learn. Several datasets are mixed in one run (folder datasets, or the
train split of a PASCAL-5i / COCO-20i fold); class names are matched across them by their normalised form. A
class name is scored on an image only if that image's dataset annotates it (a COCO "person" is not a negative
on a Weizmann horse photo).

Augmentation: horizontal flips are cached views (``views = 2``); scale jitter is one cache store per training
scale (``scales``); random crops are taken on the cached token grid and the mask together. So augmentation
stays real with the cache; the no-cache path takes the same crops in pixel space and encodes them.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.datasets import IGNORE, DatasetError, normalize_name, split_ids
from .._atomic import write_atomic
from ..data.features import RowTable, cache_features, cached_text_embeddings
from ..encoders.base import EncoderError
from ..encoders.templates import resolve_templates
from ..model.fusioner import FusionerConfig, FusionHead
from .config import COPY_PASTE_NEEDS_NO_CACHE, TrainConfig, config_differences, dump_config
from .distributed import Dist, wrap_for_training
from .encoders import build_encoder_for_training, with_offline_hint
from .metrics import SemanticMeter, semantic_scores
from .plots import plot_metrics
from .sampling import (BenchmarkSplit, dataset_synonyms, image_names, name_support, repeat_factors, _mask_lut, _Pool,
                       _UncachedSteps, build_vocabulary, choose_classes, default_scales, gather_batch, make_step_plan,
                       open_datasets, step_rng)
from .state import (CONFIG_FILE, STATE_FILE, load_state, rng_states, save_state, set_rng_states,
                    write_checkpoint)


class TrainError(RuntimeError):
    """A run that cannot go on (non-finite losses, a checkpoint that cannot be written): says why and what to do."""


# ------------------------------------------------------------------------------------------------ loss and schedule
def bce_terms(logits: torch.Tensor, masks: torch.Tensor, known: torch.Tensor, classes: list[int], stride: int,
              sampled: tuple | None = None):
    """Per-class BCE as (sum over valid (pixel, class) pairs, their count). logits ``(B, N, h, w)``, masks
    ``(B, S, S)`` int16 global ids (-1 ignore), known ``(B, G)``; ``masks`` sampled every ``stride`` px.
    ``sampled``: :func:`sampled_targets` of the same arguments, made once when two terms are summed."""
    logits, target, valid = sampled or sampled_targets(logits, masks, known, classes, stride)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (loss * valid).sum(), valid.sum()


def sampled_targets(logits: torch.Tensor, masks: torch.Tensor, known: torch.Tensor, classes: list[int], stride: int):
    """``(logits, target, valid)`` on the grid of every ``stride``-th mask pixel, each ``(B, N, h, w)``."""
    m = masks[:, stride // 2::stride, stride // 2::stride].long()
    logits = F.interpolate(logits.float(), size=m.shape[-2:], mode="bilinear", align_corners=False)
    cls = torch.tensor(classes, device=m.device) + 1
    target = (m[:, None] == cls[None, :, None, None]).float()
    valid = (m >= 0)[:, None] & known[:, classes][:, :, None, None]
    return logits, target, valid


def focal_terms(logits: torch.Tensor, masks: torch.Tensor, known: torch.Tensor, classes: list[int], stride: int,
                gamma: float = 2.0, sampled: tuple | None = None):
    """Per-class focal loss (BCE weighted by ``(1 - p_t) ** gamma``) as (sum, count), like :func:`bce_terms`."""
    x, t, valid = sampled or sampled_targets(logits, masks, known, classes, stride)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = torch.exp(-bce)  # the probability given to the true label
    return (bce * (1 - p_t) ** gamma * valid).sum(), valid.sum()


def dice_terms(logits: torch.Tensor, masks: torch.Tensor, known: torch.Tensor, classes: list[int], stride: int,
               sampled: tuple | None = None):
    """Soft dice loss ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)`` over the valid pixels of each (image, class)
    pair whose class the image shows, as (sum over those pairs, their count). Only shown classes: the absent
    ones are BCE's job (a dice term on an empty target only pushes the whole map down)."""
    x, t, valid = sampled or sampled_targets(logits, masks, known, classes, stride)
    p = torch.sigmoid(x) * valid
    t = t * valid
    inter, ps, ts = (p * t).sum((2, 3)), p.sum((2, 3)), t.sum((2, 3))
    shown = ts > 0
    dice = 1 - (2 * inter + 1) / (ps + ts + 1)
    return (dice * shown).sum(), shown.sum()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine decay to 0 at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


# ------------------------------------------------------------------------------------------------ validation
@torch.no_grad()
def validate(head: FusionHead, val_sets: list, text_by_dataset: list[torch.Tensor], device, batch_size: int = 16,
             dist: Dist | None = None, bridge=None) -> dict:
    """Whole-vocabulary mIoU of each validation split on cached features (training resolution, view 0), as
    :func:`~fusionseg.engine.metrics.semantic_scores` reports it for ``fusionseg evaluate``.

    A fast proxy for ``fusionseg evaluate`` (which works at the original resolution): datasets whose every
    pixel is a class use the arg-max, others the 0.5 threshold. Under torchrun each rank takes every
    world-th image and the confusion matrices are summed.
    """
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
        r = semantic_scores(meter.cm, ds.class_names)  # the report `fusionseg evaluate` gives
        out[ds.name] = {"miou": r["miou"], "images": len(ds), "per_class": r["per_class"]}
    head.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------ the run
def resolve_resume(cfg: TrainConfig) -> tuple[Path, bool]:
    """(run folder, whether to resume). ``resume`` may be True (continue OUT) or a run folder."""
    if isinstance(cfg.resume, str) and cfg.resume not in ("", "true", "false"):
        run = Path(cfg.resume)
        if not (run / STATE_FILE).is_file():
            raise ValueError(f"cannot resume {run}: it holds no {STATE_FILE} (not a training run folder, or no "
                             f"checkpoint was written yet)")
        return run, True
    return Path(cfg.out), bool(cfg.resume) and cfg.resume != "false"


def init_from(head: FusionHead, spec: str) -> None:
    """Load a checkpoint's trained weights into ``head`` (same encoders' shapes and preset), for fine-tuning.

    A plain checkpoint may start a ``--bridge-prior`` head: the parts only that head has (:data:`PRIOR_ONLY`: the
    unknown-name token and the prior refiner, whose last layers start at zero) keep their fresh initialisation,
    so the fine-tune starts from the checkpoint's own predictions."""
    from ..model.checkpoint import load_model
    model, _ = load_model(spec, "cpu")
    src, dst = model.head.state_dict(), head.state_dict()
    fresh = [k for k in dst if k not in src and k.startswith(PRIOR_ONLY)]
    bad = [k for k in dst if k not in fresh and (k not in src or src[k].shape != dst[k].shape)] + \
        [k for k in src if k not in dst]
    if bad:
        raise TrainError(f"--init {spec}: its weights do not fit this model ({bad[0]}); use the same encoders and preset")
    head.load_state_dict({**{k: dst[k] for k in fresh}, **{k: v.float() for k, v in src.items()}})


#: State-dict keys of the parts a ``--bridge-prior`` head adds to a plain one.
PRIOR_ONLY = ("unknown_token", "prior_refine.")


class Trainer:
    """One run of ``cfg`` in this process (rank ``dist.rank`` of ``dist.world``) on ``device``.

    ``__init__`` checks the config, opens the data and writes ``splits.json`` / ``config.toml``, fills the
    feature and text caches, builds the head and its optimiser and restores ``state.pt`` when resuming (the
    order of these steps is the order the random generators are drawn in, which resume and torchrun runs
    reproduce). :meth:`run` trains from :attr:`start` to ``cfg.steps`` and returns ``final.safetensors``.
    """

    def __init__(self, cfg: TrainConfig, dist: Dist | None = None, device: torch.device | str = "cpu"):
        self.dist = dist = dist or Dist()
        self.device = device = torch.device(device)
        self.out, resume = resolve_resume(cfg)
        if str(self.out) != cfg.out:
            cfg = dataclasses.replace(cfg, out=str(self.out))
        self.cfg = cfg
        self.show = cfg.progress and dist.main
        if cfg.batch_size % dist.world:
            raise ValueError(f"batch_size {cfg.batch_size} (the global batch) must be divisible by the {dist.world} "
                             f"torchrun processes")
        if cfg.steps < 1:
            raise ValueError("steps must be at least 1")
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)
        self.state_path = self.out / STATE_FILE
        state = None
        if resume and self.state_path.is_file():
            state = load_state(self.state_path, "cpu")
            diffs = config_differences(state.get("config", {}), asdict(cfg))
            if diffs:
                raise ValueError(f"cannot resume {self.out}: it was trained with a different config: "
                                 f"{'; '.join(diffs)} (use the same settings, or a new --out folder)")
        if dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.t_start = time.time()
        self._open_data(write_config=state is None)
        self._build_features()
        self._embed_names()
        self._build_model()
        self.start, self.bad_run, self.ema = 0, 0, None
        if cfg.init and state is None:
            init_from(self.head, cfg.init)
            self.say(f"initialised the trained weights from {cfg.init}")
        if state is not None:
            self.head.load_state_dict(state["head"])
            self.opt.load_state_dict(state["opt"])
            self.start = int(state["step"])
            self.bad_run = int(state.get("bad_steps", 0))
            self.ema = state.get("ema")
            if "rng" in state:
                set_rng_states(state["rng"])
            self.say(f"resumed {self.out} from step {self.start}")
        elif resume:
            self.say(f"no {STATE_FILE} in {self.out}: starting from step 0")
        self.log_f = None

    # -------------------------------------------------------------------------------------------- setting up
    def say(self, *a) -> None:
        if self.show:
            tqdm.write(" ".join(str(x) for x in a))

    def _open_data(self, write_config: bool) -> None:
        """Datasets, the global vocabulary, the train/validation split of every dataset."""
        cfg = self.cfg
        self.datasets = datasets = open_datasets(cfg.data, cfg.fold)
        if cfg.fold is not None and not any(isinstance(ds, BenchmarkSplit) for ds in datasets):
            self.say(f"warning: fold {cfg.fold} applies to pascal5i:ROOT and coco20i:ROOT data only; none is given, "
                     "so it changes nothing (--exclude-classes holds names out of folder datasets)")
        self.auto_excluded = [n for ds in datasets for n in getattr(ds, "novel_names", [])]
        self.vocab, maps, unknown_excl = build_vocabulary(datasets, list(cfg.exclude_classes) + self.auto_excluded)
        unknown_excl = [n for n in unknown_excl if n not in {normalize_name(a) for a in self.auto_excluded}]
        if unknown_excl:
            self.say(f"warning: --exclude-classes names no dataset has: {', '.join(unknown_excl)}")
        if not self.vocab:
            raise DatasetError("no class is left to train on (every class is excluded)")
        self.splits = {}
        train_sets = []
        holdout = set(cfg.holdout)
        for ds in datasets:
            tr, va = split_ids([i for i in ds.ids if i not in holdout], cfg.val_fraction, cfg.seed)
            va = sorted(set(va) | (holdout & set(ds.ids)))
            self.splits[ds.name] = {"root": str(ds.root), "train": tr, "val": va}
            if tr:
                train_sets.append((ds, ds.subset(tr)))
        unknown_ids = sorted(holdout - {i for ds in datasets for i in ds.ids})
        if unknown_ids:  # a typo would otherwise train on the image it meant to keep out, without a word
            self.say(f"warning: --holdout names no image of the data: {', '.join(unknown_ids)}")
        if not train_sets:
            raise DatasetError(f"no training images left in {', '.join(cfg.data)} after the validation split "
                               f"(val_fraction {cfg.val_fraction}) and the holdout; lower val_fraction or add images")
        self.maps = [maps[datasets.index(ds)] for ds, _ in train_sets]  # per training set: local -> global id
        self.train_sets = [t for _, t in train_sets]
        self.n_train = sum(len(t) for t in self.train_sets)
        self.shown = shown = image_names(self.train_sets, self.maps)
        self.support = name_support(self.train_sets, self.maps, len(self.vocab), shown)
        self.cum_weights = None  # uniform image sampling
        if cfg.repeat_factor > 0:
            if shown is None:
                raise ValueError("--repeat-factor needs training sets whose masks can be read by image id")
            w = repeat_factors(shown, cfg.repeat_factor)
            self.cum_weights = list(itertools.accumulate(w))
            self.say(f"repeat-factor sampling (threshold {cfg.repeat_factor}): {sum(x > 1 for x in w)} of {len(w)} "
                     f"images drawn more often, up to {max(w):.1f}x")
        if self.dist.main:
            write_atomic(self.out / "splits.json", json.dumps(self.splits, indent=1).encode())
            if write_config:
                write_atomic(self.out / CONFIG_FILE, dump_config(cfg).encode())

    def _build_features(self) -> None:
        """The frozen image encoder, the training scales and (with the cache) one feature pool per scale."""
        cfg, dist = self.cfg, self.dist
        self.image_encoder = enc = build_encoder_for_training(cfg.image_encoder, "image").to(self.device)
        self.token_stride = FusionerConfig.from_preset(cfg.preset, enc.strides, enc.channels, 1).token_stride
        multiple = int(getattr(enc, "size_multiple", 32))
        self.scales = sorted(set(cfg.scales or default_scales(cfg.size, multiple)))
        if cfg.copy_paste > 0 and cfg.cache:
            raise ValueError(COPY_PASTE_NEEDS_NO_CACHE)
        for sc in [cfg.size] + self.scales:
            if sc % multiple or sc % self.token_stride:
                raise ValueError(f"training size and scales must be multiples of {max(multiple, self.token_stride)} "
                                 f"px for {cfg.image_encoder} (its input grid and token stride), got {sc}")
        self.cache_kw = dict(cache_dir=cfg.cache_dir, device=self.device, progress=self.show,
                             shard_size=cfg.shard_size, rank=dist.rank, world_size=dist.world, barrier=dist.barrier)
        self.pools: list[_Pool] = []
        if not cfg.cache:
            return
        for sc in self.scales:
            feats, gmasks, known = None, [], []
            for d, ds in enumerate(self.train_sets):
                cf = cache_features(ds, enc, sc, 2, **self.cache_kw)
                self.say(f"{ds.name} at {sc} px: {len(ds)} images, features "
                         f"{'from cache' if cf.hit else f'computed for {cf.computed} here'} ({cf.path})")
                feats = [[lv] for lv in cf.level_rows] if feats is None else \
                    [f + [lv] for f, lv in zip(feats, cf.level_rows)]
                gmasks.append(cf.mask_rows.with_lut(_mask_lut(self.maps[d])))
                kn = torch.zeros(len(ds), len(self.vocab), dtype=torch.bool)
                kn[:, [g for g in self.maps[d] if g >= 0]] = True
                known.append(kn)
            self.pools.append(_Pool([RowTable.concat(f) for f in feats], RowTable.concat(gmasks), torch.cat(known),
                                    sc))
            del feats

    def _text_embeddings(self, names: list[str]):
        try:
            return cached_text_embeddings(names, self.cfg.templates, self.cfg.cache_dir,
                                          encoder_name=self.cfg.text_encoder)
        except EncoderError as e:
            raise with_offline_hint(e, self.cfg.text_encoder, "text") from None

    def _embed_names(self) -> None:
        """Text embeddings of the vocabulary (:attr:`text`) and of each validation set's names, and the
        validation sets' cached features at the training size (view 0 is read)."""
        all_names = sorted({normalize_name(n) for ds in self.datasets for n in ds.class_names} | set(self.vocab))
        vocab_syn: dict[int, list[str]] = {}  # vocabulary id -> other words for it (text augmentation)
        if self.cfg.synonym_rate > 0:
            vid = {n: i for i, n in enumerate(self.vocab)}
            for ds in self.datasets:
                for name, words in zip(ds.class_names, dataset_synonyms(ds) or []):
                    g = vid.get(normalize_name(name))
                    extra = [w for w in dict.fromkeys(normalize_name(w) for w in words) if w != normalize_name(name)]
                    if g is not None and extra:
                        have = vocab_syn.setdefault(g, [])
                        have += [w for w in extra if w not in have]
            all_names = sorted(set(all_names) | {w for ws in vocab_syn.values() for w in ws})
        if self.dist.main:  # rank 0 fills the text cache; the others read it
            text_all, self.text_spec = self._text_embeddings(all_names)
        self.dist.barrier()
        if not self.dist.main:
            text_all, self.text_spec = self._text_embeddings(all_names)
        row = {n: i for i, n in enumerate(all_names)}
        self.text = text_all[[row[n] for n in self.vocab]].to(self.device)
        self.text_all = text_all
        self.synonym_rows = {g: [row[w] for w in ws] for g, ws in vocab_syn.items()}
        self.val_sets, self.val_text = [], []
        for ds in self.datasets:
            va = self.splits[ds.name]["val"]
            if va:
                vds = ds.subset(va)
                self.val_sets.append((vds, cache_features(vds, self.image_encoder, self.cfg.size, 2, **self.cache_kw)))
                self.val_text.append(text_all[[row[normalize_name(n)] for n in ds.class_names]].to(self.device))

    def _build_model(self) -> None:
        """The trainable head, the bridge (``bridge_prior``) and AdamW (weight decay on matrices and kernels)."""
        cfg, enc = self.cfg, self.image_encoder
        mcfg = FusionerConfig.from_preset(cfg.preset, enc.strides, enc.channels, self.text.shape[1],
                                          fusion=cfg.fusion, pos_embed=cfg.pos_embed, prior=cfg.bridge_prior)
        self.bridge = None
        if cfg.bridge_prior:
            from ..encoders.base import build_text_encoder
            from ..textcache import build_bridge
            self.bridge = build_bridge(enc, build_text_encoder(cfg.text_encoder), cache_dir=cfg.cache_dir)
        self.head = head = FusionHead(mcfg).to(self.device)
        self.params = [p for p in head.parameters() if p.requires_grad]
        decay = [p for n, p in head.named_parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for n, p in head.named_parameters() if p.requires_grad and p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)

    def _meta(self) -> dict:
        """The checkpoint metadata every checkpoint of this run shares."""
        cfg = self.cfg
        return {
            "templates": resolve_templates(cfg.templates), "image_size": cfg.size, "threshold": 0.5,
            "training": {"data": [str(d.root) for d in self.datasets], "vocabulary": self.vocab,
                         "name_images": dict(zip(self.vocab, self.support)) if self.support else None,
                         "excluded_classes": sorted({normalize_name(c)
                                                     for c in list(cfg.exclude_classes) + self.auto_excluded}),
                         "train_images": self.n_train, "config": asdict(cfg),
                         "parameters": sum(p.numel() for p in self.head.parameters()), "world_size": self.dist.world},
        }

    # -------------------------------------------------------------------------------------------- running
    def log(self, row: dict) -> None:
        """One line of ``log.jsonl`` (rank 0)."""
        if self.log_f is not None:
            self.log_f.write(json.dumps(row) + "\n")
            self.log_f.flush()

    def checkpoint(self, path: Path, step: int) -> None:
        """Validate (every rank), then on rank 0 write the checkpoint, ``state.pt`` and ``metrics.png``."""
        rep = validate(self.head, self.val_sets, self.val_text, self.device, dist=self.dist,
                       bridge=self.bridge) if self.val_sets else None
        if not self.dist.main:
            return
        meta = json.loads(json.dumps(self.meta_base))
        meta["training"].update(steps=step, wall_seconds=round(time.time() - self.t_start, 1))
        if rep is not None:
            meta["training"]["validation"] = rep
            vals = {n: r["miou"] for n, r in rep.items()}
            good = [v for v in vals.values() if v is not None]
            self.log({"step": step, "val_miou": vals, "val_mean": round(float(np.mean(good)), 4) if good else None})
            self.say(f"step {step}: validation mIoU " + ", ".join(f"{n} {v:.3f}" for n, v in vals.items()
                                                                   if v is not None))
        write_checkpoint(path, self.head, self.image_encoder.spec, self.text_spec, meta)
        save_state(self.state_path, {"head": self.head.state_dict(), "opt": self.opt.state_dict(), "step": step,
                                     "config": asdict(self.cfg), "rng": rng_states(), "bad_steps": self.bad_run,
                                     "ema": self.ema})
        try:
            plot_metrics(self.out / "log.jsonl", self.out / "metrics.png")
        except OSError as e:
            self.say(f"warning: could not draw {self.out / 'metrics.png'}: {e}")

    def _batch(self, step: int):
        """This rank's rows of step ``step``'s batch on the device: (levels, masks, known)."""
        if self.cfg.cache:
            plan = make_step_plan(step, self.cfg, self.n_train, self.scales, self.token_stride, self.cum_weights)
            levels, masks, kn = gather_batch(self.pools[plan.scale], plan, self.rows, self.token_stride)
            if self.device.type == "cuda":
                levels = [lv.pin_memory() for lv in levels]
            levels = [lv.to(self.device, non_blocking=True).float() for lv in levels]
        else:
            _, pixels, masks, kn = next(self.loader)
            with torch.no_grad():
                levels = [lv.float() for lv in self.image_encoder(pixels.to(self.device, non_blocking=True))]
        return levels, masks.to(self.device, non_blocking=True), kn.to(self.device, non_blocking=True)

    def _classes(self, step: int, masks: torch.Tensor, kn: torch.Tensor) -> list[int]:
        """The step's class names, chosen from the whole global batch (presence is OR-ed over ranks)."""
        n = len(self.vocab)
        pres = torch.zeros(n + 1, dtype=torch.int32, device=self.device)
        pres[masks[masks > 0].long()] = 1
        ann = kn.any(0).to(torch.int32)
        flags = self.dist.max_(torch.cat([pres[1:], ann]))
        present = torch.nonzero(flags[:n]).flatten().tolist()
        annotated = torch.nonzero(flags[n:]).flatten().tolist()
        return choose_classes(present, annotated, step_rng(self.cfg.seed, step, "classes"), self.cfg.max_classes)

    def _class_text(self, step: int, classes: list[int]):
        """The chosen classes' text embeddings; with ``synonym_rate``, some classes named by one of their synonyms."""
        tc = self.text[classes]
        if not self.synonym_rows:
            return tc
        rng = step_rng(self.cfg.seed, step, "synonyms")
        swap = [(j, g) for j, g in enumerate(classes) if g in self.synonym_rows and rng.random() < self.cfg.synonym_rate]
        if swap:
            tc = tc.clone()
            for j, g in swap:
                rows = self.synonym_rows[g]
                tc[j] = self.text_all[rows[rng.randrange(len(rows))]].to(tc.device)
        return tc

    def step(self, step: int) -> float:
        """One optimisation step (skipped when the loss or gradient is not finite); returns its learning rate."""
        cfg, dist, opt = self.cfg, self.dist, self.opt
        levels, masks, kn = self._batch(step)
        classes = self._classes(step, masks, kn)
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        prior = unknown = None
        if self.bridge is not None:  # the bridge's map per class; name dropout gives some the unknown-name token
            with torch.no_grad():
                prior = self.bridge.logits(levels, self.text[classes])
            names_rng = step_rng(cfg.seed, step, "names")
            unknown = torch.tensor([names_rng.random() < cfg.name_dropout for _ in classes], device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp and self.device.type == "cuda"):
            logits = self.fwd(levels, self._class_text(step, classes), prior=prior, unknown=unknown)
        sampled = sampled_targets(logits, masks, kn, classes, cfg.loss_stride)  # once for every term
        if cfg.loss == "focal":
            s, c = focal_terms(logits, masks, kn, classes, cfg.loss_stride, cfg.focal_gamma, sampled=sampled)
        else:
            s, c = bce_terms(logits, masks, kn, classes, cfg.loss_stride, sampled=sampled)
        count = dist.sum_(c.detach().float().clone()).clamp(min=1)
        loss = s / count
        if cfg.loss == "bce+dice":
            ds, dc = dice_terms(logits, masks, kn, classes, cfg.loss_stride, sampled=sampled)
            loss = loss + cfg.dice_weight * ds / dist.sum_(dc.detach().float().clone()).clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # (DDP: the gradients are summed over the ranks here)
        total = dist.sum_(loss.detach().clone())
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad) if cfg.clip_grad > 0 else torch.zeros(())
        if not (torch.isfinite(total) and torch.isfinite(gnorm)):
            self.bad_run += 1
            opt.zero_grad(set_to_none=True)
            what = "loss" if not torch.isfinite(total) else "gradient"
            if self.show:
                tqdm.write(f"warning: step {step}: non-finite {what} ({float(total):.4g}); step skipped "
                           f"({self.bad_run} in a row, stopping at {cfg.max_bad_steps})")
            self.log({"step": step, "skipped": what})
            if self.bad_run >= cfg.max_bad_steps:
                raise TrainError(f"stopped at step {step}: {self.bad_run} non-finite losses in a row (max_bad_steps "
                                 f"= {cfg.max_bad_steps}); lower lr, check the data for empty/odd masks, or turn "
                                 f"amp off; the last good checkpoint is in {self.out}")
        else:
            self.bad_run = 0
            opt.step()
            lv = float(total)
            self.ema = lv if self.ema is None else 0.98 * self.ema + 0.02 * lv
        return lr

    def run(self) -> Path:
        """Train from :attr:`start` to ``cfg.steps``; returns the path of ``final.safetensors``."""
        cfg, dist, out = self.cfg, self.dist, self.out
        final = out / "final.safetensors"
        if self.start >= cfg.steps and final.is_file():
            self.say(f"{out} already trained {self.start} steps (steps = {cfg.steps}); nothing to do")
            return final
        self.meta_base = self._meta()
        self.log_f = open(out / "log.jsonl", "a") if dist.main else None
        per_rank = cfg.batch_size // dist.world
        self.rows = range(dist.rank * per_rank, (dist.rank + 1) * per_rank)
        self.loader = None
        if not cfg.cache:
            data = _UncachedSteps(self.train_sets, self.maps, len(self.vocab), self.scales, cfg, self.token_stride,
                                  self.image_encoder.mean, self.image_encoder.std, self.rows, self.cum_weights,
                                  self.shown)
            self.loader = iter(torch.utils.data.DataLoader(
                data, batch_size=None, sampler=range(self.start, cfg.steps), num_workers=cfg.workers,
                pin_memory=self.device.type == "cuda", persistent_workers=False,
                prefetch_factor=2 if cfg.workers else None))
        # under torchrun, DDP sums the ranks' gradients of sum/global count: the global batch's gradient
        model = wrap_for_training(self.head, dist, self.device, find_unused=cfg.bridge_prior)
        self.fwd = torch.compile(model) if cfg.compile else model
        self.head.train()
        bar = tqdm(range(self.start, cfg.steps), desc="training", unit="step", disable=not self.show,
                   dynamic_ncols=True, initial=self.start, total=cfg.steps)
        try:
            for step in bar:
                lr = self.step(step)
                if self.show and self.ema is not None:
                    bar.set_postfix(loss=f"{self.ema:.4f}", lr=f"{lr:.1e}")
                if self.ema is not None and (step % cfg.log_every == 0 or step == cfg.steps - 1):
                    self.log({"step": step, "loss": round(self.ema, 5), "lr": lr,
                              "t": round(time.time() - self.t_start, 1)})
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                    self.checkpoint(out / f"step{step + 1}.safetensors", step + 1)
            bar.close()
            self.head.eval()
            self.checkpoint(final, cfg.steps)
        finally:
            if self.log_f is not None:
                self.log_f.close()
                self.log_f = None
        if self.show:
            print(f"trained {cfg.steps} steps in {time.time() - self.t_start:.0f} s; checkpoint: {final}; "
                  f"metrics: {out / 'log.jsonl'}, {out / 'metrics.png'}")
        return final
