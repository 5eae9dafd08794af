"""Segmentation datasets as uniform samples.

Every dataset yields :class:`Sample` objects: an RGB image, an 8-bit label mask with the dataset's own
class *indices* (0 = background / none, k = ``class_names[k - 1]``, 255 = ignore) and an id. The folder
format (DESIGN.md) is the native one; benchmark layouts (PASCAL-5i, COCO-20i, FSS-1000, Mosaic-4) live in
their own modules and produce the same samples.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from .io import load_image

IGNORE = 255
BACKGROUND = 0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """A dataset folder or file that does not match its declared layout (message names the piece)."""


@dataclass
class Sample:
    """One image with its mask.

    image: RGB ``PIL.Image``; mask: ``(H, W)`` uint8, 0 = background, k = class_names[k-1], 255 = ignore.
    """

    id: str
    image: Image.Image
    mask: np.ndarray
    class_names: tuple[str, ...]

    def present(self) -> list[int]:
        """Class indices (1-based) with at least one pixel."""
        v = np.unique(self.mask)
        return [int(x) for x in v if 0 < x < IGNORE]


def normalize_name(name: str) -> str:
    """Canonical form of a class name for matching across datasets: trimmed, lower case, ``_``/``-`` as space
    (:func:`fusionseg.names.match_key`, the one class-name policy)."""
    from ..names import match_key
    return match_key(name)


class FolderDataset:
    """A dataset in the ``fusionseg-folder/1`` format (see DESIGN.md).

    ``class_names`` are the manifest's names in ascending mask value; the mask returned by ``__getitem__``
    is re-indexed so that class ``class_names[k-1]`` has value k, background 0 and ignore 255, whatever the
    raw values were. An undeclared raw value raises :class:`DatasetError` naming the file and the value.
    """

    def __init__(self, root: str | Path, ids: Sequence[str] | None = None):
        self.root = Path(root)
        manifest = self.root / "dataset.json"
        if not self.root.is_dir():
            raise DatasetError(f"dataset folder not found: {self.root}")
        if not manifest.is_file():
            raise DatasetError(f"{self.root} has no dataset.json (expected the fusionseg-folder/1 format, see DESIGN.md)")
        try:
            meta = json.loads(manifest.read_text())
        except json.JSONDecodeError as e:
            raise DatasetError(f"{manifest} is not valid JSON: {e}") from None
        if not isinstance(meta, dict):
            raise DatasetError(f"{manifest} must hold a JSON object (format, images, masks, classes), "
                               f"got a {type(meta).__name__}")
        if not str(meta.get("format", "")).startswith("fusionseg-folder/"):
            raise DatasetError(f"{manifest}: 'format' must be 'fusionseg-folder/1', got {meta.get('format')!r}")
        if not isinstance(meta.get("classes"), dict) or not meta["classes"]:
            raise DatasetError(f"{manifest}: 'classes' must map mask values to class names")
        for key in ("images", "masks"):
            if not isinstance(meta.get(key, key), str) or not meta.get(key, key).strip():
                raise DatasetError(f"{manifest}: '{key}' must name a folder, got {meta.get(key)!r}")

        def mask_value(v, what: str) -> int:  # an undeclared or out-of-range value would index the table wrongly
            if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit())):
                raise DatasetError(f"{manifest}: {what} {v!r} is not a mask value (an integer 0 to 255)")
            if not 0 <= int(v) <= 255:
                raise DatasetError(f"{manifest}: {what} {v!r} is outside the 8-bit mask values 0 to 255")
            return int(v)

        for k, v in meta["classes"].items():
            if not isinstance(v, str) or not v.strip():
                raise DatasetError(f"{manifest}: class {k!r} needs a name (a non-empty string), got {v!r}")
        for key in ("background_values", "ignore_values"):
            if not isinstance(meta.get(key, []), list):
                raise DatasetError(f"{manifest}: '{key}' must be a list of mask values, got {meta.get(key)!r}")
        self.meta = meta
        self.image_dir = self.root / meta.get("images", "images")
        self.mask_dir = self.root / meta.get("masks", "masks")
        for d, what in ((self.image_dir, "images"), (self.mask_dir, "masks")):
            if not d.is_dir():
                raise DatasetError(f"{self.root}: the {what} folder {d.name}/ is missing")
        raw = sorted((mask_value(k, "class key"), str(v)) for k, v in meta["classes"].items())
        self.class_names: tuple[str, ...] = tuple(v for _, v in raw)
        lut = np.full(256, -1, dtype=np.int16)
        for idx, (value, _) in enumerate(raw, start=1):
            lut[value] = idx
        for v in meta.get("background_values", []):
            lut[mask_value(v, "background value")] = BACKGROUND
        for v in meta.get("ignore_values", []):
            lut[mask_value(v, "ignore value")] = IGNORE
        self._lut = lut
        masks = {p.stem: p for p in self.mask_dir.iterdir() if p.suffix.lower() == ".png"}
        images = {p.stem: p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        all_ids = sorted(set(masks) & set(images))
        if not all_ids:
            raise DatasetError(f"{self.root}: no image in {self.image_dir.name}/ has a mask in {self.mask_dir.name}/")
        if ids is not None:
            missing = sorted(set(ids) - set(all_ids))
            if missing:
                raise DatasetError(f"{self.root}: unknown image ids {missing[:5]}")
            all_ids = list(ids)
        self.ids = list(all_ids)
        self._images = images
        self._masks = masks
        self.name = self.root.name

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def every_pixel_labelled(self) -> bool:
        """True when the manifest declares no background value (MSRC, CamVid): every pixel is one of the
        classes, so whole-vocabulary prediction takes the plain arg-max instead of a "none" threshold."""
        return not self.meta.get("background_values", [])

    def subset(self, ids: Sequence[str]) -> "FolderDataset":
        return FolderDataset(self.root, ids)

    def load_mask(self, id: str) -> np.ndarray:
        path = self._masks[id]
        from .io import declared_size
        declared_size(path)  # the one pixel limit, on the header, before the mask is decoded
        with Image.open(path) as m:
            if m.mode not in ("L", "P"):
                raise DatasetError(f"{path}: mask must be 8-bit single-channel (mode L or P), got mode {m.mode}")
            raw = np.asarray(m, dtype=np.uint8)
        out = self._lut[raw]
        if (out < 0).any():
            bad = int(raw[out < 0][0])
            raise DatasetError(f"{path}: mask value {bad} is not declared in dataset.json (classes, background_values, ignore_values)")
        return out.astype(np.uint8)

    def __getitem__(self, i: int) -> Sample:
        id = self.ids[i]
        image = load_image(self._images[id])
        mask = self.load_mask(id)
        if mask.shape != (image.height, image.width):
            raise DatasetError(f"{self._masks[id]}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is {image.width}x{image.height}")
        return Sample(id=id, image=image, mask=mask, class_names=self.class_names)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]


def split_ids(ids: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic split of whole images into (train, val) by a seeded shuffle."""
    ids = sorted(ids)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    n_val = int(round(len(ids) * val_fraction))
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val

