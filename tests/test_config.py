"""Recipes as TOML files: shipped configs, --set and flag precedence, unknown keys, offline hub encoders,
the resolved config in the run folder and the checkpoint, bad input on the CLI."""
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fusionseg.cli import main
from fusionseg.engine.train import (TrainConfig, config_differences, dump_config, load_config_file, make_config,
                                    parse_set)
from fusionseg.model.checkpoint import read_checkpoint

from conftest import REPO, make_shapes_dataset

CONFIGS = REPO / "configs"


def test_shipped_configs_load_and_say_what_the_paper_says():
    for name in ("paper-pascal5i", "paper-coco20i"):
        v = load_config_file(CONFIGS / f"{name}.toml")
        assert v["image_encoder"] == "hf:openai/clip-vit-large-patch14" == v["text_encoder"]
        assert v["preset"] == "paper" and v["size"] == 224 and v["lr"] == 1e-3 and v["warmup"] > 0
        assert all(s % 14 == 0 for s in v["scales"]) and 224 in v["scales"]
        assert v["data"][0].startswith(name.split("-")[1] + ":") and v["fold"] == 0
        cfg = make_config(dict(v, out="x"))
        assert isinstance(cfg, TrainConfig)
    from fusionseg.model.fusioner import PRESETS
    assert PRESETS["paper"]["width"] == 512 and PRESETS["paper"]["layers"] == 12 and PRESETS["paper"]["heads"] == 8
    d = load_config_file(CONFIGS / "cpu-default.toml")
    script = (REPO / "scripts" / "train_default.sh").read_text()
    assert d["image_encoder"] == "efficientnet-lite0" and d["text_encoder"] == "minilm-l6"
    assert d["preset"] == "small" and f"--steps {d['steps']}" in script and d["holdout"][0] in script


def test_unknown_key_names_the_closest(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('learning_rate = 1e-3\n')
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'.*"):
        load_config_file(f)
    f.write_text('[optim]\nlr = 1e-3\nwarmpu = 10\n')
    with pytest.raises(ValueError, match="unknown config key 'warmpu'.*did you mean 'warmup'"):
        load_config_file(f)
    with pytest.raises(ValueError, match="did you mean 'batch_size'"):
        parse_set("batchsize=4")
    with pytest.raises(ValueError, match="'steps' must be int"):
        parse_set("steps=1.5")
    assert parse_set("scales=[192, 224]") == ("scales", [192, 224])
    assert parse_set("scales=192,224") == ("scales", [192, 224])
    assert parse_set("image_encoder=hf:facebook/dino-vits16") == ("image_encoder", "hf:facebook/dino-vits16")
    assert parse_set("amp=false") == ("amp", False)


def test_config_round_trip_and_differences():
    cfg = TrainConfig(data=["a"], out="o", lr=1e-3, scales=[192, 224], holdout=["x"])
    f = tomllib.loads(dump_config(cfg))
    assert make_config(f) == cfg
    other = dict(f, lr=2e-3, steps=9, out="p")
    assert config_differences(f, other) == ["lr (0.001 -> 0.002)"]  # steps / out are runtime keys


def run(args, capsys):
    code = main(args)
    return code, capsys.readouterr()


def test_flags_override_file_and_resolved_config_is_saved(tmp_path, capsys):
    data = make_shapes_dataset(tmp_path / "shapes", n=6, size=64)
    f = tmp_path / "recipe.toml"
    f.write_text(f'data = ["{data}"]\nimage_encoder = "test-pool"\ntext_encoder = "test-hash"\npreset = "tiny"\n'
                 f'steps = 50\nbatch_size = 2\nsize = 64\nlr = 0.1\nval_fraction = 0.0\n'
                 f'cache_dir = "{tmp_path / "cache"}"\ncheckpoint_every = 0\n')
    code, out = run(["train", "--config", str(f), "--set", "lr=0.002", "--set", "steps=3", "--steps", "2",
                     "--out", str(tmp_path / "run")], capsys)
    assert code == 0, out.err
    saved = load_config_file(tmp_path / "run" / "config.toml")
    assert saved["steps"] == 2 and saved["lr"] == 0.002 and saved["preset"] == "tiny"  # flag > --set > file
    _, meta = read_checkpoint(tmp_path / "run" / "final.safetensors")
    assert meta["training"]["config"]["lr"] == 0.002 and meta["training"]["config"]["steps"] == 2
    # `--resume RUN_DIR` alone reads the run's config; a changed key is refused with its name
    code, out = run(["train", "--resume", str(tmp_path / "run"), "--lr", "0.5"], capsys)
    assert code == 2 and "different config: lr (0.002 -> 0.5)" in out.err and len(out.err.strip().splitlines()) == 1
    code, out = run(["train", "--resume", str(tmp_path / "run"), "--steps", "4"], capsys)
    assert code == 0, out.err
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_bad_input_one_line_exit_2(tmp_path, capsys):
    f = tmp_path / "c.toml"
    f.write_text("stpes = 3\n")
    code, out = run(["train", "--config", str(f), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "unknown config key 'stpes'" in out.err and "did you mean 'steps'" in out.err
    assert len(out.err.strip().splitlines()) == 1
    # an empty dataset: a folder whose images have no masks
    empty = make_shapes_dataset(tmp_path / "empty", n=1, size=32)
    for p in (empty / "masks").iterdir():
        p.unlink()
    code, out = run(["train", "--data", str(empty), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "no image" in out.err and len(out.err.strip().splitlines()) == 1
    code, out = run(["train", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "no data given" in out.err
    code, out = run(["train", "--resume", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "cannot resume" in out.err
    code, out = run(["train", "--data", "pascal5i:/nonexistent/VOC", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "needs a fold" in out.err


def test_hub_encoder_not_available_offline_says_how_to_get_it(tmp_path):
    data = make_shapes_dataset(tmp_path / "shapes", n=3, size=32)
    f = tmp_path / "paper.toml"
    f.write_text(f'data = ["{data}"]\nimage_encoder = "hf:openai/clip-vit-large-patch14"\n')
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "-m", "fusionseg.cli", "train", "--config", str(f), "--out",
                        str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-1500:]
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "huggingface-cli download openai/clip-vit-large-patch14" in err and "HF_HOME" in err
