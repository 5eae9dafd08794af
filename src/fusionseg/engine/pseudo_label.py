"""Pseudo-labels from a training-free teacher: images -> a folder dataset the student trains on (self-training).

MaskCLIP+ ("Extract Free Dense Labels from CLIP") labels images with a training-free dense map and trains a
segmenter on those labels. Here the teacher is any object with ``names``, ``synonyms`` and
``probabilities(image) -> (K, h, w)`` (:mod:`fusionseg.engine.teachers`): the ImageNet classifier bridge of
EfficientNet-Lite (1,000 named classes at stride 32), a trained fusion model (self-training rounds) or CLIP's
dense map. Per image:

* classes whose peak probability is below ``min_peak`` are dropped (MaskCLIP+'s prompt denoising);
* each pixel takes the teacher's arg-max class where its probability is at least ``min_confidence``, else
  ignore (255): uncertain pixels are left out of the loss, never taught as "none";
* with an image-level label (``labels.csv``), that class's own map decides: it takes the pixels where its
  probability is at least ``known_fraction`` of its peak, whatever else scores high there, and every other
  pixel is ignored (the teacher's other classes in such photos are mostly its confusions among siblings);
* where the source dataset has ground truth, the ground truth wins on every pixel it labels with a class
  (its background pixels, "none of the dataset's classes", are left to the teacher).

Masks are 8-bit (the folder format), so a vocabulary of more than 254 names is written as several *parts*
(``OUT/<name of OUT>-part-00/``, ...), each a folder dataset of its own with at most 254 classes; ``OUT/dataset.json`` lists them
(``"format": "fusionseg-collection/1"``) and ``fusionseg train --data OUT`` reads them all. An image goes to the
part that holds its largest teacher class; its other classes outside that part are ignored. Images are
referenced (symbolic links), not copied.
"""
from __future__ import annotations

import csv
import json
import os
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..data.datasets import IGNORE, IMAGE_SUFFIXES, DatasetError, FolderDataset, normalize_name, split_ids

COLLECTION_FORMAT = "fusionseg-collection/1"
#: Classes per part: 8-bit masks hold values 1..254 (0 = none, 255 = ignore).
PART_CLASSES = 254


class PseudoLabelError(ValueError):
    """Bad input to pseudo-labelling (message names the file, line or option)."""


@dataclass
class Source:
    """One input image: ``path``; ``gt``: reads its ground-truth mask mapped to vocabulary ids (0 none of its
    classes, g+1 = vocabulary[g], -1 ignore), or None; ``known``: the teacher class of an image-level label.
    Masks are read when the image is labelled, not all at once."""

    id: str
    path: Path
    gt: Callable[[], np.ndarray] | None = None
    known: int | None = None


def _mapped_mask(ds, id: str, lut: np.ndarray) -> np.ndarray:
    return lut[ds.load_mask(id)]


def read_labels_csv(path: Path, n_classes: int) -> dict[str, int]:
    """``labels.csv`` (``image, class_index, ...``) -> {image file name: class index}; names the line of any
    bad row."""
    out: dict[str, int] = {}
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise PseudoLabelError(f"{path}: cannot read ({e})") from None
    if not rows or [c.strip() for c in rows[0][:2]] != ["image", "class_index"]:
        raise PseudoLabelError(f"{path}:1: expected a header starting 'image,class_index'")
    for ln, row in enumerate(rows[1:], start=2):
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) < 2:
            raise PseudoLabelError(f"{path}:{ln}: expected 'image,class_index,...', got {','.join(row)!r}")
        try:
            k = int(row[1])
        except ValueError:
            raise PseudoLabelError(f"{path}:{ln}: class_index {row[1]!r} is not an integer") from None
        if not 0 <= k < n_classes:
            raise PseudoLabelError(f"{path}:{ln}: class_index {k} is outside 0..{n_classes - 1} (the teacher's classes)")
        out[Path(row[0].strip()).name] = k
    return out


def excluded_by(words: Sequence[str], exclude: Sequence[str]) -> set[str]:
    """The names of ``exclude`` that rule out a class known by ``words`` (its name, synonyms, group words):
    equal after :func:`normalize_name`, or, for a one-word excluded name, a word of a multi-word one ("shark"
    rules out "great white shark"; conservative, so held-out-name studies stay honest)."""
    ex = {normalize_name(e) for e in exclude if str(e).strip()}
    keys = {normalize_name(w) for w in words}
    hit = ex & keys
    return hit or {e for e in ex if " " not in e and any(e in k.split() for k in keys)}


