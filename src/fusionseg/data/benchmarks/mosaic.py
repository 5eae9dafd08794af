"""Mosaic-4: 2x2 mosaics of four tiles of four different classes, from FSS-1000 or any dataset of samples."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image

from ..datasets import IGNORE, DatasetError, Sample
from ._base import _cycle, _resize_pair
from ._helpers import largest_component
from .fss import FSS1000


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
