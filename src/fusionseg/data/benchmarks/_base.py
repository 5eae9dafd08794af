"""Plumbing shared by the benchmark loaders: the dataset protocol (``ids``, ``len``, iteration, ``ds[i]``),
episode cycling and the image+mask resize of Mosaic-4's tiles."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ..datasets import DatasetError, Sample
from ..io import load_image


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
