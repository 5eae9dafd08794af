"""Bad and unusual input found by a pass over every subcommand: each case failed before its fix (one line on
stderr and exit 2 for bad input, the normal result for unusual-but-valid input)."""
import json

import pytest

from conftest import make_shapes_dataset, run_cli as run


def _one_error_line(err: str, *words: str) -> str:
    lines = [ln for ln in err.strip().splitlines()  # warnings and progress bars aside
             if ln.strip() and ": warning: " not in ln and "%|" not in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "error" in lines[0] and all(w in lines[0] for w in words), lines[0]
    return lines[0]


def test_train_one_step_with_the_default_warmup(tmp_path, capsys):
    """``--steps 1`` (the smallest run) scaled the default warm-up to 1 step and then refused it as not shorter
    than the run; it now trains with no warm-up."""
    ds = make_shapes_dataset(tmp_path / "shapes", n=4, size=64)
    code, out, err = run(["train", "--data", ds, "--out", tmp_path / "run", "--image-encoder", "test-pool",
                          "--text-encoder", "test-hash", "--preset", "tiny", "--steps", "1", "--size", "64",
                          "--batch-size", "2", "--val-fraction", "0", "--cache-dir", tmp_path / "c"], capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "final.safetensors").is_file()
    assert "trained 1 steps" in out


def _absent_devices() -> list[str]:
    import torch
    mps = getattr(torch.backends, "mps", None)
    out = [f"cuda:{torch.cuda.device_count() + 1}"]  # never there: no CUDA at all, or one index past the last
    if mps is None or not mps.is_available():
        out.append("mps")
    return out


DEVICE_COMMANDS = {
    "segment": "segment {img} --classes square --out {out} --workers 0",
    "train": "train --data {ds} --out {out} --preset tiny --steps 1 --size 64",
    "evaluate": "evaluate --data {ds}",
    "cache": "cache --data {ds} --size 64 --cache-dir {out}",
    "pseudo-label": "pseudo-label --data {ds} --out {out} --max-images 1",
    "serve": "serve --port 0",
}


@pytest.mark.parametrize("command", list(DEVICE_COMMANDS))
def test_a_device_this_machine_lacks_is_one_line(tmp_path, capsys, command):
    """--device mps (PyTorch without MPS) or cuda:N past the last GPU ended in a torch traceback (exit 1) in
    every command but segment's and evaluate's plain ``cuda``; now one line naming the flag, before any work."""
    import shlex
    ds = make_shapes_dataset(tmp_path / "shapes", n=2, size=64)
    spec = DEVICE_COMMANDS[command].format(img=ds / "images" / "img000.png", ds=ds, out=tmp_path / "o")
    for dev in _absent_devices():
        code, _, err = run(shlex.split(spec) + ["--device", dev], capsys)
        assert code == 2, (dev, err)
        line = _one_error_line(err, f"--device {dev.partition(':')[0]}")
        assert "--device cpu" in line or "CUDA device(s)" in line, line
        assert not (tmp_path / "o").exists(), "an output folder was left behind"


def test_model_a_run_folder_without_final_weights(tmp_path, capsys):
    """A run folder that has not finished was "checkpoint not found ... (give ... a training run folder)",
    which it is; now the message says what is missing and which file to give instead."""
    img = make_shapes_dataset(tmp_path / "shapes", n=1, size=64) / "images" / "img000.png"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text('steps = 10\n')
    code, _, err = run(["segment", img, "--classes", "square", "--out", tmp_path / "o", "--model", run_dir], capsys)
    assert code == 2
    _one_error_line(err, "training run folder without final.safetensors", "holds no weights")
    for n in (2, 10):  # numeric order: step10 is the latest, not step2
        (run_dir / f"step{n}.safetensors").write_bytes(b"")
    code, _, err = run(["info", "--model", run_dir], capsys)
    assert code == 2
    _one_error_line(err, "without final.safetensors", str(run_dir / "step10.safetensors"))


@pytest.mark.parametrize("argv", [
    ["segment", "IMG", "--classes", "square", "--out", ""],
    ["segment", "", "--classes", "square", "--out", "OUT"],
    ["pseudo-label", "--data", "DS", "--out", ""],
    ["export", "--out", ""],
    ["evaluate", "--data", "DS", "--json", ""],
    ["train", "--data", "DS", "--out", "OUT", "--config", ""],
], ids=["segment-out", "segment-image", "pseudo-label-out", "export-out", "evaluate-json", "train-config"])
def test_an_empty_path_is_refused(tmp_path, capsys, monkeypatch, argv):
    """An empty path (an unset shell variable) was the current folder: segment, export and pseudo-label wrote
    there, evaluate dropped --json and train --config silently; now one line naming the flag."""
    ds = make_shapes_dataset(tmp_path / "shapes", n=1, size=64)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "img000.png").write_bytes((ds / "images" / "img000.png").read_bytes())
    monkeypatch.chdir(cwd)
    subst = {"IMG": str(ds / "images" / "img000.png"), "DS": str(ds), "OUT": str(tmp_path / "o")}
    code, _, err = run([subst.get(x, x) for x in argv], capsys)
    assert code == 2
    flag = "an image path" if argv[1] == "" else argv[argv.index("") - 1]
    _one_error_line(err, f"{flag} is empty")
    assert sorted(p.name for p in cwd.iterdir()) == ["img000.png"], "something was written in the current folder"
    assert not (tmp_path / "o").exists()