def excluded_teacher_classes(synonyms: Sequence[Sequence[str]], exclude: Sequence[str]) -> set[int]:
    """Teacher classes that must never become training names (see :func:`excluded_by`)."""
    return {k for k, syn in enumerate(synonyms) if excluded_by(syn, exclude)}


def collect_sources(data: Sequence[str], vocab_index: dict[str, int], n_teacher: int,
                    val_fraction: float = 0.0, seed: int = 0, holdout: Sequence[str] = (),
                    image_labels: bool = True) -> tuple[list[Source], list[str]]:
    """Inputs -> sources and the ground-truth names added to the vocabulary (in order of first appearance).

    A folder with ``dataset.json`` brings its masks (its validation split, ``val_fraction``/``seed``/``holdout``
    as ``fusionseg train`` computes it, is left out so a later training run never sees those images); a folder
    with ``labels.csv`` (ImageNet style) brings image-level labels, when ``image_labels`` (the teacher's classes
    are the indices those labels give; a model teacher's are not: then the file is skipped with a warning); any
    other folder, images alone."""
    sources: list[Source] = []
    gt_names: list[str] = []
    for d in data:
        root = Path(d)
        if not root.is_dir():
            raise PseudoLabelError(f"no such folder: {root}")
        if (root / "dataset.json").is_file():
            ds = FolderDataset(root)
            _, val = split_ids([i for i in ds.ids if i not in set(holdout)], val_fraction, seed) if val_fraction else ([], [])
            skip = set(val) | set(holdout)
            lut = np.full(256, -1, np.int32)  # dataset value -> vocabulary id + 1 (0 none, -1 ignore)
            lut[0] = 0
            for k, n in enumerate(ds.class_names, start=1):
                key = normalize_name(n)
                if key not in vocab_index:
                    vocab_index[key] = len(vocab_index)
                    gt_names.append(key)
                lut[k] = vocab_index[key] + 1
            for id in ds.ids:
                if id not in skip:
                    sources.append(Source(id, ds._images[id], partial(_mapped_mask, ds, id, lut)))
            continue
        images_dir = root / "images" if (root / "images").is_dir() else root
        files = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise PseudoLabelError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        labels = {}
        if (root / "labels.csv").is_file():
            if image_labels:
                labels = read_labels_csv(root / "labels.csv", n_teacher)
            else:
                warnings.warn(f"{root / 'labels.csv'} gives classifier class indices, which do not address this "
                              f"teacher's classes (a model's own names): its image-level labels are not used")
        for p in files:
            sources.append(Source(p.stem, p, None, labels.get(p.name)))
    seen: set[str] = set()
    for s in sources:
        if s.id in seen:
            raise PseudoLabelError(f"two inputs share the image id {s.id!r}; pseudo-label those folders separately")
        seen.add(s.id)
    return sources, gt_names


def pseudo_mask(prob: torch.Tensor, min_peak: float, min_confidence: float, known: int | None = None,
                known_fraction: float = 0.5, dropped: set[int] | frozenset = frozenset()) -> np.ndarray:
    """Teacher probabilities ``(K, H, W)`` at the image's size -> ``(H, W)`` int32 labels: teacher class index,
    or -1 (ignore). See the module docstring for the rules."""
    prob = prob.float().clone()
    peak = prob.flatten(1).amax(1)
    keep = peak >= min_peak
    if dropped:
        keep[list(dropped)] = False
    if known is not None:
        keep[known] = known not in dropped
    prob[~keep] = 0
    conf, top = prob.max(0)
    out = torch.where(conf >= min_confidence, top, torch.full_like(top, -1))
    if known is not None and known not in dropped:  # the image's own class decides: its map, nothing else
        pk = prob[known]
        own = pk >= known_fraction * pk.max().clamp(min=1e-6)
        out = torch.where(own, torch.full_like(out, known), torch.full_like(out, -1))
    return out.numpy().astype(np.int32)


