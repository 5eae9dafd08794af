"""`fusionseg segment --engine ray` on a local Ray instance (num_cpus=2, two actors) over real shared images.

One Ray instance serves the whole module (starting one costs ~10 s here); the engine joins it as it finds it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_cli, shared_data

ray = pytest.importorskip("ray")

NAMES = "grass, cow, sky, building, tree"
SIZE = "192"  # working size for both runs: the comparison holds at any size, and this keeps the suite lean


@pytest.fixture(scope="module")
def cluster():
    import logging
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, list[str]]:
    """48 real MSRC photos and one corrupt file, as a .txt list of paths."""
    src = sorted(shared_data("msrc_v2/images").glob("*.jpg"))[:48]
    d = tmp_path_factory.mktemp("inputs")
    bad = d / "zz_corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    paths = [str(p) for p in src] + [str(bad)]
    lst = d / "list.txt"
    lst.write_text("# images to segment\n" + "\n".join(paths) + "\n")
    return lst, paths


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


def test_ray_matches_local_cli_and_reports_the_corrupt_file(cluster, inputs, tmp_path, capsys):
    lst, paths = inputs
    code, _, err = run_cli(["segment", *paths[:-1], "--classes", NAMES, "--out", tmp_path / "local",
                            "--no-overlay", "--size", SIZE], capsys)
    assert code == 0, err
    code, out, err = run_cli(["segment", lst, "--classes", NAMES, "--out", tmp_path / "ray", "--no-overlay",
                              "--size", SIZE, "--engine", "ray", "--actors", "2", "--batch-size", "4"], capsys)
    assert code == 3, err  # as the local engine: some images failed, the others were written
    assert "49 images: 48 ok (0 already done), 1 errors" in out and "1 of 49 images failed" in err
    assert "segment (ray)" in err  # progress bar on stderr
    rows = _rows(tmp_path / "ray")
    assert [r["path"] for r in rows] == paths  # one row per input, input order
    bad = rows[-1]
    assert bad["status"] == "error" and "zz_corrupt.jpg" in bad["error"] and bad["fractions"] is None
    for p, r in zip(paths[:-1], rows):
        assert r["status"] == "ok" and r["error"] is None
        stem = Path(p).stem
        a = np.array(Image.open(tmp_path / "local" / f"{stem}.png"))
        b = np.array(Image.open(tmp_path / "ray" / f"{stem}.png"))
        assert a.shape == b.shape and np.array_equal(a, b), stem
        assert r["size"] == [a.shape[1], a.shape[0]]
        local = json.loads((tmp_path / "local" / f"{stem}.json").read_text())
        assert r["fractions"] == {n: v["pixel_fraction"] for n, v in local["per_class"].items()}
        assert abs(sum(r["fractions"].values()) + r["none_fraction"] - 1) < 1e-4
    assert any(r["fractions"]["grass"] > 0.05 for r in rows[:-1])  # not all empty maps

    # Rerun: finished images are skipped, the failed one is retried (and fails again), the index stays whole.
    before = {p: os.stat(tmp_path / "ray" / f"{Path(p).stem}.json").st_mtime_ns for p in paths[:-1]}
    code, out, _ = run_cli(["segment", lst, "--classes", NAMES, "--out", tmp_path / "ray", "--no-overlay",
                            "--size", SIZE, "--engine", "ray", "--actors", "1"], capsys)
    assert code == 3 and "49 images: 48 ok (48 already done), 1 errors" in out
    assert [r["path"] for r in _rows(tmp_path / "ray")] == paths
    assert before == {p: os.stat(tmp_path / "ray" / f"{Path(p).stem}.json").st_mtime_ns for p in paths[:-1]}


def test_other_names_are_not_taken_for_finished_work(inputs, tmp_path):
    from fusionseg.scale.ray_engine import completed
    _, paths = inputs
    stem = Path(paths[0]).stem
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(tmp_path / f"{stem}.png")
    (tmp_path / f"{stem}.json").write_text(json.dumps(
        {"width": 6, "height": 4, "classes": ["grass"], "image": paths[0], "none_fraction": 0.25,
         "per_class": {"grass": {"label": 1, "pixel_fraction": 0.75, "mean_score": 0.9}}}))
    row = completed(tmp_path, paths[0], ["grass"])
    assert row == {"path": paths[0], "status": "ok", "error": None, "size": [6, 4], "fractions": {"grass": 0.75},
                   "none_fraction": 0.25}
    assert completed(tmp_path, paths[0], ["grass", "cow"]) is None  # other names: redo
    assert completed(tmp_path, paths[1], ["grass"]) is None  # no outputs
    (tmp_path / f"{stem}.png").unlink()
    assert completed(tmp_path, paths[0], ["grass"]) is None  # label map missing: redo


def test_address_that_does_not_answer_fails_fast(tmp_path, inputs, capsys, monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as a fresh process would see it
    t0 = time.time()
    code, _, err = run_cli(["segment", inputs[1][0], "--classes", "cow", "--out", tmp_path, "--engine", "ray",
                            "--address", "127.0.0.1:9"], capsys)
    assert code == 2 and time.time() - t0 < 10
    assert err.count("\n") == 1 and "no Ray cluster answers at 127.0.0.1:9" in err
    code, _, err = run_cli(["segment", inputs[1][0], "--classes", "cow", "--out", tmp_path, "--engine", "ray",
                            "--address", "nonsense"], capsys)
    assert code == 2 and "--address must be" in err


def test_ray_missing_names_the_extra(tmp_path, inputs, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code, _, err = run_cli(["segment", inputs[1][0], "--classes", "cow", "--out", tmp_path, "--engine", "ray"], capsys)
    assert code == 2 and err.count("\n") == 1 and "pip install 'fusionseg[ray]'" in err


def test_bad_input_lists_and_outputs(tmp_path, inputs, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    code, _, err = run_cli(["segment", empty, "--classes", "cow", "--out", tmp_path / "o", "--engine", "ray"], capsys)
    assert code == 2 and "input list is empty" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(["segment", inputs[1][0], "--classes", "cow", "--out", blocker / "sub", "--engine", "ray"],
                           capsys)
    assert code == 2 and "cannot write to output folder" in err and err.count("\n") == 1
    code, _, err = run_cli(["segment", inputs[1][0], "--classes", "cow", "--out", "s3://bucket/x", "--engine", "ray"],
                           capsys)
    assert code == 2 and "not a URI" in err
    code, _, err = run_cli(["segment", inputs[1][0], "--classes", "cow", "--out", tmp_path / "o", "--engine", "ray",
                            "--actors", "0"], capsys)
    assert code == 2 and "--actors must be at least 1" in err


@pytest.mark.slow
def test_killed_job_resumes_without_redoing_finished_images(cluster, inputs, tmp_path):
    """A driver killed (SIGKILL) midway; the rerun finishes the rest and leaves finished outputs untouched."""
    lst, paths = inputs
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fusionseg.cli", "segment", str(lst), "--classes", NAMES, "--out", str(out),
           "--no-overlay", "--engine", "ray", "--address", cluster, "--actors", "2", "--batch-size", "2"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("*.json"))) < 10:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.stem: p.stat().st_mtime_ns for p in out.glob("*.json")}
    assert 10 <= len(done) < 48, len(done)
    time.sleep(3)  # the dead driver's actors are reaped by Ray; anything they still wrote counts as done
    done = {p.stem: p.stat().st_mtime_ns for p in out.glob("*.json")}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"49 images: 48 ok ({len(done)} already done), 1 errors" in r.stdout
    assert {s: (out / f"{s}.json").stat().st_mtime_ns for s in done} == done  # not redone
    rows = _rows(out)
    assert [x["path"] for x in rows] == paths and sum(x["status"] == "ok" for x in rows) == 48
