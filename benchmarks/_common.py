"""Shared helpers for the benchmark scripts: argument checks, A/B interleaved timing, model builders.

Every script prints medians measured in one run, with the peer timed in the same loop (A, B, A, B, ...),
so machine load hits both sides alike; the ratios are what to read, the absolute numbers move with load.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))


def shared_data() -> Path:
    """The shared data folder: ``shared/data`` beside the checkout or beside one of its parents."""
    for parent in ROOT.parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return ROOT.parent / "shared" / "data"


def fail(msg: str) -> "None":
    """Bad input: one line on stderr, exit code 2 (as the CLI does)."""
    print(f"{Path(sys.argv[0]).name}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def int_list(spec: str, what: str, lo: int, hi: int) -> list[int]:
    """'1,5,20' -> [1, 5, 20], every value in [lo, hi], or exit 2 naming the bad value."""
    try:
        vals = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        fail(f"{what} must be comma-separated integers, got {spec!r}")
    if not vals:
        fail(f"{what} is empty")
    for v in vals:
        if not lo <= v <= hi:
            fail(f"{what} {v} is out of range: give values from {lo} to {hi}")
    return vals


def sizes(spec: str, what: str, lo: int, hi: int) -> list[tuple[int, int]]:
    """'4000x3000,1024x768' -> [(4000, 3000), (1024, 768)], each side in [lo, hi], or exit 2 naming the bad one."""
    out = []
    for part in spec.split(","):
        try:
            w, h = (int(v) for v in part.lower().split("x"))
        except ValueError:
            fail(f"{what} entries must look like 4000x3000, got {part!r}")
        in_range(w, "width", lo, hi)
        in_range(h, "height", lo, hi)
        out.append((w, h))
    return out


def in_range(v: int, what: str, lo: int, hi: int) -> int:
    if not lo <= v <= hi:
        fail(f"{what} {v} is out of range: give a value from {lo} to {hi}")
    return v


def vit_side(v: int, what: str, lo: int, hi: int, patch: int = 16) -> int:
    """An image side for a ViT benchmark: in [lo, hi] and a multiple of the patch, or exit 2 saying which."""
    in_range(v, what, lo, hi)
    if v % patch:
        fail(f"{what} {v} must be a multiple of {patch} (the ViT patch)")
    return v


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for both sides (default 2)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per side (median reported)")
    return ap


def setup(a: argparse.Namespace) -> None:
    in_range(a.threads, "--threads", 1, 256)
    in_range(a.repeats, "--repeats", 1, 1000)
    torch.set_num_threads(a.threads)
    from fusionseg.runtime import tune_malloc
    tune_malloc()  # as the CLI, serve and training do (entry points); process-wide, so the peer in this process gets it too


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, timed in turn (A, B, A, B, ...) after ``warmup`` untimed calls each."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


class RandomText(torch.nn.Module):
    """A text encoder stand-in: a fixed random unit vector per name (for speed runs with cached text)."""

    def __init__(self, dim: int):
        super().__init__()
        from fusionseg.encoders.base import EncoderSpec
        self.dim = dim
        self.spec = EncoderSpec(f"random-text-{dim}", "benchmark", f"random{dim}")

    def encode(self, names, templates=None):
        g = torch.Generator().manual_seed(0)
        out = torch.randn(len(names), self.dim, generator=g)
        return torch.nn.functional.normalize(out, dim=-1)


def clip_vit_b16_folder(folder: Path) -> Path:
    """Save a randomly initialised CLIP ViT-B/16 vision tower (+ 512-d projection) as a transformers folder."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, patch_size=16, image_size=224, projection_dim=512)
        CLIPVisionModelWithProjection(cfg).eval().save_pretrained(folder)
    return folder


def vit_b16_paper_segmenter(folder: Path, size: int):
    """Segmenter over an ``hf:`` CLIP ViT-B/16 (random weights) + the ``paper`` preset head (random weights),
    text from a cached random 512-d stand-in."""
    from fusionseg.encoders.base import build_image_encoder
    from fusionseg.model.fusioner import FusionHead, Fusioner, FusionerConfig
    from fusionseg.segmenter import Segmenter
    enc = build_image_encoder(f"hf:{clip_vit_b16_folder(folder)}")
    text = RandomText(512)
    torch.manual_seed(0)
    head = FusionHead(FusionerConfig.from_preset("paper", enc.strides, enc.channels, text.dim)).eval()
    return Segmenter(Fusioner(enc, text, head), {"image_size": size}, "cpu", size=size)


