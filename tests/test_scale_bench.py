"""benchmarks/scale.py: the README table is rendered from the JSON, between its markers, and nothing else moves."""
from __future__ import annotations

import importlib.util
import json

from conftest import REPO


def _load():
    spec = importlib.util.spec_from_file_location("scale_bench", REPO / "benchmarks" / "scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RES = {"images": 200, "names_engines": 5, "gpu": "not measured: no GPU was lent to this task",
       "machine": {"cpus": 2, "platform": "Linux", "load_before": 1.0, "load_after": 1.5},
       "engines": [{"engine": "local CLI (fusionseg segment)", "wall_s": 20.0, "images_per_s": 10.0, "ratio_vs_local": 1.0},
                   {"engine": "--engine ray, 2 actors", "wall_s": 40.0, "images_per_s": 5.0, "ratio_vs_local": 0.5}],
       "runtimes": {"size": 512, "names": 20, "images": 200, "export_s": 9.0, "pytorch_images_per_s": 3.0,
                    "onnxruntime_images_per_s": 4.5, "ratio_onnx_vs_pytorch": 1.5, "min_label_agreement": 0.9995,
                    "threads": 2}}


def test_render_between_markers(tmp_path):
    mod = _load()
    doc = tmp_path / "README.md"
    doc.write_text(f"intro\n{mod.BEGIN}\nold table\n{mod.END}\noutro\n")
    (tmp_path / "scale.json").write_text(json.dumps(RES))
    mod.write_between(doc, mod.render(RES), mod.BEGIN, mod.END)
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{mod.END}\noutro\n") and "old table" not in text
    assert "| --engine ray, 2 actors | 40.0 | 5.0 | 0.5x |" in text
    assert "| onnxruntime | 4.5 | 1.5x |" in text and "99.9500%" in text and "no GPU was lent" in text


def test_the_readme_has_the_markers():
    mod = _load()
    text = (REPO / "README.md").read_text()
    assert text.count(mod.BEGIN) == 1 and text.count(mod.END) == 1 and text.index(mod.BEGIN) < text.index(mod.END)
