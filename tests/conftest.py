"""Shared fixtures: tiny deterministic encoders registered under test names, synthetic folder datasets."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from fusionseg.encoders.base import (EncoderSpec, ImageEncoder, TextEncoder, fingerprint_state,
                                     register_image_encoder, register_text_encoder)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


class PoolEncoder(ImageEncoder):
    """Colour pooled at strides 8/16/32 through fixed random 1x1 projections: tiny, fast, colour-aware."""

    def __init__(self, name: str = "test-pool"):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        self.strides, self.channels = (8, 16, 32), (8, 12, 16)
        self.projs = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(c, 3, generator=g)) for c in self.channels])
        self.spec = EncoderSpec(name, "test", fingerprint_state(self, name))

    def forward(self, pixels):
        outs = []
        for s, w in zip(self.strides, self.projs):
            p = F.avg_pool2d(pixels, s, ceil_mode=True)
            outs.append(torch.einsum("bchw,oc->bohw", p, w).tanh() + p.mean(1, keepdim=True))
        return outs


class HashText(TextEncoder):
    """A fixed random unit vector per name (no meaning; enough to tell names apart)."""

    def __init__(self, name: str = "test-hash", dim: int = 16):
        super().__init__()
        self.dim = dim
        self.register_buffer("salt", torch.zeros(1))
        self.spec = EncoderSpec(name, "test", hashlib.sha256(name.encode()).hexdigest()[:16])

    def encode(self, class_names, templates="default"):
        vecs = []
        for n in class_names:
            seed = int(hashlib.sha256(n.strip().lower().encode()).hexdigest()[:8], 16)
            vecs.append(torch.randn(self.dim, generator=torch.Generator().manual_seed(seed)))
        return F.normalize(torch.stack(vecs), dim=-1)


register_image_encoder("test-pool")(lambda name: PoolEncoder(name))
register_text_encoder("test-hash")(lambda name: HashText(name))


def make_shapes_dataset(root: Path, n: int = 12, size: int = 128, seed: int = 0) -> Path:
    """A synthetic folder dataset: red squares (class 1 'square') and blue discs (class 2 'disc') on grey."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), (128, 128, 128))
        mask = Image.new("L", (size, size), 0)
        di, dm = ImageDraw.Draw(img), ImageDraw.Draw(mask)
        boxes = []
        while len(boxes) < 2:  # two non-overlapping shapes
            r = int(rng.integers(size // 7, size // 4))
            x, y = (int(v) for v in rng.integers(r, size - r, 2))
            box = (x - r, y - r, x + r, y + r)
            if all(box[0] > b[2] or box[2] < b[0] or box[1] > b[3] or box[3] < b[1] for b in boxes):
                boxes.append(box)
        for cls, box in zip((1, 2), boxes):
            if cls == 1:
                di.rectangle(box, fill=(220, 30, 30)); dm.rectangle(box, fill=1)
            else:
                di.ellipse(box, fill=(30, 30, 220)); dm.ellipse(box, fill=2)
        img.save(root / "images" / f"img{i:03d}.png")
        mask.save(root / "masks" / f"img{i:03d}.png")
    (root / "dataset.json").write_text(json.dumps({
        "format": "fusionseg-folder/1", "images": "images", "masks": "masks",
        "classes": {"1": "square", "2": "disc"}, "background_values": [0], "ignore_values": [255]}))
    return root


def train_tiny(root: Path, n: int = 6, steps: int = 30, **overrides):
    """A tiny checkpoint on a synthetic shapes dataset (test encoders, preset tiny, 64 px): (checkpoint, dataset)."""
    from fusionseg.engine.train import TrainConfig, train
    ds = make_shapes_dataset(root / "shapes", n=n)
    kw = dict(data=[str(ds)], out=str(root / "run"), image_encoder="test-pool", text_encoder="test-hash",
              preset="tiny", steps=steps, batch_size=4, size=64, val_fraction=0.0, cache_dir=str(root / "cache"),
              progress=False)
    kw.update(overrides)
    return train(TrainConfig(**kw)), ds


def run_cli(args, capsys) -> tuple[int, str, str]:
    """``fusionseg ARGS`` in-process -> (exit code, stdout, stderr)."""
    from fusionseg.cli import main
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def shapes_dataset(tmp_path) -> Path:
    return make_shapes_dataset(tmp_path / "shapes")


def shared_data(sub: str = "") -> Path:
    p = SHARED_DATA / sub
    if not p.exists():
        pytest.skip(f"shared data not present at {p}")
    return p


def make_tiny_clip(folder: Path) -> Path:
    """A random CLIP (text/vision width 32, 4 heads, 2 layers, image 32, patch 8, projection 24, seed 0) with a
    character BPE, saved in ``folder`` (offline: transformers builds it from a config)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    folder.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz.,'-")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=40, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=24)
    CLIPModel(cfg).save_pretrained(folder)
    return folder


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (its ``_common`` import resolved), for tests of a script's functions."""
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return mod
