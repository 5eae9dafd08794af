"""PASCAL-5i: VOC2012 ``JPEGImages/<id>.jpg`` + ``SegmentationClassAug/<id>.png`` (0..20, 255), HSNet's fold lists."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..datasets import IGNORE, DatasetError
from ._base import _Base, _cycle
from .splits import NUM_FOLDS, SPLITS_ENV, _check_fold, _find_split_file, _fold_split, _read_pascal_list, \
    pascal_fold_classes

#: The 20 PASCAL VOC classes in the standard order (mask value k = VOC_CLASSES[k - 1]). VOC's file names
#: "diningtable", "pottedplant" and "tvmonitor" are written as words, since a text encoder reads them.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table", "dog",
    "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor")


def _find_voc_root(root: str | os.PathLike) -> Path:
    r = Path(root)
    if not r.is_dir():
        raise DatasetError(f"PASCAL-5i root not found: {r} (expected the VOC2012 folder with JPEGImages/ and "
                           f"SegmentationClassAug/)")
    for cand in (r, r / "VOC2012", r / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DatasetError(f"{r} has no JPEGImages/ folder (PASCAL-5i needs VOC2012 JPEGImages/ and "
                       f"SegmentationClassAug/; ROOT may also be the folder holding VOC2012/)")


def generate_pascal_split(root: str | os.PathLike, fold: int, split: str = "val",
                          image_ids: Sequence[str] | None = None, min_pixels: int = 1,
                          mask_dir: str = "SegmentationClassAug") -> list[tuple[str, int]]:
    """Episode list ``[(image id, class)]`` for PASCAL-5i from the masks, when HSNet's lists are not at hand.

    Rule: every (image, class) pair where the class has at least ``min_pixels`` pixels in the image's mask and
    belongs to the split's classes — for ``val`` fold f's classes 5f+1..5f+5, for ``trn`` the other 15.
    Images: ``image_ids`` if given, else for ``val`` VOC2012's ``ImageSets/Segmentation/val.txt`` (the 1,449
    segmentation val images), for ``trn`` ``ImageSets/SegmentationAug/train_aug.txt`` if present, else every
    mask in ``mask_dir`` not in the val list. Ordered by image id, then class.

    This is NOT HSNet's list: HSNet's lists (taken over from earlier few-shot work) are a filtered subset of
    such pairs (e.g. fold 0 val: 346 pairs, fold 0 trn: 2,286), so mIoU measured on a generated split is not
    comparable with published numbers. Use the HSNet lists for those.
    """
    f = _check_fold(fold, "PASCAL-5i")
    split = _fold_split(split, "PASCAL-5i")
    voc = _find_voc_root(root)
    masks = voc / mask_dir
    if not masks.is_dir():
        raise DatasetError(f"{voc} has no {mask_dir}/ folder (PASCAL-5i needs VOC2012 JPEGImages/ and "
                           f"SegmentationClassAug/)")
    novel = set(pascal_fold_classes(f))
    wanted = novel if split == "val" else set(range(1, 21)) - novel
    val_list = voc / "ImageSets" / "Segmentation" / "val.txt"
    if image_ids is None:
        if split == "val":
            if not val_list.is_file():
                raise DatasetError(f"{voc} has no ImageSets/Segmentation/val.txt to generate the PASCAL-5i val split "
                                   f"from; pass image_ids or use HSNet's split lists (split_dir)")
            image_ids = val_list.read_text().split()
        else:
            aug = voc / "ImageSets" / "SegmentationAug" / "train_aug.txt"
            if aug.is_file():
                image_ids = [Path(t).stem for t in aug.read_text().split() if t.endswith(".png") or "/" not in t]
            else:
                val = set(val_list.read_text().split()) if val_list.is_file() else set()
                image_ids = [p.stem for p in masks.glob("*.png") if p.stem not in val]
    out = []
    for id in sorted(set(image_ids)):
        p = masks / f"{id}.png"
        if not p.is_file():
            raise DatasetError(f"{p} is missing (listed image {id})")
        with Image.open(p) as m:
            counts = np.bincount(np.asarray(m, dtype=np.uint8).reshape(-1), minlength=256)
        out.extend((id, c) for c in sorted(wanted) if counts[c] >= min_pixels)
    return out


class Pascal5i(_Base):
    """PASCAL-5i (HSNet protocol) from a VOC2012 folder.

    Args:
        root: the VOC2012 folder (``JPEGImages/``, ``SegmentationClassAug/``), or a folder holding ``VOC2012/``
            or ``VOCdevkit/VOC2012/``.
        fold: 0..3; fold f's novel (test) classes are 5f+1..5f+5 (:attr:`novel_classes`).
        split: ``"val"`` (alias ``"test"``): HSNet's ``val/fold{f}.txt`` (image, novel class) pairs.
            ``"trn"`` (alias ``"train"``): the union of HSNet's ``trn/fold{g}.txt`` for every g != f, i.e. the
            pairs of the 15 base classes, as HSNet trains.
        split_dir: folder with the lists (see :mod:`.splits` for the search order). If no list is found and
            ``split_dir`` was not given, :func:`generate_pascal_split` builds one from the masks, with a warning
            (``split_source`` then says ``"generated"``).
        novel_as_ignore: novel-class pixels become 255 (ignore); default True for ``trn``, False for ``val``.
        mask_dir: mask folder name; default ``SegmentationClassAug`` (``SegmentationClass`` is accepted for
            ``val`` when the Aug folder is absent: the val images are all in it).

    Samples are the distinct images of the list (first-appearance order); masks keep all 20 VOC classes
    (except novel -> 255 as above) and the 255 boundary. :meth:`episodes` gives the list's (image, class)
    pairs, cycled to ``n`` like HSNet (its val loader has 1,000 episodes: ``idx % len(list)``).
    """

    benchmark = "pascal5i"

    def __init__(self, root: str | os.PathLike, fold: int, split: str = "val",
                 split_dir: str | os.PathLike | None = None, novel_as_ignore: bool | None = None,
                 mask_dir: str | None = None):
        self.fold = _check_fold(fold, "PASCAL-5i")
        self.split = _fold_split(split, "PASCAL-5i")
        self.root = _find_voc_root(root)
        self.image_dir = self.root / "JPEGImages"
        if mask_dir is None:
            mask_dir = "SegmentationClassAug"
            if not (self.root / mask_dir).is_dir() and self.split == "val" and (self.root / "SegmentationClass").is_dir():
                mask_dir = "SegmentationClass"
        self.mask_dir = self.root / mask_dir
        if not self.mask_dir.is_dir():
            raise DatasetError(f"{self.root} has no {mask_dir}/ folder (PASCAL-5i needs VOC2012 JPEGImages/ and "
                               f"SegmentationClassAug/)")
        self.class_names = VOC_CLASSES
        self.novel_classes = pascal_fold_classes(self.fold)
        self.base_classes = [c for c in range(1, 21) if c not in self.novel_classes]
        self.novel_as_ignore = (self.split == "trn") if novel_as_ignore is None else bool(novel_as_ignore)
        self.name = f"pascal5i-fold{self.fold}-{self.split}"
        expected = set(self.novel_classes) if self.split == "val" else set(self.base_classes)

        entries: list[tuple[str, int]] = []
        sources = []
        folds = [self.fold] if self.split == "val" else [g for g in range(NUM_FOLDS) if g != self.fold]
        for g in folds:
            path, tried = _find_split_file("pascal", f"{self.split}/fold{g}.txt", split_dir, self.root)
            if path is None:
                if split_dir is not None:
                    raise DatasetError(f"PASCAL-5i split list {self.split}/fold{g}.txt not found in {split_dir} "
                                       f"(tried {', '.join(str(t) for t in tried)})")
                sources = []
                break
            part = _read_pascal_list(path)
            bad = sorted({c for _, c in part} - expected)
            if bad:
                raise DatasetError(f"{path} lists classes {bad}, which are not {self.split} classes of fold "
                                   f"{self.fold} ({sorted(expected)}): is it the right fold's file?")
            entries += part
            sources.append(str(path))
        if not sources:
            warnings.warn(f"PASCAL-5i: HSNet's split lists were not found (pass split_dir or set ${SPLITS_ENV}); "
                          f"generating the {self.split} split of fold {self.fold} from the masks, which is not "
                          f"the published split (numbers are not comparable)", stacklevel=2)
            entries = generate_pascal_split(self.root, self.fold, self.split, mask_dir=mask_dir)
            self.split_source = "generated"
        else:
            self.split_source = sources[0] if len(sources) == 1 else sources
        if not entries:
            raise DatasetError(f"PASCAL-5i fold {self.fold} {self.split}: the split list is empty")

        index: dict[str, int] = {}
        for id, _ in entries:
            index.setdefault(id, len(index))
        self.ids = list(index)
        self._entries = [(index[id], c) for id, c in entries]
        missing = [p for id in self.ids for p in (self.image_dir / f"{id}.jpg", self.mask_dir / f"{id}.png")
                   if not p.is_file()]
        if missing:
            raise DatasetError(f"PASCAL-5i: {len(missing)} listed files are missing, e.g. {missing[0]} (the list "
                               f"names VOC2012 images and SBD-augmented masks: SegmentationClassAug/)")
        lut = np.full(256, -1, dtype=np.int16)
        lut[:21] = np.arange(21)
        lut[IGNORE] = IGNORE
        if self.novel_as_ignore:
            lut[self.novel_classes] = IGNORE
        self._lut = lut

    def _image_path(self, id: str) -> Path:
        return self.image_dir / f"{id}.jpg"

    def load_mask(self, id: str) -> np.ndarray:
        """``(H, W)`` uint8: 0 background, 1..20 VOC classes, 255 boundary / ignore (and novel if so set)."""
        path = self.mask_dir / f"{id}.png"
        with Image.open(path) as m:
            if m.mode not in ("L", "P"):
                raise DatasetError(f"{path}: a VOC mask must hold class indices (mode P or L), got mode {m.mode} "
                                   f"(colour masks are not supported: use SegmentationClassAug)")
            raw = np.asarray(m, dtype=np.uint8)
        out = self._lut[raw]
        if (out < 0).any():
            raise DatasetError(f"{path}: mask value {int(raw[out < 0][0])} is not a VOC label (0..20, 255)")
        return out.astype(np.uint8)

    def episodes(self, n: int | None = 1000, seed: int = 0) -> list[tuple[int, int]]:
        """(sample index, class) for the list's entries in file order, cycled to ``n`` (HSNet: 1,000 per fold;
        ``None`` = each entry once). ``seed`` is unused: HSNet's query order is deterministic."""
        return _cycle(self._entries, n)
