"""Evaluation protocols -> report dicts (JSON-ready; IoU as fractions in [0, 1])."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..choices import PROTOCOLS, SPLITS
from ..data.datasets import IGNORE
from .metrics import SemanticMeter, confusion_matrix, semantic_scores


def evaluate_semantic(segmenter, dataset, class_names: Sequence[str] | None = None, background: bool | None = None,
                      threshold: float | None = None, progress: bool = True, max_images: int | None = None) -> dict:
    """Whole-vocabulary semantic segmentation: every class of ``dataset`` named at once.

    ``background``: plain arg-max (no "none of these"); by default chosen from the dataset: datasets whose
    every pixel is a class (no background values, e.g. MSRC, CamVid) use the arg-max, others the threshold.
    mIoU is the mean over the named classes that occur in the ground truth or the prediction.
    """
    names = list(class_names or dataset.class_names)
    if background is None:
        background = bool(getattr(dataset, "every_pixel_labelled", False))
    meter = SemanticMeter(len(names) + 1, ignore_index=IGNORE)
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    t0 = time.time()
    for i in tqdm(range(n), desc=f"evaluating {getattr(dataset, 'name', '')}", unit="img", disable=not progress,
                  dynamic_ncols=True):
        s = dataset[i]
        pred = segmenter.predict(s.image, names, threshold=threshold, background=background)
        meter.update(torch.from_numpy(pred.labels.astype(np.int64)), torch.from_numpy(s.mask.astype(np.int64)))
    r = semantic_scores(meter.cm, names)
    return {"protocol": "semantic", "miou": r["miou"], "pixel_accuracy": r["pixel_accuracy"],
            "per_class": r["per_class"], "images": n,
            "argmax": bool(background), "seconds": round(time.time() - t0, 1)}


def evaluate_present(segmenter, dataset, threshold: float | None = None, background: bool | None = None,
                     progress: bool = True, max_images: int | None = None, low_iou: float = 0.05,
                     image_cms: list | None = None) -> dict:
    """The user's protocol: each image is segmented with exactly the classes its ground truth shows (what a
    person does who names what is in the photo), and the label maps are accumulated in one confusion matrix
    over the dataset's classes. ``miou`` is the mean over classes present in some image; ``low_iou_classes``
    lists those below ``low_iou``; ``mean_image_miou`` is the other common counting, the mean over images of
    each image's mIoU over its own classes (higher where big regions dominate, as on MSRC). ``background`` as in :func:`evaluate_semantic` (default from the dataset).
    ``image_cms``: a list that receives each image's own confusion matrix (for resampling over images)."""
    names = list(dataset.class_names)
    if background is None:
        background = bool(getattr(dataset, "every_pixel_labelled", False))
    meter = SemanticMeter(len(names) + 1, ignore_index=IGNORE)
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    image_ious: list[float] = []
    t0 = time.time()
    for i in tqdm(range(n), desc=f"evaluating {getattr(dataset, 'name', '')} (present names)", unit="img",
                  disable=not progress, dynamic_ncols=True):
        s = dataset[i]
        present = s.present()
        if not present:
            continue
        pred = segmenter.predict(s.image, [names[c - 1] for c in present], threshold=threshold, background=background)
        lut = np.zeros(len(present) + 1, np.int64)
        lut[1:] = present  # label k of this image's prediction -> the dataset's class index
        p, g = lut[pred.labels.astype(np.int64)], s.mask.astype(np.int64)
        cm = confusion_matrix(torch.from_numpy(p), torch.from_numpy(g), len(names) + 1, IGNORE)
        meter.cm += cm
        if image_cms is not None:
            image_cms.append(cm)
        ok = g != IGNORE
        image_ious.append(float(np.mean([((p == c) & (g == c) & ok).sum() / max(1, (((p == c) | (g == c)) & ok).sum())
                                         for c in present])))
    r = semantic_scores(meter.cm, names)
    per_class = r["per_class"]
    vals = [v for v in per_class.values() if v is not None]
    low = sorted(k for k, v in per_class.items() if v is not None and v < low_iou)
    errors, low_share = pixel_errors(meter.cm, names, low)
    return {"protocol": "present", "miou": r["miou"], "pixel_accuracy": r["pixel_accuracy"],
            "mean_image_miou": round(float(np.mean(image_ious)), 4) if image_ious else None, "per_class": per_class,
            "images": n, "classes_evaluated": len(vals), "low_iou": low_iou, "low_iou_classes": low,
            "errors": errors, "low_iou_pixels": low_share,
            "argmax": bool(background), "seconds": round(time.time() - t0, 1)}


