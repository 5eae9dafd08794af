"""`fusionseg serve` API in-process: a real image with the default model, every bad input as a 4xx JSON,
limits, the bounded pool (503 + Retry-After, 504), internal errors as 500 JSON, the page's files."""
from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'fusionseg[serve]')")
pytest.importorskip("python_multipart", reason="python-multipart is not installed")
pytest.importorskip("uvicorn", reason="uvicorn is not installed")
try:
    from fastapi.testclient import TestClient
except Exception as e:  # starlette's TestClient needs httpx2 (or httpx)
    pytest.skip(f"starlette's TestClient is unavailable: {e}", allow_module_level=True)

from fusionseg.cli import main  # noqa: E402
from fusionseg.segmenter import Prediction  # noqa: E402
from fusionseg.serve import ServeConfig, create_app, serve_in_thread  # noqa: E402
from fusionseg.serve.app import Service  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CAT = REPO / "examples" / "cat_toilet.jpg"


# --------------------------------------------------------------------------------------------------- helpers
def jpeg_bytes(w: int = 64, h: int = 48, colour=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_declaring(w: int, h: int) -> bytes:
    """A small PNG whose header declares ``w`` x ``h`` pixels (a decompression bomb's header)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def decode_png(b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))))


class StubSegmenter:
    """Stands in for Segmenter: left half class 1, right half none; optional delay or failure."""

    meta = {"image_encoder": {"name": "stub-img"}, "text_encoder": {"name": "stub-txt"},
            "config": {"preset": "tiny"}, "training": {"vocabulary": ["cat", "dog"], "parameters": 1}}
    size, threshold, decision, device = 64, 0.5, "threshold", "cpu"

    def __init__(self, delay: float = 0.0, fail: bool = False, gate: threading.Event | None = None):
        self.delay, self.fail, self.gate = delay, fail, gate
        self.calls = 0

    def predict(self, img, names, threshold=None, background=False):
        self.calls += 1
        if self.gate is not None:  # held until the test opens it: no race against the machine's speed
            assert self.gate.wait(30), "the test never opened the gate"
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("stub failure")
        W, H = img.size
        labels = np.zeros((H, W), np.uint16)
        labels[:, : W // 2] = 1
        return Prediction(labels, np.full((H, W), 0.75, np.float32), list(names))


@pytest.fixture(scope="module")
def real_client():
    import torch
    from fusionseg.segmenter import Segmenter
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    seg = Segmenter.from_pretrained("default", device="cpu")
    app = create_app(ServeConfig(max_classes=20), segmenter=seg)
    with TestClient(app) as c:
        yield c
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stub_client():
    app = create_app(ServeConfig(max_classes=5, max_pixels=200 * 200, max_upload_bytes=50_000),
                     segmenter=StubSegmenter())
    with TestClient(app) as c:
        yield c


def post(c, image: bytes | None = None, classes: str | bytes | None = "cat, dog", filename="x.jpg", **fields):
    """POST multipart/form-data (always multipart, as a browser's FormData, even without a file)."""
    data = {} if classes is None else {"classes": classes}
    data.update({k: str(v) for k, v in fields.items()})
    if image is not None:
        return c.post("/v1/segment", files={"image": (filename, image, "image/jpeg")}, data=data)
    body = b"".join(f'--nofile\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                    for k, v in data.items()) + b"--nofile--\r\n"
    return c.post("/v1/segment", content=body, headers={"content-type": "multipart/form-data; boundary=nofile"})


def assert_error(r, status: int, *words: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    for w in words:
        assert w.lower() in body["error"].lower(), body["error"]
    return body["error"]


# --------------------------------------------------------------------------------------------------- real model
def test_real_image_gives_label_map_of_its_size(real_client):
    r = post(real_client, CAT.read_bytes(), "cat, toilet, sink", filename="cat_toilet.jpg", overlay="true",
             scores="true")
    assert r.status_code == 200, r.text
    j = r.json()
    W, H = Image.open(CAT).size
    assert (j["width"], j["height"]) == (W, H) == (640, 522)
    assert j["classes"] == ["cat", "toilet", "sink"]
    assert [p["name"] for p in j["per_class"]] == ["cat", "toilet", "sink"]
    assert [p["label"] for p in j["per_class"]] == [1, 2, 3]
    labels = decode_png(j["label_png"])
    assert labels.shape == (H, W) and labels.max() <= 3
    # the reported area fractions are those of the label map
    for p in j["per_class"]:
        assert p["area_fraction"] == pytest.approx((labels == p["label"]).mean(), abs=1e-5)
        assert p["color"].startswith("#") and len(p["color"]) == 7
    assert j["none_fraction"] + sum(p["area_fraction"] for p in j["per_class"]) == pytest.approx(1.0, abs=1e-4)
    cat = j["per_class"][0]
    assert cat["area_fraction"] > 0.15 and cat["mean_score"] >= 0.5  # the cat fills a good part of the photo
    assert decode_png(j["score_png"]).shape == (H, W)
    ov = Image.open(io.BytesIO(base64.b64decode(j["overlay_png"])))
    assert ov.size[0] > W and ov.size[1] >= H  # the photo plus the legend strip on the right
    assert j["threshold"] == 0.3 and j["seconds"] > 0  # the shipped default's own threshold (MODEL_CARD.md)
    assert j["decision"] == "relative"  # no threshold given: the model's own decision, as the CLI decides


def test_the_response_says_how_none_was_decided_and_matches_the_segmenter(real_client):
    """No threshold: the model's own (relative) decision, the label map the CLI and the Python API give; a
    threshold: the threshold decision; background: the plain arg-max. The page leaves the threshold out unless a
    user types one, so it shows what the CLI shows."""
    from fusionseg.segmenter import Segmenter
    seg = Segmenter.from_pretrained("default")
    img = Image.open(CAT).convert("RGB")
    j = post(real_client, CAT.read_bytes(), "cat, toilet, sink").json()
    assert j["decision"] == "relative"
    assert np.array_equal(decode_png(j["label_png"]), seg.predict(img, ["cat", "toilet", "sink"]).labels)
    t = post(real_client, CAT.read_bytes(), "cat, toilet, sink", threshold="0.3").json()
    assert t["decision"] == "threshold" and t["threshold"] == 0.3
    assert np.array_equal(decode_png(t["label_png"]),
                          seg.predict(img, ["cat", "toilet", "sink"], threshold=0.3).labels)
    b = post(real_client, CAT.read_bytes(), "cat, toilet, sink", background="true").json()
    assert b["decision"] == "argmax" and b["threshold"] is None
    assert real_client.get("/v1/model").json()["decision"] == "relative"


def test_classes_as_json_list_and_threshold(real_client):
    r = post(real_client, CAT.read_bytes(), json.dumps(["cat", "toilet"]), threshold="0.9")
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["classes"] == ["cat", "toilet"] and j["threshold"] == 0.9
    assert "overlay_png" not in j and "score_png" not in j
    loose = post(real_client, CAT.read_bytes(), "cat, toilet", threshold="0.1").json()
    # a higher threshold leaves more pixels as "none of these"
    assert j["none_fraction"] > loose["none_fraction"]


def test_model_health_openapi(real_client):
    m = real_client.get("/v1/model").json()
    assert m["image_encoder"]["name"] == "efficientnet-lite0" and m["text_encoder"]["name"] == "minilm-l6"
    assert m["preset"] == "small" and "cat" in m["classes_seen_in_training"]
    assert m["limits"]["max_classes"] == 20
    assert m["test_time"] == {"scales": [1.0], "flip": False, "bridge_size": 320}
    h = real_client.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    api = real_client.get("/openapi.json").json()
    seg = api["paths"]["/v1/segment"]["post"]
    schema = seg["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "classes", "threshold"} <= set(schema["properties"]) and schema["required"] == ["image", "classes"]
    assert "/healthz" in api["paths"] and "/v1/model" in api["paths"]


# --------------------------------------------------------------------------------------------------- bad input
def _truncated_jpeg() -> bytes:
    """The first half of a real photo's JPEG (a crop of the demo image, small enough for the stub's limits)."""
    buf = io.BytesIO()
    Image.open(CAT).crop((200, 100, 380, 280)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    return data[: len(data) // 2]


@pytest.mark.parametrize("case", [
    "no_file", "empty_file", "not_image", "truncated", "bomb", "too_many_pixels", "too_many_bytes",
    "too_many_classes", "empty_classes", "blank_classes", "blank_name", "duplicate", "json_not_strings",
    "bad_json", "threshold_high", "threshold_low", "threshold_nan", "threshold_text", "no_classes",
    "unknown_field", "bad_flag"])
def test_bad_input_is_a_4xx_json(stub_client, case):
    c = stub_client
    img = jpeg_bytes()
    r = {
        "no_file": lambda: post(c, None),
        "empty_file": lambda: post(c, b""),
        "not_image": lambda: post(c, b"hello, this is not an image at all"),
        "truncated": lambda: post(c, _truncated_jpeg()),
        "bomb": lambda: post(c, png_declaring(100_000, 100_000), filename="bomb.png"),
        "too_many_pixels": lambda: post(c, jpeg_bytes(300, 300)),
        "too_many_bytes": lambda: post(c, CAT.read_bytes()),
        "too_many_classes": lambda: post(c, img, "a, b, c, d, e, f"),
        "empty_classes": lambda: post(c, img, ""),
        "blank_classes": lambda: post(c, img, "   "),
        "blank_name": lambda: post(c, img, "cat, , dog"),
        "duplicate": lambda: post(c, img, "cat, dog, Cat"),
        "json_not_strings": lambda: post(c, img, '["cat", 3]'),
        "bad_json": lambda: post(c, img, '["cat", "dog"'),
        "threshold_high": lambda: post(c, img, threshold="1.5"),
        "threshold_low": lambda: post(c, img, threshold="-0.1"),
        "threshold_nan": lambda: post(c, img, threshold="nan"),
        "threshold_text": lambda: post(c, img, threshold="high"),
        "no_classes": lambda: post(c, img, None),
        "unknown_field": lambda: post(c, img, colour="red"),
        "bad_flag": lambda: post(c, img, overlay="maybe"),
    }[case]()
    expect = {
        "no_file": (400, "no image"), "empty_file": (400, "empty"), "not_image": (400, "not an image"),
        "truncated": (400, "truncated"), "bomb": (413, "pixels"), "too_many_pixels": (413, "300 x 300"),
        "too_many_bytes": (413, "bytes"), "too_many_classes": (400, "limit is 5"),
        "empty_classes": (400, "empty"), "blank_classes": (400, "empty"), "blank_name": (400, "blank"),
        "duplicate": (400, "duplicate"), "json_not_strings": (400, "list of strings"),
        "bad_json": (400, "json"), "threshold_high": (400, "[0, 1]"), "threshold_low": (400, "[0, 1]"),
        "threshold_nan": (400, "[0, 1]"), "threshold_text": (400, "number"), "no_classes": (400, "no classes"),
        "unknown_field": (400, "colour"), "bad_flag": (400, "overlay"),
    }[case]
    assert_error(r, *expect)


def test_bomb_is_refused_without_decoding(stub_client):
    t0 = time.time()
    r = post(stub_client, png_declaring(60_000, 60_000), filename="bomb.png")
    assert_error(r, 413, "60000 x 60000")
    assert time.time() - t0 < 5.0  # 3.6 gigapixels were never allocated (decoding them takes minutes)


def test_wrong_content_type_and_bad_multipart(stub_client):
    c = stub_client
    assert_error(c.post("/v1/segment", json={"classes": "cat"}), 415, "multipart/form-data", "application/json")
    assert_error(c.post("/v1/segment", data={"classes": "cat"}), 415, "x-www-form-urlencoded")
    assert_error(c.post("/v1/segment", content=b"cat", headers={"content-type": "text/plain"}), 415)
    assert_error(c.post("/v1/segment", content=b"x"), 415)
    assert_error(c.post("/v1/segment", content=b"--xyz\r\n", headers={"content-type": "multipart/form-data"}),
                 400, "boundary")
    broken = (b'--xyz\r\nContent-Disposition: form-data; name="classes"\r\n\r\ncat\r\n--xyz\r\n'
              b'Content-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n' + jpeg_bytes())
    assert_error(c.post("/v1/segment", content=broken, headers={"content-type": "multipart/form-data; boundary=xyz"}),
                 400, "incomplete")
    assert_error(c.post("/v1/segment", content=b"", headers={"content-type": "multipart/form-data; boundary=xyz"}),
                 400, "empty")


def test_non_utf8_class_string(stub_client):
    body = (b'--b0und\r\nContent-Disposition: form-data; name="classes"\r\n\r\ncaf\xe9, dog\r\n'
            b'--b0und\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            b'Content-Type: image/jpeg\r\n\r\n' + jpeg_bytes() + b'\r\n--b0und--\r\n')
    r = stub_client.post("/v1/segment", content=body, headers={"content-type": "multipart/form-data; boundary=b0und"})
    assert_error(r, 400, "utf-8", "classes")
    # the same body in UTF-8 is fine
    ok = stub_client.post("/v1/segment", content=body.replace(b"caf\xe9", "café".encode()),
                          headers={"content-type": "multipart/form-data; boundary=b0und"})
    assert ok.status_code == 200 and ok.json()["classes"] == ["café", "dog"]


def test_repeated_field_and_unknown_path(stub_client):
    c = stub_client
    r = c.post("/v1/segment", files=[("image", ("a.jpg", jpeg_bytes(), "image/jpeg")),
                                     ("image", ("b.jpg", jpeg_bytes(), "image/jpeg"))], data={"classes": "cat"})
    assert_error(r, 400, "sent 2 times")
    assert_error(c.get("/v2/segment"), 404, "/v2/segment")
    assert_error(c.get("/v1/segment"), 405, "GET")


def test_server_keeps_serving_after_bad_input(stub_client):
    for bad in (b"", b"junk", _truncated_jpeg(), png_declaring(100_000, 100_000)):
        assert 400 <= post(stub_client, bad).status_code < 500
    r = post(stub_client, jpeg_bytes(40, 30), "cat, dog")
    assert r.status_code == 200
    j = r.json()
    labels = decode_png(j["label_png"])
    assert labels.shape == (30, 40) and (labels[:, :20] == 1).all() and (labels[:, 20:] == 0).all()
    assert j["per_class"][0]["area_fraction"] == 0.5 and j["per_class"][1]["area_fraction"] == 0.0


def test_internal_error_is_a_500_json_and_serving_goes_on():
    seg = StubSegmenter(fail=True)
    with TestClient(create_app(ServeConfig(), segmenter=seg), raise_server_exceptions=False) as c:
        r = post(c, jpeg_bytes())
        assert_error(r, 500, "internal error", "RuntimeError")
        seg.fail = False
        assert post(c, jpeg_bytes()).status_code == 200


# --------------------------------------------------------------------------------------------------- pool
def _post_urllib(url: str, image: bytes, classes: str = "cat") -> tuple[int, dict, dict]:
    boundary = "fsTestBoundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="classes"\r\n\r\n{classes}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            f'Content-Type: image/jpeg\r\n\r\n').encode() + image + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url + "/v1/segment", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def _wait_for(cond, what: str, limit: float = 30.0) -> None:
    t_end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < t_end, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_beyond_the_queue_is_503_with_retry_after():
    gate = threading.Event()
    seg = StubSegmenter(gate=gate)
    app = create_app(ServeConfig(workers=1, queue=1), segmenter=seg)
    results: list = []
    with serve_in_thread(app) as url:
        ts = [threading.Thread(target=lambda: results.append(_post_urllib(url, jpeg_bytes()))) for _ in range(5)]
        for t in ts:
            t.start()
        # the gate holds the one running request, so 1 running + 1 queued fill the capacity of 2;
        # the other three are refused at once, whatever the order the five arrive in
        _wait_for(lambda: len(results) == 3, "three refusals")
        assert sorted(r[0] for r in results) == [503, 503, 503], results
        assert app.state.service.busy == 2 and seg.calls == 1
        gate.set()
        for t in ts:
            t.join()
        codes = sorted(r[0] for r in results)
        assert codes == [200, 200, 503, 503, 503], codes
        busy = [r for r in results if r[0] == 503][0]
        assert int(busy[1]["retry-after"]) >= 1 and "busy" in busy[2]["error"]
        assert seg.calls == 2
        # capacity comes back once the work is done
        assert _post_urllib(url, jpeg_bytes())[0] == 200
        assert app.state.service.busy == 0


def test_request_time_limit_is_504_and_slot_freed():
    gate = threading.Event()
    seg = StubSegmenter(gate=gate)
    app = create_app(ServeConfig(workers=1, queue=0, timeout=0.2), segmenter=seg)
    with serve_in_thread(app) as url:
        code, _, body = _post_urllib(url, jpeg_bytes())
        assert code == 504 and "0.2 s" in body["error"]
        # the timed-out work still runs in its worker and holds the only slot until it ends ...
        assert app.state.service.busy == 1
        assert _post_urllib(url, jpeg_bytes())[0] == 503
        gate.set()
        # ... then the slot is free again
        _wait_for(lambda: app.state.service.busy == 0, "the slot to be freed")
        assert _post_urllib(url, jpeg_bytes())[0] == 200


def test_text_cache_is_bounded():
    """The server's Segmenter keeps an LRU of at most ``text_cache`` class-name embeddings (memory stays flat
    however many distinct names clients send)."""
    svc = Service(ServeConfig(text_cache=10))
    try:
        assert svc.seg.text_cache.maxsize == 10
        svc.seg.text_embeddings([f"name{i}" for i in range(25)])
        assert len(svc.seg.text_cache) == 10
    finally:
        svc.close()


def test_server_wide_test_time_augmentation_reaches_every_request():
    """``serve --tta-scales 1,1.4 --tta-flip``: the server's Segmenter averages the views (its label maps differ
    from one pass) and /v1/model says so; a bad list is one line at the CLI, before any model loads."""
    svc = Service(ServeConfig(tta_scales=(1.0, 1.4), tta_flip=True))
    try:
        assert svc.seg.tta and svc.seg.tta_scales == (1.0, 1.4) and svc.seg.tta_flip
        assert svc.model_info()["test_time"] == {"scales": [1.0, 1.4], "flip": True, "bridge_size": 320}
        img = Image.open(CAT).convert("RGB")
        one = svc.seg.predict(img, ["cat", "toilet"], decision="relative")
        from fusionseg.segmenter import Segmenter
        plain = Segmenter(svc.seg.model, svc.seg.meta).predict(img, ["cat", "toilet"], decision="relative")
        assert one.labels.shape == plain.labels.shape and not np.array_equal(one.scores, plain.scores)
    finally:
        svc.close()
    with pytest.raises(ValueError, match="between"):
        ServeConfig(tta_scales=(9.0,)).check()


def test_cli_serve_bad_test_time_scales(capsys):
    assert main(["serve", "--tta-scales", "1,9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--tta-scales" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------------------------------- page
def test_page_and_its_files_are_served_offline(stub_client):
    c = stub_client
    html = c.get("/")
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    for needle in ('id="file"', 'id="classes"', 'id="segment"', 'id="overlay"', 'id="legend"', 'id="chart"',
                   'id="download-label"', 'id="download-overlay"', 'id="error"'):
        assert needle in html.text
    total = 0
    for path in ("/static/app.js", "/static/style.css"):
        r = c.get(path)
        assert r.status_code == 200 and len(r.content) > 500
        assert "http://" not in r.text and "https://" not in r.text  # no CDN: everything from this server
    assert "http://" not in html.text and "https://" not in html.text
    ex = c.get("/v1/examples").json()
    assert len(ex) == 3 and all(e["credit"] and e["classes"] for e in ex)
    for e in ex:
        r = c.get(e["url"])
        assert r.status_code == 200
        total += len(r.content)
        assert max(Image.open(io.BytesIO(r.content)).size) == 480
    assert total < 300_000


# --------------------------------------------------------------------------------------------------- CLI
def test_cli_serve_bad_port_and_port_in_use(capsys):
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        assert main(["serve", "--port", str(s.getsockname()[1])]) == 2
        err = capsys.readouterr().err.strip()
        assert "in use" in err and len(err.splitlines()) == 1
    finally:
        s.close()
    assert main(["serve", "--workers", "0"]) == 2
    assert "--workers must be in [1, 256], got 0" in capsys.readouterr().err