def _label_image(prob: torch.Tensor, size: tuple[int, int], min_peak: float, min_confidence: float,
                 known: int | None, known_fraction: float, dropped) -> np.ndarray:
    """:func:`pseudo_mask` of teacher probabilities ``(K, h, w)`` resampled to ``size`` (H, W). Only the classes
    that can take a pixel are resampled (bilinear resampling never exceeds a map's peak, so a class whose peak
    is below ``min_peak`` could take none): the same labels as resampling all K, at a fraction of the cost."""
    prob = prob.float()
    peak = prob.flatten(1).amax(1)
    cand = [k for k in torch.nonzero(peak >= min_peak).flatten().tolist() if k not in dropped]
    if known is not None and known not in dropped and known not in cand:
        cand.append(known)
    if not cand:
        return np.full(size, -1, np.int32)
    up = F.interpolate(prob[cand][None], size=size, mode="bilinear", align_corners=False)[0]
    k_local = cand.index(known) if known is not None and known in cand else None
    lab = pseudo_mask(up, 0.0, min_confidence, k_local, known_fraction)
    ids = np.asarray(cand, np.int32)
    return np.where(lab >= 0, ids[np.maximum(lab, 0)], -1).astype(np.int32)


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    try:
        os.symlink(os.path.relpath(src.resolve(), dst.parent.resolve()), dst)
    except OSError:  # no symlinks here (some file systems): copy
        import shutil
        shutil.copyfile(src, dst)


