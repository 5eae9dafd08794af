"""Image loading (placeholder; the robust loader is being written)."""
from __future__ import annotations
from pathlib import Path
from PIL import Image, ImageOps


class ImageError(ValueError):
    pass


def load_image(src) -> Image.Image:
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    im = Image.open(src)
    im = ImageOps.exif_transpose(im)
    return im.convert("RGB")
