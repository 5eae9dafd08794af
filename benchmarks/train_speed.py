"""Training steps per second with the frozen-feature cache vs running both frozen encoders every step.

The peer ("encoders every step", what the authors' code does) and ours ("cached") train the same head on the
same batches: the same step plan (images, views, crop, class names) from ``engine.train``; A and B are
interleaved step by step and medians are reported. The peer loads and prepares the images (as a data loader
would), runs the image encoder on the crops and the text encoder on the batch's class names, then the same
head step. Ours gathers the crops from the in-memory cache (built once; its cost is printed too).

Setups:
* ``default``: efficientnet-lite0 + minilm-l6 (packaged, real weights), preset ``small``, 320 px, batch 16.
* ``paper``: a CLIP ViT-L/14-sized vision tower (hidden 1024, 24 layers, 16 heads, patch 14) and a CLIP
  ViT-L/14-sized text tower (768, 12 layers), random weights (speed only), preset ``paper``, 224 px.
  The peer's text pass uses the recipe's templates (``--paper-templates paper``, 32 per name, as
  configs/paper-*.toml says); the "image encoder only" ratio printed beside it is the lower bound, a peer whose
  text embeddings cost nothing.

Usage: ``python benchmarks/train_speed.py [--steps 3] [--setups default,paper] [--threads 2]``
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from fusionseg.data.datasets import FolderDataset  # noqa: E402
from fusionseg.data.features import cache_features  # noqa: E402
from fusionseg.engine.train import (TrainConfig, _mask_lut, _Pool, _UncachedSteps, bce_terms,  # noqa: E402
                                    choose_classes, gather_batch, make_step_plan, step_rng)
from fusionseg.model.fusioner import FusionerConfig, FusionHead  # noqa: E402

NAMES = ["person", "dog", "cat", "car", "bus", "bicycle", "horse", "sheep", "cow", "bird", "boat", "bottle",
         "chair", "sofa", "train", "tv monitor"]


def make_dataset(root: Path, n: int, size: int, seed: int = 0) -> FolderDataset:
    """``n`` photo-sized JPEGs (640x480 noise + rectangles) with masks of 16 named classes."""
    import json
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        h, w = 480, 640
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        for _ in range(4):
            c = int(rng.integers(1, len(NAMES) + 1))
            y, x = int(rng.integers(0, h - 100)), int(rng.integers(0, w - 100))
            mask[y:y + 120, x:x + 160] = c
            img[y:y + 120, x:x + 160] = (c * 15) % 255
        Image.fromarray(img).save(root / "images" / f"im{i:04d}.jpg", quality=90)
        Image.fromarray(mask).save(root / "masks" / f"im{i:04d}.png")
    (root / "dataset.json").write_text(json.dumps({"format": "fusionseg-folder/1", "classes": {
        str(k): n for k, n in enumerate(NAMES, start=1)}, "background_values": [0], "ignore_values": [255]}))
    return FolderDataset(root)


def build_paper_encoders(templates: str):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizerFast, CLIPVisionConfig
    from transformers import CLIPVisionModelWithProjection
    from fusionseg.encoders.hf_text import HFTextEncoder
    from fusionseg.encoders.hf_vision import CLIP_MEAN, CLIP_STD, HFVisionEncoder
    torch.manual_seed(0)
    vcfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            patch_size=14, image_size=224, projection_dim=768)
    vm = CLIPVisionModelWithProjection(vcfg).eval()
    img = HFVisionEncoder("clip-vit-l14-random", "random", vm.vision_model, "clip", CLIP_MEAN, CLIP_STD,
                          vm.visual_projection).freeze()
    tok = None
    for ref in ("openai/clip-vit-base-patch32",):
        try:
            tok = CLIPTokenizerFast.from_pretrained(ref, local_files_only=True)
        except Exception:  # noqa: BLE001
            tok = None
    if tok is None:  # no CLIP tokenizer offline: a BERT-style one from the packaged MiniLM (same token counts)
        from fusionseg.encoders.base import build_text_encoder
        tok = build_text_encoder("minilm-l6").tokenizer
    tcfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          projection_dim=768, vocab_size=max(49408, tok.vocab_size), max_position_embeddings=77)
    tm = CLIPTextModelWithProjection(tcfg).eval()

    text = HFTextEncoder("clip-text-l14-random", "random", tm, tok, "clip").freeze()
    return img, text


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def bench(setup: str, steps: int, threads: int, tmp: Path, paper_templates: str) -> dict:
    from fusionseg.encoders.base import build_image_encoder, build_text_encoder
    if setup == "default":
        image_encoder, text_encoder = build_image_encoder("efficientnet-lite0"), build_text_encoder("minilm-l6")
        cfg = TrainConfig(data=[], out="", preset="small", size=320, scales=[256, 320, 384], batch_size=16)
        templates = "default"
        n_images = 48
    else:
        image_encoder, text_encoder = build_paper_encoders(paper_templates)
        cfg = TrainConfig(data=[], out="", preset="paper", size=224, scales=[168, 224, 280], batch_size=4,
                          max_classes=16, lr=1e-3)
        templates = paper_templates
        n_images = 8
    ds = make_dataset(tmp / setup, n_images, cfg.size)
    vocab = [n for n in NAMES]
    lmap = list(range(len(NAMES)))
    mcfg = FusionerConfig.from_preset(cfg.preset, image_encoder.strides, image_encoder.channels, text_encoder.dim)
    ts = mcfg.token_stride
    # --- the cache, built once (timed)
    t0 = time.perf_counter()
    pools = []
    for sc in cfg.scales:
        cf = cache_features(ds, image_encoder, sc, 2, tmp / "cache", progress=False)
        kn = torch.ones(len(ds), len(vocab), dtype=torch.bool)
        pools.append(_Pool(cf.level_rows, cf.mask_rows.with_lut(_mask_lut(lmap)), kn, sc))  # as training does
    cache_s = time.perf_counter() - t0
    text_all = text_encoder.encode(vocab, templates)
    head = FusionHead(mcfg)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr)
    peer_data = _UncachedSteps([ds], [lmap], len(vocab), cfg.scales, cfg, ts, image_encoder.mean, image_encoder.std,
                               range(cfg.batch_size))

    def head_step(levels, masks, kn, text, classes):
        logits = head(levels, text)
        s, c = bce_terms(logits, masks, kn, classes, cfg.loss_stride)
        loss = s / c.clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()

    def classes_of(step, masks, kn):
        present = (torch.unique(masks[masks > 0]).long() - 1).tolist()
        return choose_classes(present, list(range(len(vocab))), step_rng(cfg.seed, step, "classes"), cfg.max_classes)

    def cached(step):
        plan = make_step_plan(step, cfg, len(ds), cfg.scales, ts)
        levels, masks, kn = gather_batch(pools[plan.scale], plan, range(cfg.batch_size), ts)
        levels = [lv.float() for lv in levels]
        classes = classes_of(step, masks, kn)
        head_step(levels, masks, kn, text_all[classes], classes)

    parts = {"load": [], "image": [], "text": []}

    def peer(step):
        t = time.perf_counter()
        _, pixels, masks, kn = peer_data[step]
        parts["load"].append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.no_grad():
            levels = [lv.float() for lv in image_encoder(pixels)]
        parts["image"].append(time.perf_counter() - t)
        classes = classes_of(step, masks, kn)
        t = time.perf_counter()
        with torch.no_grad():
            text = text_encoder.encode([vocab[c] for c in classes], templates)
        parts["text"].append(time.perf_counter() - t)
        head_step(levels, masks, kn, text, classes)

    cached(0)
    peer(0)  # warm-up
    for k in parts:
        parts[k].clear()
    ta, tb = [], []
    for step in range(1, steps + 1):  # A/B interleaved
        t = time.perf_counter()
        cached(step)
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        peer(step)
        tb.append(time.perf_counter() - t)
    a, b = median(ta), median(tb)
    img_only = b - median(parts["text"])
    steps_per_epoch = len(ds) / cfg.batch_size
    return {"setup": setup, "cached_s": a, "peer_s": b, "ratio": b / a, "ratio_image_only": img_only / a,
            "load_s": median(parts["load"]), "image_s": median(parts["image"]), "text_s": median(parts["text"]),
            "cache_build_s": cache_s, "images": len(ds), "scales": cfg.scales, "batch": cfg.batch_size,
            "templates": templates, "first_epoch_ratio": (b * steps_per_epoch) / (a * steps_per_epoch + cache_s),
            "cache_build_per_image_s": cache_s / len(ds)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per side (medians)")
    p.add_argument("--setups", default="default,paper")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--paper-templates", default="paper",
                   help="templates for the paper setup's peer text pass (default: the recipe's 32; 'none' = 1)")
    C.add_json_arg(p, "train_speed")
    a = p.parse_args(argv)
    C.in_range(a.steps, "--steps", 1, 1000)  # bad input: one line, exit 2 (README, Performance)
    C.in_range(a.threads, "--threads", 1, 256)
    unknown = [s for s in (s.strip() for s in a.setups.split(",")) if s not in ("default", "paper")]
    if unknown or not a.setups.strip():
        C.fail(f"--setups takes default and/or paper, comma-separated; got {a.setups!r}")
    torch.set_num_threads(a.threads)
    from fusionseg.runtime import tune_malloc
    tune_malloc()  # as `fusionseg train` does; process-wide, so both sides get it
    print(f"torch {torch.__version__}, {a.threads} threads, {a.steps} timed steps per side (medians), A/B interleaved")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setup in a.setups.split(","):
            r = bench(setup.strip(), a.steps, a.threads, Path(tmp), a.paper_templates)
            rows.append([r["setup"], r["batch"], f"{r['images']} images x {len(r['scales'])} scales x 2 views",
                         f"{r['cached_s'] * 1000:.0f}", f"{r['peer_s'] * 1000:.0f}", f"{r['ratio']:.1f}x",
                         f"{r['ratio_image_only']:.1f}x", f"{r['cache_build_s']:.1f}", f"{r['first_epoch_ratio']:.1f}x"])
            print(f"\n[{r['setup']}] batch {r['batch']}, scales {r['scales']}, {r['images']} images, templates "
                  f"{r['templates']!r}")
            print(f"  cached step        {r['cached_s'] * 1000:9.1f} ms   ({1 / r['cached_s']:.2f} steps/s)")
            print(f"  encoders-every-step {r['peer_s'] * 1000:8.1f} ms   ({1 / r['peer_s']:.3f} steps/s): load "
                  f"{r['load_s'] * 1000:.0f} + image encoder {r['image_s'] * 1000:.0f} + text encoder "
                  f"{r['text_s'] * 1000:.0f} ms + the same head step")
            print(f"  ratio (steps/s, cached / encoders every step): {r['ratio']:.1f}x   "
                  f"(image encoder only every step: {r['ratio_image_only']:.1f}x)")
            print(f"  cache build once: {r['cache_build_s']:.1f} s ({r['cache_build_per_image_s']:.2f} s/image for "
                  f"{len(r['scales'])} scales x 2 views); first epoch incl. the build: {r['first_epoch_ratio']:.1f}x")
    header = ["setup", "batch", "cache", "cached step ms", "encoders every step ms", "steps/s ratio",
              "ratio, image encoder only", "cache build s (once)", "first epoch incl. build"]
    C.save_results(a.json, "train_speed", f"{a.threads} threads, {a.steps} timed steps per side (medians), A/B "
                   f"interleaved, setups {a.setups}", [{"header": header, "rows": rows}])
    return 0


if __name__ == "__main__":
    sys.exit(main())
