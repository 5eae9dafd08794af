"""benchmarks/render.py: the README's performance blocks are rendered from docs/bench/*.json, between their
markers, and nothing else in the file moves; every block in the README has its JSON."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, load_benchmark


_load = load_benchmark


RES = {"benchmark": "toy", "command": "python benchmarks/toy.py --repeats 1", "measured": True,
       "settings": "2 images, 1 repeat", "seconds": 12.5,
       "machine": {"cpus": 2, "platform": "Linux", "torch": "2.x", "load_1min": 3.5},
       "tables": [{"title": "", "header": ["side", "ms"], "rows": [["ours", "12"], ["peer", "34"]]}],
       "notes": ["Speed-up: 2.83x."]}


def test_render_puts_the_table_between_the_markers_and_keeps_the_rest(tmp_path):
    render = _load("render")
    before = "# Title\n\nProse before, with | pipes | and 999.\n\n"
    middle = "\n\nProse between.\n"
    after = "\nend, no newline"
    doc = (before + "<!-- bench:toy:begin -->\nold typed table 999 ms\n<!-- bench:toy:end -->" + middle +
           "<!-- bench:other:begin -->\n<!-- bench:other:end -->" + after)
    (tmp_path / "toy.json").write_text(json.dumps(RES))
    (tmp_path / "other.json").write_text(json.dumps(dict(RES, benchmark="other", measured=False,
                                                           reason="no GPU on this machine", tables=[], notes=[])))
    out = render.render_doc(doc, tmp_path)
    assert out.startswith(before + "<!-- bench:toy:begin -->\n")
    toy, rest = out[len(before) + len("<!-- bench:toy:begin -->\n"):].split("\n<!-- bench:toy:end -->", 1)
    assert rest.startswith(middle + "<!-- bench:other:begin -->\n")
    other, tail = rest[len(middle + "<!-- bench:other:begin -->\n"):].split("\n<!-- bench:other:end -->", 1)
    assert tail == after  # the text outside the blocks is byte for byte what it was
    assert "999" not in toy
    assert "| side | ms |\n|---|---|\n| ours | 12 |\n| peer | 34 |" in toy
    assert "`python benchmarks/toy.py --repeats 1`" in toy and "2 images, 1 repeat" in toy
    assert toy.endswith("Speed-up: 2.83x.") and "docs/bench/toy.json" in toy
    assert other.startswith("Not measured in this run: no GPU on this machine.") and "|" not in other
    assert render.render_doc(out, tmp_path) == out  # rendering twice changes nothing


def test_a_block_without_its_json_is_an_error(tmp_path):
    render = _load("render")
    doc = tmp_path / "README.md"
    text = "a\n<!-- bench:missing:begin -->\n<!-- bench:missing:end -->\nb\n"
    doc.write_text(text)
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "render.py"), str(doc), "--bench-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "missing" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert doc.read_text() == text  # nothing written
    with pytest.raises(ValueError):
        render.render_doc(text, tmp_path)


def test_replace_between_refuses_missing_or_repeated_markers():
    common = _load("_common")
    b, e = common.markers("x")
    with pytest.raises(ValueError):
        common.replace_between("no markers", b, e, "t")
    with pytest.raises(ValueError):
        common.replace_between(f"{b}{e}{b}{e}", b, e, "t")
    with pytest.raises(ValueError):
        common.replace_between(f"{e} {b}", b, e, "t")
    assert common.replace_between(f"A{b}old{e}Z", b, e, "new") == f"A{b}\nnew\n{e}Z"


def test_every_readme_block_has_its_json_and_is_rendered_from_it():
    render = _load("render")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    names = render.block_names(readme)
    assert names, "the README's Performance section has no rendered blocks"
    assert len(names) == len(set(names))
    for name in names:
        path = REPO / "docs" / "bench" / f"{name}.json"
        assert path.is_file(), f"README block {name!r} has no {path}"
        res = json.loads(path.read_text())
        assert res["command"].startswith("python benchmarks/") and isinstance(res["measured"], bool)
        if not res["measured"]:
            assert res.get("reason") and not res["tables"]
    # the README is what the renderer makes of it: nobody edited a block by hand
    assert render.render_doc(readme, REPO / "docs" / "bench") == readme


def test_every_benchmark_script_has_a_json_option():
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        if script.name.startswith("_") or script.name == "render.py":
            continue
        text = script.read_text(encoding="utf-8")
        assert "C.add_json_arg(" in text or '"--json"' in text, f"{script.name} has no --json option"
        assert "save_results(" in text or "json.dumps(res" in text, f"{script.name} does not write its JSON"
