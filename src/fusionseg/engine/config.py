"""The training recipe: :class:`TrainConfig`, its TOML files, ``--set key=value`` and the ``fusionseg train``
flags, which are generated from the fields below (each field's ``metadata`` says whether it has a flag and
what the flag's help says), so a key and its flag are written once.

Torch-free on purpose: ``fusionseg train --help`` and a bad flag answer without importing torch.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..choices import DEFAULT_IMAGE_ENCODER, DEFAULT_PRESET, DEFAULT_TEXT_ENCODER, PRESET_NAMES

#: Images per feature-cache shard (``data.features.DEFAULT_SHARD_SIZE``; written here too so that this module
#: stays torch-free; a test keeps the two equal).
DEFAULT_SHARD_SIZE = 256


def _key(default: Any = dataclasses.MISSING, *, flag: str | None = None, help: str | None = None,
         choices: Any = None, factory: Any = dataclasses.MISSING) -> Any:
    """A config field. ``flag`` is how ``fusionseg train`` offers it: ``"value"`` (``--name VALUE``), ``"append"``
    (repeatable ``--name VALUE``), ``"csv"`` (``--name a,b,c``), ``"on"`` (``--name`` sets True), ``"off"``
    (``--no-name`` sets False), ``"resume"`` (``--resume [RUN_DIR]``); None: only through ``--config``/``--set``.
    ``help`` may name ``{default}``."""
    meta = {"flag": flag, "help": help, "choices": choices}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """A training run's recipe. Every field is a key of the TOML config and of ``--set key=value``; the fields
    declared with ``_key(flag=...)`` are also ``fusionseg train`` flags (``batch_size`` -> ``--batch-size``)."""

    data: list[str] = _key(flag="append", help="dataset folder (fusionseg-folder/1), pascal5i:ROOT or coco20i:ROOT "
                                               "(with --fold); repeat to mix")
    out: str = _key(flag="value", help="run folder; the final checkpoint is OUT/final.safetensors")
    image_encoder: str = _key(DEFAULT_IMAGE_ENCODER, flag="value", help="default {default}")
    text_encoder: str = _key(DEFAULT_TEXT_ENCODER, flag="value", help="default {default}")
    preset: str = _key(DEFAULT_PRESET, flag="value", help="default {default}", choices=list(PRESET_NAMES))
    steps: int = _key(3000, flag="value")
    batch_size: int = _key(16, flag="value",      # global batch (split evenly over torchrun ranks)
                           help="global batch (split over torchrun processes)")
    lr: float = _key(4e-4, flag="value")
    weight_decay: float = 0.05        # AdamW, on weight matrices / conv kernels only (not norms, biases)
    warmup: int = 150                 # linear warm-up steps, then cosine decay to 0
    size: int = _key(320, flag="value", help="training size (longer side, px)")
    scales: list[int] | None = _key(None, flag="csv",  # cached scales sampled per batch; >= 160 px
                                    help="comma-separated training scales in px (default: 0.8x, 1x, 1.2x --size)")
    max_classes: int = 24
    val_fraction: float = _key(0.15, flag="value", help="whole images per dataset kept out for validation")
    holdout: list[str] = _key(flag="append", factory=list,  # image ids always kept out of training
                              help="image id always kept out of training (repeatable)")
    exclude_classes: list[str] = _key(flag="csv", factory=list,
                                      help="names never used in training; their pixels are ignored")
    fold: int | None = _key(None, flag="value",  # for pascal5i:ROOT / coco20i:ROOT data: this fold's base classes
                            help="PASCAL-5i / COCO-20i fold 0-3 (novel classes left out)")
    templates: str = "default"
    checkpoint_every: int = _key(1000, flag="value")
    seed: int = _key(0, flag="value")
    device: str = _key("cpu", flag="value", help="cpu or cuda (default cpu)")
    amp: bool = True                  # bf16 autocast on CUDA
    cache_dir: str | None = _key(None, flag="value",
                                 help="feature cache folder (default ~/.cache/fusionseg or $FUSIONSEG_CACHE)")
    cache: bool = _key(True, flag="off",  # False: run the frozen image encoder every step on the same crops
                       help="run the frozen encoder every step (no feature cache)")
    shard_size: int = DEFAULT_SHARD_SIZE
    workers: int = _key(0, flag="value", help="DataLoader workers for --no-cache")
    compile: bool = _key(False, flag="on",  # torch.compile the trainable head (GPU; off on CPU)
                         help="torch.compile the trained head (GPU)")
    clip_grad: float = 1.0
    max_bad_steps: int = 10           # stop after this many non-finite losses in a row
    loss_stride: int = 4
    loss: str = _key("bce", flag="value", choices=["bce", "bce+dice", "focal"],  # engine/trainer.py loss_terms
                     help="bce (per-class BCE, the paper's), bce+dice (plus the soft dice of each class an image "
                          "shows) or focal; default {default}")
    dice_weight: float = 1.0          # loss = bce + dice_weight * dice
    focal_gamma: float = 2.0          # focal: BCE weighted by (1 - p_t) ** gamma
    fusion: bool = _key(True, flag="off", help="ablation: no fusion transformer")
    pos_embed: str = _key("none", flag="value", choices=["none", "fourier"])
    bridge_prior: bool = _key(False, flag="on",  # the bridge's per-class map as a model input (model/prior.py)
                              help="feed the semantic bridge's per-class map to the model, trained with name dropout")
    name_dropout: float = _key(0.5, flag="value",  # bridge_prior: share of a batch's names given the unknown token
                               help="with --bridge-prior: share of classes per batch given the unknown-name token (0.5)")
    log_every: int = 50
    init: str | None = _key(None, flag="value",  # fine-tuning: the trained weights to start from
                            help="start from this checkpoint's trained weights (default, a .safetensors or a run folder)")
    synonym_rate: float = _key(0.0, flag="value",  # text augmentation from a manifest's "synonyms" (pseudo-label)
                               help="share of classes named by one of their synonyms in a step (datasets written "
                                    "by fusionseg pseudo-label carry them; default 0)")
    repeat_factor: float = _key(0.0, flag="value",  # LVIS repeat-factor sampling threshold (sampling.repeat_factors)
                                help="repeat-factor sampling: images showing a class rarer than this share of the "
                                     "training images are drawn more often (sqrt(t / share)x; e.g. 0.1); 0: uniform")
    copy_paste: float = _key(0.0, flag="value",  # sampling._UncachedSteps: needs --no-cache (the pixels change)
                             help="copy-paste augmentation: chance per training image that the pixels of one class "
                                  "of another image of the same folder are pasted onto it (needs --no-cache; default 0)")
    copy_paste_by: str = _key("image", flag="value", choices=["image", "class"],  # sampling._UncachedSteps._paste
                              help="what copy-paste draws first: another image, then one of its classes (image), or "
                                   "a class of the folder, then an image showing it, so rare classes are pasted as "
                                   "often as common ones (class); default image")
    copy_paste_jitter: float = _key(0.0, flag="value",  # sampling.jitter_paste: scale and place the pasted class
                                    help="copy-paste scale jitter J: the pasted class is rescaled by a factor drawn "
                                         "log-uniformly in [1/(1+J), 1+J] and put at a random place (default 0: "
                                         "same size, same place)")
    resume: bool | str = _key(False, flag="resume",  # True: continue OUT/state.pt; a folder: continue that run
                              help="continue from the last checkpoint: of OUT (no value) or of RUN_DIR")
    progress: bool = True


#: Copy-paste changes the pixels every step; cached features cannot follow (refused by the CLI and the Trainer).
COPY_PASTE_NEEDS_NO_CACHE = "--copy-paste needs --no-cache: pasted pixels change every step, cached features do not"

#: Keys that may differ between a run and its resumption (where and how it runs, not what it learns).
RUNTIME_KEYS = frozenset({"out", "resume", "progress", "device", "cache_dir", "checkpoint_every", "steps",
                          "workers", "compile", "log_every", "shard_size", "cache"})


def config_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _closest(key: str) -> str:
    m = difflib.get_close_matches(key, config_keys(), n=1, cutoff=0.4)
    return f"; did you mean '{m[0]}'?" if m else f"; valid keys: {', '.join(config_keys())}"


def _coerce(key: str, value: Any) -> Any:
    """A config value converted to the field's type, or ValueError naming the key."""
    hint = typing.get_type_hints(TrainConfig)[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ValueError(f"config key '{key}' cannot be empty")
    base = [a for a in args if a is not type(None)] if args and typing.get_origin(hint) is not list else [hint]
    if key == "resume":
        return value if isinstance(value, (bool, str)) else str(value)
    t = base[0]
    choices = TrainConfig.__dataclass_fields__[key].metadata.get("choices")
    if t is str and choices is not None and not isinstance(value, (dict, list)) and str(value) not in choices:
        raise ValueError(f"config key '{key}' must be one of {', '.join(map(str, choices))}, got {value!r}")
    origin = typing.get_origin(t)
    try:
        if origin is list:
            inner = typing.get_args(t)[0]
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise TypeError
            if inner is int and any(isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()) for v in value):
                raise TypeError
            return [inner(v) for v in value]
        if t is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise TypeError
        if t is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if t is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if t is str:
            if isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        pass
    raise ValueError(f"config key '{key}' must be {getattr(hint, '__name__', None) or str(hint)}, got {value!r}")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML recipe: flat ``key = value`` pairs named like :class:`TrainConfig`'s fields (tables such as
    ``[optim]`` are flattened: their keys are the same names). Unknown keys raise ValueError naming the closest."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file not found: {p}")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p} is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:  # e.g. an image given as --config
        raise ValueError(f"{p} is not a TOML text file (not UTF-8: byte 0x{e.object[e.start]:02x} at {e.start})") from None
    flat: dict[str, Any] = {}
    for k, v in raw.items():
        items = v.items() if isinstance(v, dict) else [(k, v)]
        for kk, vv in items:
            if kk not in config_keys():
                raise ValueError(f"unknown config key '{kk}' in {p}{_closest(kk)}")
            flat[kk] = _coerce(kk, vv)
    return flat