def pixel_errors(cm: torch.Tensor, names: Sequence[str], low: Sequence[str] = ()) -> tuple[dict, dict | None]:
    """Where each class's ground-truth pixels went, from a confusion matrix ``cm[truth, prediction]`` whose index 0
    is "no class": per class with pixels, the shares ``missed`` (left unlabelled), ``confused`` (given another
    class) and ``confused_with`` (the other class that took most; None when none did); and the same two shares over
    the pixels of the classes ``low`` together (None without them): is a weak class unseen, or taken by a
    neighbour?"""
    c = cm.double()
    out: dict = {}
    tot = {"pixels": 0.0, "missed": 0.0, "confused": 0.0}
    for k, name in enumerate(names, start=1):
        row = c[k]
        n = float(row.sum())
        if n == 0:
            continue
        other = row.clone()
        other[0] = other[k] = 0
        j = int(other.argmax())
        out[name] = {"missed": round(float(row[0]) / n, 4), "confused": round(float(other.sum()) / n, 4),
                     "confused_with": names[j - 1] if other[j] > 0 else None}
        if name in low:
            tot["pixels"] += n
            tot["missed"] += float(row[0])
            tot["confused"] += float(other.sum())
    share = ({"missed": round(tot["missed"] / tot["pixels"], 4), "confused": round(tot["confused"] / tot["pixels"], 4)}
             if tot["pixels"] else None)
    return out, share


def heldout_subset(dataset, meta: dict):
    """The images of a folder ``dataset`` that the model described by checkpoint ``meta`` never trained on: its
    validation split recomputed from the recorded recipe (``val_fraction``, ``seed``, ``holdout``) when the
    folder was one of its training folders (matched by folder name), else every image."""
    from ..data.datasets import split_ids
    tr = meta.get("training", {}) or {}
    cfg = tr.get("config") or meta.get("config") or {}
    used = {Path(str(p)).name for p in tr.get("data", []) or []}
    if not hasattr(dataset, "subset") or getattr(dataset, "name", None) not in used:
        return dataset
    holdout = set(cfg.get("holdout", []) or [])
    _, val = split_ids([i for i in dataset.ids if i not in holdout], float(cfg.get("val_fraction", 0.15)),
                       int(cfg.get("seed", 0)))
    return dataset.subset(sorted(set(val) | (holdout & set(dataset.ids))))


def make_episodes(dataset, classes: Sequence[int] | None = None, n: int | None = None, seed: int = 0) -> list[tuple[int, int]]:
    """One-class episodes (image index, 1-based class index) for every class present in an image.

    Datasets with their own episode list (PASCAL-5i / COCO-20i: ``episodes(n, seed)``) use it; otherwise
    every (image, present class) pair, restricted to ``classes``, and cycled to ``n`` if given.
    """
    if hasattr(dataset, "episodes"):  # the benchmark's own episode list (n=None: its standard count)
        return list(dataset.episodes(n=n, seed=seed))
    allowed = set(classes) if classes else None
    eps = []
    for i in range(len(dataset)):
        mask = dataset.load_mask(dataset.ids[i]) if hasattr(dataset, "load_mask") else dataset[i].mask
        for c in np.unique(mask):
            c = int(c)
            if 0 < c < IGNORE and (allowed is None or c in allowed):
                eps.append((i, c))
    if n and eps:
        eps = [eps[k % len(eps)] for k in range(n)]
    return eps