def test_one_image_named_twice_is_read_once(tmp_path, capsys):
    """``segment photos photos/a.png`` (a folder and a file in it) was refused: "a.png and a.png would both write
    ...; rename one of them"; the same file is now read once."""
    ds = make_shapes_dataset(tmp_path / "shapes", n=2, size=64)
    imgs = ds / "images"
    code, out, err = run(["segment", imgs, imgs / "img001.png", imgs / ".." / "images" / "img000.png",
                          "--classes", "square, disc", "--out", tmp_path / "o", "--workers", "0", "--no-overlay"],
                         capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "fusionseg-summary.json", "img000.json", "img000.png", "img001.json", "img001.png"]
    summary = json.loads((tmp_path / "o" / "fusionseg-summary.json").read_text())
    assert [st["status"] for st in summary["images"]] == ["ok", "ok"]


@pytest.mark.parametrize("size", ["0", "-5", "100000"])
def test_export_size_out_of_range(tmp_path, capsys, size):
    """export --size 0 and -5 were taken silently (the default, 32 px) and 100000 ended in a torch allocation
    traceback; now the range train and cache use, one line."""
    code, _, err = run(["export", "--out", tmp_path / "o", "--size", size], capsys)
    assert code == 2
    _one_error_line(err, "--size must be in [32, 4096]", size)
    assert not (tmp_path / "o").exists()


MANIFESTS = {  # dataset.json -> words of the one error line
    "a list": ([1, 2], "must hold a JSON object"),
    "class key not a number": ({"classes": {"x": "square"}}, "class key 'x' is not a mask value"),
    "class key past 255": ({"classes": {"300": "square"}}, "outside the 8-bit mask values"),
    "class key negative": ({"classes": {"-1": "square"}}, "class key '-1' is not a mask value"),
    "class name empty": ({"classes": {"1": " "}}, "class '1' needs a name"),
    "class name not text": ({"classes": {"1": ["square"]}}, "class '1' needs a name"),
    "background past 255": ({"background_values": [999]}, "background value 999 is outside"),
    "ignore not a list": ({"ignore_values": 255}, "'ignore_values' must be a list"),
    "images not a folder name": ({"images": 5}, "'images' must name a folder"),
}


