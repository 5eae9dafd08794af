"""Everyday photos: what each model and scoring mode does with the user's protocol (present classes named).

Each row is one model + mode (+ threshold), evaluated with ``fusionseg evaluate --protocol present --split val``
on the held-out images of each shared folder (the images that model never trained on). Results are kept in
``--json`` (rows already measured with the same command are reused unless ``--fresh``), and the table is
rendered into ``--results`` between ``<!-- everyday:begin -->`` and ``<!-- everyday:end -->``.

Usage:
  python scripts/everyday_study.py --row "today (auto)=default" --row "today, bridge=default:bridge" \\
      --row "self-trained=runs/st/final.safetensors" --data-root ../shared/data \\
      --json docs/bench/everyday.json --results docs/RESULTS.md
A row is ``LABEL=MODEL[:MODE[:THRESHOLD[:DECISION[:TTA[:BRIDGE[:SIZE]]]]]]`` (DECISION: threshold or relative; default
the model's; TTA: test-time scales, ``+flip`` to mirror too, e.g. ``1,1.4+flip``; default none; BRIDGE: the
bridge's reading size in px, ``--bridge-size``; default 320; SIZE: the working size in px, ``--size``; default the
model's); MODEL ``default@REV`` is the default model shipped at git revision REV
(read with ``git show``), so rows of earlier defaults stay reproducible.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fusionseg._atomic import write_atomic

BEGIN, END = "<!-- everyday:begin -->", "<!-- everyday:end -->"
#: The short table (``--brief LABEL`` rows only), for the README's opening.
BRIEF_BEGIN, BRIEF_END = "<!-- everyday-brief:begin -->", "<!-- everyday-brief:end -->"
DATASETS = ("coco2017_mini", "coco128_seg", "msrc_v2", "camvid", "weizmann_horse")


def parse_row(spec: str) -> tuple[str, str, str, float | None, str | None, str | None, int | None, int | None]:
    label, sep, rest = spec.partition("=")
    if not sep or not label.strip() or not rest.strip():
        raise SystemExit(f"--row {spec!r}: expected LABEL=MODEL[:MODE[:THRESHOLD[:DECISION[:TTA[:BRIDGE[:SIZE]]]]]]")
    parts = rest.split(":")
    model = parts[0]
    mode = parts[1] if len(parts) > 1 and parts[1] else "auto"
    try:
        thr = float(parts[2]) if len(parts) > 2 and parts[2] else None
    except ValueError:
        raise SystemExit(f"--row {spec!r}: THRESHOLD must be a number or empty (the model's), got {parts[2]!r}")
    decision = parts[3] if len(parts) > 3 and parts[3] else None
    tta = parts[4] if len(parts) > 4 and parts[4] else None
    if tta is not None:
        try:
            tta_args(tta)
        except ValueError as e:
            raise SystemExit(f"--row {spec!r}: TTA {tta!r}: {e}")
    try:
        bridge = int(parts[5]) if len(parts) > 5 and parts[5] else None
    except ValueError:
        raise SystemExit(f"--row {spec!r}: BRIDGE must be a size in px or empty, got {parts[5]!r}")
    try:
        size = int(parts[6]) if len(parts) > 6 and parts[6] else None
    except ValueError:
        raise SystemExit(f"--row {spec!r}: SIZE must be a working size in px or empty, got {parts[6]!r}")
    return label.strip(), model, mode, thr, decision, tta, bridge, size


def tta_args(tta: str | None) -> tuple[tuple[float, ...], bool]:
    """``"1,1.4+flip"`` -> ((1.0, 1.4), True); None -> one pass."""
    from fusionseg.segmenter import check_tta_scales
    if not tta:
        return (1.0,), False
    scales, plus, flip = tta.partition("+")
    if plus and flip != "flip":
        raise ValueError("expected SCALES or SCALES+flip, e.g. 1,1.4+flip")
    return check_tta_scales(scales or "1"), bool(plus)


def command(model: str, mode: str, thr: float | None, data: str, decision: str | None = None,
            tta: str | None = None, bridge: int | None = None, size: int | None = None) -> str:
    c = f"fusionseg evaluate --protocol present --split val --model {model} --mode {mode} --data {data}"
    c += (f" --threshold {thr}" if thr is not None else "") + (f" --decision {decision}" if decision else "")
    scales, flip = tta_args(tta)
    return c + (f" --tta-scales {','.join(f'{v:g}' for v in scales)}" if scales != (1.0,) else "") + \
        (" --tta-flip" if flip else "") + (f" --bridge-size {bridge}" if bridge is not None else "") + \
        (f" --size {size}" if size is not None else "")


def resolve_model(model: str) -> str:
    """``default@REV`` -> a file holding the default weights shipped at git revision REV; other names as given."""
    if not model.startswith("default@"):
        return model
    import subprocess
    import tempfile
    rev = model.partition("@")[2]
    blob = subprocess.run(["git", "show", f"{rev}:src/fusionseg/weights/default.safetensors"], capture_output=True,
                          check=True).stdout
    f = Path(tempfile.gettempdir()) / f"fusionseg-default-{rev}.safetensors"
    f.write_bytes(blob)
    return str(f)


def run_row(model: str, mode: str, thr: float | None, root: Path, decision: str | None = None,
            tta: str | None = None, bridge: int | None = None, size: int | None = None) -> dict:
    from fusionseg.engine.evaluate import evaluate
    from fusionseg.segmenter import Segmenter
    scales, flip = tta_args(tta)
    seg = Segmenter.from_pretrained(resolve_model(model), device="cpu", mode=mode, decision=decision, size=size,
                                    tta_scales=scales, tta_flip=flip, bridge_size=bridge)
    out = {}
    for name in DATASETS:
        d = root / name
        if not (d / "dataset.json").is_file():
            continue
        t0 = time.time()
        r = evaluate(seg, str(d), protocol="present", split="val", threshold=thr, progress=False)
        out[name] = {"miou": r["miou"], "images": r["images"], "low": len(r["low_iou_classes"]),
                     "classes": r["classes_evaluated"], "per_class": r["per_class"],
                     "command": command(model, mode, thr, str(d), decision, tta, bridge, size),
                     "seconds": round(time.time() - t0, 1)}
        print(f"  {name}: mIoU {r['miou']:.3f}, {out[name]['low']} of {r['classes_evaluated']} classes < 0.05 "
              f"({r['images']} images, {out[name]['seconds']} s)", flush=True)
    return out


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def render(rows: dict, markers: tuple[str, str] = (BEGIN, END)) -> list[str]:
    L = [markers[0], "", "Generated by `python scripts/everyday_study.py` (rows and commands in `docs/bench/everyday.json`). "
         "Protocol: each held-out image segmented with exactly the classes its ground truth shows "
         "(`evaluate --protocol present --split val`); confusion-matrix mIoU over the classes present; "
         "\"low\": classes below IoU 0.05, of the classes present. Each row is "
         "`LABEL=MODEL:MODE:THRESHOLD:DECISION[:TTA[:BRIDGE[:SIZE]]]` given to `--row`; re-run with `--row` for each row, "
         "`--json docs/bench/everyday.json --results docs/RESULTS.md` (the README's short table: `--brief LABEL` "
         "for each of its rows and `--brief-results README.md`).", "",
         "| row | model : mode : threshold or decision | COCO 2017 mIoU (low / classes) | COCO128 | MSRC | CamVid | Weizmann horse |",
         "|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        res = r["results"]

        def cell(n: str) -> str:
            x = res.get(n)
            return "" if x is None else f"{_f(x['miou'])} ({x['low']} / {x['classes']})"
        how = r["threshold"] if r["threshold"] is not None else (r.get("decision") or "model's")
        spec = f"`{r['model']}` : {r['mode']} : {how}" + (f" : test-time {r['tta']}" if r.get("tta") else "") + \
            (f" : bridge {r['bridge']} px" if r.get("bridge") else "") + \
            (f" : working size {r['size']} px" if r.get("size") else "")
        L.append(f"| {label} | {spec} | {cell('coco2017_mini')} | {cell('coco128_seg')} | {cell('msrc_v2')} | "
                 f"{cell('camvid')} | {cell('weizmann_horse')} |")
    return L + ["", markers[1]]


def write_between(path: Path, lines: list[str], section: str = "Everyday photos: present classes named") -> None:
    """Put ``lines`` (first and last: the markers) between those markers in ``path``, or append them under a
    ``## section`` heading when the file has no such block."""
    text = path.read_text() if path.exists() else ""
    block = "\n".join(lines)
    begin, end = lines[0], lines[-1]
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    elif begin == BRIEF_BEGIN:
        raise SystemExit(f"{path} has no {BRIEF_BEGIN} ... {BRIEF_END} block to write the short table into")
    else:
        text = text.rstrip() + f"\n\n## {section}\n\n" + block + "\n"
    path.write_text(text)