def evaluate_episodes(segmenter, dataset, classes: Sequence[int] | None = None, n: int | None = None,
                      threshold: float | None = None, progress: bool = True, keep_examples: int = 0) -> dict:
    """LSeg/HSNet one-class episodes: each (image, class present) is segmented with that one name alone.

    Intersection and union are summed per class over all episodes; mIoU is the mean over ``classes`` (default:
    the dataset's novel classes if it has folds, else every class with an episode); FB-IoU the mean of the
    foreground and background IoU.
    """
    from .metrics import EpisodeMeter
    classes = list(classes or getattr(dataset, "novel_classes", None) or [])
    eps = make_episodes(dataset, classes or None, n)
    if not eps:
        raise ValueError(f"{getattr(dataset, 'name', 'dataset')}: no episode (no image shows any of the evaluated classes)")
    thr = segmenter.threshold if threshold is None else threshold
    names = list(dataset.class_names)
    meter = EpisodeMeter()
    by_image: dict[int, list[int]] = {}
    for i, c in eps:
        by_image.setdefault(i, []).append(c)
    examples = []
    t0 = time.time()
    bar = tqdm(total=len(eps), desc="episodes", unit="ep", disable=not progress, dynamic_ncols=True)
    for i, cs in by_image.items():
        s = dataset[i]
        enc = segmenter.encode(s.image)
        target = torch.from_numpy(s.mask.astype(np.int64))
        ignore = target == IGNORE
        for c in cs:
            fg = segmenter.foreground(enc, names[c - 1], thr)
            meter.update(c, fg, target == c, ignore)
            if len(examples) < keep_examples:
                examples.append((s.image, (target == c).numpy().astype(np.uint8) + ignore.numpy() * 254,
                                 fg.numpy().astype(np.uint8), names[c - 1]))
            bar.update(1)
    bar.close()
    r = meter.compute(classes or None)
    per = r["per_class"]
    per_class = {names[int(c) - 1]: (None if v is None or v != v else round(float(v), 4)) for c, v in per.items()}
    out = {"protocol": "episodes", "miou": round(float(r["miou"]), 4), "fbiou": round(float(r["fbiou"]), 4),
           "per_class": per_class, "episodes": len(eps), "seconds": round(time.time() - t0, 1)}
    if keep_examples:
        out["_examples"] = examples
    return out


def _table(rep: dict) -> str:
    if rep.get("protocol") == "novel-names":
        return _novel_table(rep)
    err = rep.get("errors")
    lines = ["| class | IoU | missed | given another class (most to) |", "|---|---|---|---|"] if err is not None \
        else ["| class | IoU |", "|---|---|"]
    for n, v in rep["per_class"].items():
        iou = 'n/a' if v is None else f'{v:.3f}'
        if err is None:
            lines.append(f"| {n} | {iou} |")
        elif n in err:
            e = err[n]
            to = f" ({e['confused_with']})" if e["confused_with"] else ""
            lines.append(f"| {n} | {iou} | {e['missed']:.2f} | {e['confused']:.2f}{to} |")
        else:
            lines.append(f"| {n} | {iou} | | |")
    lines.append(f"| **mean (mIoU)** | **{rep['miou']:.3f}** |" if rep.get("miou") is not None else "| mean | n/a |")
    if "fbiou" in rep:
        lines.append(f"| FB-IoU | {rep['fbiou']:.3f} |")
    if "pixel_accuracy" in rep:
        lines.append(f"| pixel accuracy | {rep['pixel_accuracy']:.3f} |")
    if "low_iou_classes" in rep:
        lines.append(f"| classes below IoU {rep['low_iou']} | {len(rep['low_iou_classes'])} of "
                     f"{rep['classes_evaluated']} |")
    if rep.get("low_iou_pixels"):
        lp = rep["low_iou_pixels"]
        lines.append(f"| their pixels: missed / given another class | {lp['missed']:.2f} / {lp['confused']:.2f} |")
    return "\n".join(lines)