def test_train_scales_with_no_size_is_refused(tmp_path, capsys):
    """train --scales "," (no size in the list) trained at the default scales without a word."""
    ds = make_shapes_dataset(tmp_path / "shapes", n=1, size=64)
    code, _, err = run(["train", "--data", ds, "--out", tmp_path / "run", "--scales", " , ", "--image-encoder",
                        "test-pool", "--text-encoder", "test-hash", "--preset", "tiny", "--steps", "1", "--size",
                        "64", "--cache-dir", tmp_path / "c"], capsys)
    assert code == 2
    _one_error_line(err, "--scales must be comma-separated integers")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_train_on_a_malformed_dataset_json(tmp_path, capsys, case):
    """A dataset.json that is valid JSON but not the folder format ended in a traceback (a list, a class key
    past 255, a folder name that is a number), a bare "invalid literal for int()" (a key that is not a number)
    or was taken wrongly (key -1 marked value 255; an empty class name); now one line naming the file."""
    ds = make_shapes_dataset(tmp_path / "shapes", n=2, size=64)
    change, words = MANIFESTS[case]
    if isinstance(change, dict):
        meta = json.loads((ds / "dataset.json").read_text())
        meta.update(change)
        change = meta
    (ds / "dataset.json").write_text(json.dumps(change))
    code, _, err = run(["train", "--data", ds, "--out", tmp_path / "run", "--image-encoder", "test-pool",
                        "--text-encoder", "test-hash", "--preset", "tiny", "--steps", "2", "--size", "64",
                        "--cache-dir", tmp_path / "c"], capsys)
    assert code == 2
    _one_error_line(err, str(ds / "dataset.json"), words)
    assert not (tmp_path / "run").exists()


def test_train_rerun_after_a_failed_start_is_not_refused(tmp_path, capsys):
    """A train that stopped on bad input found after config.toml and splits.json were written (here a --init that
    is not a checkpoint) left those files, and the corrected command was then refused: "holds a training run
    ... pass --resume or --overwrite". Nothing was trained, so the rerun now runs as given."""
    ds = make_shapes_dataset(tmp_path / "shapes", n=4, size=64)
    base = ["train", "--data", ds, "--out", tmp_path / "run", "--image-encoder", "test-pool", "--text-encoder",
            "test-hash", "--preset", "tiny", "--steps", "2", "--size", "64", "--val-fraction", "0",
            "--cache-dir", tmp_path / "c"]
    (tmp_path / "text.safetensors").write_text("not weights")
    code, _, err = run(base + ["--init", tmp_path / "text.safetensors"], capsys)
    assert code == 2
    _one_error_line(err, "not a readable safetensors checkpoint")
    code, out, err = run(base, capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "final.safetensors").is_file() and "trained 2 steps" in out
    code, _, err = run(base, capsys)  # a run that trained is still protected
    assert code == 2
    _one_error_line(err, "holds a training run", "step 2")


def test_train_config_that_is_not_text(tmp_path, capsys):
    """--config on a binary file (an image) said only "'utf-8' codec can't decode byte 0xff ...", naming no file."""
    ds = make_shapes_dataset(tmp_path / "shapes", n=1, size=64)
    img = ds / "images" / "img000.png"
    code, _, err = run(["train", "--config", img, "--data", ds, "--out", tmp_path / "run"], capsys)
    assert code == 2
    _one_error_line(err, str(img), "not a TOML text file")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--json", "--report"])
def test_evaluate_report_onto_a_folder_is_refused_before_the_run(tmp_path, capsys, flag):
    """evaluate --json FOLDER ran the whole evaluation and only then failed ("cannot write to FOLDER: it is a
    folder"); now refused before the model loads."""
    ds = make_shapes_dataset(tmp_path / "shapes", n=1, size=64)
    code, out, err = run(["evaluate", "--data", ds, "--model", tmp_path / "missing", flag, tmp_path], capsys)
    assert code == 2
    _one_error_line(err, f"{flag} {tmp_path} is a folder")  # not "checkpoint not found": before the model


