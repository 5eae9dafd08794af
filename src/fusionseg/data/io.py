"""Robust image loading and atomic file writing.

Every failure a user can cause (a missing file, a folder, a text file, a truncated JPEG, an image too large,
an unwritable output folder) raises :class:`ImageError` or :class:`OutputError` — both ``ValueError``\\ s —
with a one-line message that names the file, so the CLI can print ``str(exc)`` instead of a traceback.

Decisions (see the function docstrings for details):

* **Result**: always a fully decoded mode ``"RGB"`` :class:`PIL.Image.Image`, upright (EXIF orientation
  applied), no longer tied to an open file.
* **Transparency** (RGBA, LA, PA, La, RGBa, P or L/RGB with a ``transparency`` key): composited over
  **white**. Fully transparent pixels often hold junk colour (frequently black); white is what a viewer shows.
* **16-bit** (``I;16*``, and ``I`` whose values lie in 0..65535): scaled linearly, 0..65535 → 0..255 with
  rounding (65535 → 255, 32768 → 128). ``I`` outside that range and ``F`` outside [0, 1] are min-max
  stretched; ``F`` inside [0, 1] is multiplied by 255. NaN becomes 0.
* **Pixel limit** (one limit for the CLI, the API and the server: :data:`DEFAULT_MAX_PIXELS`, raised with
  ``max_pixels`` / ``--max-megapixels``): checked on the size the header **declares**, before anything is
  decoded or allocated at that size, whatever reduced scale a JPEG is later decoded at (label maps are made at
  the declared size, so that is what memory follows). Too large: :class:`ImageTooLarge`. Pillow's global
  ``Image.MAX_IMAGE_PIXELS`` is never changed here; a file over Pillow's own bomb limit (2x that value) is
  refused as too large too, naming both limits.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .._atomic import write_atomic, write_failure_reason

__all__ = ["ImageError", "ImageTooLarge", "OutputError", "load_image", "load_image_with_size", "declared_size",
           "save_png_atomic", "write_text_atomic", "write_bytes_atomic", "DEFAULT_MAX_PIXELS"]

#: The one pixel limit (width x height as the header declares it) of the CLI, the API and the server.
DEFAULT_MAX_PIXELS = 120_000_000
_ORIENTATION_TAG = 0x0112
# Errors Pillow raises while decoding damaged data.
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, IndexError, struct.error, zlib.error,
                  Image.DecompressionBombError)


class ImageError(ValueError):
    """An input image could not be read; the message names the file and says why."""


class ImageTooLarge(ImageError):
    """The image's header declares more pixels than the limit (nothing was decoded)."""


class OutputError(ValueError):
    """An output file could not be written; the message names the file and says why."""


# --------------------------------------------------------------------------------------------------- loading
def load_image(src: Any, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None) -> Image.Image:
    """Load ``src`` as an upright, fully decoded RGB image.

    Args:
        src: a path (``str`` / ``os.PathLike``), a binary file object, a :class:`PIL.Image.Image`, or a numpy
            array ``(H, W)``, ``(H, W, 1|2|3|4)`` of ``uint8``, ``uint16``, ``bool`` or float in [0, 1].
        max_pixels: refuse images with more pixels than this (checked from the header, before decoding).
        max_side: if given, the longer side of the result is at most this (aspect kept; LANCZOS). JPEGs are
            decoded at reduced scale (``Image.draft``), so a huge JPEG never needs full-resolution memory.

    Raises:
        ImageError: missing file, folder, not an image, truncated/corrupt data, too many pixels, bad array.
    """
    return load_image_with_size(src, max_side=max_side, max_pixels=max_pixels)[0]


