"""Benchmark datasets read from their official layouts, yielding :class:`~fusionseg.data.datasets.Sample`.

Every loader has ``class_names`` (tuple), ``ids``, ``__len__``, ``__getitem__ -> Sample``, ``load_mask(id)``
(the mask alone, without decoding the image) and ``episodes(n, seed) -> [(sample_index, class_index)]``
(one-class episodes, class indices 1-based); the fold benchmarks also have ``fold``, ``novel_classes`` and
``base_classes`` (1-based). Masks: 0 = background, k = ``class_names[k - 1]``, 255 = ignore.

* :class:`Pascal5i` — VOC2012 ``JPEGImages/<id>.jpg`` + ``SegmentationClassAug/<id>.png`` (0..20, 255).
  Folds: fold f tests classes 5f+1..5f+5. Image lists: HSNet's ``pascal/{trn,val}/fold{f}.txt``.
* :class:`Coco20i` — COCO 2014 ``train2014/``, ``val2014/`` + ``annotations/instances_{train,val}2014.json``,
  masks rendered from the polygons / RLE (crowd -> 255). Fold f tests classes f+1, f+5, ..., f+77.
  Image lists: HSNet's ``coco/{trn,val}/fold{f}.pkl``, or generated from the JSON.
* :class:`FSS1000` — one folder per class with ``1.jpg``..``10.jpg`` + ``1.png``..``10.png``.
* :class:`Mosaic4` — 2x2 mosaics of four tiles of four different classes from FSS-1000 or any dataset.
* :func:`open_dataset` — ``pascal5i:ROOT``, ``coco20i:ROOT``, ``fss1000:ROOT``, ``mosaic4:ROOT`` or a folder.

Split lists are looked up, in order, in: the ``split_dir`` argument (if given, nothing else is tried), the
folder named by ``$FUSIONSEG_SPLITS``, ``fusionseg/data/splits/`` inside the package, and ``ROOT/splits``.
In each, the file may sit directly under it, under ``<benchmark>/`` or under ``hsnet/<benchmark>/``
(``<benchmark>`` = ``pascal``, ``coco`` or ``fss``), e.g. ``splits/hsnet/pascal/val/fold0.txt``.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from .datasets import IGNORE, DatasetError, FolderDataset, Sample
from .io import load_image

__all__ = ["VOC_CLASSES", "Pascal5i", "Coco20i", "FSS1000", "Mosaic4", "MosaicSample", "open_dataset",
           "generate_pascal_split", "pascal_fold_classes", "coco_fold_classes", "decode_coco_segmentation",
           "render_coco_mask", "largest_component", "SPLITS_ENV"]

NUM_FOLDS = 4
SPLITS_ENV = "FUSIONSEG_SPLITS"
PACKAGE_SPLITS = Path(__file__).resolve().parent / "splits"

#: The 20 PASCAL VOC classes in the standard order (mask value k = VOC_CLASSES[k - 1]). VOC's file names
#: "diningtable", "pottedplant" and "tvmonitor" are written as words, since a text encoder reads them.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table", "dog",
    "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor")


# --------------------------------------------------------------------------------------------------- helpers
def _check_fold(fold: Any, what: str) -> int:
    if fold is None:
        raise DatasetError(f"{what} needs a fold: 0, 1, 2 or 3")
    ok = isinstance(fold, (int, np.integer)) and not isinstance(fold, bool)
    ok = ok or (isinstance(fold, str) and fold.strip().isdigit())
    if not ok or not 0 <= int(fold) < NUM_FOLDS:
        raise DatasetError(f"{what}: fold must be 0, 1, 2 or 3, got {fold!r}")
    return int(fold)


def _fold_split(split: str | None, what: str) -> str:
    s = (split or "val").lower()
    if s in ("val", "test"):
        return "val"
    if s in ("trn", "train"):
        return "trn"
    raise DatasetError(f"{what}: split must be 'val' (alias 'test') or 'trn' (alias 'train'), got {split!r}")


def pascal_fold_classes(fold: int) -> list[int]:
    """PASCAL-5i fold ``fold``'s test (novel) classes, 1-based: 5f+1 .. 5f+5."""
    f = _check_fold(fold, "PASCAL-5i")
    return list(range(5 * f + 1, 5 * f + 6))


def coco_fold_classes(fold: int) -> list[int]:
    """COCO-20i fold ``fold``'s test (novel) classes, 1-based in COCO category order: f+1, f+5, ..., f+77."""
    f = _check_fold(fold, "COCO-20i")
    return [f + 1 + NUM_FOLDS * k for k in range(20)]