@pytest.mark.parametrize("names,teacher,words", [
    ("square, square", "MODEL", "duplicate class name"),
    ("square,,disc", "MODEL", "blank"),
    ("x" * 101, "MODEL", "characters long"),
    (" , ", "MODEL", "the class list is empty"),
    ("square, disc", "bridge", "--names applies to a model or MaskCLIP teacher"),
    (None, "bogus", "checkpoint not found: bogus"),
])
def test_pseudo_label_names_follow_the_class_name_policy(tmp_path, capsys, names, teacher, words):
    """pseudo-label --names split at commas on its own: "cat, cat" made two teacher classes, a 300-character
    name was taken, "," fell back to the model's own names, and with the bridge teacher --names was dropped
    without a word; now the one class-name policy, one line, before any image is read. A bad --teacher left an
    empty --out folder behind."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(
        (make_shapes_dataset(tmp_path / "shapes", n=1, size=64) / "images" / "img000.png").read_bytes())
    model = tmp_path / "model.safetensors"
    model.write_text("never read")  # the names are checked before the teacher loads
    code, _, err = run(["pseudo-label", "--data", photos, "--out", tmp_path / "o", "--examples", "0",
                        "--teacher", model if teacher == "MODEL" else teacher]
                       + ([] if names is None else ["--names", names]), capsys)
    assert code == 2
    _one_error_line(err, words)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,words", [
    (["segment", "IMG", "--out", "OUT", "--classes", "@names.txt"], "give --classes-file names.txt"),
    (["evaluate", "--data", "DS", "--protocol", "novel-names", "--classes", " @names.txt"], "list the names"),
    (["pseudo-label", "--data", "DS", "--out", "OUT", "--teacher", "default", "--names", "@names.txt"],
     "--names '@names.txt' is read as class names"),
    (["export", "--out", "OUT", "--classes", "@names.txt"], "not as a file"),
])
def test_classes_at_file_is_not_a_class_name(tmp_path, capsys, argv, words):
    """--classes @names.txt (how many tools read a file) segmented the image as one class named "@names.txt",
    exit 0; the README has --classes-file for that, and the value is now refused naming it."""
    ds = make_shapes_dataset(tmp_path / "shapes", n=1, size=64)
    (tmp_path / "names.txt").write_text("square\ndisc\n")
    subst = {"IMG": str(ds / "images" / "img000.png"), "DS": str(ds), "OUT": str(tmp_path / "o")}
    code, _, err = run([subst.get(x, x) for x in argv], capsys)
    assert code == 2
    _one_error_line(err, "is read as class names, not as a file", words)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["cache", "train"])
def test_unwritable_cache_dir_is_refused_before_the_features(tmp_path, capsys, command):
    """--cache-dir on a file (or /proc) failed only after the first shard's features were computed (hours on
    a large folder); now refused before the encoder runs."""
    ds = make_shapes_dataset(tmp_path / "shapes", n=2, size=64)
    (tmp_path / "afile").write_text("")
    argv = [command, "--data", ds, "--cache-dir", tmp_path / "afile" / "cache", "--image-encoder", "test-pool",
            "--size", "64"]
    if command == "train":
        argv += ["--out", tmp_path / "run", "--text-encoder", "test-hash", "--preset", "tiny", "--steps", "2"]
    code, _, err = run(argv, capsys)
    assert code == 2
    line = _one_error_line(err, "cannot write to the feature cache folder", "--cache-dir")
    assert "%" not in err, "features were computed before the refusal"
    assert not (tmp_path / "run").exists(), line


def test_ray_actor_start_failure_names_its_cause():
    """segment --engine ray --model MISSING said only "the actors could not start: The actor died because of an
    error raised in its creation task, ray::SegmentWorker.__init__() (pid=...)": the cause, the actor's own
    error, is the last line of Ray's message (an ActorDiedError with actor_init_failed, shaped here without Ray)."""
    from fusionseg.scale.ray_engine import _cause

    class ActorDied(Exception):
        actor_init_failed = True

    e = ActorDied("The actor died because of an error raised in its creation task, ray::SegmentWorker.__init__() "
                  "(pid=1, ip=10.0.0.1)\n  File \"x.py\", line 3, in __init__\n    raise CheckpointError(msg)\n"
                  "fusionseg.model.checkpoint.CheckpointError: checkpoint not found: /m (give 'default', ...)")
    assert _cause(e) == "checkpoint not found: /m (give 'default', ...)"
    assert _cause(RuntimeError("one line\nmore")) == "one line"  # other errors: their first line, as before


