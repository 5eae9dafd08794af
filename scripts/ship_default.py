"""Evaluate a training run on its validation split and ship it as the package's default model.

Usage: python scripts/ship_default.py RUN_DIR|default [--data-root ../shared/data] [--no-write] [--trained-on TEXT]
Writes src/fusionseg/weights/default.safetensors (fp16) and the whole of MODEL_CARD.md from what it measures
and from the run's own records (nothing in the card is typed by hand). ``default`` re-ships the shipped weights
(its splits recomputed from its recorded recipe under --data-root), e.g. to add what a newer version records:
a checkpoint without ``training.name_images`` (training images per name, read by the scorer) gets them here.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from fusionseg._atomic import write_atomic
from fusionseg.data.datasets import FolderDataset, normalize_name
from fusionseg.engine.evaluate import evaluate_present, evaluate_semantic
from fusionseg.model.checkpoint import DEFAULT_WEIGHTS, load_model, save_checkpoint
from fusionseg.runtime import tune_malloc
from fusionseg.segmenter import Segmenter
from fusionseg.choices import DECISIONS
from fusionseg.tiling import PRESENCE_CAP, PRESENCE_PER_NAME, RELATIVE_FRACTION


LOSSES = {"bce": "per-class BCE", "bce+dice": "per-class BCE plus soft dice", "focal": "per-class focal loss"}



def _copy_paste(cfg: dict) -> str:
    """The card's words for the run's copy-paste settings ('' without copy-paste)."""
    if not cfg.get("copy_paste"):
        return ""
    what = ("a class of the folder drawn first, then another image showing it" if cfg.get("copy_paste_by") == "class"
            else "one class of another image of the same folder")
    j = cfg.get("copy_paste_jitter") or 0
    where = (f", rescaled by up to {1 + j:g}x either way and put at a random place" if j else "")
    return f", copy-paste at rate {cfg['copy_paste']} ({what} pasted onto a training image{where})"


def _pseudo(root: Path) -> bool:
    """A folder written by `fusionseg pseudo-label` (its labels come from a teacher, not from people)."""
    try:
        return "teacher" in json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError):
        return False


def recorded_splits(meta: dict, data_root: str) -> dict:
    """The train/val split of each training folder, recomputed from the checkpoint's recorded recipe."""
    from fusionseg.data.datasets import split_ids
    cfg = meta["training"]["config"]
    hold = set(cfg.get("holdout") or [])
    out = {}
    for p in meta["training"]["data"]:
        root = Path(data_root) / Path(p).name
        ds = FolderDataset(root)
        tr, va = split_ids([i for i in ds.ids if i not in hold], cfg["val_fraction"], cfg["seed"])
        out[ds.name] = {"root": str(root), "train": tr, "val": sorted(set(va) | (hold & set(ds.ids)))}
    return out