def _split_bases(split_dir: str | os.PathLike | None, root: Path | None) -> tuple[list[Path], bool]:
    if split_dir is not None:
        return [Path(split_dir)], True
    bases = []
    env = os.environ.get(SPLITS_ENV)
    if env:
        bases.append(Path(env))
    bases.append(PACKAGE_SPLITS)
    if root is not None:
        bases.append(root / "splits")
    return bases, False


def _find_split_file(kind: str, rel: str, split_dir, root: Path | None) -> tuple[Path | None, list[Path]]:
    """First existing ``base/{'', kind, hsnet/kind}/rel``; returns (path or None, paths tried)."""
    bases, _ = _split_bases(split_dir, root)
    tried = []
    for base in bases:
        for sub in ("", kind, f"hsnet/{kind}"):
            p = base / sub / rel if sub else base / rel
            tried.append(p)
            if p.is_file():
                return p, tried
    return None, tried


def _resize_pair(image: Image.Image, mask: np.ndarray, size_wh: tuple[int, int]) -> tuple[Image.Image, np.ndarray]:
    if image.size != size_wh:
        image = image.resize(size_wh, Image.Resampling.BILINEAR)
    if (mask.shape[1], mask.shape[0]) != size_wh:
        mask = np.asarray(Image.fromarray(mask, "L").resize(size_wh, Image.Resampling.NEAREST))
    return image, mask


class _Base:
    """Shared plumbing: ``ids``, ``__len__``, iteration, ``__getitem__`` from ``_image_path`` + ``load_mask``."""

    class_names: tuple[str, ...]
    ids: list[str]
    name: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def _image_path(self, id: str) -> Path:  # pragma: no cover - overridden
        raise NotImplementedError

    def load_mask(self, id: str) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def __getitem__(self, i: int) -> Sample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name}: index {i} out of range ({len(self)} samples)")
        id = self.ids[i]
        image = load_image(self._image_path(id))
        mask = self.load_mask(id)
        if mask.shape != (image.height, image.width):
            raise DatasetError(f"{self.name}: the mask of {id} is {mask.shape[1]}x{mask.shape[0]} but the image is "
                               f"{image.width}x{image.height}")
        return Sample(id=id, image=image, mask=mask, class_names=self.class_names)


def _cycle(items: list, n: int | None) -> list:
    if n is None or not items:
        return list(items)
    return [items[k % len(items)] for k in range(int(n))]


# --------------------------------------------------------------------------------------------------- PASCAL-5i
_PASCAL_LINE = re.compile(r"^(\S+?)__(\d+)$")


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


def _read_pascal_list(path: Path) -> list[tuple[str, int]]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        m = _PASCAL_LINE.match(line)
        if not m or not 1 <= int(m.group(2)) <= 20:
            raise DatasetError(f"{path}:{n}: expected '<VOC image id>__<class 1..20>' (e.g. 2007_000033__01), "
                               f"got {line!r}")
        out.append((m.group(1), int(m.group(2))))
    return out


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
        split_dir: folder with the lists (see the module doc for the search order). If no list is found and
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


