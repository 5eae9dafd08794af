"""BatchPredictor: one object that batch engines call on batches of images (Ray Data, Spark, plain loops).

Its constructor loads the model and embeds the class names once; calling it on a batch -- a
``dict[str, np.ndarray]`` with one of the columns ``bytes`` (encoded image files), ``path`` (local paths or any
URI :mod:`pyarrow.fs` understands; only a name when ``bytes`` is there too) or ``image`` (``(H, W, 3)`` uint8
arrays), plus optional ``id``
-- returns a dict of equal-length columns: the label maps (or their PNG bytes), per-class pixel fractions and
mean scores, the image size, and ``status``/``error`` per row. A row that cannot be decoded gets
``status == "error"`` and its reason; the rest of the batch is still segmented.

Ray Data (a stateful actor class; the model loads once per actor)::

    ds = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True, num_cpus=0)  # reads are I/O
    out = ds.map_batches(BatchPredictor, fn_constructor_kwargs={"classes": "cat, dog"},
                         batch_size=16, concurrency=4, num_gpus=0)

Spark (``pyspark.ml.functions.predict_batch_udf``)::

    def make_predict_fn():
        p = BatchPredictor("cat, dog", output="none")
        return lambda paths: p({"path": paths})["fractions"]

See ``examples/ray_batch.py`` and ``examples/spark_batch.py``.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

#: What a call returns for the label maps: arrays, PNG bytes, or nothing (fractions and scores only).
OUTPUTS = ("labels", "png", "none")


def read_uri(uri: str) -> bytes:
    """The bytes of a local path or of any URI :mod:`pyarrow.fs` understands (``s3://``, ``gs://``, ``hdfs://``,
    ``file://``; remote ones need the user's credentials in the usual places)."""
    if "://" not in uri or uri.startswith("file://"):
        with open(uri[7:] if uri.startswith("file://") else uri, "rb") as f:
            return f.read()
    try:
        from pyarrow import fs
    except ImportError:
        raise ValueError(f"reading {uri} needs pyarrow: pip install 'fusionseg[ray]'") from None
    filesystem, path = fs.FileSystem.from_uri(uri)
    with filesystem.open_input_stream(path) as f:
        return f.read()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class BatchPredictor:
    """Segment batches of images with fixed class names (see the module text for the batch format).

    ``classes``: names as a list or ``"cat, dog"``; ``model``: ``"default"`` or a checkpoint; ``runtime``:
    ``"torch"`` or ``"onnx"`` (then ``model`` is a folder written by ``fusionseg export``); ``output``: what the
    ``labels`` column holds (:data:`OUTPUTS`); ``threads``: torch CPU threads for this process (0: torch's
    choice). The other arguments are :class:`~fusionseg.segmenter.Segmenter`'s.
    """

    def __init__(self, classes: Sequence[str] | str, model: str = "default", device: str | None = None,
                 size: int | None = None, threshold: float | None = None, mode: str = "auto",
                 runtime: str = "torch", output: str = "labels", background: bool = False, threads: int = 0,
                 tile: int | None = None, decision: str | None = None, tta_scales: Sequence[float] = (1.0,),
                 tta_flip: bool = False, bridge_size: int | None = None):
        import torch
        from .segmenter import Segmenter, parse_class_names
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if threads:
            torch.set_num_threads(int(threads))
        self.classes = parse_class_names(classes)
        self.output = output
        self.background = background
        kw = dict(device=device, size=size, threshold=threshold, tile=tile, mode=mode, decision=decision,
                  tta_scales=tta_scales, tta_flip=tta_flip, bridge_size=bridge_size)
        self.segmenter = Segmenter.from_pretrained(model, runtime=runtime, **kw)
        self.threshold = self.segmenter.threshold
        self.decision = self.segmenter.decision
        self.segmenter.text_embeddings(self.classes)  # embedded once, here; every call reuses them
        self._prepare = self.segmenter.preparer()

    def _source(self, batch: dict, i: int):
        # Bytes first: Ray Data's read_binary_files(include_paths=True) gives both columns, and its paths
        # drop the URI scheme (s3://bucket/x.jpg -> bucket/x.jpg), so they are names, not something to reread.
        if "bytes" in batch:
            name = str(batch["id"][i]) if "id" in batch else str(batch["path"][i]) if "path" in batch else f"row {i}"
            return lambda: io.BytesIO(bytes(batch["bytes"][i])), name
        if "path" in batch:
            return lambda: io.BytesIO(read_uri(str(batch["path"][i]))), str(batch["path"][i])
        if "image" in batch:
            return lambda: np.asarray(batch["image"][i]), f"row {i}"
        raise ValueError("a batch needs a 'path', 'bytes' or 'image' column; got " + ", ".join(map(str, batch)))

    def predict(self, batch: dict) -> tuple[list, list[str | None]]:
        """-> (one :class:`~fusionseg.segmenter.Prediction` or None per row, one error line or None per row)."""
        n = len(next(iter(batch.values()))) if batch else 0
        preps: list = [None] * n
        errors: list[str | None] = [None] * n
        for i in range(n):
            load, name = self._source(batch, i)
            try:
                src = load()
                if hasattr(src, "read"):
                    src.name = name
                preps[i] = self._prepare(src)
            except (ValueError, OSError) as e:
                errors[i] = f"{name}: {_first_line(e)}" if name not in _first_line(e) else _first_line(e)
        good = [i for i in range(n) if preps[i] is not None]
        preds: list = [None] * n
        if good:
            for i, p in zip(good, self.segmenter.predict_batch([preps[i] for i in good], self.classes,
                                                               None, self.background)):
                preds[i] = p
        return preds, errors

    def __call__(self, batch: dict) -> dict:
        """``dict[str, np.ndarray]`` -> ``dict[str, np.ndarray]`` with columns ``id`` or ``path`` (passed through),
        ``status`` ("ok"/"error"), ``error`` ("" when ok), ``width``, ``height``, ``fractions`` ``(B, N)`` (per
        class, in :attr:`classes` order), ``mean_scores`` ``(B, N)`` (NaN where a class has no pixel),
        ``none_fraction`` ``(B,)`` and, unless ``output="none"``, ``labels`` (uint16 maps, or PNG bytes)."""
        from .visualize import label_png
        preds, errors = self.predict(batch)
        n, k = len(preds), len(self.classes)
        out: dict = {key: np.asarray(batch[key]) for key in ("id", "path") if key in batch}
        fr = np.zeros((n, k), np.float64)
        ms = np.full((n, k), np.nan, np.float64)
        none = np.zeros(n, np.float64)
        w = np.zeros(n, np.int64)
        h = np.zeros(n, np.int64)
        labels = np.empty(n, dtype=object)
        for i, p in enumerate(preds):
            if p is None:
                labels[i] = b"" if self.output == "png" else np.zeros((0, 0), np.uint16)
                continue
            s = p.summary()
            w[i], h[i], none[i] = s["width"], s["height"], s["none_fraction"]
            for j, name in enumerate(self.classes):
                c = s["per_class"][name]
                fr[i, j] = c["pixel_fraction"]
                if c["mean_score"] is not None:
                    ms[i, j] = c["mean_score"]
            if self.output == "png":
                buf = io.BytesIO()
                label_png(p.labels, k).save(buf, format="PNG")
                labels[i] = buf.getvalue()
            else:
                labels[i] = p.labels
        out.update(status=np.array(["ok" if p is not None else "error" for p in preds], dtype=object),
                   error=np.array([e or "" for e in errors], dtype=object), width=w, height=h,
                   fractions=fr, mean_scores=ms, none_fraction=none)
        if self.output != "none":
            out["labels"] = labels
        return out
