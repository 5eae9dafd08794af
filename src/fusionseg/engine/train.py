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
import difflib
import io
import json
import math
import os
import random
import time
import tomllib
import typing
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.datasets import IGNORE, DatasetError, FolderDataset, Sample, normalize_name, split_ids
from ..data.features import DEFAULT_SHARD_SIZE, RowTable, cache_features, cached_text_embeddings, write_atomic
from ..data.transforms import prepare_training_pair
from ..encoders.base import EncoderError, build_image_encoder
from ..encoders.templates import resolve_templates
from ..choices import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER
from ..model.checkpoint import save_checkpoint
from ..model.fusioner import DEFAULT_PRESET, FusionerConfig, FusionHead

STATE_FILE = "state.pt"
CONFIG_FILE = "config.toml"


class TrainError(RuntimeError):
    """A run that cannot go on (non-finite losses, a checkpoint that cannot be written): says why and what to do."""


class CheckpointWriteError(OSError):
    """A checkpoint or state file could not be written; the previous one is intact."""


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    image_encoder: str = DEFAULT_IMAGE_ENCODER
    text_encoder: str = DEFAULT_TEXT_ENCODER
    preset: str = DEFAULT_PRESET
    steps: int = 3000
    batch_size: int = 16              # global batch (split evenly over torchrun ranks)
    lr: float = 4e-4
    weight_decay: float = 0.05        # AdamW, on weight matrices / conv kernels only (not norms, biases)
    warmup: int = 150                 # linear warm-up steps, then cosine decay to 0
    size: int = 320
    scales: list[int] | None = None   # cached scales sampled per batch; default: 0.8x, 1x, 1.2x size (>= 160 px)
    max_classes: int = 24
    val_fraction: float = 0.15
    holdout: list[str] = field(default_factory=list)  # image ids always kept out of training
    exclude_classes: list[str] = field(default_factory=list)
    fold: int | None = None           # for pascal5i:ROOT / coco20i:ROOT data: train on this fold's base classes
    templates: str = "default"
    checkpoint_every: int = 1000
    seed: int = 0
    device: str = "cpu"
    amp: bool = True                  # bf16 autocast on CUDA
    cache_dir: str | None = None
    cache: bool = True                # False: run the frozen image encoder every step on the same crops
    shard_size: int = DEFAULT_SHARD_SIZE
    workers: int = 0                  # DataLoader workers feeding the no-cache path
    compile: bool = False             # torch.compile the trainable head (GPU; off on CPU)
    clip_grad: float = 1.0
    max_bad_steps: int = 10           # stop after this many non-finite losses in a row
    loss_stride: int = 4
    fusion: bool = True
    pos_embed: str = "none"
    bridge_prior: bool = False  # the bridge's per-class map as a model input (model/prior.py)
    name_dropout: float = 0.5   # with bridge_prior: share of a batch's classes given the unknown-name token
    log_every: int = 50
    resume: bool | str = False        # True: continue OUT/state.pt; a folder: continue that run
    progress: bool = True


#: Keys that may differ between a run and its resumption (where and how it runs, not what it learns).
RUNTIME_KEYS = frozenset({"out", "resume", "progress", "device", "cache_dir", "checkpoint_every", "steps",
                          "workers", "compile", "log_every", "shard_size", "cache"})


# ------------------------------------------------------------------------------------------------ config files
def config_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _closest(key: str) -> str:
    m = difflib.get_close_matches(key, config_keys(), n=1, cutoff=0.4)
    return f"; did you mean '{m[0]}'?" if m else f"; valid keys: {', '.join(config_keys())}"


