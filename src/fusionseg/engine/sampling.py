"""What each training step reads: the datasets and their shared class vocabulary, the cached feature pools,
the step's plan (scale, images, views, crop) and its class names, and the same crops as pixels for the
no-cache path.

Determinism: the batch of step ``s`` is drawn from a random generator seeded by ``(seed, s)`` alone
(:func:`step_rng`), so a resumed run, a run under ``torchrun`` (each rank takes its rows of the same global
plan) and a run without the feature cache see the same batches as one uninterrupted process.
"""
from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .pseudo_label import excluded_by
from ..data.datasets import IGNORE, DatasetError, FolderDataset, Sample, normalize_name
from ..data.transforms import prepare_training_pair
from .config import TrainConfig


# ---------------------------------------------------------------------------------------------- datasets, vocabulary
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
    from .pseudo_label import expand_collection
    out = []
    paths = [q for p in paths for q in (expand_collection(p, skip_empty=True) if Path(str(p)).is_dir() else [p])]
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


# ------------------------------------------------------------------------------------------------ pools, plans, classes
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


def dataset_synonyms(ds) -> list[list[str]] | None:
    """Per class of a folder dataset, the other words for it from its manifest's ``synonyms`` (written by
    ``fusionseg pseudo-label``: WordNet lemmas and group words), or None when it has none."""
    raw = (getattr(ds, "meta", None) or {}).get("synonyms")
    if not raw:
        return None
    values = sorted(int(k) for k in ds.meta["classes"])
    return [[str(w) for w in raw.get(str(v), [])] for v in values]


def image_names(train_sets: Sequence, maps: Sequence[Sequence[int]]) -> list[set[int]] | None:
    """Per training image (the sets one after another, as the pools hold them), the vocabulary ids its mask
    shows; None when a training set cannot give its masks by id."""
    if not all(hasattr(ds, "load_mask") for ds in train_sets):
        return None
    out: list[set[int]] = []
    for ds, lmap in zip(train_sets, maps):
        lut = np.full(256, -1, np.int64)
        for k, g in enumerate(lmap, start=1):
            lut[k] = g
        for id in ds.ids:
            out.append({int(lut[int(v)]) for v in np.unique(ds.load_mask(id)) if lut[int(v)] >= 0})
    return out


def name_support(train_sets: Sequence, maps: Sequence[Sequence[int]], n_vocab: int,
                 names: list[set[int]] | None = None) -> list[int] | None:
    """Per vocabulary name, how many training images show it (read from the masks, or from :func:`image_names`
    given as ``names``), or None when a training set cannot give its masks by id. The scorer weighs the trained
    head by this evidence (``model.scoring``)."""
    names = image_names(train_sets, maps) if names is None else names
    if names is None:
        return None
    counts = [0] * n_vocab
    for shown in names:
        for g in shown:
            counts[g] += 1
    return counts


def repeat_factors(names: Sequence[set[int]], threshold: float) -> list[float]:
    """Repeat-factor sampling (LVIS, Gupta et al. 2019): image i is drawn with weight
    ``max(1, max over its classes c of sqrt(threshold / f_c))``, ``f_c`` the share of training images showing c,
    so an image with a class rarer than ``threshold`` comes up more often (a class in 1% of the images, with
    threshold 0.1: about 3x). Images showing no class keep weight 1."""
    n = max(1, len(names))
    counts: dict[int, int] = {}
    for shown in names:
        for g in shown:
            counts[g] = counts.get(g, 0) + 1
    rc = {g: max(1.0, math.sqrt(threshold / (c / n))) for g, c in counts.items()}
    return [max([1.0] + [rc[g] for g in shown]) for shown in names]


