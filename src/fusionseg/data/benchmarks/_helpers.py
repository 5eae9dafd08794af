"""Small self-contained helpers of the benchmark loaders: a restricted unpickler (for HSNet's COCO-20i lists)
and a union-find over horizontal runs (the largest connected component, for Mosaic-4's crops)."""
from __future__ import annotations

import pickle

import numpy as np


class PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data (dicts, lists, ints, strings); refuses every class, so a list file runs no code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"the file holds an object of type {module}.{name}; only plain dicts, lists, "
                                     f"ints and strings are accepted")


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
