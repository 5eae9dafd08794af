"""COCO-20i: COCO 2014 ``train2014/``, ``val2014/`` + ``annotations/instances_{train,val}2014.json``, masks rendered
from the instances' polygons / RLE by pycocotools (crowd -> 255), HSNet's fold lists or lists generated from the JSON.

pycocotools (the ``coco`` extra, installed by ``scripts/setup.sh``) is the reference rasteriser: COCO-20i scores are
comparable with published ones only with its masks. A hand-written polygon filler used before differed from it on
0.14 % of the object pixels of ``shared/data/coco2017_mini``; without pycocotools, COCO-20i says how to install it.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..datasets import IGNORE, DatasetError
from ._base import _Base
from .splits import SPLITS_ENV, _check_fold, _find_split_file, _fold_split, _load_coco_list, coco_fold_classes


PYCOCOTOOLS_MISSING = ("COCO masks are rendered with pycocotools (the reference rasteriser, so that scores compare "
                       "with published ones), which is not installed: pip install 'fusionseg[coco]'")


def _mask_api():
    """``pycocotools.mask``, or a :class:`DatasetError` saying how to install it."""
    try:
        import pycocotools.mask as mu
    except ImportError:
        raise DatasetError(PYCOCOTOOLS_MISSING) from None
    return mu


def _decode(mu, rle) -> np.ndarray:
    """pycocotools' decode as a bool array, without the DeprecationWarning its Cython layer raises under numpy 2."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mu.decode(rle).astype(bool)


def decode_coco_segmentation(seg: Any, h: int, w: int) -> np.ndarray:
    """A COCO ``segmentation`` field -> ``(h, w)`` bool mask, rasterised by pycocotools.

    Handles polygons (list of flat coordinate lists; the instance is their union), uncompressed RLE
    (``{"counts": [ints], "size": [h, w]}``, crowd regions; its runs must cover exactly ``h * w`` pixels) and
    compressed RLE (``counts`` a string). Raises :class:`DatasetError` if pycocotools is not installed
    (``pip install 'fusionseg[coco]'``), for an RLE of another size, or for an unknown field.
    """
    mu = _mask_api()
    if isinstance(seg, list):
        polys = [list(map(float, p)) for p in seg if len(p) >= 6]
        if not polys:
            return np.zeros((h, w), dtype=bool)
        return _decode(mu, mu.merge(mu.frPyObjects(polys, h, w)))
    if isinstance(seg, dict) and "counts" in seg:
        sh, sw = (int(v) for v in seg.get("size", (h, w)))
        if (sh, sw) != (h, w):
            raise DatasetError(f"RLE size {sh}x{sw} differs from the image size {h}x{w}")
        counts = seg["counts"]
        if isinstance(counts, list):
            # pycocotools leaves the pixels past short runs uninitialised: check the runs cover the image
            if sum(int(c) for c in counts) != h * w:
                raise DatasetError(f"RLE runs add up to {sum(int(c) for c in counts)} pixels, but the size is {h}x{w}")
            rle = mu.frPyObjects({"size": [h, w], "counts": [int(c) for c in counts]}, h, w)
        else:
            rle = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        try:
            return _decode(mu, rle)
        except ValueError as e:
            raise DatasetError(f"unreadable COCO RLE ({e})") from None
    raise DatasetError(f"unsupported COCO segmentation of type {type(seg).__name__}")


def render_coco_mask(anns: Sequence[dict], h: int, w: int, cat_index: dict[int, int]) -> np.ndarray:
    """Semantic ``(h, w)`` uint8 mask from COCO instance annotations.

    Non-crowd instances are painted with ``cat_index[category_id]`` (1-based class index) in order of
    decreasing ``area`` (larger first, so smaller objects stay on top); crowd regions then become 255
    (ignore) wherever no non-crowd instance was painted. The same rule, and the same rasteriser (pycocotools), as
    the masks of ``shared/data/coco2017_mini``.
    """
    mask = np.zeros((h, w), dtype=np.uint8)
    crowd = np.zeros((h, w), dtype=bool)
    things = [a for a in anns if not a.get("iscrowd", 0)]
    things.sort(key=lambda a: -float(a.get("area", 0.0)))
    for a in things:
        mask[decode_coco_segmentation(a["segmentation"], h, w)] = cat_index[int(a["category_id"])]
    for a in anns:
        if a.get("iscrowd", 0):
            crowd |= decode_coco_segmentation(a["segmentation"], h, w)
    mask[crowd & (mask == 0)] = IGNORE
    return mask


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
        split_dir: where HSNet's ``coco/{val,trn}/fold{f}.pkl`` are (see :mod:`.splits` for the search order).
            Without them the per-class image lists are generated from the JSON (every image with at least one non-crowd
            instance of the class; HSNet's lists are a filtered subset, e.g. 19,217 val2014 images for person),
            with a warning, and ``split_source`` says ``"generated"``.
        novel_as_ignore: novel-class pixels become 255; default True for ``trn``.

    Classes: the JSON's 80 categories sorted by id (names as COCO writes them). Samples: the union of the
    split classes' image lists (val: the 20 novel classes; trn: the 60 base classes), sorted; masks rendered by
    :func:`render_coco_mask` (pycocotools; crowd -> 255). :meth:`episodes` samples as HSNet does: a class
    uniformly among the split classes, then an image uniformly among that class's images, seeded.
    """

    benchmark = "coco20i"

    def __init__(self, root: str | os.PathLike, fold: int, split: str = "val",
                 instances_json: str | os.PathLike | None = None, split_dir: str | os.PathLike | None = None,
                 novel_as_ignore: bool | None = None):
        self.fold = _check_fold(fold, "COCO-20i")
        self.split = _fold_split(split, "COCO-20i")
        sub = "val2014" if self.split == "val" else "train2014"
        self.root = _find_coco_root(root, sub)
        self.image_dir = self.root / sub
        js = Path(instances_json) if instances_json else self.root / "annotations" / f"instances_{sub}.json"
        if not js.is_file():
            raise DatasetError(f"{self.root} has no annotations/instances_{sub}.json (COCO-20i renders its masks "
                               f"from the official instances JSON; pass instances_json= if it is elsewhere)")
        _mask_api()  # before reading the JSON (450 MB for train2014): without pycocotools no mask can be made
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
        m = render_coco_mask(self._anns[id], int(im["height"]), int(im["width"]), self._cat_index)
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
