"""Issue 18: bombs refused on every path, every bad argument one line + exit 2 before any work, one class-name
policy, a fuzz pass over damaged real images. Nothing here needs a trained model except where it says so."""
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]


def jpeg_declaring(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 40)).save(buf, "JPEG", quality=80)
    b = bytearray(buf.getvalue())
    i = b.find(b"\xff\xc0")
    b[i + 5:i + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(b)


def png_declaring(w: int, h: int) -> bytes:
    import struct
    import zlib
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    b[16:24] = struct.pack(">II", w, h)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])) & 0xFFFFFFFF)
    return bytes(b)


def tiff_declaring(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "TIFF")
    im = Image.open(io.BytesIO(buf.getvalue()))
    b = bytearray(buf.getvalue())
    # patch ImageWidth (256) and ImageLength (257) entries, SHORT or LONG, in the first IFD (little endian)
    import struct
    ifd = struct.unpack("<I", b[4:8])[0]
    n = struct.unpack("<H", b[ifd:ifd + 2])[0]
    for k in range(n):
        e = ifd + 2 + 12 * k
        tag, typ = struct.unpack("<HH", b[e:e + 4])
        if tag in (256, 257):
            b[e + 2:e + 4] = struct.pack("<H", 4)  # LONG
            b[e + 8:e + 12] = struct.pack("<I", w if tag == 256 else h)
    assert im.size == (8, 8)
    return bytes(b)


