"""Image loading edge cases and atomic writes (fusionseg.data.io)."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fusionseg.data.io import (ImageError, OutputError, load_image, load_image_with_size, save_png_atomic,
                               write_bytes_atomic, write_text_atomic)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _close(a, b, tol=12):
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


def _rotated_jpeg(path: Path, size=(40, 20), orientation=6) -> Path:
    """Stored pixels: blue, with a red 8x8 block at the stored top-left corner; EXIF Orientation set."""
    im = Image.new("RGB", size, BLUE)
    ImageDraw.Draw(im).rectangle([0, 0, 7, 7], fill=RED)
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, exif=exif, quality=95)
    return path


# ------------------------------------------------------------------------------------------ orientation
def test_exif_orientation_6_is_applied(tmp_path):
    p = _rotated_jpeg(tmp_path / "rot.jpg")
    img, orig = load_image_with_size(p)
    assert img.mode == "RGB"
    assert img.size == (20, 40) and orig == (20, 40)  # width and height swapped
    # Orientation 6 = rotate 90 degrees clockwise for display: the stored top-left lands top-right.
    assert _close(img.getpixel((17, 2)), RED)
    assert _close(img.getpixel((2, 2)), BLUE)
    assert _close(img.getpixel((17, 37)), BLUE)


def test_exif_orientation_with_max_side_reports_upright_original_size(tmp_path):
    p = _rotated_jpeg(tmp_path / "rot.jpg", size=(400, 200))
    img, orig = load_image_with_size(p, max_side=100)
    assert orig == (200, 400)
    assert img.size == (50, 100)
    assert _close(img.getpixel((48, 0)), RED, tol=40)


def test_pil_input_from_open_gets_orientation_but_derived_image_does_not(tmp_path):
    p = _rotated_jpeg(tmp_path / "rot.jpg")
    with Image.open(p) as im:
        assert load_image(im).size == (20, 40)
    with Image.open(p) as im:
        derived = im.convert("RGB")  # format None: the caller owns the pixels as they are
        assert load_image(derived).size == (40, 20)


# ------------------------------------------------------------------------------------------ modes
def test_cmyk_jpeg_gives_rgb(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, quality=95)
    with Image.open(p) as im:
        assert im.mode == "CMYK"
    img = load_image(p)
    assert img.mode == "RGB"
    assert _close(img.getpixel((8, 8)), RED, tol=20)


def test_16bit_png_scaled_to_8bit(tmp_path):
    p = tmp_path / "g16.png"
    a = np.array([[0, 32768, 65535, 257, 65280]], dtype=np.uint16)
    Image.fromarray(a).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")
    out = np.asarray(load_image(p))
    assert out.shape == (1, 5, 3)
    assert out[0, :, 0].tolist() == [0, 128, 255, 1, 254]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_mode_I_and_F_images():
    i32 = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert i32.mode == "I"
    assert np.asarray(load_image(i32))[0, :, 0].tolist() == [0, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert f.mode == "F"
    assert np.asarray(load_image(f))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-10.0, 0.0, 10.0]], dtype=np.float32))  # outside [0, 1]: stretched
    assert np.asarray(load_image(wide))[0, :, 0].tolist() == [0, 128, 255]


def test_palette_with_transparency_composited_over_white(tmp_path):
    p = tmp_path / "pal.png"
    im = Image.new("P", (2, 1))
    im.putpalette([0, 255, 0, 9, 9, 9] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    im.save(p, transparency=1)
    img = load_image(p)
    assert img.getpixel((0, 0)) == (0, 255, 0)
    assert img.getpixel((1, 0)) == (255, 255, 255)
    g = tmp_path / "pal.gif"
    im.save(g, transparency=1)
    assert load_image(g).getpixel((1, 0)) == (255, 255, 255)
    assert load_image(g).getpixel((0, 0)) == (0, 255, 0)


def test_rgba_and_la_composited_over_white(tmp_path):
    a = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    p = tmp_path / "rgba.png"
    Image.fromarray(a, "RGBA").save(p)
    img = load_image(p)
    assert img.getpixel((0, 0)) == (255, 255, 255)  # fully transparent: white, not the hidden red
    assert img.getpixel((1, 0)) == BLUE
    assert _close(img.getpixel((2, 0)), (127, 127, 127), tol=2)
    la = Image.fromarray(np.array([[[0, 0], [50, 255]]], dtype=np.uint8), "LA")
    q = tmp_path / "la.png"
    la.save(q)
    img = load_image(q)
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 0)) == (50, 50, 50)


def test_grayscale_onebit_and_1x1(tmp_path):
    g = tmp_path / "g.png"
    Image.new("L", (3, 2), 77).save(g)
    assert load_image(g).getpixel((2, 1)) == (77, 77, 77)
    b = tmp_path / "b.png"
    one = Image.new("1", (4, 1), 0)
    one.putpixel((1, 0), 1)
    one.save(b)
    assert np.asarray(load_image(b))[0, :, 0].tolist() == [0, 255, 0, 0]
    t = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(t)
    img, orig = load_image_with_size(t, max_side=1024)
    assert img.size == (1, 1) and orig == (1, 1) and img.getpixel((0, 0)) == (1, 2, 3)


def test_stream_input(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (5, 4), (9, 8, 7)).save(buf, "PNG")
    buf.seek(0)
    img = load_image(buf)
    assert img.size == (5, 4) and img.getpixel((0, 0)) == (9, 8, 7)


# ------------------------------------------------------------------------------------------ arrays
def test_numpy_arrays():
    assert load_image(np.full((2, 3), 7, np.uint8)).getpixel((2, 1)) == (7, 7, 7)
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[1, 2] = (1, 2, 3)
    assert load_image(rgb).getpixel((2, 1)) == (1, 2, 3)
    rgba = np.zeros((1, 1, 4), np.uint8)
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.array([[0, 65535]], np.uint16)).getpixel((1, 0)) == (255, 255, 255)
    assert load_image(np.array([[0.0, 1.0]], np.float32)).getpixel((1, 0)) == (255, 255, 255)
    assert load_image(np.array([[True, False]])).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.array([[3, 200]], np.int64)).getpixel((1, 0)) == (200, 200, 200)
    assert load_image(np.zeros((4, 6, 3), np.uint8)[:, ::2]).size == (3, 4)  # non-contiguous view


@pytest.mark.parametrize("arr,words", [
    (np.array([[0.0, 255.0]], np.float32), "[0, 1]"),
    (np.array([[np.nan]], np.float32), "NaN"),
    (np.zeros((3, 32, 32), np.uint8), "channels-first"),
    (np.zeros((0, 4), np.uint8), "no pixels"),
    (np.array([[300]], np.int32), "0..255"),
    (np.zeros((2, 2), np.complex64), "dtype"),
])
def test_bad_arrays_raise_image_error(arr, words):
    with pytest.raises(ImageError) as ei:
        load_image(arr)
    assert words in str(ei.value)


def test_unsupported_type():
    with pytest.raises(ImageError, match="cannot load an image from a int"):
        load_image(3)


# ------------------------------------------------------------------------------------------ bad files
def test_missing_folder_text_empty(tmp_path):
    with pytest.raises(ImageError, match="no such file: .*nope.png"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)
    t = tmp_path / "notes.txt"
    t.write_text("hello, not an image\n")
    with pytest.raises(ImageError, match=r"notes\.txt is not an image Pillow can read"):
        load_image(t)
    e = tmp_path / "empty.jpg"
    e.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg is empty"):
        load_image(str(e))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_raises_with_name(tmp_path, fmt):
    p = tmp_path / f"broken.{fmt.lower()}"
    Image.effect_noise((256, 256), 60).convert("RGB").save(p, fmt)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as ei:
        load_image(p)
    msg = str(ei.value)
    assert str(p) in msg and "truncated or corrupt" in msg
    assert "\n" not in msg


def test_pixel_limit(tmp_path):
    p = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(p)
    saved = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match=r"big\.png is 300 x 200 = 60,000 pixels, more than the limit of 1,000"):
        load_image(p, max_pixels=1000)
    assert load_image(p, max_pixels=60_000).size == (300, 200)
    assert Image.MAX_IMAGE_PIXELS == saved  # Pillow's global limit is left as it was


def test_pixel_limit_is_on_the_declared_size_even_when_decoded_reduced(tmp_path):
    """The label map is made at the declared size, so a JPEG decoded at 1/8 scale still counts at full size."""
    from fusionseg.data.io import ImageTooLarge, declared_size
    p = tmp_path / "wide.jpg"
    Image.new("RGB", (800, 600), (10, 20, 30)).save(p)
    for kw in ({}, {"max_side": 100}):
        with pytest.raises(ImageTooLarge, match="800 x 600 = 480,000 pixels, more than the limit of 100,000"):
            load_image(p, max_pixels=100_000, **kw)
    img = load_image(p, max_pixels=480_000, max_side=100)
    assert img.size == (100, 75)
    assert declared_size(p, 480_000) == (800, 600) and declared_size(p.read_bytes(), None) == (800, 600)
    with pytest.raises(ImageTooLarge):
        declared_size(p, 479_999)
    with pytest.raises(ImageError, match="not an image"):
        declared_size(b"hello", 10)


def test_max_side_png_and_validation(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGB", (300, 100), (5, 6, 7)).save(p)
    img, orig = load_image_with_size(p, max_side=60)
    assert img.size == (60, 20) and orig == (300, 100)
    assert load_image(p, max_side=1000).size == (300, 100)  # never enlarged
    with pytest.raises(ValueError):
        load_image(p, max_side=0)


# ------------------------------------------------------------------------------------------ huge JPEG
_PROBE = textwrap.dedent("""
    import sys
    def hwm():
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM'):
                    return int(line.split()[1]) * 1024
    from fusionseg.data.io import load_image_with_size
    base = hwm()
    img, orig = load_image_with_size(sys.argv[1], max_side=1024)
    print(img.size[0], img.size[1], orig[0], orig[1], *img.getpixel((3, 3)), hwm() - base)
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for peak RSS")
def test_huge_jpeg_loads_reduced_in_little_memory(tmp_path):
    p = tmp_path / "huge.jpg"
    im = Image.new("RGB", (10000, 8000), (40, 90, 160))
    ImageDraw.Draw(im).rectangle([0, 0, 999, 799], fill=RED)
    im.save(p, quality=80)
    del im
    # A fresh process: its peak RSS (VmHWM, reset by exec) is not polluted by the 320 MB used to make the file.
    r = subprocess.run([sys.executable, "-c", _PROBE, str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    w, h, ow, oh, cr, cg, cb, growth = (int(v) for v in r.stdout.split())
    assert (w, h) == (1024, 819)
    assert (ow, oh) == (10000, 8000)
    assert _close((cr, cg, cb), RED, tol=20)
    # Full-resolution decoding alone would need 10000 * 8000 * 4 bytes = 320 MB.
    assert growth < 100 * 2**20, f"peak RSS grew {growth / 2**20:.0f} MB"


# ------------------------------------------------------------------------------------------ atomic writes
def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_atomic_writes_create_and_replace(tmp_path):
    t = write_text_atomic("héllo", tmp_path / "out" / "a.json")  # missing folder is created
    assert t.read_text(encoding="utf-8") == "héllo"
    write_text_atomic("second", t)
    assert t.read_text() == "second"
    b = write_bytes_atomic(b"\x00\x01", tmp_path / "b.bin")
    assert b.read_bytes() == b"\x00\x01"
    pal_img = Image.fromarray(np.full((2, 3), 5, np.uint8), "P")
    pal_img.putpalette(list(range(256)) * 3)
    png = save_png_atomic(pal_img, tmp_path / "c.png")
    with Image.open(png) as im:
        assert im.mode == "P" and np.asarray(im).tolist() == [[5, 5, 5], [5, 5, 5]]
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "out") == []
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert (os.stat(t).st_mode & 0o777) == (os.stat(plain).st_mode & 0o777)  # usual umask permissions


def test_atomic_write_into_unwritable_place(tmp_path):
    blocker = tmp_path / "file_not_folder"
    blocker.write_text("I am a file")
    target = blocker / "x.png"
    with pytest.raises(OutputError, match=r"cannot write to .*x\.png"):
        save_png_atomic(Image.new("RGB", (2, 2)), target)
    with pytest.raises(OutputError, match="cannot write to"):
        write_text_atomic("hi", blocker / "sub" / "y.json")
    with pytest.raises(OutputError, match="is a folder"):
        write_text_atomic("hi", tmp_path)
    assert blocker.read_text() == "I am a file"
    assert _leftovers(tmp_path) == []


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "keep.png"
    target.write_bytes(b"old")
    with pytest.raises((OSError, ValueError)):
        save_png_atomic(Image.new("CMYK", (2, 2)), target)  # PNG cannot hold CMYK: fails mid-write
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("writer", ["bytes", "text", "png"])
def test_disk_full_half_way_keeps_old_file_and_removes_temp(tmp_path, monkeypatch, writer):
    from fulldisk import disk_fills_after
    target = tmp_path / "out.bin"
    target.write_bytes(b"old contents")
    rec = disk_fills_after(monkeypatch, 100)
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(OutputError, match=r"cannot write to .*out\.bin: the disk is full"):
        {"bytes": lambda: write_bytes_atomic(b"x" * 5000, target),
         "text": lambda: write_text_atomic("y" * 5000, target),
         "png": lambda: save_png_atomic(noisy, target)}[writer]()
    assert rec["bytes_on_disk"] == 100                      # the write really reached the disk, half-way
    assert not rec["temp"].exists() and _leftovers(tmp_path) == []
    assert target.read_bytes() == b"old contents"


_FSIZE_PROBE = textwrap.dedent("""
    import os, resource, signal, sys
    from pathlib import Path
    from fusionseg.data.io import OutputError, write_bytes_atomic
    from fusionseg._atomic import write_atomic
    folder = Path(sys.argv[1])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)           # the kernel then fails the write with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    for name, write in (("a.bin", lambda p: write_bytes_atomic(b"n" * 10000, p)),
                        ("b.bin", lambda p: write_atomic(p, b"n" * 10000))):
        try:
            write(folder / name)
            print(name, "written")
        except (OSError, OutputError) as e:
            print(name, type(e).__name__, str(e).replace(" ", "_"))
""")


def test_write_failed_by_the_kernel_half_way(tmp_path):
    # A real short write: the process may not grow a file past 4 KiB, so the 10 kB write fails in the kernel.
    for name in ("a.bin", "b.bin"):
        (tmp_path / name).write_bytes(b"previous")
    r = subprocess.run([sys.executable, "-c", _FSIZE_PROBE, str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.split("\n") if line)
    assert lines["a.bin"].startswith("OutputError cannot_write_to") and "File_too_large" in lines["a.bin"]
    assert lines["b.bin"].startswith("OSError") and "File_too_large" in lines["b.bin"]
    for name in ("a.bin", "b.bin"):
        assert (tmp_path / name).read_bytes() == b"previous"
    assert _leftovers(tmp_path) == []


def test_atomic_helper_syncs_file_and_folder_with_umask_permissions(tmp_path, monkeypatch):
    import fusionseg._atomic as atomic
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    p = atomic.write_atomic(tmp_path / "s.json", lambda f: f.write(b"{}"))
    assert p.read_bytes() == b"{}" and len(synced) == 2          # the file, then the folder after the rename
    synced.clear()
    write_bytes_atomic(b"1", tmp_path / "o.bin")
    assert len(synced) == 1                                      # outputs: the file only (sync_folder=False)
    assert (os.stat(p).st_mode & 0o777) == (0o666 & ~atomic._umask())
    with pytest.raises(ZeroDivisionError):                       # the caller's own failure, unchanged
        atomic.write_atomic(p, lambda f: (f.write(b"partial"), 1 / 0))
    assert p.read_bytes() == b"{}" and _leftovers(tmp_path) == []
