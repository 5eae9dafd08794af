"""The ``fusionseg serve`` application: a demo page at ``/`` and a REST API under ``/v1``.

Decisions:

* **One model, loaded once** at :func:`create_app`; every request runs in a bounded thread pool off the event
  loop (``workers`` threads; at most ``queue`` more requests wait). Beyond that a request is refused at once
  with 503 and ``Retry-After``; a request that takes longer than ``timeout`` seconds gets 504 (its worker
  finishes in the background and its slot is freed only then, so the pool stays bounded).
* **Bad input is always a 4xx JSON** ``{"error": "..."}`` naming what was wrong: the body is read under the
  byte limit before parsing (413), parsed strictly (``form.py``: a non-UTF-8 text field is a 400, where
  Starlette would silently decode it as Latin-1), the image header is checked against the pixel limit before
  any decoding (413: decompression bombs never allocate), and every field is validated before work is
  queued. Unexpected errors are a 500 JSON and the server keeps serving.
* **Memory stays flat**: request bodies and results are dropped after each response; the segmenter's text
  embedding cache (one small vector per distinct class name) is an LRU of ``text_cache`` names.
* The page works offline: HTML, script, style and example images are files of this package. FastAPI's
  ``/docs`` pages load their scripts from a CDN, so they are off; ``/openapi.json`` stays.
"""