def webp_declaring(w: int, h: int) -> bytes:
    """A lossless WebP whose VP8L header declares w x h (at most 16384 a side in that format)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "WEBP", lossless=True)
    b = bytearray(buf.getvalue())
    i = b.find(b"VP8L")
    assert i > 0
    bits = int.from_bytes(b[i + 9:i + 13], "little")
    bits = (bits & ~((1 << 28) - 1)) | ((w - 1) & 0x3FFF) | (((h - 1) & 0x3FFF) << 14)
    b[i + 9:i + 13] = bits.to_bytes(4, "little")
    return bytes(b)


BOMBS = {"bomb.jpg": lambda: jpeg_declaring(65000, 65000), "bomb.png": lambda: png_declaring(65000, 65000),
         "bomb.tif": lambda: tiff_declaring(65000, 65000), "bomb.webp": lambda: webp_declaring(16384, 16384)}


def _capped(mem_mb: int):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (mem_mb << 20, mem_mb << 20))
    return limit


def run_capped(args, mem_mb=1500, timeout=20, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "fusionseg.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, preexec_fn=_capped(mem_mb), env=env, cwd=cwd)
    return p.returncode, p.stdout, p.stderr, time.monotonic() - t0


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_bomb_refused_fast_in_a_memory_capped_subprocess(tmp_path, name):
    """The 65,000 x 65,000 header (and PNG / TIFF / WebP ones) through `segment`: under 1.5 GB of address space,
    refused from the header, one line, exit 2, no output folder."""
    p = tmp_path / name
    p.write_bytes(BOMBS[name]())
    code, out, err, secs = run_capped(["segment", p, "--classes", "cat", "--out", tmp_path / "o"])
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "more than the limit" in err and name in err
    assert secs < 10  # python start-up included; nothing is decoded (the model is never loaded)
    assert not (tmp_path / "o").exists()


def test_bomb_refused_by_every_python_path(tmp_path):
    """Preparer (Segmenter.predict / predict_batch / evaluate), load_image, the dataset loader and the server's
    header check: all refuse the declared size before decoding."""
    from fusionseg.data.datasets import FolderDataset
    from fusionseg.data.io import DEFAULT_MAX_PIXELS, ImageTooLarge, declared_size, load_image
    from fusionseg.segmenter import Preparer
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(jpeg_declaring(65000, 65000))
    t0 = time.monotonic()
    with pytest.raises(ImageTooLarge, match="65000 x 65000"):
        Preparer(320, (0.5,) * 3, (0.5,) * 3)(bomb)
    with pytest.raises(ImageTooLarge):
        load_image(bomb, max_side=64)
    with pytest.raises(ImageTooLarge):
        load_image(str(bomb), max_pixels=10 ** 12)  # over Pillow's own limit too
    with pytest.raises(ImageTooLarge):
        declared_size(bomb.read_bytes())
    ds = make_shapes_dataset(tmp_path / "ds", n=2)
    (ds / "images" / "img000.png").write_bytes(png_declaring(65000, 65000))
    with pytest.raises(ImageTooLarge):
        FolderDataset(ds)[0]
    (ds / "masks" / "img001.png").write_bytes(png_declaring(65000, 65000))
    with pytest.raises(ImageTooLarge):
        FolderDataset(ds).load_mask("img001")
    assert time.monotonic() - t0 < 3
    assert Image.MAX_IMAGE_PIXELS is not None and DEFAULT_MAX_PIXELS == 120_000_000
    from fusionseg.serve.app import ApiError, check_image_header
    with pytest.raises(ApiError) as ei:
        check_image_header(bomb.read_bytes(), DEFAULT_MAX_PIXELS)
    assert ei.value.status == 413


def test_pillow_global_state_untouched(tmp_path):
    from fusionseg.data.io import load_image
    before = Image.MAX_IMAGE_PIXELS
    p = tmp_path / "a.png"
    Image.new("RGB", (30, 20)).save(p)
    load_image(p, max_pixels=10 ** 10)
    assert Image.MAX_IMAGE_PIXELS == before
    src = (ROOT / "src/fusionseg/data/io.py").read_text()
    assert "MAX_IMAGE_PIXELS =" not in src
    assert "import _open" not in (ROOT / "src/fusionseg/serve/app.py").read_text()


# ------------------------------------------------------------------------------------------ bad arguments
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("args")
    ds = make_shapes_dataset(d / "ds", n=2)
    return d, ds


BAD = [  # (argv with {img}/{ds}/{out} placeholders, words the one line must hold)
    ("segment {img} --classes cat --out {out} --device tpu", "--device"),
    ("segment {img} --classes cat --out {out} --batch-size 0", "--batch-size"),
    ("segment {img} --classes cat --out {out} --batch-size -3", "--batch-size"),
    ("segment {img} --classes cat --out {out} --workers -1", "--workers"),
    ("segment {img} --classes cat --out {out} --threads -2", "--threads"),
    ("segment {img} --classes cat --out {out} --threshold 1.5", "--threshold"),
    ("segment {img} --classes cat --out {out} --threshold -0.1", "--threshold"),
    ("segment {img} --classes cat --out {out} --threshold nan", "--threshold"),
    ("segment {img} --classes cat --out {out} --size 0", "--size"),
    ("segment {img} --classes cat --out {out} --size 99999", "--size"),
    ("segment {img} --classes cat --out {out} --tile 10", "--tile"),
    ("segment {img} --classes cat --out {out} --max-megapixels 0", "--max-megapixels"),
    ("segment {img} --classes cat --out {out} --max-megapixels inf", "--max-megapixels"),
    ("segment {img} --classes cat --out {out} --background --threshold 0.3", "--background"),
    ("segment {img} --classes cat --out {out} --batch-size x", "--batch-size"),
    ("segment {img} --classes cat --out {out} --mode nope", "--mode"),
    ("segment {img} --out {out}", "--classes"),
    ("segment {img} --classes cat --classes-file {img} --out {out}", "exactly one"),
    ("segment {img} --classes-file {missing} --out {out}", "no such classes file"),
    ("segment {img} --classes , --out {out}", "empty"),
    ("segment {img} --classes 'cat,,dog' --out {out}", "blank"),
    ("segment {img} --classes 'cat, Cat' --out {out}", "duplicate"),
    ("segment {img} --classes {long} --out {out}", "characters long"),
    ("segment {img} --classes {many} --out {out}", "limit is 1000"),
    ("segment {img} --classes '[\"cat\", 3]' --out {out}", "list of strings"),
    ("segment {img} --classes '[\"cat\"' --out {out}", "JSON"),
    ("segment {missing} --classes cat --out {out}", "no such file"),
    ("segment {img} --classes cat --out {out} --model {missing}", "missing"),
    ("train --data {ds} --out {out} --steps 0", "--steps"),
    ("train --data {ds} --out {out} --batch-size 0", "--batch-size"),
    ("train --data {ds} --out {out} --lr 0", "--lr"),
    ("train --data {ds} --out {out} --lr nan", "--lr"),
    ("train --data {ds} --out {out} --size 0", "--size"),
    ("train --data {ds} --out {out} --val-fraction 1", "--val-fraction"),
    ("train --data {ds} --out {out} --val-fraction -0.5", "--val-fraction"),
    ("train --data {ds} --out {out} --fold 7", "--fold"),
    ("train --data {ds} --out {out} --checkpoint-every -1", "--checkpoint-every"),
    ("train --data {ds} --out {out} --workers -1", "--workers"),
    ("train --data {ds} --out {out} --device tpu", "--device"),
    ("train --data {ds} --out {out} --threads -1", "--threads"),
    ("train --data {ds} --out {out} --name-dropout 2", "--name-dropout"),
    ("train --data {ds} --out {out} --scales a,b", "--scales"),
    ("train --data {ds} --out {out} --scales 0", "--scales"),
    ("train --data {ds} --out {out} --seed -1", "--seed"),
    ("train --data {ds} --out {out} --copy-paste 0.5", "--copy-paste needs --no-cache"),
    ("train --data {ds} --out {out} --no-cache --copy-paste 1.5", "--copy-paste"),
    ("train --data {ds} --out {out} --no-cache --copy-paste 0.5 --copy-paste-jitter -1", "--copy-paste-jitter"),
    ("train --data {ds} --out {out} --no-cache --copy-paste 0.5 --copy-paste-by rare", "--copy-paste-by"),
    ("train --data {ds} --out {out} --repeat-factor -1", "--repeat-factor"),
    ("train --data {ds} --out {out} --loss dice", "--loss"),
    ("train --data {ds} --out {out} --set dice_weight=-1", "--dice-weight"),
    ("train --data {ds} --out {out} --set warmup=-1", "--warmup"),
    ("train --data {ds} --out {out} --steps 10 --set warmup=10", "warmup"),
    ("train --data {missing} --out {out}", "not found"),
    ("train --data {ds} --out {out} --preset huge", "--preset"),
    ("evaluate --data {ds} --max-images 0", "--max-images"),
    ("evaluate --data {ds} --episodes 0 --protocol episodes", "--episodes"),
    ("evaluate --data {ds} --protocol episodes --max-images 5", "--episodes"),
    ("evaluate --data {ds} --episodes 5", "--episodes"),
    ("evaluate --data {ds} --threshold 2", "--threshold"),
    ("evaluate --data {ds} --fold 4", "--fold"),
    ("evaluate --data {ds} --device tpu", "--device"),
    ("evaluate --data {ds} --threads -1", "--threads"),
    ("evaluate --data {ds} --classes cat", "novel-names"),
    ("evaluate --data {ds} --protocol novel-names --classes 'cat,,dog'", "blank"),
    ("evaluate --data {missing}", "not found"),
    ("cache --data {ds} --size 0", "--size"),
    ("cache --data {ds} --shard-size 0", "--shard-size"),
    ("cache --data {ds} --fold 9", "--fold"),
    ("cache --data {ds} --device tpu", "--device"),
    ("cache --data {ds} --scales x", "--scales"),
    ("cache --data {missing}", "not found"),
    ("serve --port 70000", "--port"),
    ("serve --port -1", "--port"),
    ("serve --workers 0", "--workers"),
    ("serve --queue -1", "--queue"),
    ("serve --max-upload-mb 0", "--max-upload-mb"),
    ("serve --max-megapixels -1", "--max-megapixels"),
    ("serve --max-classes 0", "--max-classes"),
    ("serve --max-classes 5000", "--max-classes"),
    ("serve --timeout 0", "--timeout"),
    ("serve --timeout nan", "--timeout"),
    ("serve --threads -1", "--threads"),
    ("serve --device tpu", "--device"),
    ("serve --size 2", "--size"),
    ("serve --host 999.1.1.1 --port 0", "--host"),
    ("pseudo-label --data {ds} --out {out} --min-peak 2", "--min-peak"),
    ("pseudo-label --data {ds} --out {out} --min-confidence -1", "--min-confidence"),
    ("pseudo-label --data {ds} --out {out} --max-images 0", "--max-images"),
    ("pseudo-label --data {ds} --out {out} --device tpu", "--device"),
    ("pseudo-label --data {ds} --out {out} --threads -1", "--threads"),
    ("pseudo-label --data {missing} --out {out}", "missing"),
    ("export --out {out} --format tflite", "--format"),
    ("info --model {missing}", "missing"),
    ("nosuchcommand", "invalid choice"),
]


@pytest.mark.parametrize("spec,words", BAD, ids=[f"{i:02d}-{b[0].split()[0]}" for i, b in enumerate(BAD)])
def test_every_bad_argument_is_one_line_exit_2_before_work(inputs, tmp_path, capsys, spec, words):
    import shlex
    from fusionseg.cli import main
    d, ds = inputs
    img = ds / "images" / "img000.png"
    argv = [a.format(img=img, ds=ds, out=tmp_path / "o", missing=tmp_path / "missing", long="x" * 101,
                     many=",".join(f"c{i}" for i in range(1001))) for a in shlex.split(spec)]
    t0 = time.monotonic()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    secs = time.monotonic() - t0
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, (spec, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "error" in lines[0] and words in lines[0], lines[0]
    assert not (tmp_path / "o").exists(), "an output folder was left behind"
    assert secs < 15, f"{spec}: {secs:.1f} s before the refusal"


# ------------------------------------------------------------------------------------------ class names
def test_one_class_name_policy():
    from fusionseg.names import MAX_NAME_CHARS, match_key, parse_class_names
    assert parse_class_names(" cat ,  potted\tplant ") == ["cat", "potted plant"]
    assert parse_class_names('["cat, kitten", " toilet "]') == ["cat, kitten", "toilet"]
    assert parse_class_names(["Cat", "dog"]) == ["Cat", "dog"]
    assert match_key("Sign_Symbol") == match_key("sign-symbol") == "sign symbol"
    for bad, word in [("", "empty"), (" , ", "empty"), ("cat,,dog", "blank"), ("cat, dog,", "blank"),
                      ("cat, CAT", "duplicate"), ("traffic_light, traffic light", "duplicate"),
                      ("x" * (MAX_NAME_CHARS + 1), "characters long"), ('["a", 1]', "list of strings"),
                      ('["a"', "JSON"), (["a", "b\x00c"], "control"), (",".join("abc"), None)]:
        if word is None:
            assert parse_class_names(bad) == ["a", "b", "c"]
            continue
        with pytest.raises(ValueError, match=word):
            parse_class_names(bad)
    with pytest.raises(ValueError, match="limit is 3"):
        parse_class_names("a, b, c, d", limit=3)


def test_cli_api_and_server_share_the_policy():
    """The same strings give the same names or the same message on the three surfaces."""
    from fusionseg.data.datasets import normalize_name
    from fusionseg.encoders.hf_text import clean_name
    from fusionseg.names import parse_class_names
    from fusionseg.segmenter import parse_class_names as seg_parse
    from fusionseg.serve.app import ApiError, parse_classes
    assert seg_parse is parse_class_names
    assert normalize_name("  Sign_Symbol ") == "sign symbol" and clean_name("  traffic_light ") == "traffic light"
    for spec in ['["cat, kitten", "toilet"]', "cat, sofa", "cat,,dog", "cat, Cat", "x" * 101, ""]:
        try:
            want = parse_class_names(spec, limit=100)
        except ValueError as e:
            with pytest.raises(ApiError) as ei:
                parse_classes(spec, 100)
            assert ei.value.status == 400 and ei.value.message == str(e)
        else:
            assert parse_classes(spec, 100) == want


def test_classes_file(tmp_path):
    from fusionseg.names import read_classes_file
    f = tmp_path / "c.txt"
    f.write_text("cat, kitten\n\n  toilet  \n", encoding="utf-8")
    assert read_classes_file(f) == ["cat, kitten", "toilet"]
    f.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="UTF-8"):
        read_classes_file(f)
    f.write_text("\n \n")
    with pytest.raises(ValueError, match="no names"):
        read_classes_file(f)


# ------------------------------------------------------------------------------------------ fuzz
def _mutants(seed: int, n: int) -> list[tuple[str, bytes]]:
    """Truncations, header-field edits and random byte flips of a real JPEG and PNG."""
    rng = np.random.default_rng(seed)
    real = sorted((Path("/work/shared/data/coco128_seg/images")).glob("*.jpg"))[:2]
    srcs = [p.read_bytes() for p in real]
    if not srcs:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (120, 160, 3), np.uint8)).save(buf, "JPEG")
        srcs = [buf.getvalue()]
    for s in list(srcs):
        buf = io.BytesIO()
        Image.open(io.BytesIO(s)).convert("RGB").resize((160, 120)).save(buf, "PNG")
        srcs.append(buf.getvalue())
    out = []
    for k in range(n):
        src = bytearray(srcs[k % len(srcs)])
        kind = k % 4
        if kind == 0:  # truncation
            src = src[:int(rng.integers(1, len(src)))]
        elif kind == 1:  # header field: a random byte among the first 300 set to a random value
            for _ in range(int(rng.integers(1, 4))):
                src[int(rng.integers(0, min(300, len(src))))] = int(rng.integers(0, 256))
        elif kind == 2:  # random bytes anywhere
            for _ in range(int(rng.integers(1, 50))):
                src[int(rng.integers(0, len(src)))] = int(rng.integers(0, 256))
        else:  # size fields: a declared size up to 65535 a side
            if src[:4] == b"\x89PNG":
                import struct
                src[16:24] = struct.pack(">II", int(rng.integers(1, 65536)), int(rng.integers(1, 65536)))
            else:
                i = src.find(b"\xff\xc0")
                if i > 0:
                    src[i + 5:i + 9] = bytes(rng.integers(0, 256, 4).tolist())
        ext = ".png" if src[:4] == b"\x89PNG" or bytes(srcs[k % len(srcs)][:4]) == b"\x89PNG" else ".jpg"
        out.append((f"m{k:03d}{ext}", bytes(src)))
    return out


def _fuzz_folder(tmp_path, n: int, seed: int, timeout: float, mem_mb: int):
    d = tmp_path / "fuzz"
    d.mkdir()
    for name, data in _mutants(seed, n):
        (d / name).write_bytes(data)
    code, out, err, secs = run_capped(["segment", d, "--classes", "person, dog", "--out", tmp_path / "o",
                                       "--no-overlay", "--workers", "0", "--size", "128"],
                                      mem_mb=mem_mb, timeout=timeout)
    assert code in (0, 2, 3), err[-2000:]
    assert "Traceback" not in err
    if code != 2 or (tmp_path / "o").exists():
        summary = json.loads((tmp_path / "o" / "fusionseg-summary.json").read_text())
        assert len(summary["images"]) == n
        assert all(s["status"] in ("ok", "error") for s in summary["images"])
        assert summary["ok"] == len(list((tmp_path / "o").glob("m*.json")))
    return code, secs


def test_fuzz_folder_of_damaged_images(tmp_path):
    """24 damaged JPEG/PNG files (FUSIONSEG_FUZZ_N for more) in one `segment` run under a 6 GB address-space cap
    (the default model loads torch): every file ends as ok or error, never a crash or a hang."""
    n = int(os.environ.get("FUSIONSEG_FUZZ_N", "24"))
    _fuzz_folder(tmp_path, n, seed=1, timeout=max(240, 3 * n), mem_mb=6000)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_fuzz_each_file_alone(tmp_path, seed):
    """The long pass: each mutant in its own `segment` subprocess, capped at 60 s and 6 GB: exit 0 or 2."""
    for name, data in _mutants(100 + seed, 12):
        p = tmp_path / name
        p.write_bytes(data)
        code, out, err, secs = run_capped(["segment", p, "--classes", "person", "--out", tmp_path / ("o" + name),
                                           "--no-overlay", "--size", "128"], mem_mb=6000, timeout=60)
        assert code in (0, 2), (name, err[-500:])
        assert "Traceback" not in err