def parse_set(item: str) -> tuple[str, Any]:
    """``key=value`` from ``--set``; the value is read as TOML (``lr=1e-3``, ``scales=[192,224]``,
    ``amp=false``) and falls back to a plain string (``image_encoder=hf:facebook/dino-vits16``)."""
    if "=" not in item:
        raise ValueError(f"--set expects key=value, got {item!r}")
    key, _, text = item.partition("=")
    key = key.strip()
    if key not in config_keys():
        raise ValueError(f"unknown config key '{key}' in --set{_closest(key)}")
    text = text.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key, _coerce(key, value)


def make_config(values: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from merged key/value pairs (defaults for the rest); needs ``data`` and ``out``."""
    for k in values:
        if k not in config_keys():
            raise ValueError(f"unknown config key '{k}'{_closest(k)}")
    missing = [k for k in ("data", "out") if not values.get(k)]
    if missing:
        raise ValueError(f"no {' and no '.join(missing)} given: pass --{missing[0]} or set it in the config file")
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def dump_config(cfg: TrainConfig | dict) -> str:
    """The resolved config as TOML (``None`` values left out: they mean the default)."""
    d = asdict(cfg) if isinstance(cfg, TrainConfig) else dict(cfg)
    lines = ["# resolved training config (fusionseg train --config this-file reproduces the run)"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in d.items() if v is not None]
    return "\n".join(lines) + "\n"


def _comparable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if k in RUNTIME_KEYS:
            continue
        if k == "data":
            v = [x if ":" in str(x) and not Path(x).exists() else str(Path(x).resolve()) for x in v]
        out[k] = v
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """Keys (not runtime-only ones) whose values differ between two resolved configs, as 'key (a -> b)'."""
    a, b = _comparable(saved), _comparable(current)
    keys = sorted(set(a) | set(b))
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in keys if a.get(k) != b.get(k)]


# ------------------------------------------------------------------------------------------------ CLI flags
def _base(hint: Any) -> Any:
    """``X | None`` -> ``X``; any other type as it is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(hint) if a is not type(None)][0]
    return hint


