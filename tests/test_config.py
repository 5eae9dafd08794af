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
    assert "hf download openai/clip-vit-large-patch14" in err and "HF_HOME" in err


# The `fusionseg train` flags as they were written by hand before they were generated from TrainConfig:
# (option, dest, action, type, nargs, const, choices, metavar, help). --config, --set and --threads are not
# config keys and stay hand-written in cli.py.
TRAIN_FLAGS = [
    ("--config", "config", "store", None, None, None, None, None, "TOML recipe, e.g. configs/cpu-default.toml"),
    ("--set", "set", "append", None, None, None, None, "KEY=VALUE", "override one config key (repeatable)"),
    ("--data", "data", "append", None, None, None, None, None,
     "dataset folder (fusionseg-folder/1), pascal5i:ROOT or coco20i:ROOT (with --fold); repeat to mix"),
    ("--out", "out", "store", None, None, None, None, None, "run folder; the final checkpoint is OUT/final.safetensors"),
    ("--image-encoder", "image_encoder", "store", None, None, None, None, None, "default efficientnet-lite0"),
    ("--text-encoder", "text_encoder", "store", None, None, None, None, None, "default minilm-l6"),
    ("--preset", "preset", "store", None, None, None, ["paper", "small", "tiny"], None, "default small"),
    ("--steps", "steps", "store", int, None, None, None, None, None),
    ("--batch-size", "batch_size", "store", int, None, None, None, None, "global batch (split over torchrun processes)"),
    ("--lr", "lr", "store", float, None, None, None, None, None),
    ("--size", "size", "store", int, None, None, None, None, "training size (longer side, px)"),
    ("--scales", "scales", "store", None, None, None, None, None,
     "comma-separated training scales in px (default: 0.8x, 1x, 1.2x --size)"),
    ("--val-fraction", "val_fraction", "store", float, None, None, None, None,
     "whole images per dataset kept out for validation"),
    ("--holdout", "holdout", "append", None, None, None, None, None, "image id always kept out of training (repeatable)"),
    ("--exclude-classes", "exclude_classes", "store", None, None, None, None, None,
     "names never used in training; their pixels are ignored"),
    ("--fold", "fold", "store", int, None, None, None, None, "PASCAL-5i / COCO-20i fold 0-3 (novel classes left out)"),
    ("--checkpoint-every", "checkpoint_every", "store", int, None, None, None, None, None),
    ("--seed", "seed", "store", int, None, None, None, None, None),
    ("--device", "device", "store", None, None, None, None, None, "cpu or cuda (default cpu)"),
    ("--cache-dir", "cache_dir", "store", None, None, None, None, None,
     "feature cache folder (default ~/.cache/fusionseg or $FUSIONSEG_CACHE)"),
    ("--no-cache", "no_cache", "store_true", None, 0, True, None, None, "run the frozen encoder every step (no feature cache)"),
    ("--workers", "workers", "store", int, None, None, None, None, "DataLoader workers for --no-cache"),
    ("--compile", "compile", "store_true", None, 0, True, None, None, "torch.compile the trained head (GPU)"),
    ("--init", "init", "store", None, None, None, None, None,
     "start from this checkpoint's trained weights (default, a .safetensors or a run folder)"),
    ("--synonym-rate", "synonym_rate", "store", float, None, None, None, None,
     "share of classes named by one of their synonyms in a step (datasets written by fusionseg pseudo-label "
     "carry them; default 0)"),
    ("--repeat-factor", "repeat_factor", "store", float, None, None, None, None,
     "repeat-factor sampling: images showing a class rarer than this share of the training images are drawn more "
     "often (sqrt(t / share)x; e.g. 0.1); 0: uniform"),
    ("--copy-paste", "copy_paste", "store", float, None, None, None, None,
     "copy-paste augmentation: chance per training image that the pixels of one class of another image of the same "
     "folder are pasted onto it (needs --no-cache; default 0)"),
    ("--copy-paste-by", "copy_paste_by", "store", None, None, None, ["image", "class"], None,
     "what copy-paste draws first: another image, then one of its classes (image), or a class of the folder, then an "
     "image showing it, so rare classes are pasted as often as common ones (class); default image"),
    ("--copy-paste-jitter", "copy_paste_jitter", "store", float, None, None, None, None,
     "copy-paste scale jitter J: the pasted class is rescaled by a factor drawn log-uniformly in [1/(1+J), 1+J] and "
     "put at a random place (default 0: same size, same place)"),
    ("--resume", "resume", "store", None, "?", True, None, "RUN_DIR",
     "continue from the last checkpoint: of OUT (no value) or of RUN_DIR"),
    ("--overwrite", "overwrite", "store_true", None, 0, True, None, None,
     "start afresh in an --out folder that holds a run (its run files are replaced)"),
    ("--loss", "loss", "store", None, None, None, ["bce", "bce+dice", "focal"], None,
     "bce (per-class BCE, the paper's), bce+dice (plus the soft dice of each class an image shows) or focal; "
     "default bce"),
    ("--no-fusion", "no_fusion", "store_true", None, 0, True, None, None, "ablation: no fusion transformer"),
    ("--pos-embed", "pos_embed", "store", None, None, None, ["none", "fourier"], None, None),
    ("--bridge-prior", "bridge_prior", "store_true", None, 0, True, None, None,
     "feed the semantic bridge's per-class map to the model, trained with name dropout"),
    ("--name-dropout", "name_dropout", "store", float, None, None, None, None,
     "with --bridge-prior: share of classes per batch given the unknown-name token (0.5)"),
    ("--threads", "threads", "store", int, None, None, None, None, None),
]


