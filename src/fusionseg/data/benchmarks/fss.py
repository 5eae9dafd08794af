"""FSS-1000: one folder per class with ``1.jpg``..``10.jpg`` + ``1.png``..``10.png``."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..datasets import DatasetError
from ._base import _Base, _cycle
from .splits import SPLITS_ENV, _find_split_file


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
        split_dir: where the class lists are (see :mod:`.splits` for the search order).
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