def _flag_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("flag")]


def _option(f: dataclasses.Field) -> str:
    return f"--no-{f.name.replace('_', '-')}" if f.metadata["flag"] == "off" else f"--{f.name.replace('_', '-')}"


def add_train_flags(parser) -> None:
    """Add one ``fusionseg train`` flag per config field that offers one (``metadata["flag"]``), with the field's
    type, choices and help; every flag defaults to None/False, meaning "not given" (the config decides)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in _flag_fields():
        kind, meta = f.metadata["flag"], f.metadata
        kw: dict[str, Any] = {}
        if meta["help"] is not None:
            kw["help"] = meta["help"].format(default=f.default)
        if kind in ("on", "off"):
            parser.add_argument(_option(f), action="store_true", **kw)
            continue
        if kind == "resume":
            parser.add_argument(_option(f), nargs="?", const=True, default=None, metavar="RUN_DIR", **kw)
            continue
        t = _base(hints[f.name])
        if kind == "value" and t in (int, float):
            kw["type"] = t
        if meta["choices"] is not None:
            kw["choices"] = meta["choices"]
        parser.add_argument(_option(f), action="append" if kind == "append" else "store", default=None, **kw)


def flag_values(args) -> dict[str, Any]:
    """The config keys the parsed ``fusionseg train`` flags set (flags left out are not in the dict).
    Raises ValueError (one line) on a bad value."""
    hints = typing.get_type_hints(TrainConfig)
    out: dict[str, Any] = {}
    for f in _flag_fields():
        kind = f.metadata["flag"]
        v = getattr(args, _option(f)[2:].replace("-", "_"))
        if kind == "on" and v:
            out[f.name] = True
        elif kind == "off" and v:
            out[f.name] = False
        elif kind == "csv" and v is not None:
            inner = typing.get_args(_base(hints[f.name]))[0]
            if inner is int:
                if not v:
                    continue
                try:
                    out[f.name] = [int(x) for x in v.split(",") if x.strip()]
                except ValueError:
                    raise ValueError(f"{_option(f)} must be comma-separated integers, got {v!r}") from None
                if not out[f.name]:  # "," would fall back to the default without a word
                    raise ValueError(f"{_option(f)} must be comma-separated integers, got {v!r}")
            else:
                out[f.name] = [x for x in v.split(",") if x.strip()]
        elif kind in ("value", "append", "resume") and v is not None:
            if f.name == "steps" and v < 1:
                raise ValueError("--steps must be at least 1")
            out[f.name] = v
    return out
