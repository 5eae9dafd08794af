"""Pictures of label maps: a class palette, colour label PNGs, overlays with a legend, side-by-side figures.

Decisions:

* **Palette**: index 0 is black ("none of these"); class ``k`` gets a bright colour from golden-ratio hue
  steps, with saturation/value tiers changing every 8 classes, de-duplicated after rounding so every row is
  unique for any ``n`` (checked for 1000 and more). Deterministic: no random state.
* **Legend**: always in a white strip to the **right** of the image, so it never hides pixels; entries are the
  classes present, largest first, with their pixel share; they wrap into columns no taller than the image
  (at least 8 rows, so tiny images still get a readable legend: the canvas grows downwards if needed);
  at most 40 entries, the rest summarised as "+N more". Font: Pillow's built-in ``ImageFont.load_default``,
  scalable (``size=``) on Pillow >= 10.1 with FreeType, the fixed bitmap font otherwise; its size follows the
  image size (12..48 px).
* Label values outside ``1..len(class_names)`` (0 = none, 255 = ignore in ground truth) are left uncoloured.
"""
from __future__ import annotations

import colorsys
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["palette", "label_png", "overlay", "side_by_side", "grid"]

_GOLDEN = 0.6180339887498949
_TIERS = ((0.90, 1.00), (0.60, 0.95), (1.00, 0.78), (0.45, 1.00), (0.85, 0.62), (0.70, 0.85))
_WHITE = (255, 255, 255)
_TEXT = (20, 20, 20)
MAX_LEGEND_ENTRIES = 40


# --------------------------------------------------------------------------------------------------- palette
def palette(n: int) -> np.ndarray:
    """``(n + 1, 3)`` uint8 colours: row 0 black (none), rows 1..n distinct bright class colours."""
    n = int(n)
    if n < 0:
        raise ValueError(f"palette size must be >= 0, got {n}")
    out = np.zeros((n + 1, 3), np.uint8)
    seen = {(0, 0, 0), (255, 255, 255)}
    for i in range(n):
        h = (0.0 + i * _GOLDEN) % 1.0
        s, v = _TIERS[(i // 8) % len(_TIERS)]
        rgb = _hsv255(h, s, v)
        step = 0
        while rgb in seen:  # rounding collision (only for large n): nudge hue, deterministically
            step += 1
            cycle, k = divmod(step, 769)  # a full turn of hue steps, then a slightly darker/paler level
            rgb = _hsv255((h + k * 0.0013) % 1.0, max(0.3, s - 0.01 * cycle), max(0.35, v - 0.02 * cycle))
        seen.add(rgb)
        out[i + 1] = rgb
    return out


def _hsv255(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _lut(n_classes: int, max_value: int) -> tuple[np.ndarray, np.ndarray]:
    """Colour and "is a class" look-up tables indexed by label value (values > n_classes: not a class)."""
    size = max(max_value, n_classes) + 1
    colours = np.zeros((size, 3), np.uint8)
    colours[: n_classes + 1] = palette(n_classes)
    is_class = np.zeros(size, bool)
    is_class[1: n_classes + 1] = True
    return colours, is_class


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D (H, W) array, got shape {labels.shape}")
    if labels.dtype == np.bool_:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be >= 0, found {int(labels.min())}")
    return labels


# --------------------------------------------------------------------------------------------------- label PNG
def label_png(labels: np.ndarray, n_classes: int) -> Image.Image:
    """Label map → an image whose pixel values are exactly ``labels``.

    With values <= 255 (and ``n_classes`` <= 255) a mode ``"P"`` image with :func:`palette` colours, so it
    opens as a colour picture while ``np.array(Image.open(f))`` gives the labels back; index 255 (the usual
    "ignore") is white. Larger values give a 16-bit grayscale (``"I;16"``) image, exact but not coloured.
    """
    labels = _check_labels(labels)
    top = int(labels.max()) if labels.size else 0
    if top > 65535:
        raise ValueError(f"labels up to 65535 fit in a PNG, found {top}")
    if n_classes <= 255 and top <= 255:
        pal = np.zeros((256, 3), np.uint8)
        pal[: n_classes + 1] = palette(n_classes)
        if n_classes < 255:
            pal[255] = _WHITE
        img = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8), "P")
        img.putpalette(pal.reshape(-1).tolist())
        return img
    a16 = np.ascontiguousarray(labels, dtype="<u2")
    return Image.frombytes("I;16", (a16.shape[1], a16.shape[0]), a16.tobytes())


# --------------------------------------------------------------------------------------------------- fonts/text
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=px)  # Pillow >= 10.1 with FreeType: scalable
    except Exception:  # older Pillow (no size argument) or no FreeType
        return ImageFont.load_default()


def _text_w(font, text: str) -> int:
    l, _, r, _ = font.getbbox(text)
    return int(math.ceil(r - min(l, 0)))


def _line_h(font) -> int:
    _, t, _, b = font.getbbox("Ag|")
    return int(math.ceil(b - min(t, 0)))