def paste_classes(names: Sequence[set[int]], lmap: Sequence[int]) -> list[tuple[int, list[int]]]:
    """For class-first copy-paste in one folder: per class its images show (``names``: vocabulary ids per image of
    the folder, as :func:`image_names` gives them; ``lmap``: the folder's mask value - 1 -> vocabulary id), the
    mask value and the indices of the images showing it, in mask-value order. Excluded classes (id -1) never
    appear in ``names``, so they are never pasted."""
    local = {g: k for k, g in enumerate(lmap, start=1) if g >= 0}
    imgs: dict[int, list[int]] = {}
    for i, shown in enumerate(names):
        for g in shown:
            imgs.setdefault(local[g], []).append(i)
    return sorted(imgs.items())


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
        syn = dataset_synonyms(ds)
        for k, name in enumerate(ds.class_names):
            key = normalize_name(name)
            # a pseudo-labelled class (with synonyms) is ruled out by any of its words ("cat" rules out "tabby")
            hit = excluded_by([key] + syn[k], excl) if syn else excl & {key}
            if hit:
                seen_excl |= hit
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


def plan_batch(rng: random.Random, n: int, views: int, grid: int, top: int, batch_size: int,
               cum_weights: Sequence[float] | None = None) -> Plan:
    """Random images (uniform, or by ``cum_weights``: cumulative image weights, see :func:`repeat_factors`),
    views and a random crop of the token grid (crop side between 0.7x ``top`` and ``top`` tokens, at most the
    grid, so larger scales give zoomed-in crops)."""
    top = min(grid, max(2, top))
    k = rng.randint(max(2, int(top * 0.7)), top)
    if cum_weights is None:
        idx = [rng.randrange(n) for _ in range(batch_size)]
    else:
        idx = rng.choices(range(n), cum_weights=cum_weights, k=batch_size)
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


# ------------------------------------------------------------------------------------------------ no-cache batches
class _UncachedSteps(torch.utils.data.Dataset):
    """Step ``s`` -> this rank's rows of step ``s``'s plan as pixels: (scale index, crops (b, 3, k*t, k*t)
    normalised, masks (b, k*t, k*t) int16 global ids, known (b, G)). Images are resized/padded exactly as the
    cache does, flipped for view 1, then cropped: the same crops the cached path takes on the feature grid."""

    def __init__(self, sets: list, maps: list, n_vocab: int, scales: list[int], cfg: TrainConfig, token_stride: int,
                 mean, std, rows: Sequence[int], cum_weights: Sequence[float] | None = None,
                 names: Sequence[set[int]] | None = None):
        self.sets, self.maps, self.n_vocab = sets, maps, n_vocab
        self.cum_weights = cum_weights
        self.scales, self.cfg, self.ts, self.mean, self.std = scales, cfg, token_stride, mean, std
        self.rows = list(rows)
        self.offsets = np.cumsum([0] + [len(s) for s in sets])
        #: per folder, (mask value, the folder's image indices showing it) for class-first copy-paste
        self.by_class: list[list[tuple[int, list[int]]]] | None = None
        if cfg.copy_paste > 0 and cfg.copy_paste_by == "class":
            if names is None:
                raise ValueError("--copy-paste-by class needs training sets whose masks can be read by image id")
            self.by_class = [paste_classes(names[int(self.offsets[d]):int(self.offsets[d + 1])], maps[d])
                             for d in range(len(sets))]

    def __len__(self) -> int:
        return self.cfg.steps

    def __getitem__(self, step: int):
        plan = make_step_plan(step, self.cfg, int(self.offsets[-1]), self.scales, self.ts, self.cum_weights)
        sc = self.scales[plan.scale]
        px, k = self.ts, plan.k
        xs, ms, kn = [], [], []
        for r in self.rows:
            i, v, (oy, ox) = plan.idx[r], plan.views[r], plan.offs[r]
            d = int(np.searchsorted(self.offsets, i, side="right") - 1)
            s = self.sets[d][i - int(self.offsets[d])]
            x, m = prepare_training_pair(s.image, s.mask, sc, self.mean, self.std)
            if self.cfg.copy_paste > 0:
                x, m = self._paste(step, r, d, i - int(self.offsets[d]), x, m, sc)
            if v:
                x, m = x.flip(-1), m.flip(-1)
            xs.append(x[:, oy * px:(oy + k) * px, ox * px:(ox + k) * px])
            ms.append(_global_masks(m[oy * px:(oy + k) * px, ox * px:(ox + k) * px], self.maps[d]))
            row = torch.zeros(self.n_vocab, dtype=torch.bool)
            row[[g for g in self.maps[d] if g >= 0]] = True
            kn.append(row)
        return plan.scale, torch.stack(xs), torch.stack(ms), torch.stack(kn)

    def _paste(self, step: int, row: int, d: int, j: int, x: torch.Tensor, m: torch.Tensor, size: int):
        """Copy-paste (Ghiasi et al. 2021, simplified to semantic masks): with chance ``cfg.copy_paste``, the pixels
        of one class of another image of folder ``d`` (prepared at the same size, so at the same place) replace
        this image's; the mask follows. Same folder only: its classes are known on every one of its images."""
        rng = step_rng(self.cfg.seed, step, f"paste{row}")
        n = len(self.sets[d])
        if n < 2 or rng.random() >= self.cfg.copy_paste:
            return x, m
        if self.by_class is not None:  # a class of the folder first, then an image (not this one) showing it
            pool = self.by_class[d]
            if not pool:
                return x, m
            value, imgs = pool[rng.randrange(len(pool))]
            cands = [t for t in imgs if t != j]
            if not cands:
                return x, m
            other = self.sets[d][cands[rng.randrange(len(cands))]]
        else:
            k = rng.randrange(n - 1)
            other, value = self.sets[d][k + (k >= j)], None  # any image but this one; a class it shows, below
        x2, m2 = prepare_training_pair(other.image, other.mask, size, self.mean, self.std)
        if value is None:
            shown = [int(c) for c in torch.unique(m2) if 0 < int(c) < IGNORE]
            if not shown:
                return x, m
            value = shown[rng.randrange(len(shown))]
        sel = m2 == value
        if self.cfg.copy_paste_jitter > 0:
            x2, sel = jitter_paste(rng, x2, sel, m != IGNORE, self.cfg.copy_paste_jitter)
        if not sel.any():
            return x, m
        x, m = x.clone(), m.clone()
        x[:, sel] = x2[:, sel]
        m[sel] = value
        return x, m