def _novel_table(rep: dict) -> str:
    f = lambda v: "n/a" if v is None else f"{v:.3f}"
    lines = ["| class | discrimination | episode IoU | AUC gap |", "|---|---|---|---|"]
    for n, v in rep["per_class"].items():
        lines.append(f"| {n} | {f(v['discrimination'])} | {f(v['iou'])} | {f(v['auc_gap'])} |")
    lines += [f"| **mean** | **{f(rep['discrimination'])}** (chance {f(rep['chance'])}) | **{f(rep['miou'])}** "
              f"(whole image {f(rep['trivial_miou'])}) | **{f(rep['auc_gap'])}** |",
              f"| FB-IoU | | {f(rep['fbiou'])} (whole image {f(rep['trivial_fbiou'])}) | |",
              f"| AUC right / wrong name | | | {f(rep['auc_right'])} / {f(rep['auc_wrong'])} |"]
    return "\n".join(lines)


def _figure(examples, path) -> None:
    from ..data.io import save_png_atomic
    from ..visualize import grid, overlay
    rows = []
    for img, gt, pred, name in examples:
        names = [name] if isinstance(name, str) else list(name)
        gt_v = np.where(gt == 255, 0, gt)
        rows.append([img, overlay(img, gt_v, names, legend=False), overlay(img, pred, names)])
    save_png_atomic(grid(rows, ["image", "ground truth", "prediction"]), path)


def evaluate(model="default", data: str = "", protocol: str = "semantic", fold: int | None = None,
             threshold: float | None = None, device: str = "cpu", json_path: str | None = None,
             report_path: str | None = None, max_images: int | None = None, episodes: int | None = None,
             progress: bool = True, examples: int = 4, classes: Sequence[str] | str | None = None,
             mode: str = "auto", split: str = "all", decision: str | None = None,
             tta_scales: Sequence[float] = (1.0,), tta_flip: bool = False, bridge_size: int | None = None) -> dict:
    """Evaluate a model on a dataset; returns the report dict (also written as JSON / Markdown if asked).
    ``decision``: how "none of these" is decided (``Segmenter.decision``; default the model's);
    ``tta_scales`` / ``tta_flip``: test-time augmentation (``Segmenter``'s: every protocol reads the averaged
    views); ``bridge_size``: ``Segmenter``'s (default ``BRIDGE_SIZE``)."""
    import json
    from pathlib import Path
    from ..data.benchmarks import open_dataset
    from ..data.io import write_text_atomic
    from ..segmenter import Segmenter
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    if protocol == "novel-names" and not classes:
        raise ValueError("--protocol novel-names needs --classes with at least two of the dataset's class names")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    ds = open_dataset(data, fold=fold)
    seg = model if isinstance(model, Segmenter) else Segmenter.from_pretrained(
        model, device=device, mode=mode, decision=decision, tta_scales=tta_scales, tta_flip=tta_flip,
        bridge_size=bridge_size)
    if decision is not None and seg.decision != decision:
        seg = copy.copy(seg)  # the caller's segmenter keeps its own decision
        seg.decision = seg._decision(decision, None, seg.decision)
    if split == "val":
        if not hasattr(ds, "subset"):
            raise ValueError("--split val needs a dataset folder (benchmarks bring their own splits: use --fold)")
        ds = heldout_subset(ds, seg.meta)
    if protocol == "novel-names":
        names = classes.split(",") if isinstance(classes, str) else list(classes)
        rep = evaluate_novel_names(seg, ds, names, threshold=threshold, progress=progress, max_images=max_images,
                                   keep_examples=examples if report_path else 0)
        ex = rep.pop("_examples", [])
    elif protocol == "present":
        rep = evaluate_present(seg, ds, threshold=threshold, progress=progress, max_images=max_images)
        ex = []
        for i in range(min(examples, len(ds)) if report_path else 0):
            s = ds[i]
            pres = s.present()
            if pres:
                p = seg.predict(s.image, [ds.class_names[c - 1] for c in pres], threshold=threshold,
                                background=rep["argmax"])
                lut = np.zeros(len(pres) + 1, np.int64)
                lut[1:] = pres
                ex.append((s.image, s.mask, lut[p.labels.astype(np.int64)], list(ds.class_names)))
    elif protocol == "semantic":
        rep = evaluate_semantic(seg, ds, threshold=threshold, progress=progress, max_images=max_images)
        ex = []
        for i in range(min(examples, len(ds)) if report_path else 0):
            s = ds[i]
            p = seg.predict(s.image, list(ds.class_names), threshold=threshold, background=rep["argmax"])
            ex.append((s.image, s.mask, p.labels, list(ds.class_names)))
    else:
        rep = evaluate_episodes(seg, ds, n=episodes, threshold=threshold, progress=progress,
                                keep_examples=examples if report_path else 0)
        ex = rep.pop("_examples", [])
    rep.update(model=str(model if not isinstance(model, Segmenter) else seg.meta.get("path")), data=str(data),
               fold=fold, threshold=seg.threshold if threshold is None else threshold, mode=seg.mode,
               split=split, decision=seg.decision if threshold is None and protocol in ("semantic", "present")
               else "threshold")  # episodes and novel names: each name alone, sigmoid >= threshold
    rep["table"] = _table(rep)
    if json_path:
        write_text_atomic(json.dumps({k: v for k, v in rep.items() if k != "table"}, indent=1), json_path)
    if report_path:
        rp = Path(report_path)
        fig = rp.with_suffix(".png")
        if ex:
            _figure(ex, fig)
        body = [f"# fusionseg evaluation: {rep['protocol']}", "",
                f"- model: `{rep['model']}`", f"- data: `{rep['data']}`" + (f", fold {fold}" if fold is not None else ""),
                f"- threshold: {rep['threshold']}", f"- time: {rep.get('seconds')} s", "", rep["table"], ""]
        if ex:
            body += [f"![image | ground truth | prediction]({fig.name})", ""]
        write_text_atomic("\n".join(body), rp)
    return rep


