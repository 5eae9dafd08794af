"""The split rules of the fold benchmarks, in one place: fold numbers, split names, which classes a fold tests,
where the split lists are looked up, and how the lists are read.

* Folds: 0..3. PASCAL-5i fold f tests classes 5f+1..5f+5; COCO-20i fold f tests f+1, f+5, ..., f+77 (1-based).
* Split names: ``val`` (alias ``test``) and ``trn`` (alias ``train``).
* Lists (HSNet's ``pascal/{trn,val}/fold{f}.txt``, ``coco/{trn,val}/fold{f}.pkl``, ``fss/{trn,val,test}.txt``)
  are looked up, in order, in: the ``split_dir`` argument (if given, nothing else is tried), the folder named by
  ``$FUSIONSEG_SPLITS``, and ``ROOT/splits``. In each, the file may sit directly under it, under
  ``<benchmark>/`` or under ``hsnet/<benchmark>/`` (``<benchmark>`` = ``pascal``, ``coco`` or ``fss``), e.g.
  ``splits/hsnet/pascal/val/fold0.txt``. Without a list, PASCAL-5i and COCO-20i generate one (with a warning:
  not the published split) and FSS-1000 asks for one.
* The package ships no lists: HSNet's repository states no licence, so they cannot be redistributed under
  ours. A copy of HSNet's lists (``data/splits/`` of juhongm999/hsnet) laid out as ``hsnet/{pascal,coco,fss}/``
  works as it is: ``FUSIONSEG_SPLITS=/path/to/splits``.
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..datasets import DatasetError
from ._helpers import PlainUnpickler

NUM_FOLDS = 4
SPLITS_ENV = "FUSIONSEG_SPLITS"


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


# --------------------------------------------------------------------------------------------------- list files
_PASCAL_LINE = re.compile(r"^(\S+?)__(\d+)$")


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


def _load_coco_list(path: Path) -> dict[int, list[str]]:
    """HSNet's ``fold{f}.pkl``: ``{0-based class: [image paths such as 'val2014/COCO_val2014_....jpg']}``,
    read with an unpickler that refuses every object (the files hold only dict/list/int/str)."""
    try:
        data = PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as e:
        raise DatasetError(f"{path}: not a plain COCO-20i split list ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(k, int) and isinstance(v, list) for k, v in data.items()):
        raise DatasetError(f"{path}: expected a dict of class index -> list of image paths")
    return data