# --------------------------------------------------------------------------------------------------- COCO-20i
def _rle_string_to_counts(s: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE string (pycocotools' LEB128-like 6-bit text format) into run lengths."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _rle_counts_to_mask(counts: Sequence[int], h: int, w: int) -> np.ndarray:
    """Run lengths (alternating 0s and 1s, starting with 0s, column-major) -> ``(h, w)`` bool."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != h * w:
        raise DatasetError(f"RLE runs add up to {int(counts.sum())} pixels, but the size is {h}x{w}")
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T.copy()


def _polygons_to_mask(polys: Sequence[Sequence[float]], h: int, w: int) -> np.ndarray:
    """Fill COCO polygons (flat ``[x0, y0, x1, y1, ...]`` lists; pixel (x, y) spans [x, x+1) x [y, y+1)).

    A pixel is inside a polygon when its centre ``(x + 0.5, y + 0.5)`` is (even-odd rule, scanline per row);
    the instance is the union of its polygons. This is the rule pycocotools' rasteriser approximates: on the
    2,535 instances of shared/data/coco2017_mini the two differ on 0.14 % of the object pixels.
    """
    out = np.zeros((h, w), dtype=bool)
    for poly in polys:
        xy = np.asarray(poly, dtype=np.float64)
        if xy.size < 6:
            continue
        xy = xy[: xy.size // 2 * 2].reshape(-1, 2)
        x1, y1 = xy[:, 0], xy[:, 1]
        x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
        ylo, yhi = np.minimum(y1, y2), np.maximum(y1, y2)
        r0 = max(0, int(np.floor(ylo.min() - 0.5)))
        r1 = min(h, int(np.ceil(yhi.max() + 0.5)) + 1)
        if r1 <= r0:
            continue
        yc = np.arange(r0, r1, dtype=np.float64)[:, None] + 0.5
        active = (ylo[None, :] <= yc) & (yc < yhi[None, :])
        dy = np.where(y2 == y1, 1.0, y2 - y1)
        xs = np.where(active, x1[None, :] + (yc - y1[None, :]) / dy[None, :] * (x2 - x1)[None, :], np.inf)
        xs.sort(axis=1)
        # columns whose centre lies in [a, b): ceil(a - 0.5) .. ceil(b - 0.5) - 1
        cols = np.ceil(np.where(np.isfinite(xs), xs, 0.0) - 0.5).clip(0, w).astype(np.int64)
        for k, c in enumerate(active.sum(1).tolist()):
            row = out[r0 + k]
            for lo, hi in zip(cols[k, 0:c:2].tolist(), cols[k, 1:c:2].tolist()):
                if hi > lo:
                    row[lo:hi] = True
    return out


def _coco_decode(rle) -> np.ndarray:
    """pycocotools' decode, without the DeprecationWarning its Cython layer raises under numpy 2."""
    import pycocotools.mask as mu
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mu.decode(rle).astype(bool)


def _have_pycocotools() -> bool:
    try:
        import pycocotools.mask  # noqa: F401
    except Exception:
        return False
    return True


def decode_coco_segmentation(seg: Any, h: int, w: int, use_pycocotools: bool | None = None) -> np.ndarray:
    """A COCO ``segmentation`` field -> ``(h, w)`` bool mask.

    Handles polygons (list of flat coordinate lists), uncompressed RLE (``{"counts": [ints], "size": [h, w]}``,
    crowd regions) and compressed RLE (``counts`` a string). Uses pycocotools when installed (unless
    ``use_pycocotools=False``); otherwise our own decoder: RLE exactly, polygons by the pixel-centre rule
    (:func:`_polygons_to_mask`; a few boundary pixels may differ from pycocotools).
    """
    if use_pycocotools is None:
        use_pycocotools = _have_pycocotools()
    if isinstance(seg, list):
        polys = [p for p in seg if len(p) >= 6]
        if not polys:
            return np.zeros((h, w), dtype=bool)
        if use_pycocotools:
            import pycocotools.mask as mu
            return _coco_decode(mu.merge(mu.frPyObjects([list(map(float, p)) for p in polys], h, w)))
        return _polygons_to_mask(polys, h, w)
    if isinstance(seg, dict) and "counts" in seg:
        sh, sw = (int(v) for v in seg.get("size", (h, w)))
        if (sh, sw) != (h, w):
            raise DatasetError(f"RLE size {sh}x{sw} differs from the image size {h}x{w}")
        counts = seg["counts"]
        if use_pycocotools:
            import pycocotools.mask as mu
            if isinstance(counts, list):
                rle = mu.frPyObjects(seg, h, w)
            else:
                rle = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
            return _coco_decode(rle)
        if not isinstance(counts, list):
            counts = _rle_string_to_counts(counts)
        return _rle_counts_to_mask(counts, h, w)
    raise DatasetError(f"unsupported COCO segmentation of type {type(seg).__name__}")


def render_coco_mask(anns: Sequence[dict], h: int, w: int, cat_index: dict[int, int],
                     use_pycocotools: bool | None = None) -> np.ndarray:
    """Semantic ``(h, w)`` uint8 mask from COCO instance annotations.

    Non-crowd instances are painted with ``cat_index[category_id]`` (1-based class index) in order of
    decreasing ``area`` (larger first, so smaller objects stay on top); crowd regions then become 255
    (ignore) wherever no non-crowd instance was painted. The same rule as ``shared/data/coco2017_mini``.
    """
    mask = np.zeros((h, w), dtype=np.uint8)
    crowd = np.zeros((h, w), dtype=bool)
    things = [a for a in anns if not a.get("iscrowd", 0)]
    things.sort(key=lambda a: -float(a.get("area", 0.0)))
    for a in things:
        mask[decode_coco_segmentation(a["segmentation"], h, w, use_pycocotools)] = cat_index[int(a["category_id"])]
    for a in anns:
        if a.get("iscrowd", 0):
            crowd |= decode_coco_segmentation(a["segmentation"], h, w, use_pycocotools)
    mask[crowd & (mask == 0)] = IGNORE
    return mask


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"the file holds an object of type {module}.{name}; only plain dicts, lists, "
                                     f"ints and strings are accepted")


def _load_coco_list(path: Path) -> dict[int, list[str]]:
    """HSNet's ``fold{f}.pkl``: ``{0-based class: [image paths such as 'val2014/COCO_val2014_....jpg']}``,
    read with an unpickler that refuses every object (the files hold only dict/list/int/str)."""
    try:
        data = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as e:
        raise DatasetError(f"{path}: not a plain COCO-20i split list ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(k, int) and isinstance(v, list) for k, v in data.items()):
        raise DatasetError(f"{path}: expected a dict of class index -> list of image paths")
    return data


def _find_coco_root(root: str | os.PathLike, sub: str) -> Path:
    r = Path(root)
    layout = ("COCO-20i needs the COCO 2014 layout: train2014/, val2014/ and "
              "annotations/instances_{train,val}2014.json")
    if not r.is_dir():
        raise DatasetError(f"COCO-20i root not found: {r} ({layout})")
    for cand in (r, r / "COCO2014", r / "coco"):
        if (cand / sub).is_dir():
            return cand
    raise DatasetError(f"{r} has no {sub}/ folder ({layout})")


class Coco20i(_Base):
    """COCO-20i (HSNet protocol) from the COCO 2014 layout.

    Args:
        root: folder with ``train2014/``, ``val2014/``, ``annotations/instances_{train,val}2014.json`` (or a
            folder holding ``COCO2014/`` so laid out).
        fold: 0..3; fold f's novel classes are f+1, f+5, ..., f+77 (1-based, COCO category order).
        split: ``"val"`` (images of ``val2014``) or ``"trn"`` (``train2014``).
        instances_json: the instances file, if not at the usual place.
        split_dir: where HSNet's ``coco/{val,trn}/fold{f}.pkl`` are (see the module doc). Without them the
            per-class image lists are generated from the JSON (every image with at least one non-crowd
            instance of the class; HSNet's lists are a filtered subset, e.g. 19,217 val2014 images for person),
            with a warning, and ``split_source`` says ``"generated"``.
        novel_as_ignore: novel-class pixels become 255; default True for ``trn``.

    Classes: the JSON's 80 categories sorted by id (names as COCO writes them). Samples: the union of the
    split classes' image lists (val: the 20 novel classes; trn: the 60 base classes), sorted; masks rendered by
    :func:`render_coco_mask` (crowd -> 255). :meth:`episodes` samples as HSNet does: a class uniformly among the
    split classes, then an image uniformly among that class's images, seeded.
    """

    benchmark = "coco20i"

    def __init__(self, root: str | os.PathLike, fold: int, split: str = "val",
                 instances_json: str | os.PathLike | None = None, split_dir: str | os.PathLike | None = None,
                 novel_as_ignore: bool | None = None, use_pycocotools: bool | None = None):
        self.fold = _check_fold(fold, "COCO-20i")
        self.split = _fold_split(split, "COCO-20i")
        sub = "val2014" if self.split == "val" else "train2014"
        self.root = _find_coco_root(root, sub)
        self.image_dir = self.root / sub
        js = Path(instances_json) if instances_json else self.root / "annotations" / f"instances_{sub}.json"
        if not js.is_file():
            raise DatasetError(f"{self.root} has no annotations/instances_{sub}.json (COCO-20i renders its masks "
                               f"from the official instances JSON; pass instances_json= if it is elsewhere)")
        try:
            meta = json.loads(js.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{js} is not valid JSON: {e}") from None
        for key in ("images", "annotations", "categories"):
            if key not in meta:
                raise DatasetError(f"{js} has no '{key}' (not a COCO instances file)")
        cats = sorted(meta["categories"], key=lambda c: int(c["id"]))
        if len(cats) != 80:
            raise DatasetError(f"{js} has {len(cats)} categories; COCO-20i needs the 80 COCO thing classes")
        self.class_names = tuple(str(c["name"]) for c in cats)
        self._cat_index = {int(c["id"]): k for k, c in enumerate(cats, start=1)}
        self.novel_classes = coco_fold_classes(self.fold)
        self.base_classes = [c for c in range(1, 81) if c not in self.novel_classes]
        self.split_classes = self.novel_classes if self.split == "val" else self.base_classes
        self.novel_as_ignore = (self.split == "trn") if novel_as_ignore is None else bool(novel_as_ignore)
        self.use_pycocotools = use_pycocotools
        self.name = f"coco20i-fold{self.fold}-{self.split}"
        self.instances_json = js

        by_name = {Path(im["file_name"]).name: im for im in meta["images"]}
        anns_by_image: dict[int, list[dict]] = {}
        for a in meta["annotations"]:
            anns_by_image.setdefault(int(a["image_id"]), []).append(a)

        path, tried = _find_split_file("coco", f"{self.split}/fold{self.fold}.pkl", split_dir, self.root)
        per_class: dict[int, list[str]] = {}
        if path is not None:
            lists = _load_coco_list(path)
            for c in self.split_classes:
                per_class[c] = [Path(p).name for p in lists.get(c - 1, [])]
            extra = sorted(k + 1 for k, v in lists.items() if v and k + 1 not in self.split_classes)
            if extra:
                raise DatasetError(f"{path} lists images for classes {extra[:5]}, which are not {self.split} "
                                   f"classes of fold {self.fold}: is it the right fold's file?")
            self.split_source = str(path)
        else:
            if split_dir is not None:
                raise DatasetError(f"COCO-20i split list {self.split}/fold{self.fold}.pkl not found in {split_dir} "
                                   f"(tried {', '.join(str(t) for t in tried)})")
            warnings.warn(f"COCO-20i: HSNet's split lists were not found (pass split_dir or set ${SPLITS_ENV}); "
                          f"generating fold {self.fold} {self.split} from {js.name}, which is not the published "
                          f"split (numbers are not comparable)", stacklevel=2)
            for c in self.split_classes:
                per_class[c] = []
            for name, im in by_name.items():
                present = {self._cat_index[int(a["category_id"])] for a in anns_by_image.get(int(im["id"]), [])
                           if not a.get("iscrowd", 0)}
                for c in present & set(self.split_classes):
                    per_class[c].append(name)
            for c in per_class:
                per_class[c].sort()
            self.split_source = "generated"

        files = sorted({n for v in per_class.values() for n in v})
        if not files:
            raise DatasetError(f"COCO-20i fold {self.fold} {self.split}: no image shows any of the split's classes")
        unknown = [n for n in files if n not in by_name]
        if unknown:
            raise DatasetError(f"COCO-20i: {len(unknown)} listed images are not in {js.name}, e.g. {unknown[0]}")
        missing = [n for n in files if not (self.image_dir / n).is_file()]
        if missing:
            raise DatasetError(f"COCO-20i: {len(missing)} listed images are missing from {self.image_dir}, "
                               f"e.g. {missing[0]}")
        self.ids = [Path(n).stem for n in files]
        pos = {Path(n).stem: i for i, n in enumerate(files)}
        self._per_class = {c: [pos[Path(n).stem] for n in v] for c, v in per_class.items()}
        self._images = {Path(n).stem: by_name[n] for n in files}
        self._anns = {Path(n).stem: anns_by_image.get(int(by_name[n]["id"]), []) for n in files}
        lut = np.arange(256, dtype=np.uint8)
        if self.novel_as_ignore:
            lut[self.novel_classes] = IGNORE
        self._lut = lut

    def _image_path(self, id: str) -> Path:
        return self.image_dir / self._images[id]["file_name"]

    def load_mask(self, id: str) -> np.ndarray:
        im = self._images[id]
        m = render_coco_mask(self._anns[id], int(im["height"]), int(im["width"]), self._cat_index,
                             self.use_pycocotools)
        return self._lut[m]

    def images_of(self, class_index: int) -> list[int]:
        """Sample indices listed for a (1-based) class of the split."""
        return list(self._per_class.get(int(class_index), []))

    def episodes(self, n: int | None = 1000, seed: int = 0) -> list[tuple[int, int]]:
        """HSNet's COCO sampling, seeded: each episode draws a class uniformly among the split's classes that
        have images, then one of that class's images uniformly (1,000 episodes by default).
        ``n=None``: every (image, class) pair of the lists once, by class then image."""
        classes = [c for c in self.split_classes if self._per_class.get(c)]
        if n is None:
            return [(i, c) for c in classes for i in self._per_class[c]]
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(int(n)):
            c = classes[int(rng.integers(len(classes)))]
            imgs = self._per_class[c]
            out.append((imgs[int(rng.integers(len(imgs)))], c))
        return out


# --------------------------------------------------------------------------------------------------- FSS-1000
def _find_fss_root(root: str | os.PathLike) -> Path:
    r = Path(root)
    if not r.is_dir():
        raise DatasetError(f"FSS-1000 root not found: {r} (expected one folder per class holding 1.jpg..10.jpg "
                           f"and 1.png..10.png)")
    for cand in (r / "FSS-1000", r / "fewshot_data"):
        if cand.is_dir():
            return cand
    return r


def _natural_key(stem: str):
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


class FSS1000(_Base):
    """FSS-1000: one folder per class, ``<k>.jpg`` + ``<k>.png`` (10 per class, 224x224).

    Args:
        root: the folder of class folders (or one holding ``FSS-1000/``).
        split: ``"test"`` (240 classes), ``"val"`` (240), ``"trn"`` (520; alias ``"train"``) — class lists
            ``fss/{split}.txt`` as HSNet (for ``test`` the authors' ``fss_test_set.txt`` is also accepted, in
            ``ROOT`` or the split folders) — or ``"all"``: every sub-folder holding images.
        split_dir: where the class lists are (see the module doc).
        threshold: mask pixels ``>= threshold`` (grey level, after conversion to L) are foreground: the masks
            are anti-aliased 0..255, possibly stored as RGB. A mask whose maximum is 1 is read as a 0/1 mask
            (the format of the authors' example support set) and thresholded at 1.

    Classes are sorted by folder name (as HSNet); ``class_names`` are the folder names with ``_`` as space,
    ``categories`` the folder names. Each class folder's images are ``<k>.jpg`` sorted by k; where only
    ``<k>.jpeg`` exists it is used, a stray ``<k>.jpeg`` beside ``<k>.jpg`` is ignored. Masks: 0 / class index.
    :meth:`episodes` gives every image once with its own class (HSNet: 2,400 test episodes).
    """

    benchmark = "fss1000"

    def __init__(self, root: str | os.PathLike, split: str = "test", split_dir: str | os.PathLike | None = None,
                 threshold: int = 128):
        s = (split or "test").lower()
        s = {"train": "trn"}.get(s, s)
        if s not in ("trn", "val", "test", "all"):
            raise DatasetError(f"FSS-1000: split must be 'test', 'val', 'trn' or 'all', got {split!r}")
        self.split = s
        self.root = _find_fss_root(root)
        self.threshold = int(threshold)
        if s == "all":
            cats = sorted(p.name for p in self.root.iterdir()
                          if p.is_dir() and any(q.suffix.lower() in (".jpg", ".jpeg") for q in p.iterdir()))
            if not cats:
                raise DatasetError(f"{self.root} has no class folder with images (FSS-1000 layout: one folder per "
                                   f"class holding 1.jpg..10.jpg and 1.png..10.png)")
            self.split_source = "all folders"
        else:
            path, tried = _find_split_file("fss", f"{s}.txt", split_dir, self.root)
            if path is None and s == "test":
                for cand in [self.root / "fss_test_set.txt", self.root.parent / "fss_test_set.txt"] + \
                        [t.parent / "fss_test_set.txt" for t in tried]:
                    if cand.is_file():
                        path = cand
                        break
            if path is None:
                raise DatasetError(f"FSS-1000 class list {s}.txt not found (tried {', '.join(str(t) for t in tried)}); "
                                   f"pass split_dir= (HSNet's data/splits/fss), set ${SPLITS_ENV}, or use split='all'")
            cats = sorted({line.strip() for line in path.read_text().splitlines() if line.strip()})
            self.split_source = str(path)
        present = [c for c in cats if (self.root / c).is_dir()]
        if not present:
            raise DatasetError(f"{self.root} does not look like FSS-1000: none of the {len(cats)} {s} class folders "
                               f"(e.g. {cats[0]}/) is there (layout: one folder per class with 1.jpg + 1.png, ...)")
        if len(present) < len(cats):
            miss = [c for c in cats if c not in set(present)]
            raise DatasetError(f"{self.root} has no folder '{miss[0]}' ({len(miss)} of the {len(cats)} {s} classes "
                               f"are missing; FSS-1000 layout: one folder per class with 1.jpg..10.jpg + 1.png..10.png)")
        self.categories = tuple(cats)
        self.class_names = tuple(c.replace("_", " ") for c in cats)
        self.name = f"fss1000-{s}"
        self.ids: list[str] = []
        self._files: dict[str, tuple[Path, Path, int]] = {}
        self._entries: list[tuple[int, int]] = []
        for k, cat in enumerate(cats, start=1):
            folder = self.root / cat
            images: dict[str, Path] = {}
            for p in folder.iterdir():
                ext = p.suffix.lower()
                if ext == ".jpg" or (ext == ".jpeg" and p.stem not in images):
                    images[p.stem] = p
            if not images:
                raise DatasetError(f"{folder} holds no .jpg image")
            for stem in sorted(images, key=_natural_key):
                mask = folder / f"{stem}.png"
                if not mask.is_file():
                    raise DatasetError(f"{images[stem]} has no mask {mask.name} beside it")
                id = f"{cat}/{stem}"
                self._files[id] = (images[stem], mask, k)
                self._entries.append((len(self.ids), k))
                self.ids.append(id)

    def _image_path(self, id: str) -> Path:
        return self._files[id][0]

    def load_mask(self, id: str) -> np.ndarray:
        _, path, k = self._files[id]
        with Image.open(path) as m:
            g = np.asarray(m.convert("L"), dtype=np.uint8)
        thr = 1 if g.max() == 1 else self.threshold
        return np.where(g >= thr, np.uint8(k), np.uint8(0))

    def class_of(self, i: int) -> int:
        """1-based class index of sample ``i``."""
        return self._files[self.ids[i]][2]

    def episodes(self, n: int | None = None, seed: int = 0) -> list[tuple[int, int]]:
        """Every image once with its class (``n=None``), or cycled to ``n``; ``seed`` unused."""
        return _cycle(self._entries, n)


# --------------------------------------------------------------------------------------------------- Mosaic-4
def largest_component(binary: np.ndarray) -> tuple[int, tuple[int, int, int, int]] | None:
    """Largest 4-connected component of a ``(H, W)`` bool array: ``(area, (x0, y0, x1, y1))`` with exclusive
    ends, or ``None`` if the array is empty. Union-find over horizontal runs (no scipy needed)."""
    b = np.asarray(binary, dtype=bool)
    h, w = b.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = b
    d = np.diff(padded, axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)
    n = len(rows)
    if n == 0:
        return None
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    row_start = np.searchsorted(rows, np.arange(h + 1)).tolist()
    s_l, e_l = starts.tolist(), ends.tolist()
    for y in range(1, h):
        i, i1 = row_start[y - 1], row_start[y]
        j, j1 = row_start[y], row_start[y + 1]
        while i < i1 and j < j1:
            if s_l[i] < e_l[j] and s_l[j] < e_l[i]:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[rj] = ri
            if e_l[i] < e_l[j]:
                i += 1
            else:
                j += 1
    roots = np.fromiter((find(k) for k in range(n)), dtype=np.int64, count=n)
    area = np.bincount(roots, weights=ends - starts, minlength=n)
    best = int(np.argmax(area))
    sel = roots == best
    return int(area[best]), (int(starts[sel].min()), int(rows[sel].min()), int(ends[sel].max()),
                             int(rows[sel].max()) + 1)


def _square_box(box: tuple[int, int, int, int], w: int, h: int, margin: float) -> tuple[int, int, int, int]:
    """Grow ``box`` by ``margin`` x its longer side on every side, make it square where the image allows (shifted
    to stay inside), and clip it to the image."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0

    def span(c: float, limit: int) -> tuple[int, int]:
        s = min(side, float(limit))
        a = min(max(c - s / 2.0, 0.0), limit - s)
        lo, hi = int(round(a)), int(round(a + s))
        return max(0, lo), min(limit, max(hi, lo + 1))

    (ax, bx), (ay, by) = span(cx, w), span(cy, h)
    return ax, ay, bx, by


@dataclass
class MosaicSample(Sample):
    """A Mosaic-4 sample: ``query`` is the queried class (1-based, one of the four tiles' classes), ``tiles``
    the four ``(source id, class)`` pairs in quadrant order (top-left, top-right, bottom-left, bottom-right)."""

    query: int = 0
    tiles: tuple[tuple[str, int], ...] = ()

    @property
    def query_name(self) -> str:
        return self.class_names[self.query - 1]


class Mosaic4:
    """Deterministic 2x2 mosaics of four tiles showing four different classes, each with one query class.

    Args:
        source: an :class:`FSS1000` (each image is a tile, whole, with its class) or any dataset of
            :class:`Sample` s with ``class_names`` (e.g. a :class:`FolderDataset`), from which *single-object
            crops* are cut (below).
        n: number of mosaics.
        seed: the plan (classes, tiles, query) comes from ``numpy.random.default_rng(seed)``: the same seed and
            source give identical mosaics.
        size: output size, an int (square) or ``(height, width)``; default 448 = 2 x 224 (FSS-1000's size).
            Each tile is resized (stretched) into its quadrant: image bilinear, mask nearest.
        others: crops only — what pixels of *other* annotated classes inside a crop become: ``"ignore"``
            (255, default: the crop is a single-class tile, and the other object neither counts as the query's
            background nor as a miss) or ``"background"`` (0). Background (0) and ignore (255) pixels stay.
        min_area: crops only — a class's largest component must cover at least this fraction of its image.
        margin: crops only — the component's box grows by this fraction of its longer side on each side.

    Single-object crops: for every source image and every class present in it, the largest 4-connected
    component of that class; its bounding box grown by ``margin`` and made square where the image allows is
    the crop, labelled with that class (all of that class's pixels in the crop, not just the component).

    Mosaic ``i``: four different classes drawn without replacement among those with a tile, one tile drawn for
    each, placed in the order drawn (top-left, top-right, bottom-left, bottom-right); the query is one of the
    four drawn uniformly. Mask values are class indices of ``source.class_names``. ``class_names`` is the
    source's. :meth:`episodes` gives ``(i, query)`` for each mosaic.
    """

    benchmark = "mosaic4"

    def __init__(self, source, n: int = 1000, seed: int = 0, size: int | tuple[int, int] = 448,
                 others: str = "ignore", min_area: float = 0.01, margin: float = 0.1):
        if others not in ("ignore", "background"):
            raise ValueError(f"others must be 'ignore' or 'background', got {others!r}")
        if int(n) < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.source = source
        self.class_names: tuple[str, ...] = tuple(source.class_names)
        self.n, self.seed, self.others = int(n), int(seed), others
        self.min_area, self.margin = float(min_area), float(margin)
        if isinstance(size, (tuple, list)):
            self.size = (int(size[0]), int(size[1]))
        else:
            self.size = (int(size), int(size))
        if min(self.size) < 2:
            raise ValueError(f"size must be at least 2 pixels a side, got {size}")
        self.name = f"mosaic4-{getattr(source, 'name', 'source')}-s{self.seed}"
        self._whole = isinstance(source, FSS1000)
        self.tiles = self._index_tiles()
        eligible = sorted(c for c, t in self.tiles.items() if t)
        if len(eligible) < 4:
            raise DatasetError(f"Mosaic-4 needs tiles of at least 4 classes; {getattr(source, 'name', 'the source')} "
                               f"gives {len(eligible)} ({[self.class_names[c - 1] for c in eligible]})")
        rng = np.random.default_rng(self.seed)
        self._plan: list[tuple[tuple[tuple[int, int, tuple | None], ...], int]] = []
        for _ in range(self.n):
            classes = [eligible[int(k)] for k in rng.choice(len(eligible), size=4, replace=False)]
            tiles = []
            for c in classes:
                options = self.tiles[c]
                idx, box = options[int(rng.integers(len(options)))]
                tiles.append((idx, c, box))
            query = classes[int(rng.integers(4))]
            self._plan.append((tuple(tiles), query))
        self.ids = [f"mosaic-s{self.seed}-{i:05d}" for i in range(self.n)]

    # -- tile index
    def _source_mask(self, i: int) -> np.ndarray:
        src = self.source
        if hasattr(src, "load_mask") and hasattr(src, "ids"):
            return src.load_mask(src.ids[i])
        return src[i].mask

    def _index_tiles(self) -> dict[int, list[tuple[int, tuple | None]]]:
        src = self.source
        tiles: dict[int, list[tuple[int, tuple | None]]] = {}
        if self._whole:
            for i in range(len(src)):
                tiles.setdefault(src.class_of(i), []).append((i, None))
            return tiles
        for i in range(len(src)):
            mask = self._source_mask(i)
            h, w = mask.shape
            for c in np.unique(mask):
                c = int(c)
                if not 0 < c < IGNORE:
                    continue
                comp = largest_component(mask == c)
                if comp is None or comp[0] < self.min_area * h * w:
                    continue
                tiles.setdefault(c, []).append((i, _square_box(comp[1], w, h, self.margin)))
        return tiles

    # -- dataset protocol
    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[MosaicSample]:
        for i in range(len(self)):
            yield self[i]

    @property
    def queries(self) -> list[int]:
        return [q for _, q in self._plan]

    def _tile(self, idx: int, c: int, box) -> tuple[str, Image.Image, np.ndarray]:
        s = self.source[idx]
        image, mask = s.image, s.mask
        if box is not None:
            x0, y0, x1, y1 = box
            image = image.crop((x0, y0, x1, y1))
            m = mask[y0:y1, x0:x1]
            other = (m != c) & (m != 0) & (m != IGNORE)
            mask = np.where(other, np.uint8(IGNORE if self.others == "ignore" else 0), m).astype(np.uint8)
        return s.id, image, mask

    def __getitem__(self, i: int) -> MosaicSample:
        if not -self.n <= i < self.n:
            raise IndexError(f"{self.name}: index {i} out of range ({self.n} mosaics)")
        i = i % self.n
        tiles, query = self._plan[i]
        H, W = self.size
        hs, ws = (0, H // 2, H), (0, W // 2, W)
        canvas = Image.new("RGB", (W, H))
        out = np.zeros((H, W), dtype=np.uint8)
        names = []
        for q, (idx, c, box) in enumerate(tiles):
            r, k = divmod(q, 2)
            y0, y1, x0, x1 = hs[r], hs[r + 1], ws[k], ws[k + 1]
            sid, image, mask = self._tile(idx, c, box)
            image, mask = _resize_pair(image, mask, (x1 - x0, y1 - y0))
            canvas.paste(image, (x0, y0))
            out[y0:y1, x0:x1] = mask
            names.append((sid, c))
        return MosaicSample(id=self.ids[i], image=canvas, mask=out, class_names=self.class_names, query=query,
                            tiles=tuple(names))

    def episodes(self, n: int | None = None, seed: int = 0) -> list[tuple[int, int]]:
        """``(i, query of mosaic i)`` for every mosaic (``n=None``) or cycled to ``n``; ``seed`` unused (the
        mosaics' own seed fixed the queries)."""
        return _cycle([(i, q) for i, (_, q) in enumerate(self._plan)], n)


# --------------------------------------------------------------------------------------------------- dispatch
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