def reading_of(row: dict) -> tuple:
    """A stored row's reading, as :func:`parse_row` gives it after the label."""
    return (row["model"], row["mode"], row["threshold"], row.get("decision"), row.get("tta"), row.get("bridge"),
            row.get("size"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", action="append", default=[],
                    help="LABEL=MODEL[:MODE[:THRESHOLD[:DECISION[:TTA[:BRIDGE[:SIZE]]]]]] (repeatable)")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--json", default="docs/bench/everyday.json")
    ap.add_argument("--results", action="append", default=[],
                    help="Markdown file to render the table into, between the markers (repeatable)")
    ap.add_argument("--brief", action="append", default=[],
                    help="a row LABEL for the short table (repeatable, in this order)")
    ap.add_argument("--brief-results", action="append", default=[],
                    help="Markdown file whose everyday-brief block gets the short table (repeatable)")
    ap.add_argument("--fresh", action="store_true", help="re-measure rows already in --json")
    ap.add_argument("--again", action="store_true",
                    help="measure a reading that a row of another label already holds (labels are the rows' keys: "
                         "without this, a new label for a measured reading stops the run, so a label typed slightly "
                         "differently does not add the same row twice)")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    jp = Path(a.json)
    rows = json.loads(jp.read_text()) if jp.is_file() else {}
    for spec in a.row:
        label, model, mode, thr, decision, tta, bridge, size = parse_row(spec)
        reading = (model, mode, thr, decision, tta, bridge, size)
        old = rows.get(label)
        if old and not a.fresh and reading_of(old) == reading:
            print(f"{label}: kept from {jp}")
            continue
        same = [k for k, r in rows.items() if k != label and reading_of(r) == reading]
        if same and not a.again:
            raise SystemExit(f"--row {label!r}: the row {same[0]!r} already holds this reading; give its label, or "
                             "--again to measure it under a new one")
        print(f"{label}: {model} : {mode} : {thr} : {decision} : {tta} : {bridge} : {size}", flush=True)
        rows[label] = {"model": model, "mode": mode, "threshold": thr, "decision": decision,
                       **({"tta": tta} if tta else {}), **({"bridge": bridge} if bridge is not None else {}),
                       **({"size": size} if size is not None else {}),
                       "results": run_row(model, mode, thr, Path(a.data_root), decision, tta, bridge, size)}
        # merge into the file as it is now: another study process may have written rows since this one read it
        jp.parent.mkdir(parents=True, exist_ok=True)
        now = json.loads(jp.read_text()) if jp.is_file() else {}
        rows = {**now, label: rows[label]}
        write_atomic(jp, json.dumps(rows, indent=1).encode())
    for res in a.results:
        write_between(Path(res), render(rows))
        print(f"wrote the table into {res}")
    missing = [b for b in a.brief if b not in rows]
    if missing:
        raise SystemExit(f"--brief: no measured row {missing[0]!r}; rows: {', '.join(rows)}")
    for res in a.brief_results:
        write_between(Path(res), render({b: rows[b] for b in a.brief}, (BRIEF_BEGIN, BRIEF_END)))
        print(f"wrote the short table into {res}")


if __name__ == "__main__":
    main()
