"""``fusionseg export --format onnx`` and the onnxruntime path (``--runtime onnx``, ``Segmenter(runtime="onnx")``).

An export folder holds:

- ``image_encoder.onnx``: normalised pixels ``(B, 3, H, W)`` -> the encoder's maps ``map0..mapK`` (one per
  stride); batch, height and width are dynamic (any size on the encoder's grid: multiples of its
  ``size_multiple``, which the Segmenter pads to anyway);
- ``fusion_head.onnx``: those maps + ``text`` ``(N, C_t)`` class embeddings -> ``logits`` ``(B, N, h, w)`` at
  the decoder's stride; batch, N (any number of names) and the map sizes are dynamic;
- ``text_embeddings.safetensors`` + the names in ``fusionseg-onnx.json``: the text side, precomputed for the
  names given at export time (``--classes``);
- ``fusionseg-onnx.json``: the source checkpoint, the encoders' fingerprints, a fingerprint of the trained
  head, the encoder's mean/std/strides, the opset.

The onnxruntime Segmenter is the ordinary :class:`~fusionseg.segmenter.Segmenter` with its image encoder
and fusion head answered by onnxruntime sessions; everything around them (resizing, padding, batching,
tiling, upsampling, the label rule) is the same code. The source checkpoint is still loaded, for its text
encoder (names not precomputed) and, in the ``fusion+bridge`` mode, the classifier bridge on top of the
encoder maps; its fingerprints are checked against the export, so a folder made from another model is
refused, naming what differs.

onnx and onnxruntime are optional: ``pip install 'fusionseg[onnx]'``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "fusionseg-onnx/1"
META = "fusionseg-onnx.json"
ENCODER_FILE = "image_encoder.onnx"
HEAD_FILE = "fusion_head.onnx"
TEXT_FILE = "text_embeddings.safetensors"
ONNX_HINT = "pip install 'fusionseg[onnx]'"


def head_fingerprint(head: nn.Module) -> str:
    """sha256 (16 hex) over the trained head's parameter names, shapes and values."""
    h = hashlib.sha256()
    for k, v in sorted(head.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class _Encoder(nn.Module):
    def __init__(self, enc):
        super().__init__()
        self.enc = enc

    def forward(self, pixels):
        return tuple(self.enc(pixels))


class _Head(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, *args):
        *visual, text = args
        return self.head(list(visual), text)


@contextlib.contextmanager
def _traceable_pooling():
    """The head pools finer maps onto the token grid with ``adaptive_avg_pool2d``; on the encoder's grid the
    ratio is a whole number (a stride ratio), where that equals ``avg_pool2d`` with that kernel, which exports
    with dynamic sizes (adaptive pooling to a traced size does not)."""
    orig = F.adaptive_avg_pool2d

    def pool(x, size):
        kh, kw = x.shape[-2] // size[0], x.shape[-1] // size[1]
        return F.avg_pool2d(x, (int(kh), int(kw)))

    F.adaptive_avg_pool2d = pool
    try:
        yield
    finally:
        F.adaptive_avg_pool2d = orig


@contextlib.contextmanager
def _plain_ops(enc):
    """Encoders may take CPU fast paths the tracer cannot follow (EfficientNet-Lite's fused oneDNN conv + ReLU6
    and its cached BatchNorm folding): trace with the plain reference paths (``fusionseg.runtime.fast_paths``;
    the graph computes the same function, and onnxruntime folds the BatchNorms itself)."""
    import sys
    from ..runtime import fast_paths_as
    mod = sys.modules.get(type(enc).__module__)
    same = getattr(mod, "_same", None)
    if same is not None:
        # TF "same" padding from the traced size: on the encoder's grid (every stride-2 input has an even size)
        # it is the same for every size, so it is taken as a constant (traced shape arithmetic mixed up H and W)
        mod._same = lambda n, kernel, stride: same(int(n), kernel, stride)
    try:
        with fast_paths_as(False):
            yield
    finally:
        if same is not None:
            mod._same = same


def _first_line(e: BaseException, limit: int = 240) -> str:
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if len(line) <= limit else line[:limit] + " ..."


def require_onnx(runtime_only: bool = False) -> None:
    mods = ("onnxruntime",) if runtime_only else ("onnx", "onnxruntime")
    for m in mods:
        try:
            __import__(m)
        except ImportError:
            raise ValueError(f"the ONNX path needs {m}, which is not installed: {ONNX_HINT}") from None


def export_onnx(model: str | Path = "default", out: str | Path = "export", classes: str | Sequence[str] | None = None,
                size: int | None = None, opset: int = 17) -> dict:
    """Write the export folder (module text) for checkpoint ``model``; -> the metadata written.

    ``size``: longer side of the example input used for tracing (default: the model's working size); the
    graphs take any size on the encoder's grid. Raises ValueError (naming the encoder) when the image encoder
    cannot be traced."""
    require_onnx()
    from ..data.io import write_text_atomic
    from ..model.checkpoint import load_model
    from ..segmenter import parse_class_names
    from safetensors.torch import save_file
    names = parse_class_names(classes) if classes else []
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fusionseg-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to output folder {out}: {e.strerror or e}") from None
    fus, meta = load_model(model, "cpu")
    fus.eval()
    enc, cfg = fus.image_encoder, fus.cfg
    if getattr(cfg, "prior", False):
        raise ValueError("models trained with --bridge-prior cannot be exported to ONNX yet (their head also takes "
                         "the bridge's maps); export a model without it")
    mult = int(getattr(enc, "size_multiple", 32))
    s = int(size or meta.get("image_size", 320))
    hh, ww = max(mult, s // mult * mult), max(mult, (s * 3 // 4) // mult * mult)  # not square: catches H/W mix-ups
    x = torch.randn(1, 3, hh, ww)
    n_maps = len(enc.strides)
    map_names = [f"map{i}" for i in range(n_maps)]
    enc_name = meta["image_encoder"]["name"]
    with torch.no_grad():
        visual = list(enc(x))
    if len(visual) != n_maps:
        raise ValueError(f"the image encoder {enc_name} gave {len(visual)} maps for {n_maps} strides")
    try:
        with torch.no_grad(), _plain_ops(enc), warnings_quiet():
            torch.onnx.export(_Encoder(enc), (x,), str(out / ENCODER_FILE), dynamo=False, opset_version=opset,
                              input_names=["pixels"], output_names=map_names,
                              dynamic_axes={"pixels": {0: "batch", 2: "height", 3: "width"},
                                            **{m: {0: "batch", 2: f"h{i}", 3: f"w{i}"} for i, m in enumerate(map_names)}})
    except Exception as e:
        raise ValueError(f"the image encoder {enc_name} cannot be exported to ONNX: {_first_line(e)}") from None
    text = torch.randn(3, fus.text_encoder.dim)
    try:
        with torch.no_grad(), _traceable_pooling(), warnings_quiet():
            torch.onnx.export(_Head(fus.head), (*visual, text), str(out / HEAD_FILE), dynamo=False,
                              opset_version=opset, input_names=map_names + ["text"], output_names=["logits"],
                              dynamic_axes={**{m: {0: "batch", 2: f"h{i}", 3: f"w{i}"} for i, m in enumerate(map_names)},
                                            "text": {0: "names"}, "logits": {0: "batch", 1: "names", 2: "h", 3: "w"}})
    except Exception as e:
        raise ValueError(f"the fusion head of {model} cannot be exported to ONNX: {_first_line(e)}") from None
    files = [ENCODER_FILE, HEAD_FILE]
    if names:
        emb = fus.encode_text(names).float().contiguous()
        save_file({"embeddings": emb}, str(out / TEXT_FILE))
        files.append(TEXT_FILE)
    info = {"format": FORMAT, "model": str(model) if str(model) == "default" else str(Path(model).resolve()),
            "image_encoder": meta["image_encoder"], "text_encoder": meta["text_encoder"],
            "head_fingerprint": head_fingerprint(fus.head), "templates": meta.get("templates"),
            "image_size": meta.get("image_size"), "mean": list(enc.mean), "std": list(enc.std),
            "strides": list(enc.strides), "size_multiple": mult, "maps": map_names, "opset": opset,
            "text_dim": int(fus.text_encoder.dim), "classes": names, "files": files}
    write_text_atomic(json.dumps(info, indent=1), out / META)
    return info


@contextlib.contextmanager
def warnings_quiet():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------- runtime
class OrtModels:
    """The two onnxruntime sessions of an export folder."""

    def __init__(self, folder: str | Path, device: str = "cpu", threads: int = 0):
        require_onnx(runtime_only=True)
        import onnxruntime as ort
        folder = Path(folder)
        meta_path = folder / META
        if not meta_path.is_file():
            raise ValueError(f"no ONNX export in {folder} ({META} missing); make one with "
                             f"fusionseg export --format onnx --out {folder}")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{meta_path} is not valid JSON: {_first_line(e)}") from None
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} has format {self.meta.get('format')!r}, expected {FORMAT!r}")
        for f in self.meta.get("files", []):
            if not (folder / f).is_file():
                raise ValueError(f"the ONNX export in {folder} is incomplete: {f} is missing")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.encoder = ort.InferenceSession(str(folder / ENCODER_FILE), opts, providers=providers)
            self.head = ort.InferenceSession(str(folder / HEAD_FILE), opts, providers=providers)
        except Exception as e:
            raise ValueError(f"onnxruntime cannot load the export in {folder}: {_first_line(e)}") from None
        maps = self.meta["maps"]
        got_enc = [o.name for o in self.encoder.get_outputs()]
        got_head = [i.name for i in self.head.get_inputs()]
        if got_enc != maps or got_head != maps + ["text"]:
            raise ValueError(f"the graphs in {folder} do not match {META}: encoder outputs {got_enc}, head inputs "
                             f"{got_head}, expected {maps} (+ text)")
        self.folder = folder

    def encode(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        outs = self.encoder.run(None, {"pixels": pixels.detach().float().cpu().contiguous().numpy()})
        return [torch.from_numpy(o).to(pixels.device) for o in outs]

    def logits(self, visual: Sequence[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        feed = {m: v.detach().float().cpu().contiguous().numpy() for m, v in zip(self.meta["maps"], visual)}
        feed["text"] = text.detach().float().cpu().contiguous().numpy()
        return torch.from_numpy(self.head.run(None, feed)[0]).to(visual[0].device)


class OrtHead(nn.Module):
    """Stands in for :class:`~fusionseg.model.fusioner.FusionHead` (same call, same ``cfg``), run by onnxruntime."""

    def __init__(self, ort_models: OrtModels, cfg):
        super().__init__()
        self.ort = ort_models
        self.cfg = cfg
        self.register_buffer("_dtype_probe", torch.zeros(1), persistent=False)

    def forward(self, visual, text, out_size=None, text_padding=None, prior=None, unknown=None):
        if text_padding is not None:
            raise ValueError("the ONNX head takes one list of names for the whole batch (no text_padding)")
        if text.dim() == 3:
            raise ValueError("the ONNX head takes text (N, C) shared by the batch")
        lg = self.ort.logits(visual, text)
        if out_size is not None and tuple(lg.shape[-2:]) != tuple(out_size):
            lg = F.interpolate(lg, size=out_size, mode="bilinear", align_corners=False)
        return lg


def onnx_segmenter(cls, folder, device=None, runtime: str = "onnx", threads: int = 0, **kw):
    """``Segmenter.from_pretrained(folder, runtime="onnx")``: a Segmenter whose image encoder and fusion head
    are the export's onnxruntime sessions (module text). Raises ValueError naming what does not match."""
    if runtime != "onnx":
        raise ValueError(f"runtime must be torch or onnx, got {runtime!r}")
    from ..model.checkpoint import load_model
    device = device or "cpu"
    ort_models = OrtModels(folder, device, threads)
    info = ort_models.meta
    model, meta = load_model(info["model"], "cpu" if device is None else device)
    for side in ("image_encoder", "text_encoder"):
        want, got = info[side], meta[side]
        if (want.get("name"), want.get("fingerprint")) != (got.get("name"), got.get("fingerprint")):
            raise ValueError(f"the ONNX export in {folder} does not match its model {info['model']}: {side} "
                             f"{want.get('name')} ({want.get('fingerprint')}) in the export, {got.get('name')} "
                             f"({got.get('fingerprint')}) in the checkpoint")
    if head_fingerprint(model.head) != info.get("head_fingerprint"):
        raise ValueError(f"the ONNX export in {folder} does not match its model {info['model']}: the fusion head's "
                         f"weights differ (head fingerprint {info.get('head_fingerprint')} in the export, "
                         f"{head_fingerprint(model.head)} in the checkpoint); export again")
    if list(model.image_encoder.strides) != list(info["strides"]):
        raise ValueError(f"the ONNX export in {folder} does not match: encoder strides {info['strides']} in the "
                         f"export, {list(model.image_encoder.strides)} in the checkpoint")
    model.head = OrtHead(ort_models, model.head.cfg)
    model.encode_image = ort_models.encode  # instance attribute: Fusioner.encode_image -> onnxruntime
    seg = cls(model, meta, device, **kw)
    seg.runtime = "onnx"
    seg.onnx_folder = Path(folder)
    names = info.get("classes") or []
    if names:  # the precomputed text side goes straight into the text cache
        from safetensors.torch import load_file
        emb = load_file(str(Path(folder) / TEXT_FILE))["embeddings"]
        if emb.shape != (len(names), info["text_dim"]):
            raise ValueError(f"{Path(folder) / TEXT_FILE} holds {tuple(emb.shape)} embeddings for {len(names)} "
                             f"names of dimension {info['text_dim']}")
        for n, e in zip(names, emb):
            seg.text_cache.put(seg._text_key(n), e)
    return seg