import asyncio
import base64
import io
import json
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from ..data.io import DEFAULT_MAX_PIXELS
from ..names import MAX_NAME_CHARS, parse_class_names  # noqa: F401  (MAX_NAME_CHARS re-exported)
from .form import FormError, Part, boundary_of, parse_multipart

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass
class ServeConfig:
    """Server settings; every limit is enforced per request.

    model: ``default`` or a checkpoint path; device: ``cpu`` / ``cuda``; size: working size (longer side, px;
    None = the model's); workers: requests computed at once; queue: requests waiting beyond those;
    max_upload_bytes: largest image file; max_pixels: largest image (width x height, read from the header
    before decoding); max_classes: most class names per request; timeout: seconds before a 504;
    threads: torch CPU threads (0 = torch's choice); text_cache: class-name embeddings kept in memory;
    tta_scales / tta_flip / bridge_size: how every request is read (``Segmenter``'s; each view is a full pass).
    """

    model: str = "default"
    device: str = "cpu"
    size: int | None = None
    workers: int = 1
    queue: int = 8
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS  # the one limit of the CLI, API and server
    max_classes: int = 100
    timeout: float = 60.0
    threads: int = 0
    text_cache: int = 4096
    tta_scales: tuple = (1.0,)
    tta_flip: bool = False
    bridge_size: int | None = None

    def check(self) -> "ServeConfig":
        for k in ("workers", "max_upload_bytes", "max_pixels", "max_classes", "text_cache"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k.replace('_', '-')} must be at least 1, got {getattr(self, k)}")
        if self.queue < 0:
            raise ValueError(f"queue must be >= 0, got {self.queue}")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout}")
        if self.max_classes > 1000:
            raise ValueError(f"max-classes is at most 1000 (the segmenter's limit), got {self.max_classes}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        from ..segmenter import check_tta_scales
        check_tta_scales(self.tta_scales)
        return self


class ApiError(Exception):
    """A request that cannot be served: HTTP ``status``, a message for the client, optional headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# --------------------------------------------------------------------------------------------------- inputs
def parse_classes(raw: str, limit: int) -> list[str]:
    """``"cat, sofa"`` or ``'["cat", "sofa"]'`` -> names, by the one class-name policy (:mod:`fusionseg.names`,
    the same as the CLI's and the API's). ApiError(400) on bad input."""
    try:
        return parse_class_names(raw, limit=limit)
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def parse_threshold(raw: str | None) -> float | None:
    if raw is None or not raw.strip():
        return None
    try:
        t = float(raw)
    except ValueError:
        raise ApiError(400, f"threshold must be a number in [0, 1], got {raw.strip()[:40]!r}") from None
    if not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise ApiError(400, f"threshold must be in [0, 1], got {raw.strip()[:40]}")
    return t


def parse_flag(name: str, raw: str | None) -> bool:
    if raw is None:
        return False
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ApiError(400, f"{name} must be true or false, got {raw.strip()[:40]!r}")


def _text(part: Part) -> str:
    try:
        return part.data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"form field '{part.name}' is not valid UTF-8 (byte 0x{part.data[e.start]:02x} at "
                            f"position {e.start}); send text fields as UTF-8") from None


@dataclass
class SegmentRequest:
    image: bytes
    filename: str
    classes: list[str]
    threshold: float | None
    background: bool
    overlay: bool
    scores: bool


def read_form(parts: list[Part], cfg: ServeConfig) -> SegmentRequest:
    """Validate the form fields of ``POST /v1/segment`` (everything but the image's content)."""
    by: dict[str, list[Part]] = {}
    for p in parts:
        by.setdefault(p.name, []).append(p)
    known = {"image", "classes", "threshold", "background", "overlay", "scores"}
    unknown = sorted(set(by) - known)
    if unknown:
        raise ApiError(400, f"unknown form field(s) {', '.join(map(repr, unknown))}; the fields are "
                            f"{', '.join(sorted(known))}")
    for k, v in by.items():
        if len(v) > 1:
            raise ApiError(400, f"form field '{k}' was sent {len(v)} times; send it once")
    if "image" not in by:
        raise ApiError(400, "no image: send the picture as a multipart file field named 'image' "
                            "(curl -F image=@photo.jpg)")
    img = by["image"][0]
    if not img.data:
        raise ApiError(400, f"the image {img.filename or ''} is empty (0 bytes)".replace("  ", " "))
    if len(img.data) > cfg.max_upload_bytes:
        raise ApiError(413, f"the image is {len(img.data):,} bytes; this server's limit is "
                            f"{cfg.max_upload_bytes:,} bytes")
    if "classes" not in by:
        raise ApiError(400, 'no classes: send a form field classes="cat, sofa, potted plant" (or a JSON list)')
    txt = {k: _text(by[k][0]) for k in ("classes", "threshold", "background", "overlay", "scores") if k in by}
    return SegmentRequest(
        image=img.data, filename=img.filename or "image", classes=parse_classes(txt["classes"], cfg.max_classes),
        threshold=parse_threshold(txt.get("threshold")), background=parse_flag("background", txt.get("background")),
        overlay=parse_flag("overlay", txt.get("overlay")), scores=parse_flag("scores", txt.get("scores")))


def check_image_header(data: bytes, max_pixels: int) -> tuple[int, int]:
    """The declared size of ``data`` (header only, nothing decoded); 413 over ``max_pixels``, 400 if unreadable."""
    from ..data.io import ImageError, ImageTooLarge, declared_size
    try:
        return declared_size(data, max_pixels, name="the image")
    except ImageTooLarge as e:
        raise ApiError(413, f"{e}".replace("shrink it first or raise the limit (--max-megapixels, max_pixels=)",
                                           "send a smaller image")) from None
    except ImageError as e:
        raise ApiError(400, str(e).replace("not an image Pillow can read", "not an image this server can read")) from None


# --------------------------------------------------------------------------------------------------- work
def _png_b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Service:
    """The model plus the bounded pool that runs it."""

    def __init__(self, cfg: ServeConfig, segmenter=None):
        import torch
        from ..segmenter import Segmenter
        self.cfg = cfg.check()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        t0 = time.time()
        self.seg = segmenter if segmenter is not None else Segmenter.from_pretrained(
            cfg.model, device=cfg.device, size=cfg.size, text_cache_size=cfg.text_cache, tta_scales=cfg.tta_scales,
            tta_flip=cfg.tta_flip, bridge_size=cfg.bridge_size)
        self.load_seconds = round(time.time() - t0, 2)
        self.pool = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="fusionseg-serve")
        self.capacity = cfg.workers + cfg.queue
        self._lock = threading.Lock()
        self.busy = 0  # running + queued
        self.served = 0
        self.refused = 0
        self._avg = 1.0  # running mean of a request's compute seconds, for Retry-After

    # ---- capacity
    def try_acquire(self) -> bool:
        with self._lock:
            if self.busy >= self.capacity:
                self.refused += 1
                return False
            self.busy += 1
            return True

    def _release(self, _f: Future | None = None) -> None:
        with self._lock:
            self.busy -= 1

    def retry_after(self) -> int:
        return max(1, math.ceil(self._avg * self.capacity / max(1, self.cfg.workers)))

    def submit(self, req: SegmentRequest) -> Future:
        fut = self.pool.submit(self.run, req)
        fut.add_done_callback(self._release)
        return fut

    # ---- compute (in a worker thread)
    def run(self, req: SegmentRequest) -> dict:
        from ..data.io import ImageError, ImageTooLarge, load_image
        from ..visualize import label_png, overlay, palette
        from PIL import Image
        t0 = time.time()
        check_image_header(req.image, self.cfg.max_pixels)
        bio = io.BytesIO(req.image)
        bio.name = f"the image {req.filename!r}"
        try:
            img = load_image(bio, max_pixels=self.cfg.max_pixels)
        except ImageError as e:
            raise ApiError(413 if isinstance(e, ImageTooLarge) else 400, str(e)) from None
        pred = self.seg.predict(img, req.classes, threshold=req.threshold, background=req.background)
        s = pred.summary()
        pal = palette(len(req.classes))
        per = [{"name": n, "label": v["label"], "area_fraction": v["pixel_fraction"], "mean_score": v["mean_score"],
                "color": "#%02x%02x%02x" % tuple(int(c) for c in pal[v["label"]])}
               for n, v in s["per_class"].items()]
        out: dict[str, Any] = {
            "classes": s["classes"], "width": s["width"], "height": s["height"],
            "threshold": None if req.background else (self.seg.threshold if req.threshold is None else req.threshold),
            "decision": self.decision_for(req), "background": req.background, "none_fraction": s["none_fraction"],
            "per_class": per,
            "label_png": _png_b64(label_png(pred.labels, len(req.classes))),
        }
        if req.scores:
            q = np.rint(np.clip(pred.scores, 0.0, 1.0) * 255.0).astype(np.uint8)
            out["score_png"] = _png_b64(Image.fromarray(q, "L"))
        if req.overlay:
            out["overlay_png"] = _png_b64(overlay(img, pred.labels, req.classes))
        dt = time.time() - t0
        out["seconds"] = round(dt, 3)
        with self._lock:
            self.served += 1
            self._avg = 0.8 * self._avg + 0.2 * dt
        return out

    def decision_for(self, req) -> str:
        """How "none of these" was decided for ``req``: ``argmax`` (background), ``threshold`` (a threshold was
        given) or the model's own decision (``relative`` for the shipped model)."""
        from ..segmenter import Segmenter
        return "argmax" if req.background else Segmenter._decision(None, req.threshold, self.seg.decision)

    def model_info(self) -> dict:
        m = self.seg.meta
        tr = m.get("training", {}) or {}
        c = m.get("config", {}) or {}
        return {
            "model": str(self.cfg.model),
            "image_encoder": m.get("image_encoder", {}), "text_encoder": m.get("text_encoder", {}),
            "preset": c.get("preset"), "parameters": tr.get("parameters"),
            "image_size": self.seg.size, "threshold": self.seg.threshold, "decision": self.seg.decision,
            "device": str(self.seg.device),
            "test_time": self.seg.test_time,
            "classes_seen_in_training": list(tr.get("vocabulary", []) or []),
            "limits": {"max_upload_bytes": self.cfg.max_upload_bytes, "max_pixels": self.cfg.max_pixels,
                       "max_classes": self.cfg.max_classes, "timeout_seconds": self.cfg.timeout,
                       "workers": self.cfg.workers, "queue": self.cfg.queue},
        }

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------------------------------- app
_SEGMENT_OPENAPI = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image", "classes"],
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "the picture (JPEG, PNG, BMP, GIF, TIFF, WebP)"},
            "classes": {"type": "string", "description": 'comma-separated names ("cat, sofa") or a JSON list (["cat", "sofa"])'},
            "threshold": {"type": "number", "minimum": 0, "maximum": 1, "description": "none-of-these threshold on the sigmoid score; giving it means the threshold decision (default: the model's own decision: relative for the shipped model)"},
            "background": {"type": "boolean", "description": "plain arg-max, no threshold"},
            "overlay": {"type": "boolean", "description": "also return overlay_png (classes over the photo, with a legend)"},
            "scores": {"type": "boolean", "description": "also return score_png (8-bit score of each pixel's class, 255 = 1.0)"},
        }}}}},
    "responses": {
        "200": {"description": "classes, image size, per-class area fraction and mean score, base64 PNGs",
                "content": {"application/json": {"schema": {"type": "object", "properties": {
                    "classes": {"type": "array", "items": {"type": "string"}},
                    "width": {"type": "integer"}, "height": {"type": "integer"},
                    "threshold": {"type": "number", "nullable": True},
                    "decision": {"type": "string", "enum": ["relative", "threshold", "argmax"],
                                 "description": "how none-of-these was decided (threshold: the threshold above applied)"},
                    "background": {"type": "boolean"},
                    "none_fraction": {"type": "number"},
                    "per_class": {"type": "array", "items": {"type": "object", "properties": {
                        "name": {"type": "string"}, "label": {"type": "integer"}, "area_fraction": {"type": "number"},
                        "mean_score": {"type": "number", "nullable": True}, "color": {"type": "string"}}}},
                    "label_png": {"type": "string", "description": "base64 PNG, pixel value k = class k, 0 = none"},
                    "overlay_png": {"type": "string"}, "score_png": {"type": "string"},
                    "seconds": {"type": "number"}}}}}},
        "400": {"description": "bad input: {\"error\": ...}"}, "413": {"description": "over a size limit"},
        "415": {"description": "not multipart/form-data"}, "503": {"description": "busy; see Retry-After"},
        "504": {"description": "took longer than the time limit"},
    },
}