def test_python_dash_m_fusionseg(tmp_path):
    """``python -m fusionseg`` (the usual way to run a package's command line, e.g. from another venv's python)
    said "No module named fusionseg.__main__"."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    r = subprocess.run([sys.executable, "-m", "fusionseg", "segment", str(tmp_path / "missing.png"), "--classes",
                        "cat", "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    _one_error_line(r.stderr, "no such file or folder", "missing.png")


def test_train_holdout_naming_no_image_is_said(tmp_path, capsys):
    """--holdout with an id no dataset has (a typo, an extension: "img001.png") trained without a word, on the
    image meant to be kept out; now a warning names it, like --exclude-classes does for names."""
    ds = make_shapes_dataset(tmp_path / "shapes", n=3, size=64)
    code, out, err = run(["train", "--data", ds, "--out", tmp_path / "run", "--image-encoder", "test-pool",
                          "--text-encoder", "test-hash", "--preset", "tiny", "--steps", "1", "--size", "64",
                          "--val-fraction", "0", "--cache-dir", tmp_path / "c", "--holdout", "img001.png",
                          "--holdout", "img002"], capsys)
    assert code == 0, err
    assert "warning: --holdout names no image of the data: img001.png" in out + err
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert splits["shapes"]["val"] == ["img002"]


def test_pseudo_label_with_every_teacher_class_excluded(tmp_path):
    """Excluding every teacher class (on images without ground truth) wrote parts declaring no class, said
    "train with --data OUT", and train then refused them; now refused before any image is labelled."""
    from fusionseg.engine.pseudo_label import PseudoLabelError, pseudo_label
    from test_pseudo_label import StubTeacher, _photos
    photos = _photos(tmp_path / "photos", n=1)
    with pytest.raises(PseudoLabelError, match="leaves the teacher none of its 3 classes"):
        pseudo_label([str(photos)], tmp_path / "out", StubTeacher(k=3), progress=False, examples=0,
                     exclude_classes=["object", "animal"])  # every class's synonyms
    assert not (tmp_path / "out" / "dataset.json").exists()
    shapes = make_shapes_dataset(tmp_path / "shapes", n=1, size=64)  # ground truth brings names: still a dataset
    rep = pseudo_label([str(shapes)], tmp_path / "out2", StubTeacher(k=3), progress=False, examples=0,
                       exclude_classes=["object", "animal"])
    assert rep["images"] == 1


def test_model_an_onnx_export_folder(tmp_path, capsys):
    """An ONNX export folder as --model of a torch command said "checkpoint not found ... give a training run
    folder"; now it says what the folder is and how it runs."""
    exp = tmp_path / "export"
    exp.mkdir()
    (exp / "fusionseg-onnx.json").write_text("{}")
    code, _, err = run(["info", "--model", exp], capsys)
    assert code == 2
    _one_error_line(err, "is an ONNX export", f"--runtime onnx --model {exp}")


def test_segment_a_pipe_is_named_as_such(tmp_path, capsys):
    """A named pipe (or /dev/stdin fed by a pipe) said "no such file or folder" for a path that exists."""
    import os
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    code, _, err = run(["segment", fifo, "--classes", "cat", "--out", tmp_path / "o"], capsys)
    assert code == 2
    _one_error_line(err, "is not a regular file")
    assert not (tmp_path / "o").exists()


def test_train_fold_on_folder_data_is_said(tmp_path, capsys):
    """--fold only selects a PASCAL-5i / COCO-20i fold; on folder datasets it changed nothing, without a word (a
    user meaning to hold a fold's names out would train on them)."""
    ds = make_shapes_dataset(tmp_path / "shapes", n=3, size=64)
    base = ["train", "--data", ds, "--image-encoder", "test-pool", "--text-encoder", "test-hash", "--preset", "tiny",
            "--steps", "1", "--size", "64", "--val-fraction", "0", "--cache-dir", tmp_path / "c"]
    code, out, err = run(base + ["--out", tmp_path / "run", "--fold", "1"], capsys)
    assert code == 0, err
    assert "warning: fold 1 applies to pascal5i:ROOT and coco20i:ROOT data only" in out + err
    code, out, err = run(base + ["--out", tmp_path / "run2"], capsys)
    assert code == 0 and "warning: fold" not in out + err


@pytest.mark.parametrize("opset", ["13", "99"])
def test_export_opset_outside_what_torch_writes(tmp_path, capsys, opset):
    """export --opset 13 (the attention needs 14) or 99 (past torch's newest) failed after tracing, with torch's
    graph dumped on stdout; refused up front now, one line naming the range."""
    code, out, err = run(["export", "--format", "onnx", "--out", tmp_path / "onnx", "--opset", opset], capsys)
    assert code == 2 and out == ""
    _one_error_line(err, "--opset")
    assert not (tmp_path / "onnx").exists()