def _coerce(key: str, value: Any) -> Any:
    """A config value converted to the field's type, or ValueError naming the key."""
    hint = typing.get_type_hints(TrainConfig)[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ValueError(f"config key '{key}' cannot be empty")
    base = [a for a in args if a is not type(None)] if args and typing.get_origin(hint) is not list else [hint]
    if key == "resume":
        return value if isinstance(value, (bool, str)) else str(value)
    t = base[0]
    origin = typing.get_origin(t)
    try:
        if origin is list:
            inner = typing.get_args(t)[0]
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise TypeError
            if inner is int and any(isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()) for v in value):
                raise TypeError
            return [inner(v) for v in value]
        if t is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise TypeError
        if t is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if t is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if t is str:
            if isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        pass
    raise ValueError(f"config key '{key}' must be {getattr(hint, '__name__', None) or str(hint)}, got {value!r}")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML recipe: flat ``key = value`` pairs named like :class:`TrainConfig`'s fields (tables such as
    ``[optim]`` are flattened: their keys are the same names). Unknown keys raise ValueError naming the closest."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file not found: {p}")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p} is not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for k, v in raw.items():
        items = v.items() if isinstance(v, dict) else [(k, v)]
        for kk, vv in items:
            if kk not in config_keys():
                raise ValueError(f"unknown config key '{kk}' in {p}{_closest(kk)}")
            flat[kk] = _coerce(kk, vv)
    return flat


def parse_set(item: str) -> tuple[str, Any]:
    """``key=value`` from ``--set``; the value is read as TOML (``lr=1e-3``, ``scales=[192,224]``,
    ``amp=false``) and falls back to a plain string (``image_encoder=hf:facebook/dino-vits16``)."""
    if "=" not in item:
        raise ValueError(f"--set expects key=value, got {item!r}")
    key, _, text = item.partition("=")
    key = key.strip()
    if key not in config_keys():
        raise ValueError(f"unknown config key '{key}' in --set{_closest(key)}")
    text = text.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key, _coerce(key, value)


