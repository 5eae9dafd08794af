"""Evaluate a training run on its validation split and ship it as the package's default model.

Usage: python scripts/ship_default.py RUN_DIR [--data-root ../shared/data] [--no-write]
Writes src/fusionseg/weights/default.safetensors (fp16) and MODEL_CARD.md with the measured numbers.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fusionseg.data.datasets import FolderDataset
from fusionseg.engine.evaluate import evaluate_semantic
from fusionseg.model.checkpoint import DEFAULT_WEIGHTS, load_model, save_checkpoint
from fusionseg.segmenter import Segmenter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--data-root", default=None, help="where the run's dataset folders are now (default: as recorded)")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    run = Path(a.run)
    model, meta = load_model(run / "final.safetensors")
    seg = Segmenter(model, meta, "cpu")
    splits = json.loads((run / "splits.json").read_text())
    results = {}
    for name, sp in splits.items():
        root = Path(a.data_root) / name if a.data_root else Path(sp["root"])
        ds = FolderDataset(root, sp["val"])
        t0 = time.time()
        r = evaluate_semantic(seg, ds)
        results[name] = r
        print(f"{name}: {len(ds)} val images, mIoU {r['miou']:.3f}, pixel acc {r['pixel_accuracy']:.3f} ({time.time() - t0:.0f} s)")
    tr = meta["training"]
    mean = sum(r["miou"] for r in results.values()) / len(results)
    print(f"mean over datasets: {mean:.3f}")
    (run / "val_report.json").write_text(json.dumps(results, indent=1))
    if a.no_write:
        return
    meta_out = {k: v for k, v in meta.items() if k not in ("config", "image_encoder", "text_encoder", "format", "path")}
    meta_out["validation"] = {n: {"miou": r["miou"], "pixel_accuracy": r["pixel_accuracy"], "images": r["images"]}
                              for n, r in results.items()}
    for k in ("data",):
        meta_out["training"][k] = [Path(p).name for p in tr[k]]
    save_checkpoint(DEFAULT_WEIGHTS, model.head, model.image_encoder.spec, model.text_encoder.spec, meta_out, half=True)
    size_mb = DEFAULT_WEIGHTS.stat().st_size / 1e6
    card = DEFAULT_WEIGHTS.parent / "MODEL_CARD.md"
    rows = "\n".join(f"| {n} | {r['images']} | {r['miou']:.3f} | {r['pixel_accuracy']:.3f} | "
                     f"{'arg-max (every pixel is a class)' if r['argmax'] else 'threshold 0.5'} |" for n, r in results.items())
    per = "\n".join(f"- **{n}**: " + ", ".join(f"{c} {v:.2f}" if v is not None else f"{c} n/a"
                                                 for c, v in r["per_class"].items()) for n, r in results.items())
    cfg = tr["config"]
    card.write_text(f"""# fusionseg default model

`default.safetensors` ({size_mb:.1f} MB, fp16): the trainable part of a Fusioner (fusion transformer, decoder,
cosine head; {tr['parameters']:,} parameters) for the frozen encoders **efficientnet-lite0** (image) and
**minilm-l6** (text, default prompt templates), both loaded offline from their PyPI packages.

## Training
- Recipe: `scripts/train_default.sh` (preset `{meta['config']['preset']}`: width {meta['config']['width']},
  {meta['config']['layers']} layers, {meta['config']['heads']} heads, MLP {meta['config']['mlp']}, decoder
  {meta['config']['decoder_channels']}, tokens at stride 32 with stride-16/8 skips).
- Data: the five folders of `../shared/data` with a `dataset.json` ({', '.join(Path(p).name for p in tr['data'])});
  {tr['train_images']} training images; 15% of each folder's images (seeded) kept aside for validation, and the
  demo image `examples/cat_toilet.jpg` (COCO 000000358083) held out.
- {tr['steps']} steps, batch {cfg['batch_size']}, AdamW lr {cfg['lr']} (warm-up {cfg['warmup']}, cosine), weight decay
  {cfg['weight_decay']}, per-class BCE at stride {cfg['loss_stride']}, up to {cfg['max_classes']} names per batch;
  images at {cfg['size']} px (longer side, padded square), original + flipped view cached, random token-grid crops.
- {meta.get('trained_from', 'Trained from the folders above.')}
- Wall time: {tr["wall_seconds"]:.0f} s on {meta.get("trained_on", "the machine noted in the issue")}.

## Names seen in training ({len(tr['vocabulary'])})
{', '.join(tr['vocabulary'])}

Names outside this list are embedded by MiniLM and scored by the same head, but they are **not** reliably
segmented by meaning: with these offline encoders the model mostly learned the names above.

## Validation (whole vocabulary of each dataset named at once, held-out images)
| dataset | images | mIoU | pixel acc. | decision |
|---|---|---|---|---|
{rows}

Mean mIoU over the five datasets: **{mean:.3f}**. Measured by `python scripts/ship_default.py RUN_DIR`.

Per-class IoU:
{per}

## Terms
The training data are research datasets (COCO: CC BY 4.0 annotations, Flickr-licensed images; MSRC-v2;
Weizmann Horse; CamVid): see each folder's SOURCE.md. Use these weights for research.
""")
    print(f"wrote {DEFAULT_WEIGHTS} ({size_mb:.1f} MB) and {card}")


if __name__ == "__main__":
    main()