def _err(status: int, message: str, headers: dict[str, str] | None = None):
    from fastapi.responses import JSONResponse
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(cfg: ServeConfig | None = None, segmenter=None):
    """Build the FastAPI app; loads the model now (or uses ``segmenter``, e.g. one shared by tests)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .. import __version__

    cfg = (cfg or ServeConfig()).check()
    svc = Service(cfg, segmenter)
    pkg = resources.files(__package__)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        svc.close()

    app = FastAPI(title="fusionseg", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Open-vocabulary semantic segmentation: POST an image and any class names.")
    app.state.service = svc

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, e: ApiError):
        return _err(e.status, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(req: Request, e: StarletteHTTPException):
        msg = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        if e.status_code == 404:
            msg = f"no such page or endpoint: {req.url.path} (the API is POST /v1/segment, GET /v1/model, GET /healthz)"
        elif e.status_code == 405:
            msg = f"{req.method} is not allowed on {req.url.path}"
        return _err(e.status_code, msg, getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, e: RequestValidationError):
        return _err(400, "; ".join(str(x.get("msg", x)) for x in e.errors()) or "invalid request")

    @app.exception_handler(Exception)
    async def _internal(req: Request, e: Exception):  # the server (uvicorn) logs the traceback
        return _err(500, f"internal error ({type(e).__name__}); the server logged it and keeps serving")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse((pkg / "static" / "index.html").read_text("utf-8"))

    app.mount("/static", StaticFiles(directory=str(pkg / "static")), name="static")
    app.mount("/examples", StaticFiles(directory=str(pkg / "examples")), name="examples")

    @app.get("/v1/examples", summary="the bundled example images")
    async def examples():
        items = json.loads((pkg / "examples" / "examples.json").read_text("utf-8"))
        return [dict(it, url=f"/examples/{it['file']}") for it in items]

    @app.get("/healthz", summary="liveness and load")
    async def healthz():
        return {"status": "ok", "busy": svc.busy, "capacity": svc.capacity, "served": svc.served,
                "refused": svc.refused}

    @app.get("/v1/model", summary="encoders, preset, classes seen in training, limits")
    async def model():
        return svc.model_info()

    async def _read_request(request: Request, ctype: str, limit: int) -> SegmentRequest:
        from starlette.requests import ClientDisconnect
        chunks, n = [], 0
        try:
            async for chunk in request.stream():
                n += len(chunk)
                if n > limit:
                    raise ApiError(413, f"the request is over {limit:,} bytes; this server takes images up to "
                                        f"{cfg.max_upload_bytes:,} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(400, "the client closed the connection before the request body was complete") from None
        body = b"".join(chunks)
        del chunks
        if not body:
            raise ApiError(400, "the request body is empty: send multipart/form-data with an image and classes")
        try:
            parts = parse_multipart(body, ctype)
        except FormError as e:
            raise ApiError(400, str(e)) from None
        del body
        return read_form(parts, cfg)

    @app.post("/v1/segment", summary="segment an image with any class names", openapi_extra=_SEGMENT_OPENAPI)
    async def segment(request: Request):
        ctype = request.headers.get("content-type", "")
        try:
            boundary_of(ctype)
        except FormError as e:
            if ctype.lower().startswith("multipart/form-data"):
                raise ApiError(400, str(e))
            raise ApiError(415, f"POST /v1/segment takes multipart/form-data (fields image, classes, threshold), "
                                f"got {ctype.split(';')[0] or 'no Content-Type'}: send the image as a file field, "
                                f"e.g. curl -F image=@photo.jpg -F classes='cat, dog'")
        limit = cfg.max_upload_bytes + 64 * 1024  # the image plus the other fields and the boundaries
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request is {int(declared):,} bytes; this server takes images up to "
                                f"{cfg.max_upload_bytes:,} bytes")
        # A slot is taken before the body is read, so at most `capacity` bodies are ever held in memory.
        if not svc.try_acquire():
            ra = svc.retry_after()
            raise ApiError(503, f"the server is busy ({svc.capacity} requests running or queued); retry in {ra} s",
                           {"Retry-After": str(ra)})
        fut = None
        try:
            req = await _read_request(request, ctype, limit)
            try:
                fut = svc.submit(req)
            except RuntimeError:  # the pool is shut down
                raise ApiError(503, "the server is shutting down", {"Retry-After": "5"}) from None
        finally:
            if fut is None:
                svc._release()
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(fut), timeout=cfg.timeout)
        except asyncio.TimeoutError:
            raise ApiError(504, f"segmentation took longer than this server's limit of {cfg.timeout:g} s; "
                                f"try a smaller image or fewer classes") from None
        return Response(json.dumps(result, separators=(",", ":")), media_type="application/json")

    return app

