"""The zero-shot study of docs/RESULTS.md: trains every model it needs (skipping runs already finished),
evaluates them on names they never saw, and writes the tables.

    python scripts/zero_shot_study.py --data-root ../shared/data --out runs/study --results docs/RESULTS.md

Parts (``--parts``, default all):

* ``folds``: the 80 COCO names in four COCO-20i-style folds (fold f: classes f+1, f+5, ..., f+77). For each fold
  a fusion model and a no-fusion model are trained on all five shared folders with the fold's names excluded
  (never used; their pixels ignored, in every folder, with the same-concept spellings of other folders:
  see ``ALIASES``), then evaluated on the held-out COCO images (each run's ``splits.json``).
* ``cross``: fusion and no-fusion trained without any CamVid or MSRC data (COCO folders + Weizmann horse),
  evaluated on all of CamVid and MSRC: whole vocabulary, and the novel-names protocol on the names the
  training never used.
* ``msrc6``: the six MSRC names cow, sheep, cat, dog, boat, flower excluded everywhere, and every MSRC image
  that shows one of them held out of training; evaluated on those images.
* ``testtime`` (not in the default parts): the fusion run of each of ``--testtime-on`` (``foldF`` / ``msrc6``,
  trained as for ``selftrain`` when missing) read with the opt-in test-time views and bridge size
  (``TESTTIME_ROWS``), on its held-out images; table between ``<!-- study-testtime:begin -->`` and
  ``<!-- study-testtime:end -->``.
* ``selftrain`` (not in the default parts; needs ``--pseudo DIR``, a ``fusionseg pseudo-label`` collection):
  does a teacher's vocabulary teach the fusion model names it never saw? For each of ``--selftrain-on`` (COCO
  folds ``foldF`` and/or ``msrc6``) the same fusion run is trained again with the pseudo-labels added and
  ``--synonym-rate`` text augmentation, under the same exclusions (an excluded name also removes every teacher
  class with it among its synonyms or hypernyms), and both are evaluated on the same held-out images. Its table
  goes between ``<!-- study-selftrain:begin -->`` and ``<!-- study-selftrain:end -->`` of ``--results``.

    python scripts/zero_shot_study.py --parts selftrain --pseudo runs/pl_imagenet --results docs/RESULTS.md

Rows for every part (same images, same episodes): fusion; fusion with the names shuffled (each novel name
swapped for another one); no-fusion; the whole image as the class; the training-free bridge; fusion+bridge.
Measures: discrimination among the novel names, one-class episode mIoU and FB-IoU, the wrong-name AUC gap,
and whole-vocabulary mIoU where every class of the data is named at once.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fusionseg._atomic import write_atomic

ALIASES = {"airplane": ["aeroplane"], "person": ["body", "face", "pedestrian", "bicyclist"]}
MSRC6 = ["cow", "sheep", "cat", "dog", "boat", "flower"]
DEMO_ID = "000000358083"  # the README's demo photo, never trained on
KINDS = (("fusion", True, False), ("nofusion", False, False), ("prior", True, True))  # run name, fusion, bridge prior


class Concat:
    """Several folder datasets with the same class list, read as one (ids prefixed by the folder)."""

    def __init__(self, parts):
        self.parts = parts
        self.class_names = parts[0].class_names
        assert all(p.class_names == self.class_names for p in parts)
        self.index = [(d, i) for d, p in enumerate(parts) for i in range(len(p))]
        self.ids = [f"{parts[d].name}/{parts[d].ids[i]}" for d, i in self.index]
        self.name = "+".join(p.name for p in parts)
        self.every_pixel_labelled = parts[0].every_pixel_labelled

    def __len__(self):
        return len(self.index)

    def load_mask(self, id):
        d, _, i = id.partition("/")
        return next(p for p in self.parts if p.name == d).load_mask(i)

    def __getitem__(self, k):
        d, i = self.index[k]
        return self.parts[d][i]


def coco_names(root: Path) -> list[str]:
    meta = json.loads((root / "coco2017_mini" / "dataset.json").read_text())
    return [meta["classes"][str(i)] for i in range(1, 81)]


def fold_names(names: list[str], fold: int) -> list[str]:
    return [names[c - 1] for c in range(fold + 1, 81, 4)]


def with_aliases(names: list[str]) -> list[str]:
    return list(names) + [a for n in names for a in ALIASES.get(n, [])]


def train_run(out: Path, data: list[Path], exclude: list[str], fusion: bool, steps: int, threads: int,
              holdout: list[str], batch_size: int = 8, prior: bool = False, synonym_rate: float = 0.0) -> dict:
    import torch
    from fusionseg.engine.train import TrainConfig, train
    final = out / "final.safetensors"
    if not final.is_file():
        torch.set_num_threads(threads)
        cfg = TrainConfig(data=[str(d) for d in data], out=str(out), steps=steps, scales=[320],
                          exclude_classes=exclude, holdout=holdout, fusion=fusion, checkpoint_every=0,
                          batch_size=batch_size, bridge_prior=prior, synonym_rate=synonym_rate)
        train(cfg)
    from fusionseg.model.checkpoint import read_checkpoint
    _, meta = read_checkpoint(final)
    return {"run": str(out), "wall_seconds": meta["training"].get("wall_seconds"), "steps": meta["training"]["steps"],
            "vocabulary": meta["training"]["vocabulary"], "validation": meta["training"].get("validation")}


def variants(run: Path, nofusion_run: Path, bridge_alone: bool, rows: set[str] | None = None) -> list[tuple[str, Path, str]]:
    """(row label, run folder, scoring mode) of every evaluated design; the bridge-prior run where it exists.
    ``rows``: only these labels (``--rows``; the others are kept from results.json)."""
    out = [("fusion", run, "fusion"), ("no-fusion", nofusion_run, "fusion")]
    if bridge_alone:  # training-free: the same in every run, so only where the table has a row for it
        out.append(("bridge alone", run, "bridge"))
    out.append(("fusion+bridge", run, "fusion+bridge"))
    prior_run = run.parent / run.name.replace("-fusion", "-prior")
    if (prior_run / "final.safetensors").is_file():
        out.append(("bridge-prior model", prior_run, "fusion+bridge"))
    return [v for v in out if rows is None or v[0] in rows]


def novel_rows(rows_to_do: list[tuple], ds, names: list[str], threads: int) -> dict:
    """The novel-names protocol on ``ds`` for ``names``, one row per (label, run folder, scoring mode[, reading]):
    ``reading``, the ``Segmenter`` keywords of how each image is read (test-time views, the bridge's size)."""
    import torch
    from fusionseg.engine.evaluate import evaluate_novel_names
    from fusionseg.segmenter import Segmenter
    torch.set_num_threads(threads)
    rows = {}
    for label, path, mode, *reading in rows_to_do:
        t0 = time.time()
        seg = Segmenter.from_pretrained(path, device="cpu", mode=mode, **(reading[0] if reading else {}))
        r = evaluate_novel_names(seg, ds, names, progress=False)
        r["seconds"] = round(time.time() - t0, 1)
        rows[label] = r
        print(f"  {label}: discrimination {r['discrimination']}, mIoU {r['miou']} (shuffled {r['shuffled_miou']}, "
              f"whole image {r['trivial_miou']}), AUC gap {r['auc_gap']}", flush=True)
    return rows


def msrc6_images(folder: Path):
    """-> (the MSRC folder dataset, the ids of its images that show one of the six names)."""
    from fusionseg.data.datasets import FolderDataset
    msrc = FolderDataset(folder)
    ids6 = [msrc.class_names.index(n) + 1 for n in MSRC6]
    return msrc, [i for i in msrc.ids if np.isin(msrc.load_mask(i), ids6).any()]


def fold_heldout(run: Path, folders: dict, novel: list[str]):
    """-> (the held-out COCO images of both COCO folders, from ``run``'s splits.json; the names of ``novel`` they
    show)."""
    from fusionseg.data.datasets import FolderDataset
    splits = json.loads((run / "splits.json").read_text())
    ds = Concat([FolderDataset(folders[n], splits[n]["val"]) for n in ("coco128_seg", "coco2017_mini")])
    present = sorted({c for i in ds.ids for c in np.unique(ds.load_mask(i)).tolist() if 0 < c < 255})
    return ds, [n for n in novel if ds.class_names.index(n) + 1 in present]


def part_names(key: str, names80: list[str], folders: dict, flag: str):
    """A part named ``foldF`` or ``msrc6`` -> (names excluded from training, image ids held out of it, the novel
    names, a function run folder -> (its held-out images, the novel names they show))."""
    if key == "msrc6":
        msrc, shown = msrc6_images(folders["msrc_v2"])
        return MSRC6, [DEMO_ID] + shown, MSRC6, lambda run: (msrc.subset(shown), MSRC6)
    if key.startswith("fold") and key[4:] in ("0", "1", "2", "3"):
        novel = fold_names(names80, int(key[4:]))
        return with_aliases(novel), [DEMO_ID], novel, lambda run: fold_heldout(run, folders, novel)
    raise SystemExit(f"{flag}: expected fold0..fold3 or msrc6, got {key!r}")


SELFTRAIN_ROWS = (("people's labels, fusion", "base", "fusion"), ("+ pseudo-labels, fusion", "pl", "fusion"),
                  ("bridge alone", "base", "bridge"), ("people's labels, fusion+bridge", "base", "fusion+bridge"),
                  ("+ pseudo-labels, fusion+bridge", "pl", "fusion+bridge"))
SELFTRAIN_BEGIN, SELFTRAIN_END = "<!-- study-selftrain:begin -->", "<!-- study-selftrain:end -->"
#: The testtime part: how the opt-in reading options (test-time views, the bridge's size) do on unseen names.
_TTA = {"tta_scales": (1.0, 1.4), "tta_flip": True}
TESTTIME_ROWS = (("fusion alone, one pass", "fusion", {}), ("fusion alone, test-time 1,1.4+flip", "fusion", _TTA),
                 ("bridge alone, one pass", "bridge", {}),
                 ("bridge alone, test-time 1,1.4+flip, bridge 448 px", "bridge", {**_TTA, "bridge_size": 448}),
                 ("fusion+bridge, one pass", "fusion+bridge", {}),
                 ("fusion+bridge, test-time 1,1.4+flip", "fusion+bridge", _TTA),
                 ("fusion+bridge, test-time 1,1.4+flip, bridge 448 px", "fusion+bridge", {**_TTA, "bridge_size": 448}))
TESTTIME_BEGIN, TESTTIME_END = "<!-- study-testtime:begin -->", "<!-- study-testtime:end -->"


def selftrain_rows(base: Path, pl: Path, ds, names: list[str], threads: int) -> dict:
    """The novel-names protocol on ``ds`` for ``names``: the run without and with the pseudo-labels, each alone
    and with the bridge, and the bridge alone."""
    rows = novel_rows([(label, base if which == "base" else pl, mode) for label, which, mode in SELFTRAIN_ROWS],
                      ds, names, threads)
    return {label: table_fields(r) for label, r in rows.items()}


def table_fields(r: dict, *extra: str) -> dict:
    """What the selftrain and testtime tables keep of a novel-names report."""
    return {k: r.get(k) for k in ("discrimination", "chance", "miou", "fbiou", "trivial_miou", "shuffled_miou",
                                  "auc_gap") + extra}


def selftrain_table(entry: dict) -> list[str]:
    """The selftrain part's Markdown, markers included (``everyday_study.write_between``'s form)."""
    steps = sorted({r["steps"] for e in entry.values() for r in e["train"].values()})
    return [SELFTRAIN_BEGIN, "", "Generated by `python scripts/zero_shot_study.py --parts selftrain --pseudo DIR "
            "--results docs/RESULTS.md` (results in the study's `results.json`). Each pair of runs is the same "
            f"{'/'.join(map(str, steps))}-step fusion training with the same names excluded, without and with the "
            "pseudo-label collection "
            "(its teacher classes that have an excluded name among their synonyms or hypernyms removed too); the "
            "novel-names protocol on the same held-out images.", ""] + \
        part_tables(entry, lambda e: f"pseudo-labels: `{e['pseudo']}`, synonym rate {e['synonym_rate']}; ") + \
        [SELFTRAIN_END]


def testtime_table(entry: dict) -> list[str]:
    """The testtime part's Markdown, markers included."""
    return [TESTTIME_BEGIN, "", "Generated by `python scripts/zero_shot_study.py --parts testtime --results "
            "docs/RESULTS.md` (results in the study's `results.json`): the study's fusion run of each part (the "
            "names excluded from its training) read once or with the opt-in reading options, the novel-names "
            "protocol on the part's held-out images; seconds: the whole row on this machine's 2 cores.", ""] + \
        part_tables(entry, seconds=True) + [TESTTIME_END]


def part_tables(entry: dict, about=lambda e: "", seconds: bool = False) -> list[str]:
    """One table per part of ``entry`` (its rows: :func:`table_fields`), headed by what the part is."""
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    L = []
    for key, e in entry.items():
        some = next(iter(e["rows"].values()))
        L += [f"**{key}** ({e['images']} held-out images, {len(e['novel_present'])} unseen names present; "
              f"{about(e)}discrimination chance {f(some.get('chance'))}, whole image as the mask "
              f"{f(some['trivial_miou'])}):", "",
              "| row | discrimination | episode mIoU | shuffled-name mIoU | AUC gap |" + (" seconds |" if seconds else ""),
              "|---|---|---|---|---|" + ("---|" if seconds else "")]
        for label, r in e["rows"].items():
            L.append(f"| {label} | {f(r['discrimination'])} | {f(r['miou'])} | {f(r['shuffled_miou'])} | "
                     f"{f(r['auc_gap'])} |" + (f" {r.get('seconds')} |" if seconds else ""))
        L.append("")
    return L


def semantic_rows(run: Path, nofusion_run: Path, ds, novel: list[str], threads: int, rows_only=None) -> dict:
    """Whole vocabulary: every class of ``ds`` named at once; mIoU over the novel and over the other names."""
    import torch
    from fusionseg.data.datasets import normalize_name
    from fusionseg.engine.evaluate import evaluate_semantic
    from fusionseg.segmenter import Segmenter
    torch.set_num_threads(threads)
    nov = {normalize_name(n) for n in novel}
    rows = {}
    for label, path, mode in variants(run, nofusion_run, bridge_alone=False, rows=rows_only):
        seg = Segmenter.from_pretrained(path, device="cpu", mode=mode)
        r = evaluate_semantic(seg, ds, progress=False)
        pn = [v for n, v in r["per_class"].items() if normalize_name(n) in nov and v is not None]
        pb = [v for n, v in r["per_class"].items() if normalize_name(n) not in nov and v is not None]
        r["miou_novel"] = round(float(np.mean(pn)), 4) if pn else None
        r["miou_seen"] = round(float(np.mean(pb)), 4) if pb else None
        rows[label] = r
        print(f"  semantic {label}: mIoU {r['miou']} (novel {r['miou_novel']}, seen {r['miou_seen']})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="folds,cross,msrc6")
    ap.add_argument("--folds", default="0,1,2,3")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--force", action="store_true", help="evaluate parts already in results.json again")
    ap.add_argument("--prior", default="msrc6", help="parts that also train the bridge-prior model (--bridge-prior)")
    ap.add_argument("--rows", default=None, help="with --force: evaluate only these rows (comma-separated labels, "
                    "e.g. \"fusion+bridge\") and keep the others from results.json")
    ap.add_argument("--results", default=None, help="write the Markdown tables here (e.g. docs/RESULTS.md)")
    ap.add_argument("--pseudo", default=None, help="selftrain: the pseudo-label collection added to training")
    ap.add_argument("--synonym-rate", type=float, default=0.5, help="selftrain: text augmentation rate (default 0.5)")
    ap.add_argument("--selftrain-on", default="fold0,msrc6", help="selftrain: foldF and/or msrc6 (default fold0,msrc6)")
    ap.add_argument("--testtime-on", default="fold0,msrc6", help="testtime: foldF and/or msrc6 (default fold0,msrc6)")
    a = ap.parse_args()
    if "selftrain" in a.parts.split(",") and not (a.pseudo and Path(a.pseudo, "dataset.json").is_file()):
        raise SystemExit(f"--parts selftrain needs --pseudo DIR holding a pseudo-label collection, got {a.pseudo}")
    from fusionseg.data.datasets import FolderDataset, normalize_name
    root, out = Path(a.data_root), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    folders = {n: root / n for n in ("coco128_seg", "coco2017_mini", "msrc_v2", "weizmann_horse", "camvid")}
    parts = a.parts.split(",")
    names80 = coco_names(root)

    done: set[str] = set()
    rows_only = {r.strip() for r in a.rows.split(",")} if a.rows else None

    def merge(old: dict, new: dict) -> dict:
        """``new`` into ``old``, dict by dict: rows not evaluated again stay as they were."""
        for k, v in new.items():
            old[k] = merge(old[k], v) if isinstance(v, dict) and isinstance(old.get(k), dict) else v
        return old

    def save():  # merge into the file: several study processes (different parts) may run side by side
        current = json.loads(res_path.read_text()) if res_path.is_file() else {}
        for k in done:
            current[k] = merge(current[k], results[k]) if rows_only and isinstance(current.get(k), dict) else results[k]
        write_atomic(res_path, json.dumps(current, indent=1).encode())  # a unique temp name per process
        results.update(current)

    def todo(key: str) -> bool:
        return a.force or key not in results

    if "folds" in parts:
        for f in (int(x) for x in a.folds.split(",")):
            exclude, holdout, novel, heldout = part_names(f"fold{f}", names80, folders, "--folds")
            runs = {}
            for kind, fusion, prior in KINDS[: 3 if "folds" in a.prior.split(",") else 2]:
                runs[kind] = train_run(out / f"fold{f}-{kind}", list(folders.values()), exclude, fusion,
                                       a.steps, a.threads, holdout, a.batch_size, prior)
            if a.train_only or not todo(f"fold{f}"):
                continue
            ds, novel_here = heldout(out / f"fold{f}-fusion")
            print(f"fold {f}: {len(ds)} held-out COCO images, {len(novel_here)} of the 20 novel names present", flush=True)
            fu, nofu = out / f"fold{f}-fusion", out / f"fold{f}-nofusion"
            results[f"fold{f}"] = {"novel": novel, "novel_present": novel_here, "train": runs,
                                   "novel_names": novel_rows(variants(fu, nofu, True, rows_only), ds, novel_here,
                                                             a.threads),
                                   "semantic": semantic_rows(out / f"fold{f}-fusion", out / f"fold{f}-nofusion", ds,
                                                             novel, a.threads, rows_only)}
            done.add(f"fold{f}")
            save()
    if "cross" in parts:
        data = [folders[n] for n in ("coco128_seg", "coco2017_mini", "weizmann_horse")]
        runs = {kind: train_run(out / f"cross-{kind}", data, [], fusion, a.steps, a.threads, [DEMO_ID], a.batch_size)
                for kind, fusion in (("fusion", True), ("nofusion", False))}
        if not a.train_only and todo("cross"):
            vocab = set(runs["fusion"]["vocabulary"])
            entry = {"train": runs}
            for name in ("msrc_v2", "camvid"):
                ds = FolderDataset(folders[name])
                unseen = [n for n in ds.class_names if normalize_name(n) not in vocab]
                print(f"cross-dataset {name}: {len(ds)} images, names never used in training: {', '.join(unseen)}")
                entry[name] = {"unseen": unseen,
                               "novel_names": novel_rows(variants(out / "cross-fusion", out / "cross-nofusion", True,
                                                                  rows_only), ds, unseen, a.threads),
                               "semantic": semantic_rows(out / "cross-fusion", out / "cross-nofusion", ds, unseen,
                                                         a.threads, rows_only)}
            results["cross"] = entry
            done.add("cross")
            save()
    if "msrc6" in parts:
        msrc, shown = msrc6_images(folders["msrc_v2"])
        runs = {kind: train_run(out / f"msrc6-{kind}", list(folders.values()), MSRC6, fusion, a.steps, a.threads,
                                [DEMO_ID] + shown, a.batch_size, prior)
                for kind, fusion, prior in KINDS[: 3 if "msrc6" in a.prior.split(",") else 2]}
        if not a.train_only and todo("msrc6"):
            splits = json.loads((out / "msrc6-fusion" / "splits.json").read_text())
            seen_val = [i for i in splits["msrc_v2"]["val"] if i not in set(shown)]
            print(f"msrc6: {len(shown)} MSRC images show the six names (held out); {len(seen_val)} other val images")
            results["msrc6"] = {"train": runs, "images": len(shown),
                                "novel_names": novel_rows(variants(out / "msrc6-fusion", out / "msrc6-nofusion", True,
                                                                   rows_only), msrc.subset(shown), MSRC6, a.threads),
                                "semantic_seen": semantic_rows(out / "msrc6-fusion", out / "msrc6-nofusion",
                                                               msrc.subset(seen_val), MSRC6, a.threads, rows_only)}
            done.add("msrc6")
            save()

    def each_part(part: str, keys: str, flag: str, measure) -> None:
        """``measure(key, excluded names, held-out ids, heldout)`` for each part of ``keys`` not measured yet."""
        entry = results.get(part, {}) if not a.force else {}
        for key in [k.strip() for k in keys.split(",") if k.strip()]:
            if key not in entry:
                entry[key] = measure(key, *part_names(key, names80, folders, flag))
                results[part] = entry
                done.add(part)
                save()

    def selftrain(key: str, exclude: list[str], holdout: list[str], novel: list[str], heldout) -> dict:
        base = out / f"{key}-fusion"
        runs = {"people's labels": train_run(base, list(folders.values()), exclude, True, a.steps, a.threads,
                                             holdout, a.batch_size),
                "+ pseudo-labels": train_run(out / f"{key}-fusion-pl", list(folders.values()) + [Path(a.pseudo)],
                                             exclude, True, a.steps, a.threads, holdout, a.batch_size,
                                             synonym_rate=a.synonym_rate)}
        ds, here = heldout(base)
        print(f"selftrain {key}: {len(ds)} held-out images, {len(here)} novel names present", flush=True)
        return {"novel_present": here, "images": len(ds), "pseudo": str(a.pseudo), "synonym_rate": a.synonym_rate,
                "train": runs, "rows": selftrain_rows(base, out / f"{key}-fusion-pl", ds, here, a.threads)}

    def testtime(key: str, exclude: list[str], holdout: list[str], novel: list[str], heldout) -> dict:
        run = out / f"{key}-fusion"
        runs = {"fusion": train_run(run, list(folders.values()), exclude, True, a.steps, a.threads, holdout,
                                    a.batch_size)}
        ds, here = heldout(run)
        print(f"testtime {key}: {len(ds)} held-out images, {len(here)} novel names present", flush=True)
        rows = novel_rows([(label, run, mode, kw) for label, mode, kw in TESTTIME_ROWS], ds, here, a.threads)
        return {"novel_present": here, "images": len(ds), "train": runs,
                "rows": {label: table_fields(r, "seconds") for label, r in rows.items()}}

    if "selftrain" in parts:
        each_part("selftrain", a.selftrain_on, "--selftrain-on", selftrain)
    if "testtime" in parts:
        each_part("testtime", a.testtime_on, "--testtime-on", testtime)
    if a.results:
        from study_report import write_report  # scripts/study_report.py
        if any(k.startswith("fold") or k in ("cross", "msrc6") for k in results):
            write_report(results, a, Path(a.results))
        if "selftrain" in results:
            from everyday_study import write_between  # the same marker writer
            write_between(Path(a.results), selftrain_table(results["selftrain"]),
                          "Does a teacher's vocabulary teach unseen names?")
        if "testtime" in results:
            from everyday_study import write_between
            write_between(Path(a.results), testtime_table(results["testtime"]),
                          "Test-time views and the bridge's size on unseen names")
        print(f"wrote {a.results}")


if __name__ == "__main__":
    main()
