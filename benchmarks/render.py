"""Render every benchmark block of a Markdown file from its JSON: numbers are generated, not typed.

    python benchmarks/render.py README.md

Each ``<!-- bench:NAME:begin -->`` ... ``<!-- bench:NAME:end -->`` block is replaced by the table rendered from
``docs/bench/NAME.json`` (written by ``benchmarks/NAME.py --json ...``); the text around the blocks is left as
it is. A block whose JSON is missing is an error (exit 2, one line), and nothing is written.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BLOCK = re.compile(r"<!-- bench:([a-z0-9_\-]+):begin -->")  # lower case: NAME in prose is no block


def block_names(doc: str) -> list[str]:
    return BLOCK.findall(doc)


def render_doc(doc: str, bench_dir: Path) -> str:
    """``doc`` with every bench block rendered from ``bench_dir/NAME.json``. Raises ValueError naming what is wrong."""
    for name in block_names(doc):
        path = Path(bench_dir) / f"{name}.json"
        if not path.is_file():
            raise ValueError(f"block {name!r} has no results file {path}")
        try:
            res = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {path}: {e}") from None
        begin, end = C.markers(name)
        doc = C.replace_between(doc, begin, end, C.render_results(res, name))
    return doc


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("files", nargs="+", help="Markdown files to render in place (e.g. README.md)")
    ap.add_argument("--bench-dir", default=str(C.BENCH_DIR), help="where the JSON files are (default docs/bench)")
    a = ap.parse_args(argv)
    for f in a.files:
        path = Path(f)
        try:
            doc = path.read_text(encoding="utf-8")
        except OSError as e:
            C.fail(f"cannot read {path}: {e.strerror or e}")
        try:
            new = render_doc(doc, Path(a.bench_dir))
        except ValueError as e:
            C.fail(f"{path}: {e}")
        if new != doc:
            path.write_text(new, encoding="utf-8")
        print(f"{path}: {len(block_names(doc))} blocks rendered")


if __name__ == "__main__":
    main()