# ------------------------------------------------------------------------------------ novel names
def roc_auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Area under the ROC curve of scores ``pos`` (positives) against ``neg`` (negatives): the probability that
    a random positive outscores a random negative, ties counting half (Mann-Whitney U). NaN if either is empty."""
    pos, neg = pos.flatten().double(), neg.flatten().double()
    if not len(pos) or not len(neg):
        return float("nan")
    s = torch.cat([pos, neg])
    order = s.argsort()
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inv, counts = torch.unique(s, return_inverse=True, return_counts=True)
    if len(uniq) < len(s):
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, ranks)
        ranks = (sums / counts)[inv]
    n1, n0 = len(pos), len(neg)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _class_indices(dataset, names: Sequence[str]) -> list[int]:
    from ..data.datasets import normalize_name
    own = {normalize_name(n): k for k, n in enumerate(dataset.class_names, start=1)}
    out = []
    for n in names:
        k = own.get(normalize_name(n))
        if k is None:
            raise ValueError(f"{getattr(dataset, 'name', 'dataset')} has no class {n!r}; its classes: "
                             f"{', '.join(dataset.class_names)}")
        out.append(k)
    return out


def evaluate_novel_names(segmenter, dataset, names: Sequence[str], threshold: float | None = None,
                         progress: bool = True, max_images: int | None = None, keep_examples: int = 0) -> dict:
    """Does the model know what unseen names *mean*? Three measures on the images that show any of ``names``:

    * ``discrimination``: every pixel of one of the K named classes is assigned the arg-max among the K names
      (decoded together); mean over classes of the fraction assigned correctly. Chance is 1/K.
    * ``miou`` / ``fbiou``: one-class episodes (each present name decoded alone, sigmoid >= threshold), IoU
      summed per class as in :class:`~fusionseg.engine.metrics.EpisodeMeter`. ``trivial_miou``: the same with
      the whole image predicted as the class.
      ``shuffled_miou``: the same episodes decoded with another of the names (does the text matter?).
    * ``auc_gap``: per episode, the ROC-AUC with which the right name's score map separates the object from
      the rest of the image, minus the AUC of another of the names (the next one in the list) on the same
      object; averaged over episodes. Near 0 means "something unfamiliar is here", not meaning.
    """
    from ..segmenter import parse_class_names
    from .metrics import EpisodeMeter
    names = parse_class_names(names)
    if len(names) < 2:
        raise ValueError("the novel-names protocol needs at least two names (--classes \"cow, sheep, ...\"): "
                         "discrimination and the wrong-name control compare them")
    ids = _class_indices(dataset, names)
    k = len(names)
    thr = segmenter.threshold if threshold is None else float(threshold)
    conf = np.zeros((k, k), dtype=np.int64)
    meter, trivial, shuffled = EpisodeMeter(), EpisodeMeter(), EpisodeMeter()
    auc_r, auc_w = [], []
    per_auc: dict[int, list[float]] = {a: [] for a in range(k)}
    n_img = 0
    examples = []
    t0 = time.time()
    bar = tqdm(total=len(dataset), desc="novel names", unit="img", disable=not progress, dynamic_ncols=True)
    for i in range(len(dataset)):  # the bar counts images looked at; those without the names are skipped
        if max_images is not None and n_img >= max_images:
            break
        bar.update(1)
        mask = dataset.load_mask(dataset.ids[i]) if hasattr(dataset, "load_mask") else dataset[i].mask
        present = [a for a, c in enumerate(ids) if (mask == c).any()]
        if not present:
            continue
        n_img += 1
        s = dataset[i]
        enc = segmenter.encode(s.image)
        target = torch.from_numpy(s.mask.astype(np.int64))
        valid = target != IGNORE
        H, W = target.shape
        up = lambda lg: torch.nn.functional.interpolate(lg[None].float(), size=(H, W), mode="bilinear",
                                                        align_corners=False)[0]
        joint = up(segmenter.logits_from(enc, names)).argmax(0)
        for a in present:
            sel = target == ids[a]
            conf[a] += np.bincount(joint[sel].numpy(), minlength=k)
        for a in present:
            gt = (target == ids[a]) & valid
            right = up(segmenter.logits_from(enc, [names[a]]))[0]
            wrong = up(segmenter.logits_from(enc, [names[(a + 1) % k]]))[0]
            fg = right.sigmoid() >= thr
            meter.update(ids[a], fg, gt, ~valid)
            trivial.update(ids[a], torch.ones_like(gt), gt, ~valid)
            shuffled.update(ids[a], wrong.sigmoid() >= thr, gt, ~valid)
            neg = valid & ~gt
            x, y = roc_auc(right[gt], right[neg]), roc_auc(wrong[gt], wrong[neg])
            if x == x and y == y:
                auc_r.append(x)
                auc_w.append(y)
                per_auc[a].append(x - y)
            if len(examples) < keep_examples:
                examples.append((s.image, gt.numpy().astype(np.uint8) + (~valid).numpy() * 254,
                                 fg.numpy().astype(np.uint8), names[a]))
    bar.close()
    if not n_img:
        raise ValueError(f"{getattr(dataset, 'name', 'dataset')}: no image shows any of {', '.join(names)}")
    acc = conf.diagonal() / np.maximum(conf.sum(1), 1)
    has = conf.sum(1) > 0
    r, tr, sh = meter.compute(ids), trivial.compute(ids), shuffled.compute(ids)
    per_class = {}
    for a, n in enumerate(names):
        iou = r["per_class"].get(ids[a])
        per_class[n] = {"discrimination": round(float(acc[a]), 4) if has[a] else None,
                        "iou": None if iou is None or iou != iou else round(float(iou), 4),
                        "auc_gap": round(float(np.mean(per_auc[a])), 4) if per_auc[a] else None}
    out = {"protocol": "novel-names", "classes": list(names),
           "discrimination": round(float(acc[has].mean()), 4), "chance": round(1.0 / k, 4),
           "miou": round(float(r["miou"]), 4), "fbiou": round(float(r["fbiou"]), 4),
           "trivial_miou": round(float(tr["miou"]), 4), "trivial_fbiou": round(float(tr["fbiou"]), 4),
           "shuffled_miou": round(float(sh["miou"]), 4), "shuffled_fbiou": round(float(sh["fbiou"]), 4),
           "auc_gap": round(float(np.mean(auc_r) - np.mean(auc_w)), 4) if auc_r else None,
           "auc_right": round(float(np.mean(auc_r)), 4) if auc_r else None,
           "auc_wrong": round(float(np.mean(auc_w)), 4) if auc_w else None,
           "per_class": per_class, "images": n_img, "episodes": r["episodes"],
           "seconds": round(time.time() - t0, 1)}
    if keep_examples:
        out["_examples"] = examples
    return out