def make_config(values: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from merged key/value pairs (defaults for the rest); needs ``data`` and ``out``."""
    for k in values:
        if k not in config_keys():
            raise ValueError(f"unknown config key '{k}'{_closest(k)}")
    missing = [k for k in ("data", "out") if not values.get(k)]
    if missing:
        raise ValueError(f"no {' and no '.join(missing)} given: pass --{missing[0]} or set it in the config file")
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def dump_config(cfg: TrainConfig | dict) -> str:
    """The resolved config as TOML (``None`` values left out: they mean the default)."""
    d = asdict(cfg) if isinstance(cfg, TrainConfig) else dict(cfg)
    lines = ["# resolved training config (fusionseg train --config this-file reproduces the run)"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in d.items() if v is not None]
    return "\n".join(lines) + "\n"


def _comparable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if k in RUNTIME_KEYS:
            continue
        if k == "data":
            v = [x if ":" in str(x) and not Path(x).exists() else str(Path(x).resolve()) for x in v]
        out[k] = v
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """Keys (not runtime-only ones) whose values differ between two resolved configs, as 'key (a -> b)'."""
    a, b = _comparable(saved), _comparable(current)
    keys = sorted(set(a) | set(b))
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in keys if a.get(k) != b.get(k)]


# ------------------------------------------------------------------------------------------------ datasets
class BenchmarkSplit:
    """The training split of a PASCAL-5i / COCO-20i fold (novel classes ignored) in the shape training reads."""

    every_pixel_labelled = False

    def __init__(self, base, ids: Sequence[str] | None = None):
        import copy
        self.base = base
        self.ids = list(base.ids if ids is None else ids)
        self.root = Path(base.root)
        self.name = base.name
        self.class_names = tuple(base.class_names)
        self.novel_as_ignore = getattr(base, "novel_as_ignore", None)
        self.fold = getattr(base, "fold", None)
        self.novel_names = [base.class_names[c - 1] for c in getattr(base, "novel_classes", [])]
        self._view = copy.copy(base)
        self._view.ids = self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Sample:
        return self._view[i]

    def subset(self, ids: Sequence[str]) -> "BenchmarkSplit":
        return BenchmarkSplit(self.base, ids)


def open_datasets(paths: Sequence[str], fold: int | None = None) -> list:
    """Folder datasets, or ``pascal5i:ROOT`` / ``coco20i:ROOT`` (the fold's ``trn`` split: base classes only)."""
    if not paths:
        raise DatasetError("give at least one --data folder")
    out = []
    for p in paths:
        prefix = str(p).partition(":")[0].lower()
        if prefix in ("pascal5i", "coco20i") and not Path(p).exists():
            from ..data.benchmarks import open_dataset
            if fold is None:
                raise DatasetError(f"{p}: training on {prefix} needs a fold: set fold = 0..3 in the config "
                                   f"(or --set fold=0); its novel classes are left out of training")
            with warnings.catch_warnings():
                warnings.simplefilter("default")
                out.append(BenchmarkSplit(open_dataset(p, fold=fold, split="trn")))
        elif prefix in ("fss1000", "mosaic4") and not Path(p).exists():
            raise DatasetError(f"{p}: {prefix} is an evaluation benchmark; train on folder datasets, pascal5i:ROOT "
                               f"or coco20i:ROOT")
        else:
            out.append(FolderDataset(p))
    return out


# ------------------------------------------------------------------------------------------------ pieces
class _Pool:
    """The cached training features of one scale, every dataset's rows one after another, with masks read as
    global vocabulary ids (int16, -1 ignore). ``levels`` and ``masks`` are :class:`RowTable` over the
    memory-mapped shards (or plain tensors): indexing ``[i, v, ...]`` reads one image's view, nothing is
    concatenated in memory."""

    def __init__(self, feats, masks_global, known: torch.Tensor, size: int):
        self.size = size               # images were resized (longer side) and padded to size x size
        self.levels = feats            # list of (N, V, C, h, w) fp16
        self.masks = masks_global      # (N, V, S, S) int16: -1 ignore, 0 none, g+1 = vocab[g]
        self.known = known             # (N, G) bool: which vocabulary names the image's dataset annotates


def build_vocabulary(datasets: Sequence, exclude: Sequence[str] = ()) -> tuple[list[str], list[list[int]], list[str]]:
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


def _mask_lut(lmap: list[int]) -> torch.Tensor:
    """Dataset-local mask value -> global id (int16): 0 stays 0, class k -> vocab index + 1, excluded and
    unknown values -> -1 (ignore)."""
    lut = torch.full((256,), -1, dtype=torch.int16)
    lut[0] = 0
    for k, g in enumerate(lmap, start=1):
        lut[k] = g + 1 if g >= 0 else -1  # excluded classes become ignore
    return lut


def _global_masks(local: torch.Tensor, lmap: list[int]) -> torch.Tensor:
    return _mask_lut(lmap)[local.long()]


def default_scales(size: int, multiple: int = 32) -> list[int]:
    """0.8x, 1x and 1.2x the training size on the encoder's grid (32 px for CNNs, the patch for ViTs; just
    ``size`` below 160 px)."""
    if size < 160:
        return [size]
    return sorted({int(size * 0.8) // multiple * multiple, size, -(-int(size * 1.2) // multiple) * multiple})


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine decay to 0 at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@dataclass
class Plan:
    """One global batch: scale index, crop side ``k`` in tokens, and per row (image, view, token offset)."""

    scale: int
    k: int
    idx: list[int]
    views: list[int]
    offs: list[tuple[int, int]]


def step_rng(seed: int, step: int, what: str = "batch") -> random.Random:
    """The generator of one step's draws: a function of (seed, step) only (resume- and rank-independent)."""
    return random.Random(f"{seed}:{step}:{what}")


def plan_batch(rng: random.Random, n: int, views: int, grid: int, top: int, batch_size: int) -> Plan:
    """Random images, views and a random crop of the token grid (crop side between 0.7x ``top`` and ``top``
    tokens, at most the grid, so larger scales give zoomed-in crops)."""
    top = min(grid, max(2, top))
    k = rng.randint(max(2, int(top * 0.7)), top)
    idx = [rng.randrange(n) for _ in range(batch_size)]
    vis = [rng.randrange(views) for _ in idx]
    offs = [(rng.randint(0, grid - k), rng.randint(0, grid - k)) for _ in idx]
    return Plan(0, k, idx, vis, offs)


def gather_batch(pool: _Pool, plan: Plan, rows: Sequence[int], token_stride: int):
    """Cached crops of ``rows`` of a plan -> (levels [(b, C, k*f, k*f)], masks (b, k*s, k*s) int16, known (b, G))."""
    grid = pool.size // token_stride
    k = plan.k
    sel = [(plan.idx[r], plan.views[r], plan.offs[r]) for r in rows]
    out_levels = []
    for lv in pool.levels:
        f = lv.shape[-1] // grid  # cells of this level per token
        out_levels.append(torch.stack([lv[i, v, :, oy * f:(oy + k) * f, ox * f:(ox + k) * f] for i, v, (oy, ox) in sel]))
    px = token_stride
    masks = torch.stack([pool.masks[i, v, oy * px:(oy + k) * px, ox * px:(ox + k) * px] for i, v, (oy, ox) in sel])
    known = pool.known[[i for i, _, _ in sel]]
    return out_levels, masks, known


def choose_classes(present: Sequence[int], annotated: Sequence[int], rng: random.Random, max_classes: int) -> list[int]:
    """Every class present in the batch (shuffled, at most ``max_classes``), then negatives that the batch's
    datasets annotate, up to ``max_classes``."""
    present = list(present)
    rng.shuffle(present)
    chosen = present[:max_classes]
    taken = set(chosen)
    rest = [c for c in annotated if c not in taken]
    rng.shuffle(rest)
    return chosen + rest[: max(0, max_classes - len(chosen))]


def sample_batch(pool: _Pool, cfg: TrainConfig, rng: random.Random, token_stride: int):
    """One process's batch from one pool (kept for scripts): -> (levels, masks, known, classes)."""
    n, views = pool.masks.shape[:2]
    plan = plan_batch(rng, n, views, pool.size // token_stride, cfg.size // token_stride, cfg.batch_size)
    levels, masks, known = gather_batch(pool, plan, range(cfg.batch_size), token_stride)
    present = (torch.unique(masks[masks > 0]).long() - 1).tolist()
    annotated = torch.nonzero(known.any(0)).flatten().tolist()
    return levels, masks, known, choose_classes(present, annotated, rng, cfg.max_classes)


def bce_terms(logits: torch.Tensor, masks: torch.Tensor, known: torch.Tensor, classes: list[int], stride: int):
    """Per-class BCE as (sum over valid (pixel, class) pairs, their count). Shapes as :func:`bce_loss`."""
    m = masks[:, stride // 2::stride, stride // 2::stride].long()
    logits = F.interpolate(logits.float(), size=m.shape[-2:], mode="bilinear", align_corners=False)
    cls = torch.tensor(classes, device=m.device) + 1
    target = (m[:, None] == cls[None, :, None, None]).float()
    valid = (m >= 0)[:, None] & known[:, classes][:, :, None, None]
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (loss * valid).sum(), valid.sum()


def bce_loss(logits: torch.Tensor, masks: torch.Tensor, known: torch.Tensor, classes: list[int], stride: int) -> torch.Tensor:
    """Per-class BCE. logits ``(B, N, h, w)``, masks ``(B, S, S)`` int16 global ids (-1 ignore), known ``(B, G)``."""
    s, c = bce_terms(logits, masks, known, classes, stride)
    return s / c.clamp(min=1)


# ------------------------------------------------------------------------------------------------ distributed
@dataclass
class Dist:
    """Where this process sits under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t


def init_distributed(device: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun set up (env RANK / WORLD_SIZE / LOCAL_RANK): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world <= 1:
        return Dist(), dev
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local), dev


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


# ------------------------------------------------------------------------------------------------ state files
def _rng_states() -> dict:
    st = np.random.get_state()
    out = {"python": json.dumps(random.getstate()), "torch": torch.get_rng_state(),
           "numpy": [st[0], torch.from_numpy(np.asarray(st[1]).astype(np.int64)), int(st[2]), int(st[3]), float(st[4])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_states(st: dict) -> None:
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
        reason = "the disk is full" if e.errno == 28 else (e.strerror or str(e))
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


# ------------------------------------------------------------------------------------------------ plot
def plot_metrics(log_path: str | Path, png_path: str | Path, width: int = 900, height: int = 620) -> Path | None:
    """Training loss and validation mIoU against step, from ``log.jsonl``, as a PNG (Pillow only)."""
    from PIL import Image, ImageDraw
    rows = []
    p = Path(log_path)
    if not p.is_file():
        return None
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}            # a resumed run's rows replace old ones
    val = {r["step"]: r["val_mean"] for r in rows if r.get("val_mean") is not None}
    if not loss and not val:
        return None
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    steps_all = sorted(set(loss) | set(val))
    x0, x1 = 70, width - 25
    xmax = max(steps_all[-1], 1)

    def panel(top: int, bottom: int, series: dict, title: str, colour, ylo=None, yhi=None) -> None:
        d.rectangle([x0, top, x1, bottom], outline="black")
        d.text((x0, top - 16), title, fill="black")
        if not series:
            d.text((x0 + 10, top + 10), "no values yet", fill="grey")
            return
        xs, ys = zip(*sorted(series.items()))
        lo = min(ys) if ylo is None else ylo
        hi = max(ys) if yhi is None else yhi
        if hi - lo < 1e-9:
            hi = lo + 1.0
        for t in range(5):  # y ticks and grid
            v = lo + (hi - lo) * t / 4
            y = bottom - (bottom - top) * t / 4
            d.line([x0, y, x1, y], fill=(225, 225, 225))
            d.text((5, y - 6), f"{v:.3g}", fill="black")
        for t in range(6):  # x ticks
            v = xmax * t / 5
            x = x0 + (x1 - x0) * t / 5
            d.line([x, bottom, x, bottom + 4], fill="black")
            d.text((x - 12, bottom + 6), f"{int(v)}", fill="black")
        pts = [(x0 + (x1 - x0) * x / xmax, bottom - (bottom - top) * (y - lo) / (hi - lo)) for x, y in zip(xs, ys)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts if len(pts) < 60 else pts[-1:]:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        d.rectangle([x0, top, x1, bottom], outline="black")  # the frame over the grid lines

    mid = height // 2
    panel(30, mid - 30, loss, "training loss (EMA) vs step", (200, 40, 40))
    panel(mid + 20, height - 30, val, "validation mIoU (mean over datasets) vs step", (30, 90, 200), 0.0,
          max(1e-3, max(val.values())) if val else None)
    d.text((x1 - 30, height - 16), "step", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_atomic(Path(png_path), buf.getvalue())
    return Path(png_path)


# ------------------------------------------------------------------------------------------------ encoders
def _offline_hint(name: str, kind: str) -> str:
    ref = name[3:] if name.startswith("hf:") else name
    return (f"; to train offline, download it once with `huggingface-cli download {ref}` (stored under $HF_HOME, "
            f"default ~/.cache/huggingface; then set HF_HUB_OFFLINE=1) or point {kind}_encoder at a local folder: "
            f"\"hf:/path/to/{ref.split('/')[-1]}\"")


def build_encoder_for_training(name: str, kind: str = "image"):
    """Build a frozen encoder; a hub model that cannot be loaded (offline) says how to get it."""
    try:
        if kind == "image":
            return build_image_encoder(name)
        from ..encoders.base import build_text_encoder
        return build_text_encoder(name)
    except EncoderError as e:
        msg = str(e)
        if name.startswith("hf:") and not Path(name[3:]).expanduser().exists() and "download" not in msg:
            msg = msg.split("; check")[0] + _offline_hint(name, kind)
        raise EncoderError(msg) from None


# ------------------------------------------------------------------------------------------------ no-cache batches
class _UncachedSteps(torch.utils.data.Dataset):
    """Step ``s`` -> this rank's rows of step ``s``'s plan as pixels: (scale index, crops (b, 3, k*t, k*t)
    normalised, masks (b, k*t, k*t) int16 global ids, known (b, G)). Images are resized/padded exactly as the
    cache does, flipped for view 1, then cropped: the same crops the cached path takes on the feature grid."""

    def __init__(self, sets: list, maps: list, n_vocab: int, scales: list[int], cfg: TrainConfig, token_stride: int,
                 mean, std, rows: Sequence[int]):
        self.sets, self.maps, self.n_vocab = sets, maps, n_vocab
        self.scales, self.cfg, self.ts, self.mean, self.std = scales, cfg, token_stride, mean, std
        self.rows = list(rows)
        self.offsets = np.cumsum([0] + [len(s) for s in sets])

    def __len__(self) -> int:
        return self.cfg.steps

    def __getitem__(self, step: int):
        plan = make_step_plan(step, self.cfg, int(self.offsets[-1]), self.scales, self.ts)
        sc = self.scales[plan.scale]
        px, k = self.ts, plan.k
        xs, ms, kn = [], [], []
        for r in self.rows:
            i, v, (oy, ox) = plan.idx[r], plan.views[r], plan.offs[r]
            d = int(np.searchsorted(self.offsets, i, side="right") - 1)
            s = self.sets[d][i - int(self.offsets[d])]
            x, m = prepare_training_pair(s.image, s.mask, sc, self.mean, self.std)
            if v:
                x, m = x.flip(-1), m.flip(-1)
            xs.append(x[:, oy * px:(oy + k) * px, ox * px:(ox + k) * px])
            ms.append(_global_masks(m[oy * px:(oy + k) * px, ox * px:(ox + k) * px], self.maps[d]))
            row = torch.zeros(self.n_vocab, dtype=torch.bool)
            row[[g for g in self.maps[d] if g >= 0]] = True
            kn.append(row)
        return plan.scale, torch.stack(xs), torch.stack(ms), torch.stack(kn)


def make_step_plan(step: int, cfg: TrainConfig, n: int, scales: list[int], token_stride: int) -> Plan:
    rng = step_rng(cfg.seed, step)
    si = rng.randrange(len(scales))
    plan = plan_batch(rng, n, 2, scales[si] // token_stride, cfg.size // token_stride, cfg.batch_size)
    plan.scale = si
    return plan


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
            msg = str(e)
            if cfg.text_encoder.startswith("hf:") and not Path(cfg.text_encoder[3:]).expanduser().exists():
                msg = msg.split("; check")[0] + _offline_hint(cfg.text_encoder, "text")
            raise EncoderError(msg) from None
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
        from ..textcache import build_bridge
        bridge = build_bridge(image_encoder, build_text_encoder(cfg.text_encoder), cache_dir=cfg.cache_dir)
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
            _set_rng_states(state["rng"])
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
        try:
            save_checkpoint(path, head, image_encoder.spec, text_spec, meta)
        except Exception as e:  # noqa: BLE001 - OSError or the safetensors writer's own error type
            reason = "the disk is full" if getattr(e, "errno", None) == 28 or "No space" in str(e) else str(e)
            err = CheckpointWriteError(f"could not write checkpoint {path}: {reason}; the previous checkpoint "
                                       f"is intact; free space and resume with --resume")
            err.errno = getattr(e, "errno", None)
            raise err from None
        save_state(state_path, {"head": head.state_dict(), "opt": opt.state_dict(), "step": step,
                                "config": asdict(cfg), "rng": _rng_states(), "bad_steps": bad_run, "ema": ema})
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
    fwd = torch.compile(head) if cfg.compile else head
    use_amp = cfg.amp and device.type == "cuda"
    pin = device.type == "cuda"
    head.train()
    bar = tqdm(range(start, cfg.steps), desc="training", unit="step", disable=not show, dynamic_ncols=True,
               initial=start, total=cfg.steps)
    grads_buf = None
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
            loss.backward()
            if dist.enabled:  # sum the ranks' gradients of sum/global count = the global batch's gradient
                flat = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                grads_buf = torch.cat([g.reshape(-1) for g in flat])
                dist.sum_(grads_buf)
                o = 0
                for p in params:
                    n = p.numel()
                    p.grad = grads_buf[o:o + n].view_as(p).clone()
                    o += n
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
