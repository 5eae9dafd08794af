"""BatchPredictor: the object Ray Data's map_batches and Spark's predict_batch_udf call on batches of images."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import shared_data

from fusionseg import BatchPredictor
from fusionseg.segmenter import Segmenter

NAMES = ["grass", "cow", "sky", "building"]


@pytest.fixture(scope="module")
def photos():
    return [str(p) for p in sorted(shared_data("msrc_v2/images").glob("*.jpg"))[1:4]]


@pytest.fixture(scope="module")
def predictor():
    # As Ray Data builds it: the class, then fn_constructor_kwargs.
    return BatchPredictor(**{"classes": "grass, cow, sky, building", "model": "default"})


def test_constructor_embeds_names_once_and_calls_reuse_them(predictor, photos):
    cache = predictor.segmenter.text_cache
    assert all(predictor.segmenter._text_key(n) in cache for n in NAMES)
    misses = cache.misses
    predictor({"path": np.array(photos[:1])})
    assert cache.misses == misses  # no name embedded again


def test_paths_bytes_and_arrays_give_the_segmenter_labels(predictor, photos, tmp_path):
    seg = predictor.segmenter
    want = [seg.predict(p, NAMES).labels for p in photos]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    ids = np.array(["a", "b", "c", "d"], dtype=object)
    out = predictor({"path": np.array(photos + [str(bad)]), "id": ids})
    assert list(out["status"]) == ["ok", "ok", "ok", "error"]
    assert list(out["id"]) == list(ids)
    assert out["error"][3].startswith(str(bad)) and "not an image" in out["error"][3] and out["error"][0] == ""
    assert out["fractions"].shape == (4, len(NAMES)) and out["mean_scores"].shape == (4, len(NAMES))
    for i, w in enumerate(want):
        assert np.array_equal(out["labels"][i], w)
        assert (out["width"][i], out["height"][i]) == (w.shape[1], w.shape[0])
        frac = np.bincount(w.ravel(), minlength=len(NAMES) + 1) / w.size
        assert np.allclose(out["fractions"][i], frac[1:], atol=1e-6) and abs(out["none_fraction"][i] - frac[0]) < 1e-6
        present = frac[1:] > 0
        assert np.isnan(out["mean_scores"][i][~present]).all()
        # the threshold decision keeps only pixels at or above it; the relative one any score above 0
        floor = seg.threshold if seg.decision == "threshold" else 0.0
        assert (out["mean_scores"][i][present] >= floor).all() and (out["mean_scores"][i][present] > 0).all()
    assert out["fractions"][3].sum() == 0 and out["labels"][3].size == 0
    assert any(out["fractions"][:3, 0] > 0.05)  # grass is found on these MSRC photos

    blobs = np.array([open(p, "rb").read() for p in photos], dtype=object)
    by_bytes = predictor({"bytes": blobs})
    arrays = np.empty(len(photos), dtype=object)
    arrays[:] = [np.asarray(Image.open(p).convert("RGB")) for p in photos]
    by_array = predictor({"image": arrays})
    for i, w in enumerate(want):
        assert np.array_equal(by_bytes["labels"][i], w)
        assert np.array_equal(by_array["labels"][i], w)


def test_png_output_round_trips_and_none_output_is_lean(photos):
    p = BatchPredictor(NAMES, output="png", mode="fusion")
    out = p({"path": photos[:1]})
    labels = np.array(Image.open(io.BytesIO(out["labels"][0])))
    assert np.array_equal(labels, Segmenter(p.segmenter.model, p.segmenter.meta, mode="fusion").predict(photos[0], NAMES).labels)
    p.output = "none"
    assert "labels" not in p({"path": photos[:1]})


def test_bad_batches_and_arguments(predictor):
    with pytest.raises(ValueError, match="needs a 'path', 'bytes' or 'image' column"):
        predictor({"pixels": np.zeros(1)})
    with pytest.raises(ValueError, match="output must be one of"):
        BatchPredictor(NAMES, output="jpeg")
    with pytest.raises(ValueError, match="class list is empty"):
        BatchPredictor("")


def test_ray_data_map_batches_gives_the_segmenter_labels(predictor, tmp_path):
    """Ray Data itself: read_binary_files -> map_batches(BatchPredictor, fn_constructor_kwargs, concurrency=2) on a
    local Ray, 6 real photos and a corrupt file; the rows carry the labels and fractions of Segmenter.predict."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'fusionseg[ray]')")
    pytest.importorskip("pandas", reason="Ray Data needs pandas (pip install 'fusionseg[ray]')")
    pytest.importorskip("pyarrow", reason="Ray Data needs pyarrow (pip install 'fusionseg[ray]')")
    import logging

    import ray.data
    import torch
    photos = [str(p) for p in sorted(shared_data("msrc_v2/images").glob("*.jpg"))[:6]]
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    # A Ray actor with one CPU runs torch on one thread; the reference does too (a different thread count can
    # flip a pixel whose two best scores tie to the last bit -- one pixel of photo 3 at 2 threads).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = {p: predictor.segmenter.predict(p, NAMES) for p in photos}
    finally:
        torch.set_num_threads(threads)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        # The reads take no CPU: with two 1-CPU actors on 2 CPUs a 1-CPU read would wait forever (tried: it hangs).
        ds = ray.data.read_binary_files(photos + [str(bad)], include_paths=True, num_cpus=0)
        rows = ds.map_batches(BatchPredictor, fn_constructor_kwargs={"classes": NAMES, "threads": 1},
                              batch_size=3, concurrency=2).take_all()
    finally:
        ray.shutdown()
    by_path = {r["path"]: r for r in rows}
    assert sorted(by_path) == sorted(photos + [str(bad)]) and len(rows) == 7
    assert by_path[str(bad)]["status"] == "error" and str(bad) in by_path[str(bad)]["error"]
    for p, w in want.items():
        r = by_path[p]
        assert r["status"] == "ok" and r["error"] == ""
        assert np.array_equal(r["labels"], w.labels)
        frac = np.bincount(w.labels.ravel(), minlength=len(NAMES) + 1) / w.labels.size
        assert np.allclose(r["fractions"], frac[1:], atol=1e-6) and (r["width"], r["height"]) == w.labels.shape[::-1]
    assert sum(by_path[p]["fractions"][0] > 0.05 for p in photos) >= 2  # grass is found on these MSRC photos
