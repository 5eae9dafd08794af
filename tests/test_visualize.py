"""Palette, label PNGs, overlays with legend, figures (fusionseg.visualize)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFont

from fusionseg import visualize
from fusionseg.visualize import grid, label_png, overlay, palette, side_by_side


def _png_roundtrip(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


def _colours(img: Image.Image) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in c) for c in np.asarray(img.convert("RGB")).reshape(-1, 3)}


# ------------------------------------------------------------------------------------------ palette
def test_palette_distinct_bright_deterministic():
    p = palette(1000)
    assert p.shape == (1001, 3) and p.dtype == np.uint8
    assert p[0].tolist() == [0, 0, 0]
    assert len({tuple(r) for r in p.tolist()}) == 1001  # all rows unique, none black except row 0
    assert p[1:].max(axis=1).min() >= 128  # no dark class colour
    assert np.array_equal(palette(1000), p)  # deterministic
    assert np.array_equal(palette(10), p[:11])  # a class keeps its colour whatever the vocabulary size
    first = p[1:21].astype(int)
    d = np.sqrt(((first[:, None] - first[None]) ** 2).sum(-1)) + np.eye(20) * 1e9
    assert d.min() > 40  # the first 20 colours are clearly apart
    assert palette(0).shape == (1, 3)
    with pytest.raises(ValueError):
        palette(-1)


# ------------------------------------------------------------------------------------------ label PNG
def test_label_png_is_colour_palette_image_with_exact_values():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 21, (30, 40)).astype(np.uint8)
    lab[0, 0] = 255  # "ignore"
    img = label_png(lab, 20)
    assert img.mode == "P"
    back = _png_roundtrip(img)
    assert back.mode == "P"
    assert np.array_equal(np.asarray(back), lab)
    pal = np.array(back.getpalette()[: 3 * 21], np.uint8).reshape(21, 3)
    assert np.array_equal(pal, palette(20))
    rgb = back.convert("RGB")
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    y, x = np.argwhere(lab == 3)[0]
    assert rgb.getpixel((int(x), int(y))) == tuple(palette(20)[3].tolist())


def test_label_png_sparse_values_and_uint16_input():
    lab = np.zeros((4, 4), np.uint16)
    lab[1, 1], lab[2, 2] = 5, 7  # unused indices in between must not be renumbered by the PNG writer
    assert np.array_equal(np.asarray(_png_roundtrip(label_png(lab, 10))), lab)


def test_label_png_many_classes_is_exact_16bit():
    lab = (np.arange(40 * 60).reshape(40, 60) % 700).astype(np.uint16)
    img = label_png(lab, 700)
    back = _png_roundtrip(img)
    assert back.mode.startswith("I;16")
    assert np.array_equal(np.asarray(back).astype(np.int64), lab.astype(np.int64))


@pytest.mark.parametrize("bad", [np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.float32),
                                 np.full((2, 2), -1, np.int32)])
def test_label_png_rejects_bad_labels(bad):
    with pytest.raises(ValueError):
        label_png(bad, 3)


# ------------------------------------------------------------------------------------------ overlay
def _photo(w=64, h=48, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8), "RGB")


def test_overlay_keeps_unlabelled_pixels_and_adds_legend_strip():
    img = _photo()
    lab = np.zeros((48, 64), np.uint8)
    lab[5:20, 5:30] = 1
    lab[30:45, 10:60] = 2
    lab[0, 63] = 255  # ignore value: left as is
    names = ["cat", "dog", "absent"]
    out = overlay(img, lab, names, alpha=0.5)
    assert out.mode == "RGB"
    W, H = img.size
    assert out.size[0] > W and out.size[1] >= H  # legend beside the image, never over it
    a, o = np.asarray(img), np.asarray(out)[:H, :W]
    none = (lab == 0) | (lab == 255)
    assert np.array_equal(o[none], a[none])
    pal = palette(3).astype(int)
    expect = (a[lab == 1].astype(int) * 128 + pal[1] * 128 + 128) >> 8
    assert np.abs(o[lab == 1].astype(int) - expect).max() <= 1
    strip = _colours(out.crop((W, 0, out.size[0], out.size[1])))
    assert tuple(pal[1]) in strip and tuple(pal[2]) in strip  # swatches of present classes
    assert tuple(pal[3]) not in strip  # absent class not listed
    assert (255, 255, 255) in strip


def test_overlay_alpha_extremes_and_no_legend():
    img = _photo(20, 10)
    lab = np.ones((10, 20), np.uint8)
    assert np.array_equal(np.asarray(overlay(img, lab, ["x"], alpha=0.0, legend=False)), np.asarray(img))
    full = overlay(img, lab, ["x"], alpha=1.0, legend=False)
    assert full.size == img.size
    assert _colours(full) == {tuple(int(v) for v in palette(1)[1])}
    with pytest.raises(ValueError):
        overlay(img, lab, ["x"], alpha=1.5)
    with pytest.raises(ValueError, match="shape"):
        overlay(img, np.ones((20, 10), np.uint8), ["x"])


@pytest.mark.parametrize("size", [(1, 1), (8, 8), (3, 40)])
def test_overlay_tiny_images(size):
    img = Image.new("RGB", size, (0, 200, 0))
    lab = np.ones(size[::-1], np.uint8)
    out = overlay(img, lab, ["a long class name"])
    assert out.size[0] > size[0] and out.size[1] >= max(size[1], 12)
    assert np.asarray(out)[0, 0].tolist() != [255, 255, 255]  # the image is at the top left
    assert tuple(int(v) for v in palette(1)[1]) in _colours(out)


def test_overlay_many_classes_caps_legend():
    n = 100
    lab = (np.arange(200 * 300).reshape(200, 300) % (n + 1)).astype(np.uint16)
    img = Image.new("RGB", (300, 200), (128, 128, 128))
    out = overlay(img, lab, [f"class {i}" for i in range(n)], alpha=1.0)
    strip = _colours(out.crop((300, 0, out.size[0], out.size[1])))
    pal = {tuple(int(v) for v in c) for c in palette(n)[1:]}
    assert len(strip & pal) == visualize.MAX_LEGEND_ENTRIES - 1  # 39 swatches + "+61 more"
    assert out.size[1] == 200  # wraps into columns instead of growing taller than the image


def test_overlay_legend_scales_with_image_size():
    small = overlay(Image.new("RGB", (100, 100)), np.ones((100, 100), np.uint8), ["thing"])
    big = overlay(Image.new("RGB", (1600, 1600)), np.ones((1600, 1600), np.uint8), ["thing"])
    assert big.size[0] - 1600 > 1.5 * (small.size[0] - 100)


def test_overlay_without_scalable_font(monkeypatch):
    real = ImageFont.load_default

    def old_pillow(*args, **kwargs):
        if args or kwargs:
            raise TypeError("load_default() takes no arguments")
        return real()

    monkeypatch.setattr(ImageFont, "load_default", old_pillow)
    out = overlay(_photo(), np.ones((48, 64), np.uint8), ["cat"])
    assert out.size[0] > 64


# ------------------------------------------------------------------------------------------ figures
def test_side_by_side_same_height_and_exact_label_colours():
    img = _photo(64, 48)
    lab = np.zeros((24, 32), np.uint8)
    lab[:, 16:] = 2
    panels = [img, label_png(lab, 3), Image.new("L", (10, 10), 100)]
    fig = side_by_side(panels, ["image", "ground truth", "gray"])
    assert fig.mode == "RGB"
    assert fig.size[0] >= 64 + 64 + 48 and fig.size[1] > 48  # label panel scaled x2, gray to 48x48; titles
    pal = palette(3)
    assert tuple(int(v) for v in pal[2]) in _colours(fig)
    blended = {c for c in _colours(fig) if c not in (tuple(pal[0]), tuple(pal[2]))}
    assert tuple(pal[1]) not in blended  # nearest resize: no made-up label colours
    untitled = side_by_side(panels)
    assert untitled.size[1] < fig.size[1]
    with pytest.raises(ValueError):
        side_by_side(panels, ["only one"])


def test_grid_column_and_cell_titles():
    a, b = _photo(40, 30, 1), _photo(20, 30, 2)
    g = grid([[a, b], [b, a]], ["left", "right"])
    assert g.size[0] >= 80 and g.size[1] >= 60
    g2 = grid([[a, b], [a]], [["x", "y"], ["z"]], height=15)
    assert g2.size[1] < g.size[1]
    with pytest.raises(ValueError):
        grid([])
    with pytest.raises(ValueError):
        grid([[a, b]], [["x"], ["y"]])
