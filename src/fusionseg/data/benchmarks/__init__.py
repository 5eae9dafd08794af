"""Benchmark datasets read from their official layouts, yielding :class:`~fusionseg.data.datasets.Sample`.

Every loader has ``class_names`` (tuple), ``ids``, ``__len__``, ``__getitem__ -> Sample``, ``load_mask(id)``
(the mask alone, without decoding the image) and ``episodes(n, seed) -> [(sample_index, class_index)]``
(one-class episodes, class indices 1-based); the fold benchmarks also have ``fold``, ``novel_classes`` and
``base_classes`` (1-based). Masks: 0 = background, k = ``class_names[k - 1]``, 255 = ignore.

* :class:`Pascal5i` — VOC2012 ``JPEGImages/<id>.jpg`` + ``SegmentationClassAug/<id>.png`` (0..20, 255).
  Folds: fold f tests classes 5f+1..5f+5. Image lists: HSNet's ``pascal/{trn,val}/fold{f}.txt``.
* :class:`Coco20i` — COCO 2014 ``train2014/``, ``val2014/`` + ``annotations/instances_{train,val}2014.json``,
  masks rendered from the polygons / RLE by pycocotools (the ``coco`` extra; crowd -> 255). Fold f tests
  classes f+1, f+5, ..., f+77. Image lists: HSNet's ``coco/{trn,val}/fold{f}.pkl``, or generated from the JSON.
* :class:`FSS1000` — one folder per class with ``1.jpg``..``10.jpg`` + ``1.png``..``10.png``.
* :class:`Mosaic4` — 2x2 mosaics of four tiles of four different classes from FSS-1000 or any dataset.
* :func:`open_dataset` — ``pascal5i:ROOT``, ``coco20i:ROOT``, ``fss1000:ROOT``, ``mosaic4:ROOT`` or a folder.

Modules: :mod:`.splits` (fold and split rules, where the split lists are looked up, list readers),
:mod:`.pascal`, :mod:`.coco`, :mod:`.fss`, :mod:`.mosaic` (one per benchmark), ``_base`` (the shared dataset
plumbing), ``_helpers`` (a restricted unpickler, a union-find); this ``__init__`` holds the dispatcher.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..datasets import DatasetError, FolderDataset
from ._helpers import largest_component
from .coco import Coco20i, decode_coco_segmentation, render_coco_mask
from .fss import FSS1000
from .mosaic import Mosaic4, MosaicSample
from .pascal import VOC_CLASSES, Pascal5i, generate_pascal_split
from .splits import (NUM_FOLDS, SPLITS_ENV, _check_fold, _load_coco_list, _read_pascal_list,
                     coco_fold_classes, pascal_fold_classes)

__all__ = ["VOC_CLASSES", "Pascal5i", "Coco20i", "FSS1000", "Mosaic4", "MosaicSample", "open_dataset",
           "generate_pascal_split", "pascal_fold_classes", "coco_fold_classes", "decode_coco_segmentation",
           "render_coco_mask", "largest_component", "SPLITS_ENV", "BENCHMARKS", "NUM_FOLDS"]


BENCHMARKS = ("pascal5i", "coco20i", "fss1000", "mosaic4")


def open_dataset(spec: str, fold: int | None = None, split: str | None = None, **kwargs):
    """A dataset by spec.

    * ``pascal5i:ROOT`` (fold 0-3; split ``val`` default, or ``trn``), ``coco20i:ROOT`` (likewise),
    * ``fss1000:ROOT`` (split ``test`` default, ``val``, ``trn``, ``all``),
    * ``mosaic4:ROOT`` — Mosaic-4 over an FSS-1000 root (its ``split``, default ``test``) or over a folder
      dataset (ROOT with ``dataset.json``),
    * a folder with ``dataset.json`` -> :class:`FolderDataset`.

    Extra keywords go to the loader (e.g. ``split_dir=``, ``n=``, ``seed=`` for Mosaic-4). Raises
    :class:`DatasetError` for an unknown name, a missing or wrong layout, a fold outside 0-3, or a fold given
    to a dataset without folds.
    """
    spec = str(spec)
    prefix, sep, rest = spec.partition(":")
    name = prefix.lower()
    if sep and name in BENCHMARKS:
        if not rest:
            raise DatasetError(f"{spec!r}: give the dataset root after the colon, e.g. {name}:/data/...")
        if name == "pascal5i":
            return Pascal5i(rest, _check_fold(fold, "PASCAL-5i"), split=split or "val", **kwargs)
        if name == "coco20i":
            return Coco20i(rest, _check_fold(fold, "COCO-20i"), split=split or "val", **kwargs)
        if fold is not None:
            raise DatasetError(f"{name} has no folds; leave fold out (got fold={fold!r})")
        if name == "fss1000":
            return FSS1000(rest, split=split or "test", **kwargs)
        mosaic_keys = ("n", "seed", "size", "others", "min_area", "margin")
        mk = {k: kwargs.pop(k) for k in mosaic_keys if k in kwargs}
        if (Path(rest) / "dataset.json").is_file():
            if kwargs:
                raise DatasetError(f"{spec!r}: unexpected options {sorted(kwargs)} for a folder dataset")
            return Mosaic4(FolderDataset(rest), **mk)
        return Mosaic4(FSS1000(rest, split=split or "test", **kwargs), **mk)
    p = Path(spec)
    if p.is_dir():
        if fold is not None:
            raise DatasetError(f"{spec} is a folder dataset, which has no folds; leave fold out (got fold={fold!r})")
        return FolderDataset(p)
    if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]*", prefix) and len(prefix) > 1:
        raise DatasetError(f"unknown dataset {prefix!r} in {spec!r}: use one of "
                           f"{', '.join(b + ':ROOT' for b in BENCHMARKS)}, or a folder with dataset.json")
    raise DatasetError(f"dataset not found: {spec!r} is not a folder, and not one of "
                       f"{', '.join(b + ':ROOT' for b in BENCHMARKS)}")