def _fit(font, text: str, width: int) -> str:
    """``text`` shortened with "..." so that it is at most ``width`` pixels wide."""
    if _text_w(font, text) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _text_w(font, text[:mid] + "...") <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "..." if lo else ""


def _font_px(w: int, h: int) -> int:
    return int(min(48, max(12, round(math.sqrt(w * h) / 40))))


# --------------------------------------------------------------------------------------------------- overlay
def _blend(image: Image.Image, labels: np.ndarray, n_classes: int, alpha: float) -> Image.Image:
    arr = np.array(image.convert("RGB"), dtype=np.uint8)
    top = int(labels.max()) if labels.size else 0
    colours, is_class = _lut(n_classes, top)
    a = int(round(alpha * 256))
    rows = max(1, (1 << 20) // max(1, arr.shape[1]))  # about 1 M pixels per block: bounded memory
    for r0 in range(0, arr.shape[0], rows):
        lab = labels[r0: r0 + rows]
        m = is_class[lab]
        if not m.any():
            continue
        sub = arr[r0: r0 + rows]
        mix = (sub.astype(np.uint16) * (256 - a) + colours[lab].astype(np.uint16) * a + 128) >> 8
        sub[m] = mix[m].astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def overlay(image: Image.Image, labels: np.ndarray, class_names: Sequence[str], alpha: float = 0.5,
            legend: bool = True) -> Image.Image:
    """Classes blended over ``image``, plus a legend strip to the right.

    Args:
        image: the picture, ``(W, H)``; any mode (converted to RGB).
        labels: ``(H, W)`` integers; ``k`` in ``1..len(class_names)`` is ``class_names[k - 1]``; other values
            (0 = none of these, 255 = ignore) leave the pixel as it is.
        alpha: class colour weight, 0 (invisible) .. 1 (opaque).
        legend: add the legend (swatch, name, pixel share) of the classes present.

    Returns:
        An RGB image: ``(W, H)`` without legend; ``(W + strip, max(H, legend height))`` with it, the image at
        the top left, unchanged where no class is.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    labels = _check_labels(labels)
    W, H = image.size
    if labels.shape != (H, W):
        raise ValueError(f"labels have shape {labels.shape} but the image is {W} x {H} (expected ({H}, {W}))")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    names = list(class_names)
    blended = _blend(image, labels, len(names), float(alpha))
    if not legend:
        return blended
    return _with_legend(blended, _legend_entries(labels, names))


def _legend_entries(labels: np.ndarray, names: list[str]) -> list[tuple[tuple[int, int, int] | None, str]]:
    n = len(names)
    counts = np.bincount(labels.reshape(-1), minlength=n + 1)[: n + 1] if labels.size else np.zeros(n + 1, int)
    total = max(1, labels.size)
    present = [k for k in range(1, n + 1) if counts[k] > 0]
    present.sort(key=lambda k: (-int(counts[k]), k))
    pal = palette(n)
    entries: list[tuple[tuple[int, int, int] | None, str]] = []
    shown = present if len(present) <= MAX_LEGEND_ENTRIES else present[: MAX_LEGEND_ENTRIES - 1]
    for k in shown:
        pct = 100.0 * counts[k] / total
        share = f"{pct:.1f}%" if pct >= 0.1 else "<0.1%"
        entries.append((tuple(int(c) for c in pal[k]), f"{names[k - 1]}  {share}"))
    if len(shown) < len(present):
        rest = present[len(shown):]
        pct = 100.0 * sum(int(counts[k]) for k in rest) / total
        entries.append((None, f"+{len(rest)} more ({pct:.1f}%)"))
    if not entries:
        entries.append((None, "no class present"))
    return entries


def _with_legend(img: Image.Image, entries: list) -> Image.Image:
    W, H = img.size
    px = _font_px(W, H)
    font = _font(px)
    lh = _line_h(font)
    row_h = int(round(lh * 1.5))
    pad = max(4, px // 2)
    sw = max(6, lh)  # swatch side
    max_text = 24 * px  # a name longer than ~24 em is shortened
    min_rows = min(len(entries), 8)
    rows = max(1, (max(H, 2 * pad + min_rows * row_h) - 2 * pad) // row_h)
    rows = min(rows, len(entries))
    cols = [entries[i: i + rows] for i in range(0, len(entries), rows)]
    texts = [[_fit(font, t, max_text) for _, t in col] for col in cols]
    col_w = [sw + pad // 2 + max(_text_w(font, t) for t in col) + pad for col in texts]
    strip_w = pad + sum(col_w)
    out = Image.new("RGB", (W + strip_w, max(H, 2 * pad + rows * row_h)), _WHITE)
    out.paste(img, (0, 0))
    d = ImageDraw.Draw(out)
    x = W + pad
    for col, col_texts, cw in zip(cols, texts, col_w):
        y = pad
        for (colour, _), text in zip(col, col_texts):
            top = y + (row_h - sw) // 2
            if colour is not None:
                d.rectangle([x, top, x + sw - 1, top + sw - 1], fill=colour, outline=(60, 60, 60))
            ty = y + (row_h - lh) // 2 - min(0, font.getbbox("Ag|")[1])
            d.text((x + sw + pad // 2, ty), text, fill=_TEXT, font=font)
            y += row_h
        x += cw
    return out


# --------------------------------------------------------------------------------------------------- figures
_LABEL_MODES = ("P", "1", "I;16", "I;16B", "I;16L", "I;16N", "I")


def _as_rgb(p: Image.Image) -> Image.Image:
    if p.mode == "RGB":
        return p
    if p.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        from .data.io import load_image  # 16-bit/float scaled properly
        return load_image(p.copy() if p.format else p)
    if p.mode in ("RGBA", "LA", "PA") or "transparency" in p.info:
        bg = Image.new("RGB", p.size, _WHITE)
        rgba = p.convert("RGBA")
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return p.convert("RGB")


def _scaled(p: Image.Image, height: int) -> Image.Image:
    w, h = p.size
    rgb = _as_rgb(p)
    if h == height:
        return rgb
    new = (max(1, round(w * height / h)), height)
    nearest = p.mode in _LABEL_MODES or height > h  # label maps stay exact; enlarged pictures stay crisp
    return rgb.resize(new, Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS)


def side_by_side(panels: Sequence[Image.Image], titles: Sequence[str] | None = None,
                 height: int | None = None, gap: int | None = None) -> Image.Image:
    """A row of ``panels`` scaled to one height (default: the tallest), each with its title above.

    Label maps (mode ``"P"``, ``"1"``, 16-bit) and enlarged panels are resized with NEAREST, others LANCZOS.
    """
    return grid([list(panels)], titles, height=height, gap=gap)


def grid(rows: Sequence[Sequence[Image.Image | None]],
         titles: Sequence[str] | Sequence[Sequence[str]] | None = None,
         height: int | None = None, gap: int | None = None) -> Image.Image:
    """Rows of panels (e.g. image | ground truth | prediction per row) on a white canvas, columns aligned.

    Args:
        rows: ``rows[r][c]`` a PIL image or None (blank cell); rows may differ in length.
        titles: column titles (one list of str, drawn once above the first row), or one title per cell
            (a list of lists, drawn above each panel), or None.
        height: the height every panel is scaled to (default: the tallest panel).
        gap: pixels between panels (default: from the height).
    """
    rows = [list(r) for r in rows]
    cells = [p for r in rows for p in r if p is not None]
    if not cells:
        raise ValueError("grid needs at least one panel")
    for p in cells:
        if not isinstance(p, Image.Image):
            raise TypeError(f"panels must be PIL images, got {type(p).__name__}")
    ncols = max(len(r) for r in rows)
    per_cell = titles is not None and len(titles) > 0 and not isinstance(titles[0], str)
    if titles is not None and not per_cell and len(titles) not in (0, ncols):
        raise ValueError(f"{len(titles)} titles for {ncols} columns")
    if per_cell and (len(titles) != len(rows) or any(len(t) > len(r) for t, r in zip(titles, rows))):
        raise ValueError("per-cell titles must have the same shape as rows")
    H = int(height) if height is not None else max(p.size[1] for p in cells)
    if H < 1:
        raise ValueError(f"height must be >= 1, got {H}")
    scaled = [[_scaled(p, H) if p is not None else None for p in r] for r in rows]
    col_w = [max((r[c].size[0] for r in scaled if c < len(r) and r[c] is not None), default=H)
             for c in range(ncols)]
    g = max(2, H // 50) if gap is None else int(gap)
    has_titles = bool(titles) and any(t for t in (titles if not per_cell else [x for r in titles for x in r]))
    font = _font(min(40, max(12, round(H / 16)))) if has_titles else None
    th = int(round(_line_h(font) * 1.5)) if font else 0
    header = th if has_titles and not per_cell else 0
    cell_title = th if has_titles and per_cell else 0
    width = sum(col_w) + g * (ncols + 1)
    height_total = g + header + len(rows) * (cell_title + H + g)
    out = Image.new("RGB", (width, height_total), _WHITE)
    d = ImageDraw.Draw(out)

    def title_at(text: str, x0: int, cw: int, y0: int) -> None:
        if not text:
            return
        t = _fit(font, str(text), cw)
        tw = _text_w(font, t)
        ty = y0 + (th - _line_h(font)) // 2 - min(0, font.getbbox("Ag|")[1])
        d.text((x0 + max(0, (cw - tw) // 2), ty), t, fill=_TEXT, font=font)

    xs = [g + sum(col_w[:c]) + g * c for c in range(ncols)]
    if header:
        for c, t in enumerate(titles):
            title_at(t, xs[c], col_w[c], g)
    y = g + header
    for r, row in enumerate(scaled):
        for c, p in enumerate(row):
            if cell_title and c < len(titles[r]):
                title_at(titles[r][c], xs[c], col_w[c], y)
            if p is not None:
                out.paste(p, (xs[c] + (col_w[c] - p.size[0]) // 2, y + cell_title))
        y += cell_title + H + g
    return out