def default_segmenter(size: int):
    from fusionseg.segmenter import Segmenter
    return Segmenter.from_pretrained("default", device="cpu", size=size)


# ------------------------------------------------------------------------------------------ results as JSON
# Every script writes what it measured to docs/bench/<name>.json (``--json PATH``), and
# ``python benchmarks/render.py README.md`` renders each ``<!-- bench:NAME:begin -->`` ...
# ``<!-- bench:NAME:end -->`` block of the README from docs/bench/NAME.json: numbers are generated, not typed.
BENCH_DIR = ROOT / "docs" / "bench"
_T0 = time.perf_counter()


def markers(name: str) -> tuple[str, str]:
    """The README markers of benchmark ``name``'s rendered block."""
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


def replace_between(doc: str, begin: str, end: str, text: str) -> str:
    """``doc`` with what lies between ``begin`` and ``end`` replaced by ``text``; all else unchanged.
    Raises ValueError when the markers are missing, repeated or out of order."""
    if doc.count(begin) != 1 or doc.count(end) != 1 or doc.index(begin) > doc.index(end):
        raise ValueError(f"needs exactly one {begin} followed by one {end}")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{text.strip()}\n{end}{tail}"


def write_between(path: Path, text: str, begin: str, end: str) -> None:
    """Rewrite the block between the markers of the file at ``path`` (exit 2 with one line when they are missing)."""
    path = Path(path)
    try:
        doc = path.read_text(encoding="utf-8")
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror or e}")
    try:
        new = replace_between(doc, begin, end, text)
    except ValueError as e:
        fail(f"{path}: {e}")
    path.write_text(new, encoding="utf-8")


def add_json_arg(ap: argparse.ArgumentParser, name: str) -> None:
    ap.add_argument("--json", default=str(BENCH_DIR / f"{name}.json"),
                    help=f"where to write the results (default docs/bench/{name}.json); "
                         "`python benchmarks/render.py README.md` renders them")


def machine() -> dict:
    import os
    import platform
    return {"cpus": os.cpu_count(), "platform": platform.platform(terse=True), "torch": torch.__version__,
            "load_1min": round(os.getloadavg()[0], 2)}


def command() -> str:
    """The command line that ran this script, as a user would type it (paths relative to the checkout)."""
    import shlex
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return "python " + shlex.join([str(script), *sys.argv[1:]])


def save_results(path: str | Path, name: str, settings: str, tables: Sequence[dict] = (),
                 notes: Sequence[str] = (), measured: bool = True, **extra) -> dict:
    """Write one benchmark's results as JSON: ``tables`` are ``{"title", "header", "rows"}``, ``notes`` lines
    of text that are rendered after them; the command line, machine and wall seconds are recorded."""
    import json
    res = {"benchmark": name, "command": command(), "measured": measured, "settings": settings,
           "seconds": round(time.perf_counter() - _T0, 1), "machine": machine(),
           "tables": [{"title": t.get("title", ""), "header": list(t["header"]),
                       "rows": [[c if isinstance(c, (int, float, bool)) or c is None else str(c) for c in r]
                                for r in t["rows"]]} for t in tables],
           "notes": list(notes), **extra}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return res


def render_results(res: dict, name: str | None = None) -> str:
    """Markdown for one benchmark's JSON (see ``save_results``), read from ``docs/bench/<name>.json``."""
    m = res.get("machine") or {}
    src = f"docs/bench/{name or res['benchmark']}.json"
    if res.get("measured", True):
        where = (f"{m.get('cpus', '?')} CPU cores, torch {m.get('torch', '?')}, 1-minute load average "
                 f"{m.get('load_1min', '?')}")
        lines = [f"Generated from `{src}`, written by `{res['command']}` ({res.get('settings', '')}; "
                 f"{where}; {res.get('seconds', '?')} s)."]
    else:
        lines = [f"Not measured in this run: {res.get('reason', 'no reason recorded')}. "
                 f"Command: `{res['command']}` ({res.get('settings', '')}); it writes `{src}`."]
    for t in res.get("tables", []):
        lines.append("")
        if t.get("title"):
            lines += [t["title"], ""]
        lines.append(table(t["header"], t["rows"]))
    if res.get("notes"):
        for n in res["notes"]:
            lines += ["", n]
    return "\n".join(lines)