def pseudo_label(data: Sequence[str], out: str | Path, teacher, min_peak: float = 0.5, min_confidence: float = 0.3,
                 known_fraction: float = 0.5, exclude_classes: Sequence[str] = (), val_fraction: float = 0.0,
                 seed: int = 0, holdout: Sequence[str] = (), examples: int = 8, progress: bool = True,
                 max_images: int | None = None) -> dict:
    """Label the images of ``data`` with ``teacher``; write the folder dataset(s) under ``out``; -> summary dict."""
    from ..data.io import load_image, save_png_atomic, write_text_atomic
    out = Path(out)
    out_res = out.resolve()
    for d in data:
        r = Path(d).resolve()
        if out_res == r or r in out_res.parents:
            raise PseudoLabelError(f"the output folder {out} is inside the input folder {d}; write it elsewhere")
    names = list(teacher.names)
    dropped = excluded_teacher_classes(teacher.synonyms, exclude_classes)
    vocab_index = {f"\0teacher{k}": k for k in range(len(names))}  # teacher classes first; GT names appended
    sources, gt_names = collect_sources(data, vocab_index, len(names), val_fraction, seed, holdout,
                                        image_labels=getattr(teacher, "indexed_by_labels", True))
    if max_images is not None:
        sources = sources[:max_images]
    if not sources:
        raise PseudoLabelError("no image to label")
    if len(dropped) >= len(names) and not gt_names:  # the parts would declare no class: no dataset to train on
        raise PseudoLabelError(f"--exclude-classes leaves the teacher none of its {len(names)} classes to label with")
    ex = {normalize_name(e) for e in exclude_classes}
    n_gt = len(gt_names)
    per_part = PART_CLASSES - n_gt
    if per_part < 1:
        raise PseudoLabelError(f"the ground-truth datasets bring {n_gt} names; at most {PART_CLASSES - 1} fit beside the teacher's")
    n_parts = -(-len(names) // per_part)
    # parts are named after the output folder: training keys its splits by folder name, so two collections
    # trained together must not both have a "part-00"
    part_dirs = [out / f"{out.name}-part-{p:02d}" for p in range(n_parts)]
    for pd in part_dirs:
        (pd / "images").mkdir(parents=True, exist_ok=True)
        (pd / "masks").mkdir(parents=True, exist_ok=True)
    counts = np.zeros(len(names), np.int64)
    shown: list[tuple] = []
    images_per_part = [0] * n_parts
    ignored = 0
    total = 0
    bar = tqdm(sources, desc="pseudo-labelling", unit="img", disable=not progress, dynamic_ncols=True)
    for s in bar:
        img = load_image(s.path)
        lab = _label_image(teacher.probabilities(img), (img.height, img.width), min_peak, min_confidence,
                           s.known, known_fraction, dropped)
        teacher_px = lab[lab >= 0]
        if s.known is not None and s.known not in dropped:
            part = s.known // per_part
        elif teacher_px.size:
            part = int(np.bincount(teacher_px, minlength=len(names)).argmax()) // per_part
        else:
            part = 0
        lo, hi = part * per_part, min(len(names), (part + 1) * per_part)
        mask = np.full(lab.shape, IGNORE, np.uint8)
        inside = (lab >= lo) & (lab < hi)
        mask[inside] = (lab[inside] - lo + 1).astype(np.uint8)
        if s.gt is not None:  # the ground truth wins where it names a class; its "none" pixels keep a sure teacher
            g = s.gt()
            cls = g > 0
            mask[cls] = (per_part + (g[cls] - 1 - len(names)) + 1).astype(np.uint8)
            mask[g < 0] = IGNORE
            mask[(g == 0) & ~inside] = 0
            inside &= ~cls & (g >= 0)
        np.add.at(counts, lab[inside], 1)
        ignored += int((mask == IGNORE).sum())
        total += mask.size
        stem = s.id
        _link(s.path, part_dirs[part] / "images" / f"{stem}{s.path.suffix.lower()}")
        save_png_atomic(Image.fromarray(mask, mode="L"), part_dirs[part] / "masks" / f"{stem}.png")
        images_per_part[part] += 1
        if len(shown) < examples:
            shown.append((img, mask, part))
    bar.close()
    syn = teacher.synonyms
    manifests = []
    for p, pd in enumerate(part_dirs):
        lo, hi = p * per_part, min(len(names), (p + 1) * per_part)
        classes = {str(k - lo + 1): names[k] for k in range(lo, hi) if k not in dropped}
        classes.update({str(per_part + j + 1): n for j, n in enumerate(gt_names)})
        ignore = [k - lo + 1 for k in range(lo, hi) if k in dropped] + [255]
        m = {"format": "fusionseg-folder/1", "images": "images", "masks": "masks", "classes": classes,
             "background_values": [0], "ignore_values": sorted(ignore),
             "synonyms": {str(k - lo + 1): [s for s in syn[k] if normalize_name(s) not in ex]
                          for k in range(lo, hi) if k not in dropped},
             "teacher": teacher.describe()}
        manifests.append(m)
        write_text_atomic(json.dumps(m, indent=1), pd / "dataset.json")
    summary = {"format": COLLECTION_FORMAT, "parts": [pd.name for pd in part_dirs], "images": len(sources),
               "images_per_part": images_per_part, "teacher": teacher.describe(),
               "teacher_classes": len(names), "dropped_classes": sorted(names[k] for k in dropped),
               "classes_with_pixels": int((counts > 0).sum()), "ignored_fraction": round(ignored / max(total, 1), 4),
               "settings": {"min_peak": min_peak, "min_confidence": min_confidence, "known_fraction": known_fraction,
                            "exclude_classes": list(exclude_classes), "val_fraction": val_fraction, "seed": seed},
               "data": [str(d) for d in data]}
    if shown:
        from ..visualize import grid, overlay
        rows = []
        for img, mask, p in shown:
            man = manifests[p]
            n_cls = max(int(k) for k in man["classes"])
            names_p = [man["classes"].get(str(v), "") for v in range(1, n_cls + 1)]
            vis = np.where(mask == IGNORE, 0, mask)
            rows.append([img, overlay(img, vis, names_p)])
        save_png_atomic(grid(rows, ["image", "pseudo-label (uncoloured: ignored)"]), out / "examples.png")
        summary["examples"] = "examples.png"
    write_text_atomic(json.dumps(summary, indent=1), out / "dataset.json")
    return summary


def expand_collection(path: str | Path, skip_empty: bool = False) -> list[Path]:
    """A folder written by :func:`pseudo_label` -> its part folders; any other folder -> itself.

    ``skip_empty``: leave out the parts that received no image (``images_per_part``; a small folder labelled
    by a 1,000-name teacher fills one or two of its parts), unless every part is empty. Training reads the
    parts with this: a part without images is no dataset to train on.
    """
    p = Path(path)
    m = p / "dataset.json"
    if m.is_file():
        try:
            meta = json.loads(m.read_text())
        except json.JSONDecodeError:
            return [p]
        if isinstance(meta, dict) and meta.get("format") == COLLECTION_FORMAT:
            parts = [p / q for q in meta.get("parts", [])]
            missing = [str(q) for q in parts if not (q / "dataset.json").is_file()]
            if missing:
                raise DatasetError(f"{m}: part {missing[0]} is missing (re-run fusionseg pseudo-label)")
            counts = meta.get("images_per_part")
            if skip_empty and isinstance(counts, list) and len(counts) == len(parts) and any(counts):
                parts = [q for q, n in zip(parts, counts) if n]
            return parts
    return [p]