def jitter_paste(rng: random.Random, x: torch.Tensor, sel: torch.Tensor, valid: torch.Tensor,
                 jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale jitter for copy-paste (the large-scale jittering of Ghiasi et al. 2021, on the pasted class only):
    the box around ``sel`` (the class's pixels of image ``x``) is resized by a factor drawn log-uniformly in
    [1/(1+jitter), 1+jitter] (shrunk further if it would not fit) and put at a uniformly random place inside the
    box of ``valid`` (the target image's pixels that are not padding). -> (pixels, where they go), both full size."""
    ys, xs = torch.nonzero(sel, as_tuple=True)
    vy, vx = torch.nonzero(valid, as_tuple=True)
    if len(ys) == 0 or len(vy) == 0:
        return x, torch.zeros_like(sel)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    ty0, ty1, tx0, tx1 = int(vy.min()), int(vy.max()) + 1, int(vx.min()), int(vx.max()) + 1
    f = math.exp(rng.uniform(-math.log1p(jitter), math.log1p(jitter)))
    f = min(f, (ty1 - ty0) / (y1 - y0), (tx1 - tx0) / (x1 - x0))
    nh, nw = max(1, round((y1 - y0) * f)), max(1, round((x1 - x0) * f))
    px = F.interpolate(x[None, :, y0:y1, x0:x1], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    ps = F.interpolate(sel[None, None, y0:y1, x0:x1].float(), size=(nh, nw), mode="nearest")[0, 0] > 0.5
    oy, ox = ty0 + rng.randrange(ty1 - ty0 - nh + 1), tx0 + rng.randrange(tx1 - tx0 - nw + 1)
    out_x, out_sel = torch.zeros_like(x), torch.zeros_like(sel)
    out_x[:, oy:oy + nh, ox:ox + nw] = px
    out_sel[oy:oy + nh, ox:ox + nw] = ps
    return out_x, out_sel


def make_step_plan(step: int, cfg: TrainConfig, n: int, scales: list[int], token_stride: int,
                   cum_weights: Sequence[float] | None = None) -> Plan:
    rng = step_rng(cfg.seed, step)
    si = rng.randrange(len(scales))
    plan = plan_batch(rng, n, 2, scales[si] // token_stride, cfg.size // token_stride, cfg.batch_size, cum_weights)
    plan.scale = si
    return plan