def count_names(meta: dict, splits: dict) -> dict:
    """Training images per vocabulary name (``training.name_images``) from the training splits' masks."""
    from fusionseg.engine.sampling import build_vocabulary, name_support, open_datasets
    sets = open_datasets([sp["root"] for sp in splits.values()])
    vocab, maps, _ = build_vocabulary(sets, meta["training"].get("excluded_classes") or [])
    if vocab != meta["training"]["vocabulary"]:
        raise SystemExit("the datasets found do not give the checkpoint's vocabulary; check --data-root")
    sup = name_support([d.subset(splits[d.name]["train"]) for d in sets], maps, len(vocab))
    return dict(zip(vocab, sup))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--data-root", default=None, help="where the run's dataset folders are now (default: as recorded)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--started-from", default=None,
                    help="for the card: what the run's --init checkpoint was (default: its recorded path)")
    ap.add_argument("--trained-on", default=None, help="where it was trained, for the card (default: as recorded)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="the shipped \"none of these\" threshold (default: the checkpoint's)")
    ap.add_argument("--image-size", type=int, default=None,
                    help="the working size the shipped model runs at (default: its training size)")
    ap.add_argument("--decision", default=None, choices=list(DECISIONS),
                    help="the shipped \"none of these\" decision (default: the checkpoint's, else threshold)")
    a = ap.parse_args()
    tune_malloc()
    if a.run == "default":
        model, meta = load_model("default")
        splits = recorded_splits(meta, a.data_root or "../shared/data")
        run = Path("runs/default-reship")
        run.mkdir(parents=True, exist_ok=True)
    else:
        run = Path(a.run)
        model, meta = load_model(run / "final.safetensors")
        splits = json.loads((run / "splits.json").read_text())
    if a.threshold is not None:
        meta["threshold"] = a.threshold
    if a.decision is not None:
        meta["decision"] = a.decision
    if a.image_size is not None:
        meta["image_size"] = a.image_size
    if not meta["training"].get("name_images"):
        meta["training"]["name_images"] = count_names(meta, splits)
    seg = Segmenter(model, meta, "cpu")
    results, present, teacher_sets = {}, {}, []
    for name, sp in splits.items():
        root = Path(a.data_root) / name if a.data_root and not _pseudo(Path(sp["root"])) else Path(sp["root"])
        if _pseudo(root):
            teacher_sets.append(root)
            continue
        if not sp["val"]:
            continue
        ds = FolderDataset(root, sp["val"])
        t0 = time.time()
        results[name] = r = evaluate_semantic(seg, ds, progress=False)
        present[name] = p = evaluate_present(seg, ds, progress=False)
        print(f"{name}: {len(ds)} val images, all names mIoU {r['miou']:.3f}, present names mIoU {p['miou']:.3f} "
              f"({time.time() - t0:.0f} s)")
    tr = meta["training"]
    mean = sum(r["miou"] for r in results.values()) / len(results)
    mean_p = sum(r["miou"] for r in present.values()) / len(present)
    print(f"mean over datasets: all names {mean:.3f}, present names {mean_p:.3f}")
    write_atomic(run / "val_report.json", json.dumps({"semantic": results, "present": present}, indent=1).encode())
    if a.no_write:
        return
    meta_out = {k: v for k, v in meta.items() if k not in ("config", "image_encoder", "text_encoder", "format", "path")}
    meta_out["validation"] = {n: {"miou": r["miou"], "pixel_accuracy": r["pixel_accuracy"], "images": r["images"],
                                  "present_miou": present[n]["miou"]} for n, r in results.items()}
    meta_out["training"]["data"] = [Path(p).name for p in tr["data"]]
    if a.trained_on:
        meta_out["trained_on"] = a.trained_on
    if a.started_from:
        meta_out["started_from"] = a.started_from
    started_from = meta_out.get("started_from")
    save_checkpoint(DEFAULT_WEIGHTS, model.head, model.image_encoder.spec, model.text_encoder.spec, meta_out, half=True)
    size_mb = DEFAULT_WEIGHTS.stat().st_size / 1e6
    gt_names: list[str] = []
    for name, sp in splits.items():
        root = Path(sp["root"])
        if not _pseudo(root) and (root / "dataset.json").is_file():
            for n in FolderDataset(root).class_names:
                k = normalize_name(n)
                if k in tr["vocabulary"] and k not in gt_names:
                    gt_names.append(k)
    teacher_names = [n for n in tr["vocabulary"] if n not in set(gt_names)]
    teachers = sorted({json.dumps(json.loads((r / "dataset.json").read_text()).get("teacher", {}))
                       for r in teacher_sets})
    decided = "relative" if seg.decision == "relative" else f"threshold {seg.threshold}"
    rows = "\n".join(f"| {n} | {r['images']} | {present[n]['miou']:.3f} | {len(present[n]['low_iou_classes'])} of "
                     f"{present[n]['classes_evaluated']} | {r['miou']:.3f} | {r['pixel_accuracy']:.3f} | "
                     f"{'arg-max (every pixel is a class)' if r['argmax'] else decided} |"
                     for n, r in results.items())
    per = "\n".join(f"- **{n}**: " + ", ".join(f"{c} {v:.2f}" if v is not None else f"{c} n/a"
                                                 for c, v in present[n]["per_class"].items()) for n in present)
    cfg = tr["config"]
    mc = meta["config"]
    data_names = [Path(p).name for p in tr["data"]]
    human = [d for d, sp in splits.items() if not _pseudo(Path(sp["root"]))]
    t = meta.get("templates", "default")
    templates = f"{len(t)}" if isinstance(t, list) else str(t)
    command = "python scripts/ship_default.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    if seg.decision == "relative":
        none_rule = (f"\"None of these\" is decided *relatively* (`--decision relative`): each name's score map is divided "
                     f"by its own peak in the image, a name counts as present when that peak reaches {PRESENCE_PER_NAME} "
                     f"per name asked (capped at {PRESENCE_CAP}), and a pixel takes the present name with the highest "
                     f"relative score when it reaches {RELATIVE_FRACTION} of that name's peak. Give `--threshold T` for the "
                     f"absolute decision (a pixel takes the best name when its sigmoid score reaches T; the model's T "
                     f"is {meta.get('threshold', 0.5)}).")
    else:
        none_rule = (f"A pixel takes the best name when its sigmoid score reaches the threshold "
                     f"({meta.get('threshold', 0.5)}), else \"none of these\".")
    card = f"""# fusionseg default model

`default.safetensors` ({size_mb:.1f} MB, fp16): the trainable part of a Fusioner (fusion transformer, decoder,
cosine head; {tr['parameters']:,} parameters) for the frozen encoders **{model.image_encoder.spec.name}** (image) and
**{model.text_encoder.spec.name}** (text, {templates} prompt templates), both loaded offline from their PyPI packages.
This card is written by `{command}` from the run's records and its measurements.

## Training
- Preset `{mc['preset']}`: width {mc['width']}, {mc['layers']} layers, {mc['heads']} heads, MLP {mc['mlp']}, decoder
  {mc['decoder_channels']}, tokens at stride {max(mc['visual_strides'])}.
- Data: {', '.join(data_names)}; {tr['train_images']} training images; {cfg['val_fraction']:.0%} of each folder's
  images (seed {cfg['seed']}) kept aside for validation{', and held out: ' + ', '.join(cfg['holdout']) if cfg.get('holdout') else ''}.
  Labelled by people: {', '.join(human)}.{' Pseudo-labelled by a teacher (`fusionseg pseudo-label`): ' + '; '.join(teachers) + '.' if teachers else ''}
- {tr['steps']} steps, batch {cfg['batch_size']}, AdamW lr {cfg['lr']} (warm-up {cfg['warmup']}, cosine), weight decay
  {cfg['weight_decay']}, {LOSSES[cfg.get('loss', 'bce')]} at stride {cfg['loss_stride']}, up to {cfg['max_classes']} names per batch,
  images at {cfg['size']} px (scales {cfg.get('scales') or 'default'}){f", synonyms as names at rate {cfg['synonym_rate']}" if cfg.get('synonym_rate') else ''}{_copy_paste(cfg)}{f", started from {started_from or '`' + str(cfg['init']) + '`'}" if cfg.get('init') else ''}.
- Runs at a working size of {meta.get('image_size', cfg['size'])} px (longer side; `--size` changes it).
- Wall time: {tr["wall_seconds"]:.0f} s on {meta_out.get("trained_on", meta.get("trained_on", "the machine noted in the issue"))}.

## How names are scored
The default mode (`auto` = `fusion+bridge` with EfficientNet-Lite) treats a name as known when its text
embedding is within cosine 0.85 of a name it was trained on. A known name's logits are this model's and the
semantic bridge's (the image encoder's ImageNet classifier and the names of its 1,000 classes) mixed with weight
n / (n + 10) on the model, n the training images that showed that name (recorded below as
`training.name_images`): names seen in hundreds of photos keep the model's sharp maps, names seen in a handful
lean on the bridge. Any other name goes to the bridge, sharpened by this model's own map of it.
{none_rule}
`--mode fusion` gives the trained head alone, `--mode bridge` the training-free bridge alone (with the threshold
decision unless `--decision relative` is given: the bridge's faint maps of absent names would pass the relative gate).

## Validation (held-out images)
*present*: each image segmented with exactly the classes its ground truth shows (`evaluate --protocol present`);
*all names*: every class of the dataset named at once (`--protocol semantic`).

| dataset | images | present names mIoU | classes below IoU 0.05 | all names mIoU | pixel acc. (all names) | decision |
|---|---|---|---|---|---|---|
{rows}

Mean over the {len(results)} datasets: present names **{mean_p:.3f}**, all names **{mean:.3f}**.

Per-class IoU, present names:
{per}

## Names seen in training ({len(tr['vocabulary'])})
Labelled by people ({len(gt_names)}): {', '.join(gt_names)}

{f"From the teacher ({len(teacher_names)}): " + ', '.join(teacher_names) if teacher_names else "No teacher names."}

## Terms
The training data are research datasets (COCO: CC BY 4.0 annotations, Flickr-licensed images; MSRC-v2;
Weizmann Horse; CamVid; ImageNet sample photos for pseudo-labels, non-commercial research): see each folder's
SOURCE.md. Use these weights for research.
"""
    write_atomic(DEFAULT_WEIGHTS.parent / "MODEL_CARD.md", card.encode())
    print(f"wrote {DEFAULT_WEIGHTS} ({size_mb:.1f} MB) and {DEFAULT_WEIGHTS.parent / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
