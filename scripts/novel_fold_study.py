"""One COCO-20i-style fold on the shared COCO folders: novel-class episodes for a model trained with the
fold's names excluded, against two baselines on exactly the same episodes.

Usage: python scripts/novel_fold_study.py RUN_DIR FOLD [--data-root ../shared/data]
RUN_DIR is a `fusionseg train ... --exclude-classes <fold's 20 names>` run; its splits.json gives the held-out
images. Rows: the model with the right name; the same model with each novel name swapped for another novel
name (does the text matter?); the whole image predicted as the class.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fusionseg.data.datasets import IGNORE, FolderDataset
from fusionseg.engine.metrics import EpisodeMeter
from fusionseg.segmenter import Segmenter

COCO = ("coco128_seg", "coco2017_mini")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("fold", type=int)
    ap.add_argument("--data-root", default="../shared/data")
    a = ap.parse_args()
    splits = json.loads((Path(a.run) / "splits.json").read_text())
    seg = Segmenter.from_pretrained(a.run, device="cpu")
    novel = list(range(a.fold + 1, 81, 4))  # 1-based, interleaved
    perm = novel[1:] + novel[:1]  # a derangement: every novel name replaced by another novel name
    swap = dict(zip(novel, perm))
    meters = {"fusion (right name)": EpisodeMeter(), "fusion (another novel name)": EpisodeMeter(),
              "whole image": EpisodeMeter()}
    n_eps, t0 = 0, time.time()
    for name in COCO:
        ds = FolderDataset(Path(a.data_root) / name, splits[name]["val"])
        names = ds.class_names
        for s in ds:
            present = [c for c in s.present() if c in novel]
            if not present:
                continue
            enc = seg.encode(s.image)
            H, W = s.mask.shape
            target = torch.from_numpy(s.mask.astype(np.int64))
            ignore = target == IGNORE
            for c in present:
                gt = target == c
                for key, q in (("fusion (right name)", c), ("fusion (another novel name)", swap[c])):
                    meters[key].update(c, seg.foreground(enc, names[q - 1]), gt, ignore)
                meters["whole image"].update(c, torch.ones(H, W, dtype=torch.bool), gt, ignore)
                n_eps += 1
    print(f"fold {a.fold}: {n_eps} episodes on held-out COCO images, novel classes {novel}, "
          f"{time.time() - t0:.0f} s")
    print("| row | mIoU (novel) | FB-IoU |\n|---|---|---|")
    for k, m in meters.items():
        r = m.compute(novel)
        print(f"| {k} | {r['miou']:.3f} | {r['fbiou']:.3f} |")


if __name__ == "__main__":
    main()