def load_image_with_size(src: Any, max_side: int | None = None,
                         max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, tuple[int, int]]:
    """Like :func:`load_image`, also returning the original upright size ``(W, H)`` (after EXIF orientation,
    before ``max_side`` shrinking). For a JPEG the size comes from the header; full resolution is not decoded.
    """
    if max_side is not None:
        max_side = int(max_side)
        if max_side < 1:
            raise ValueError(f"max_side must be at least 1, got {max_side}")
    if isinstance(src, Image.Image):
        name = getattr(src, "filename", "") or "the image"
        img, orig = _from_pil(src, str(name), max_side, max_pixels)
    elif isinstance(src, np.ndarray):
        img = _from_array(src)
        orig = img.size
        _check_pixels("the array", orig, max_pixels)
    elif isinstance(src, (str, os.PathLike)):
        img, orig = _from_path(src, max_side, max_pixels)
    elif hasattr(src, "read"):
        name = str(getattr(src, "name", "") or "the image stream")
        try:
            img, orig = _from_stream(src, name, max_side, max_pixels)
        except UnidentifiedImageError:
            raise ImageError(f"{name} is not an image Pillow can read") from None
    else:
        raise ImageError(f"cannot load an image from a {type(src).__name__}: pass a file path, a PIL image or a "
                         f"numpy array (H, W[, C]) of uint8, uint16, bool or float in [0, 1]")
    return _shrink(img, max_side), orig