def _train_parser():
    import argparse
    from fusionseg.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_train_flags_are_generated_from_the_config_fields():
    import dataclasses
    kinds = {"_StoreAction": "store", "_AppendAction": "append", "_StoreTrueAction": "store_true"}
    got = {}
    for a in _train_parser()._actions:
        if a.dest == "help":
            continue
        got[a.option_strings[0]] = (a.option_strings[0], a.dest, kinds[type(a).__name__], a.type, a.nargs, a.const,
                                    a.choices, a.metavar, a.help)
        # "not given" is None (store_true: False) so the config file and --set keep their values
        assert a.default in (None, False) or a.dest == "threads", a
    assert got == {f[0]: f for f in TRAIN_FLAGS}  # the same flags, types, choices and help as the hand-written ones
    # every flag but --config/--set/--threads is a config key, by the field's name
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for opt, dest, *_ in TRAIN_FLAGS:
        if opt in ("--config", "--set", "--threads", "--overwrite"):  # how to run, not what: no config key
            continue
        key = dest[3:] if opt.startswith("--no-") else dest
        assert key in fields and fields[key].metadata["flag"], opt
        assert opt == ("--no-" if fields[key].metadata["flag"] == "off" else "--") + key.replace("_", "-")
    flagged = {f.name for f in fields.values() if f.metadata.get("flag")}
    assert len(flagged) == len(TRAIN_FLAGS) - 4
    from fusionseg.data.features import DEFAULT_SHARD_SIZE
    assert TrainConfig(data=["a"], out="o").shard_size == DEFAULT_SHARD_SIZE


def test_flag_values_map_flags_to_config_keys():
    from fusionseg.engine.config import flag_values
    p = _train_parser()
    v = flag_values(p.parse_args(["--data", "a", "--data", "b", "--steps", "5", "--scales", "192,224", "--no-cache",
                                  "--no-fusion", "--compile", "--exclude-classes", "cat,dog", "--resume", "--lr", "0.1",
                                  "--bridge-prior", "--name-dropout", "0.25", "--holdout", "x1"]))
    assert v == {"data": ["a", "b"], "steps": 5, "scales": [192, 224], "cache": False, "fusion": False,
                 "compile": True, "exclude_classes": ["cat", "dog"], "resume": True, "lr": 0.1,
                 "bridge_prior": True, "name_dropout": 0.25, "holdout": ["x1"]}
    assert flag_values(p.parse_args([])) == {}
    assert flag_values(p.parse_args(["--resume", "runs/x"]))["resume"] == "runs/x"
    with pytest.raises(ValueError, match="--scales must be comma-separated integers, got '1,a'"):
        flag_values(p.parse_args(["--scales", "1,a"]))
    with pytest.raises(ValueError, match="--steps must be at least 1"):
        flag_values(p.parse_args(["--steps", "0"]))
