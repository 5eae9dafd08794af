"""The CLI end to end with a tiny checkpoint (test encoders), and every bad input of the issue."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


from conftest import make_shapes_dataset, run_cli as run, train_tiny


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("cli"), n=6, steps=30)


def test_segment_writes_three_files(tiny_ckpt, tmp_path, capsys):
    ckpt, ds = tiny_ckpt
    img = ds / "images" / "img000.png"
    code, out, err = run(["segment", img, "--classes", "square, disc", "--model", ckpt, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    lab = Image.open(tmp_path / "o" / "img000.png")
    assert lab.mode == "P" and lab.size == (128, 128)
    assert set(np.unique(np.asarray(lab))) <= {0, 1, 2}
    ov = Image.open(tmp_path / "o" / "img000_overlay.png")
    assert ov.width >= 128 and ov.height >= 128
    info = json.loads((tmp_path / "o" / "img000.json").read_text())
    assert info["width"] == 128 and info["height"] == 128 and info["classes"] == ["square", "disc"]
    fr = sum(v["pixel_fraction"] for v in info["per_class"].values()) + info["none_fraction"]
    assert abs(fr - 1) < 1e-4
    assert "img000.png" in out
    assert not list((tmp_path / "o").glob("*.tmp"))


def test_segment_folder_input(tiny_ckpt, tmp_path, capsys):
    ckpt, ds = tiny_ckpt
    code, _, err = run(["segment", ds / "images", "--classes", "square", "--model", ckpt, "--out", tmp_path / "o",
                        "--no-overlay"], capsys)
    assert code == 0, err
    assert len(list((tmp_path / "o").glob("img*.json"))) == 6
    summary = json.loads((tmp_path / "o" / "fusionseg-summary.json").read_text())
    assert summary["ok"] == 6 and summary["failed"] == 0 and summary["exit_code"] == 0
    assert [s["status"] for s in summary["images"]] == ["ok"] * 6


@pytest.mark.parametrize("classes,msg", [("", "empty"), (" , ,", "empty"), ("cat, Cat ", "duplicate"),
                                          (",".join(f"c{i}" for i in range(1001)), "limit")])
def test_bad_class_lists(tiny_ckpt, tmp_path, capsys, classes, msg):
    ckpt, ds = tiny_ckpt
    code, out, err = run(["segment", ds / "images" / "img000.png", "--classes", classes, "--model", ckpt,
                          "--out", tmp_path / "o"], capsys)
    assert code == 2 and msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_bad_paths_and_images(tiny_ckpt, tmp_path, capsys):
    ckpt, ds = tiny_ckpt
    code, _, err = run(["segment", tmp_path / "nope.jpg", "--classes", "cat", "--model", ckpt, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "nope.jpg" in err
    txt = tmp_path / "notes.jpg"
    txt.write_text("not an image")
    code, _, err = run(["segment", txt, "--classes", "cat", "--model", ckpt, "--out", tmp_path / "o2"], capsys)
    assert code == 2 and "notes.jpg" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o2" / "notes.png").exists()
    good = Image.new("RGB", (200, 150), (10, 200, 30))
    good.save(tmp_path / "t.jpg", quality=90)
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    code, _, err = run(["segment", tmp_path / "trunc.jpg", "--classes", "cat", "--model", ckpt, "--out", tmp_path / "o3"], capsys)
    assert code == 2 and "trunc.jpg" in err
    assert not (tmp_path / "o3" / "trunc.png").exists()


def test_unwritable_output(tiny_ckpt, tmp_path, capsys):
    ckpt, ds = tiny_ckpt
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(["segment", ds / "images" / "img000.png", "--classes", "square", "--model", ckpt,
                        "--out", blocker / "sub"], capsys)
    assert code == 2 and "cannot write" in err


def test_bad_checkpoints(tiny_ckpt, tmp_path, capsys):
    ckpt, ds = tiny_ckpt
    img = ds / "images" / "img000.png"
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(Path(ckpt).read_bytes()[:100])
    code, _, err = run(["segment", img, "--classes", "square", "--model", trunc, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "trunc.safetensors" in err
    junk = tmp_path / "model.bin"
    junk.write_bytes(b"\x00" * 64)
    code, _, err = run(["segment", img, "--classes", "square", "--model", junk, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "model.bin" in err
    code, _, err = run(["segment", img, "--classes", "square", "--model", tmp_path / "missing.safetensors",
                        "--out", tmp_path / "o"], capsys)
    assert code == 2 and "not found" in err


def test_checkpoint_for_other_encoders_names_both(tiny_ckpt, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    ckpt, ds = tiny_ckpt
    with safe_open(str(ckpt), "pt") as f:
        meta = json.loads(f.metadata()["fusionseg"])
    meta["image_encoder"]["fingerprint"] = "0123456789abcdef"
    meta["image_encoder"]["name"] = "efficientnet-lite2"
    other = tmp_path / "other.safetensors"
    save_file(load_file(str(ckpt)), str(other), metadata={"fusionseg": json.dumps(meta)})
    from fusionseg.model.checkpoint import CheckpointError, load_model
    from conftest import HashText, PoolEncoder
    with pytest.raises(CheckpointError, match="efficientnet-lite2.*test-pool"):
        load_model(other, image_encoder=PoolEncoder().freeze(), text_encoder=HashText().freeze())


def test_image_kinds(tiny_ckpt, tmp_path, capsys):
    """Grayscale, RGBA, palette, 16-bit, CMYK, 1x1 all segment; labels come back at the original size."""
    ckpt, ds = tiny_ckpt
    base = Image.open(ds / "images" / "img001.png").convert("RGB")
    files = {
        "gray.png": base.convert("L"), "rgba.png": base.convert("RGBA"), "pal.png": base.convert("P"),
        "cmyk.jpg": base.convert("CMYK"), "one.png": Image.new("RGB", (1, 1), (200, 0, 0)),
        "wide.png": base.resize((300, 20)),
    }
    a16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    files["g16.png"] = Image.fromarray(a16)
    for n, im in files.items():
        im.save(tmp_path / n)
    code, _, err = run(["segment", *[tmp_path / n for n in files], "--classes", "square, disc", "--model", ckpt,
                        "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    for n, im in files.items():
        lab = Image.open(tmp_path / "o" / (Path(n).stem + ".png"))
        assert lab.size == im.size, n


def test_module_runs_as_script(tiny_ckpt, tmp_path):
    r = subprocess.run([sys.executable, "-m", "fusionseg.cli", "segment", str(tmp_path / "missing.png"),
                        "--classes", "x", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "missing.png" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_semantic_and_episodes_write_reports(tiny_ckpt, tmp_path, capsys):
    ckpt, ds = tiny_ckpt
    code, out, err = run(["evaluate", "--model", ckpt, "--data", ds, "--protocol", "semantic",
                          "--json", tmp_path / "s.json", "--report", tmp_path / "s.md"], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "s.json").read_text())
    assert rep["protocol"] == "semantic" and set(rep["per_class"]) == {"square", "disc"}
    assert 0 <= rep["miou"] <= 1 and rep["model"] == str(ckpt) and rep["data"] == str(ds)
    assert "| square |" in out and (tmp_path / "s.png").is_file() and "s.png" in (tmp_path / "s.md").read_text()
    code, out, err = run(["evaluate", "--model", ckpt, "--data", ds, "--protocol", "episodes",
                          "--json", tmp_path / "e.json", "--report", tmp_path / "e.md"], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "e.json").read_text())
    assert rep["protocol"] == "episodes" and rep["episodes"] == 12  # 6 images x 2 classes present
    assert 0 <= rep["miou"] <= 1 and 0 <= rep["fbiou"] <= 1


def test_evaluate_bad_input(tiny_ckpt, tmp_path, capsys):
    ckpt, ds = tiny_ckpt
    code, _, err = run(["evaluate", "--model", ckpt, "--data", "imagenet-seg"], capsys)
    assert code == 2 and "dataset not found" in err and "pascal5i:ROOT" in err
    code, _, err = run(["evaluate", "--model", ckpt, "--data", ds, "--fold", "4"], capsys)
    assert code == 2 and "fold" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(["evaluate", "--model", ckpt, "--data", empty], capsys)
    assert code == 2 and "dataset.json" in err


def test_train_cache_and_info_commands(tmp_path, capsys):
    ds = make_shapes_dataset(tmp_path / "shapes", n=4)
    code, out, err = run(["cache", "--data", ds, "--image-encoder", "test-pool", "--size", "64",
                          "--cache-dir", tmp_path / "c"], capsys)
    assert code == 0 and "cached in" in out
    code, out, _ = run(["cache", "--data", ds, "--image-encoder", "test-pool", "--size", "64",
                        "--cache-dir", tmp_path / "c"], capsys)
    assert code == 0 and "already cached" in out
    code, out, err = run(["train", "--data", ds, "--out", tmp_path / "run", "--image-encoder", "test-pool",
                          "--text-encoder", "test-hash", "--preset", "tiny", "--steps", "3", "--size", "64",
                          "--val-fraction", "0.25", "--cache-dir", tmp_path / "c",
                          "--exclude-classes", "disc, unicorn"], capsys)
    assert code == 0, err
    assert "unicorn" in out and (tmp_path / "run" / "final.safetensors").is_file()
    code, out, _ = run(["info", "--model", tmp_path / "run"], capsys)
    assert code == 0 and "test-pool" in out and "names seen in training (1): square" in out
    code, _, err = run(["train", "--data", tmp_path / "nope", "--out", tmp_path / "r2"], capsys)
    assert code == 2 and "not found" in err
    code, _, err = run(["train", "--data", ds, "--out", tmp_path / "r3", "--steps", "0"], capsys)
    assert code == 2 and "--steps" in err


def test_help_and_argument_errors_do_not_import_torch():
    """``--help`` and a bad choice answer from argparse alone; the choices offered are the ones the code takes."""
    code = ("import sys\nfrom fusionseg.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    print('exit', e.code)\n"
            "print('torch' in sys.modules)")
    for args, code_want, text in ((["--help"], 0, "segment"), (["segment", "--help"], 0, "--classes"),
                                  (["train", "--preset", "huge"], 2, "invalid choice: 'huge'")):
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert r.stdout.strip().splitlines()[-2:] == [f"exit {code_want}", "False"], r.stdout  # torch never imported
        assert text in r.stdout + r.stderr
    from fusionseg import choices
    from fusionseg.engine import evaluate, train
    from fusionseg.model.fusioner import DEFAULT_PRESET, PRESETS
    from fusionseg.segmenter import MODES
    assert tuple(sorted(PRESETS)) == choices.PRESET_NAMES and DEFAULT_PRESET in PRESETS
    assert MODES is choices.MODES and evaluate.PROTOCOLS is choices.PROTOCOLS
    fields = train.TrainConfig.__dataclass_fields__
    assert fields["image_encoder"].default == choices.DEFAULT_IMAGE_ENCODER
    assert fields["text_encoder"].default == choices.DEFAULT_TEXT_ENCODER


# ------------------------------------------------------------------------------------------ issue 18
def test_segment_never_overwrites_an_input_or_earlier_outputs(tiny_ckpt, tmp_path, capsys, monkeypatch):
    ckpt, ds = tiny_ckpt
    photo = tmp_path / "photo.png"
    photo.write_bytes((ds / "images" / "img000.png").read_bytes())
    before = photo.read_bytes()
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--overwrite"]):  # an input is never overwritten, --overwrite or not
        code, _, err = run(["segment", "photo.png", "--classes", "square", "--model", ckpt, "--out", ".", *extra], capsys)
        assert code == 2 and "photo.png" in err and "overwrite it" in err and len(err.strip().splitlines()) == 1
        assert photo.read_bytes() == before
    code, out, err = run(["segment", photo, "--classes", "square", "--model", ckpt, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    first = (tmp_path / "o" / "photo.json").read_text()
    code, _, err = run(["segment", photo, "--classes", "disc", "--model", ckpt, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "--overwrite" in err and "already holds" in err
    assert (tmp_path / "o" / "photo.json").read_text() == first
    code, _, err = run(["segment", photo, "--classes", "disc", "--model", ckpt, "--out", tmp_path / "o",
                        "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "photo.json").read_text())["classes"] == ["disc"]
    a, b = tmp_path / "x.png", tmp_path / "x_overlay.png"  # x's overlay would land on x_overlay's label map
    a.write_bytes(before), b.write_bytes(before)
    code, _, err = run(["segment", a, b, "--classes", "disc", "--model", ckpt, "--out", tmp_path / "o2"], capsys)
    assert code == 2 and "both write" in err and not (tmp_path / "o2").exists()


def test_folder_keeps_going_with_summary_and_exit_3(tiny_ckpt, tmp_path, capsys):
    ckpt, ds = tiny_ckpt
    d = tmp_path / "in"
    d.mkdir()
    for i in range(5):
        (d / f"img{i}.png").write_bytes((ds / "images" / f"img00{i}.png").read_bytes())
    data = (d / "img0.png").read_bytes()
    (d / "img1b.png").write_bytes(data[: len(data) // 2])  # truncated, sorts among the good ones
    (d / "img2b.jpg").write_bytes(b"not an image at all")
    code, out, err = run(["segment", d, "--classes", "square, disc", "--model", ckpt, "--out", tmp_path / "o",
                          "--no-overlay", "--workers", "2"], capsys)
    assert code == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 3 and "img1b.png" in lines[0] + lines[1] and "img2b.jpg" in lines[0] + lines[1]
    assert "2 of 7 images failed, 5 written" in lines[2] and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "o").glob("img*.png")) == [f"img{i}.png" for i in range(5)]
    assert len(out.strip().splitlines()) == 5  # one line per image written
    s = json.loads((tmp_path / "o" / "fusionseg-summary.json").read_text())
    by = {Path(x["image"]).name: x for x in s["images"]}
    assert s["exit_code"] == 3 and s["ok"] == 5 and s["failed"] == 2 and len(by) == 7
    assert by["img1b.png"]["status"] == "error" and "truncated" in by["img1b.png"]["error"]
    assert by["img3.png"]["status"] == "ok" and by["img3.png"]["outputs"][0].endswith("img3.png")


def test_checkpoint_with_non_finite_weights_is_refused(tiny_ckpt, tmp_path, capsys):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    ckpt, ds = tiny_ckpt
    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    k0 = next(k for k, v in state.items() if v.is_floating_point())
    state[k0] = state[k0].clone()
    state[k0].view(-1)[0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"), metadata=meta)
    code, _, err = run(["segment", ds / "images" / "img000.png", "--classes", "square", "--model",
                        tmp_path / "nan.safetensors", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "NaN or infinite" in err and k0 in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_train_out_onto_a_run_needs_resume_or_overwrite(tmp_path, capsys):
    ds = make_shapes_dataset(tmp_path / "shapes", n=4)
    base = ["train", "--data", ds, "--out", tmp_path / "run", "--image-encoder", "test-pool", "--text-encoder",
            "test-hash", "--preset", "tiny", "--steps", "3", "--size", "64", "--val-fraction", "0",
            "--cache-dir", tmp_path / "c"]
    code, _, err = run(base, capsys)
    assert code == 0, err
    assert "warm-up" in err and "using 1" in err  # the default 150-step warm-up on a 3-step run, said once
    final = (tmp_path / "run" / "final.safetensors").read_bytes()
    log = (tmp_path / "run" / "log.jsonl").read_text()
    code, _, err = run(base + ["--seed", "5"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "test-pool + test-hash" in err and "step 3" in err and "--resume" in err and "--overwrite" in err
    assert (tmp_path / "run" / "final.safetensors").read_bytes() == final
    assert (tmp_path / "run" / "log.jsonl").read_text() == log
    code, _, err = run(base + ["--resume"], capsys)  # continuing the finished run: nothing to do
    assert code == 0, err
    code, _, err = run(base + ["--seed", "5", "--overwrite"], capsys)
    assert code == 0, err
    rows = [json.loads(r) for r in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert rows and all(r.get("step", 0) <= 3 for r in rows)
    assert sum(1 for r in rows if r.get("step") == 3) <= 2  # the old log was not appended to


def _cli_subprocess(args):
    """The CLI in a child process with the test encoders registered (conftest), as a user would run it."""
    code = ("import sys; sys.path.insert(0, %r); import conftest; from fusionseg.cli import main; "
            "sys.exit(main())" % str(Path(__file__).parent))
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", ["SIGTERM", pytest.param("SIGINT", marks=pytest.mark.slow)])
def test_signal_mid_folder_stops_workers_and_leaves_no_partial_file(tiny_ckpt, tmp_path, sig):
    import os
    import signal
    import time
    ckpt, ds = tiny_ckpt
    d = tmp_path / "in"
    d.mkdir()
    big = Image.open(ds / "images" / "img000.png").resize((1200, 1200))
    for i in range(16):
        big.save(d / f"p{i:02d}.png", compress_level=1)
    o = tmp_path / "o"
    p = _cli_subprocess(["segment", d, "--classes", "square, disc", "--model", ckpt, "--out", o, "--workers", "2",
                         "--batch-size", "1"])
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120 and not list(o.glob("p*.json")):
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.1)
    kids = [int(k) for k in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()]
    assert len(kids) >= 2  # the decode workers
    t1 = time.monotonic()
    p.send_signal(getattr(signal, sig))
    code = p.wait(timeout=10)
    took = time.monotonic() - t1
    err = p.stderr.read()
    assert code == (143 if sig == "SIGTERM" else 130), err
    assert took < 2.0, f"{took:.2f} s to stop"
    assert "Traceback" not in err
    time.sleep(0.3)
    alive = [k for k in kids if os.path.exists(f"/proc/{k}") and "zombie" not in
             open(f"/proc/{k}/status").read().lower()]
    assert not alive, f"orphan workers {alive}"
    assert not [f for f in os.listdir(o) if f.endswith(".tmp")], "a partial file was left"
    s = json.loads((o / "fusionseg-summary.json").read_text())
    assert s["interrupted"] == sig and s["ok"] >= 1 and s["not_done"] >= 1
    for x in s["images"]:  # every image said written has its three complete files
        if x["status"] == "ok":
            for f in x["outputs"]:
                Path(f).is_file() and (json.loads(Path(f).read_text()) if f.endswith(".json") else Image.open(f).load())
