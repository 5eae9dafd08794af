"""The README's examples, run as written against the shipped default model (offline), so they cannot drift:
the Python API snippet under "Use" and the example response of the server's `POST /v1/segment`."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
CAT = REPO / "examples" / "cat_toilet.jpg"
DEFAULT_WEIGHTS = REPO / "src" / "fusionseg" / "weights" / "default.safetensors"
pytestmark = pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="default weights not built yet")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def api_snippet() -> str:
    found = [b for b in python_blocks() if "from fusionseg import Segmenter" in b]
    assert len(found) == 1, "README should hold one Python block that imports Segmenter (the API example)"
    return found[0]


@pytest.fixture(scope="module")
def default_segmenter():
    import torch
    from fusionseg.segmenter import Segmenter
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield Segmenter.from_pretrained("default", device="cpu")
    torch.set_num_threads(threads)


def test_api_snippet_runs_as_written(tmp_path, monkeypatch, default_segmenter):
    code = api_snippet()
    assert 'Segmenter.from_pretrained("default")' in code and 'seg.predict("photo.jpg"' in code
    shutil.copy(CAT, tmp_path / "photo.jpg")  # the snippet's placeholder photo
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md (Python API example)", "exec"), ns)
    pred = ns["pred"]
    names = [n.strip().strip('"') for n in re.search(r"seg\.predict\([^,]+,\s*\[(.*?)\]\)", code).group(1).split(",")]
    assert pred.class_names == names
    # the comments beside pred.labels / pred.scores state shape and dtype: hold the code to them
    for attr in ("labels", "scores"):
        m = re.search(rf"pred\.{attr}\s*#\s*\(H, W\)\s*(\w+)", code)
        assert m, f"README's comment on pred.{attr} no longer states (H, W) and a dtype"
        arr = getattr(pred, attr)
        assert isinstance(arr, np.ndarray) and arr.shape == (522, 640) and arr.dtype == np.dtype(m.group(1))
    assert pred.labels.max() <= len(names) and (pred.labels == 0).any() and (pred.labels == 1).any()  # 0 = none
    assert 0.0 <= float(pred.scores.min()) and float(pred.scores.max()) <= 1.0  # sigmoid scores


def example_response() -> str:
    """The commented response under README's `curl ... examples/cat_toilet.jpg ... /v1/segment`."""
    m = re.search(r"curl -s -F image=@examples/cat_toilet\.jpg -F classes=\"([^\"]+)\"[^\n]*/v1/segment\n"
                  r"((?:\s*#[^\n]*\n)+)", README)
    assert m, "README's example request with examples/cat_toilet.jpg and its response is gone"
    return m.group(1), " ".join(line.strip()[1:].strip() for line in m.group(2).splitlines())


def test_serve_example_response_matches_the_server(default_segmenter):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    pytest.importorskip("python_multipart", reason="python-multipart is not installed")
    try:
        from fastapi.testclient import TestClient
    except Exception as e:  # starlette's TestClient needs httpx2 (or httpx)
        pytest.skip(f"starlette's TestClient is unavailable: {e}")
    from fusionseg.serve import ServeConfig, create_app
    classes, shown = example_response()
    with TestClient(create_app(ServeConfig(), segmenter=default_segmenter)) as c:
        r = c.post("/v1/segment", files={"image": ("cat_toilet.jpg", CAT.read_bytes(), "image/jpeg")},
                   data={"classes": classes})
    assert r.status_code == 200, r.text
    got = r.json()
    first = shown.index('"per_class"')
    top, item = shown[:first] + shown[shown.index("]", first):], shown[first:shown.index("]", first)]
    for part, real in ((top, got), (item, got["per_class"][0])):
        for key, raw in re.findall(r'"(\w+)":((?:\[[^\]]*\])|(?:"[^"]*")|(?:[-\d.]+)|true|false|\.\.\.)', part):
            assert key in real, f"README's example response shows {key!r}; the server's has {sorted(real)}"
            if raw != "..." and not raw.endswith('..."'):  # values shown literally must be the server's
                assert json.loads(raw) == real[key], f"README shows {key}={raw}, the server gives {real[key]!r}"