def _from_path(src: str | os.PathLike, max_side: int | None, max_pixels: int):
    path = Path(os.fspath(src))
    name = str(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ImageError(f"no such file: {name}") from None
    except IsADirectoryError:
        raise ImageError(f"{name} is a folder, not an image file") from None
    except PermissionError:
        raise ImageError(f"cannot read {name}: permission denied") from None
    except OSError as e:
        raise ImageError(f"cannot read {name}: {e.strerror or e}") from None
    with f:
        try:
            if os.fstat(f.fileno()).st_size == 0:
                raise ImageError(f"{name} is empty (0 bytes), not an image")
        except OSError:
            pass
        try:
            return _from_stream(f, name, max_side, max_pixels)
        except UnidentifiedImageError:
            raise ImageError(f"{name} is not an image Pillow can read "
                             f"(supported: JPEG, PNG, BMP, GIF, TIFF, WebP, ...)") from None
        except IsADirectoryError:
            raise ImageError(f"{name} is a folder, not an image file") from None


def _open(fp: BinaryIO, name: str, max_pixels: int | None) -> Image.Image:
    """``Image.open`` (header only). Pillow's global bomb limit is left as it is: a file over it is refused
    here as too large (it is far over ours too unless the caller raised ours above Pillow's)."""
    start = fp.tell() if hasattr(fp, "tell") else 0
    try:
        return Image.open(fp)
    except Image.DecompressionBombError as e:
        import re
        m = re.search(r"\((\d+) pixels\)", str(e))
        n = int(m.group(1)) if m else None
        wh = _sniff_size(fp, start)
        what = f"{wh[0]} x {wh[1]} = {n or wh[0] * wh[1]:,} pixels" if wh else f"{n:,} pixels" if n else "too many pixels"
        lim = max_pixels if max_pixels is not None else DEFAULT_MAX_PIXELS
        extra = "" if n is None or n > lim else (f" (Pillow's own limit, PIL.Image.MAX_IMAGE_PIXELS x 2, is lower than "
                                                 f"ours: raise it as well)")
        raise ImageTooLarge(f"{name} is {what}, more than the limit of {lim:,}{extra}; shrink it first or raise "
                            f"the limit (--max-megapixels, max_pixels=)") from None


def _sniff_size(fp: BinaryIO, start: int) -> tuple[int, int] | None:
    """(W, H) from a PNG, GIF or JPEG header, for messages only; None when unknown."""
    try:
        fp.seek(start)
        head = fp.read(64 * 1024)
    except (OSError, ValueError):
        return None
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return struct.unpack("<HH", head[6:10])
    if head[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(head):
            if head[i] != 0xFF:
                i += 1
                continue
            marker = head[i + 1]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                h, w = struct.unpack(">HH", head[i + 5:i + 9])
                return w, h
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                i += 2 if marker != 0xFF else 1
                continue
            i += 2 + struct.unpack(">H", head[i + 2:i + 4])[0]
    return None


def declared_size(src: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None) -> tuple[int, int]:
    """The (W, H) an image file's header declares, read without decoding pixels; refused with
    :class:`ImageTooLarge` over ``max_pixels`` and :class:`ImageError` when it is not a readable image.
    ``src``: a path, bytes or a binary file object."""
    import io as _io
    if isinstance(src, (bytes, bytearray, memoryview)):
        fp, own = _io.BytesIO(bytes(src)), True
    elif isinstance(src, (str, os.PathLike)):
        name = name or str(src)
        try:
            fp, own = open(src, "rb"), True
        except OSError as e:
            raise ImageError(f"cannot read {name}: {e.strerror or e}") from None
    else:
        fp, own = src, False
    name = name or str(getattr(fp, "name", "") or "the image")
    try:
        try:
            im = _open(fp, name, max_pixels)
        except UnidentifiedImageError:
            raise ImageError(f"{name} is not an image Pillow can read (supported: JPEG, PNG, BMP, GIF, TIFF, WebP, "
                             f"...)") from None
        except ImageError:
            raise
        except _DECODE_ERRORS as e:
            raise ImageError(f"{name} is truncated or corrupt ({_reason(e)})") from None
        w, h = im.size
        if w < 1 or h < 1:
            raise ImageError(f"{name} has no pixels ({w} x {h})")
        _check_pixels(name, (w, h), max_pixels)
        return w, h
    finally:
        if own:
            fp.close()


def _from_stream(fp: BinaryIO, name: str, max_side: int | None, max_pixels: int):
    try:
        im = _open(fp, name, max_pixels)
    except (UnidentifiedImageError, ImageError):
        raise
    except _DECODE_ERRORS as e:  # header present but broken
        raise ImageError(f"{name} is truncated or corrupt ({_reason(e)})") from None
    return _from_pil(im, name, max_side, max_pixels, from_file=True)


def _from_pil(im: Image.Image, name: str, max_side: int | None, max_pixels: int, from_file: bool = False):
    """Decode (reduced where the format allows), orient and convert an opened or in-memory image.

    EXIF orientation is applied only to images straight from a file (``Image.open`` sets ``.format``; derived
    images have ``format`` None, and their pixels may already have been turned by the caller).
    """
    w, h = im.size
    if w < 1 or h < 1:
        raise ImageError(f"{name} has no pixels ({w} x {h})")
    _check_pixels(name, (w, h), max_pixels)  # the declared size, before anything is decoded or allocated
    from_file = from_file or im.format is not None
    lazy = bool(getattr(im, "tile", None))  # not decoded yet
    orientation = 1
    if from_file and im.format != "PNG":  # JPEG/TIFF/WebP keep EXIF in the header
        orientation = _orientation(im)
    # Reduced JPEG decoding: the smallest scale (1/2, 1/4, 1/8) that still gives >= the target size.
    if max_side is not None and lazy and im.format == "JPEG" and max(w, h) > max_side:
        s = max_side / max(w, h)
        try:
            im.draft(None, (max(1, int(np.ceil(w * s))), max(1, int(np.ceil(h * s)))))
        except _DECODE_ERRORS:
            pass
    try:
        im.load()
        if from_file and im.format == "PNG":  # a PNG may keep its eXIf chunk after the pixel data
            orientation = _orientation(im)
        if orientation in (5, 6, 7, 8):
            w, h = h, w
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
        rgb = _to_rgb(im, name)
    except ImageError:
        raise
    except _DECODE_ERRORS as e:
        raise ImageError(f"{name} is truncated or corrupt ({_reason(e)})") from None
    return rgb, (w, h)


def _orientation(im: Image.Image) -> int:
    try:
        o = im.getexif().get(_ORIENTATION_TAG, 1)
        return int(o) if isinstance(o, (int, np.integer)) and 1 <= int(o) <= 8 else 1
    except Exception:  # unreadable EXIF must never stop an image from loading
        return 1


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:200]


def _check_pixels(name: str, size: tuple[int, int], max_pixels: int | None) -> None:
    w, h = size
    n = w * h
    if max_pixels is not None and n > max_pixels:
        raise ImageTooLarge(f"{name} is {w} x {h} = {n:,} pixels, more than the limit of {max_pixels:,}; shrink it "
                            f"first or raise the limit (--max-megapixels, max_pixels=)")


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    """Any Pillow mode → RGB; transparency composited over white; 16-bit/float scaled to 8 bit."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.int64)
        if mode.startswith("I;16") or (a.size and a.min() >= 0 and a.max() <= 65535):
            g = _u16_to_u8(a)
        else:
            g = _stretch(a.astype(np.float64))
        return Image.fromarray(g, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = np.where(np.isfinite(a), a, 0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            g = np.rint(a * 255.0).astype(np.uint8)
        else:
            g = _stretch(a)
        return Image.fromarray(g, "L").convert("RGB")
    if mode == "1":
        return im.convert("L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        if mode == "La":
            im = im.convert("LA")
        try:
            rgba = im.convert("RGBA")
        except (ValueError, OSError) as e:
            raise ImageError(f"{name}: cannot convert mode {mode} to RGB ({_reason(e)})") from None
        return _over_white(rgba)
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"{name} has pixel mode {mode}, which cannot be converted to RGB ({_reason(e)})") from None


def _u16_to_u8(a: np.ndarray) -> np.ndarray:
    """0..65535 → 0..255, rounded (v * 255 / 65535; 65535 → 255, 32768 → 128)."""
    a = np.clip(a, 0, 65535).astype(np.uint32)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _stretch(a: np.ndarray) -> np.ndarray:
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _over_white(rgba: Image.Image) -> Image.Image:
    bg = Image.new("RGB", rgba.size, (255, 255, 255))
    bg.paste(rgba, mask=rgba.getchannel("A"))
    return bg


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (2, 3, 4)):
        hint = ""
        if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 2, 3, 4):
            hint = " (it looks channels-first: use arr.transpose(1, 2, 0))"
        raise ImageError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4); got shape {a.shape}{hint}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ImageError(f"the image array has no pixels (shape {a.shape})")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = _u16_to_u8(a)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageError("the float image array holds NaN or infinity")
        lo, hi = float(a.min()), float(a.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ImageError(f"a float image array must hold values in [0, 1]; got {lo:g}..{hi:g} "
                             f"(divide 0..255 data by 255, or pass uint8)")
        a = np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer) and a.dtype != np.uint8:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise ImageError(f"an integer image array of dtype {a.dtype} must hold values in 0..255; got "
                             f"{lo}..{hi} (pass uint16 for 16-bit data)")
        a = a.astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageError(f"unsupported image array dtype {a.dtype}: use uint8, uint16, bool or float in [0, 1]")
    a = np.ascontiguousarray(a)
    if a.ndim == 2:
        return Image.fromarray(a, "L").convert("RGB")
    c = a.shape[2]
    if c == 3:
        return Image.fromarray(a, "RGB")
    im = Image.fromarray(a, "LA" if c == 2 else "RGBA")
    return _over_white(im.convert("RGBA"))


def _shrink(img: Image.Image, max_side: int | None) -> Image.Image:
    if max_side is None:
        return img
    w, h = img.size
    long_side = max(w, h)
    if long_side <= max_side:
        return img
    s = max_side / long_side
    size = (max_side, max(1, round(h * s))) if w >= h else (max(1, round(w * s)), max_side)
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


# --------------------------------------------------------------------------------------------------- writing
def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """:func:`fusionseg._atomic.write_atomic` through ``write(f)`` (temp file, fsync, rename), creating missing
    folders; ``OSError``\\ s become :class:`OutputError` naming ``path``. Readers see either the old file or the
    complete new one; on any failure the temp file is removed."""
    path = Path(os.fspath(path))
    name = str(path)
    parent = path.parent
    try:
        if path.is_dir():
            raise OutputError(f"cannot write to {name}: it is a folder")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise OutputError(f"cannot write to {name}: {parent} is a file, not a folder") from None
        return write_atomic(path, write, sync_folder=False)  # outputs: atomic, without the folder's fsync
    except OSError as e:
        raise OutputError(f"cannot write to {name}: {write_failure_reason(e)}") from e


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``)."""
    return _atomic_write(path, lambda f: f.write(data))


def write_text_atomic(text: str, path: str | os.PathLike, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8 by default)."""
    return write_bytes_atomic(text.encode(encoding), path)


def save_png_atomic(img: Image.Image, path: str | os.PathLike, **save_kwargs: Any) -> Path:
    """Save ``img`` as PNG at ``path`` atomically. Extra keywords go to ``Image.save`` (e.g. ``compress_level``)."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"save_png_atomic needs a PIL image, got {type(img).__name__}")
    return _atomic_write(path, lambda f: img.save(f, format="PNG", **save_kwargs))
