"""Tiling and label resampling: where windows go on a large image, how their maps are stitched, and how the
low-resolution logits become a full-size label map.

* :func:`window_starts` / :func:`owned_spans` / :func:`stitch_windows`: sliding-window encoding whose memory
  is bounded by one window (windows overlap by :data:`OVERLAP`; each keeps its maps up to the middle of each
  overlap, away from its padded borders);
* :func:`upsample_crop`: decoder-resolution logits -> the working size, padding cropped;
* :func:`upsample_rows` / :func:`labels_from_logits`: logits -> labels and scores at the original size, in
  row bands (a 10,000 x 8,000 photo costs little more memory than its label map), through
  :mod:`fusionseg.labelmap`'s per-cell class pruning when that pays;
* :func:`relative_labels`: the same with the *relative* "none of these" decision (each name measured against
  its own peak in the image, present only when that peak clears a gate that rises with the number of names).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .choices import DECISIONS  # noqa: F401 - re-exported
from .labelmap import argmax_classes, resample_argmax, write_band
from .runtime import fast_paths

#: Fraction of a window shared with its neighbour (features are kept up to the middle of the overlap).
OVERLAP = 0.5

#: :func:`relative_labels`: a pixel keeps its best name where that name's score is at least this fraction of the
#: name's own peak in the image.
RELATIVE_FRACTION = 0.3
#: :func:`relative_labels`: a name counts as present in the image when its peak score reaches this much per name
#: asked (one name: 0.01, three: 0.03, eighty: capped at :data:`PRESENCE_CAP`): the more names a query holds, the
#: fewer of them a photo shows, so each must show more evidence. 0.01 per name and the fraction 0.3 were chosen on
#: the held-out COCO 2017 images (docs/RESULTS.md, "How none of these is decided"), and checked on COCO128.
PRESENCE_PER_NAME = 0.01
PRESENCE_CAP = 0.5


def presence_gate(n_names: int, per_name: float = PRESENCE_PER_NAME, cap: float = PRESENCE_CAP) -> float:
    """The peak sigmoid score a name needs to count as present when ``n_names`` names are asked together."""
    return min(float(cap), float(per_name) * max(1, int(n_names)))


def _owned(starts: list[int], tile: int, total: int, align: int) -> list[tuple[int, int]]:
    """For windows at ``starts`` of side ``tile``: the span each one owns, split at the middle of each overlap."""
    cuts = [0] + [min(total, (s1 + s0 + tile) // 2 // align * align) for s0, s1 in zip(starts, starts[1:])] + [total]
    return [(cuts[k], cuts[k + 1]) for k in range(len(starts))]


def _starts(total: int, tile: int, align: int) -> list[int]:
    """Window starts (multiples of ``align``) covering ``total`` with windows of ``tile``, overlap >= tile/4."""
    if total <= tile:
        return [0]
    step = max(align, (tile - int(tile * OVERLAP)) // align * align)
    n = -(-(total - tile) // step) + 1
    starts = sorted({min(total - tile, round(i * (total - tile) / (n - 1) / align) * align) for i in range(n)})
    return starts


def stitch_windows(x: torch.Tensor, tile: int, align: int, strides: Sequence[int],
                   encode: Callable[[torch.Tensor], list], device=None) -> list[torch.Tensor]:
    """Sliding-window encoding of a padded canvas ``x`` ``(1, 3, Hp, Wp)`` (sides multiples of ``align``):
    ``encode`` runs on one window of side ``tile`` (a multiple of ``align``) at a time and each window's maps
    (one per stride in ``strides``) are kept where it owns the canvas -> maps ``[(1, C_i, Hp/s_i, Wp/s_i)]``."""
    Hp, Wp = x.shape[-2:]
    th, tw = min(tile, Hp), min(tile, Wp)
    ys, xs = _starts(Hp, th, align), _starts(Wp, tw, align)
    by, bx = _owned(ys, th, Hp, align), _owned(xs, tw, Wp, align)
    maps: list[torch.Tensor] | None = None
    wins = [(j, i) for j in range(len(ys)) for i in range(len(xs))]
    for k in range(0, len(wins), 1):  # one window at a time: memory bounded by one window
        chunk = wins[k:k + 1]
        xb = torch.cat([x[..., ys[j]:ys[j] + th, xs[i]:xs[i] + tw] for j, i in chunk]).to(device)
        feats = encode(xb)
        if maps is None:
            maps = [torch.zeros(1, f.shape[1], Hp // s, Wp // s, dtype=f.dtype, device=f.device)
                    for f, s in zip(feats, strides)]
        for n, (j, i) in enumerate(chunk):
            (y0, y1), (x0, x1) = by[j], bx[i]
            for f, m, s in zip(feats, maps, strides):
                m[0, :, y0 // s:y1 // s, x0 // s:x1 // s] = \
                    f[n, :, (y0 - ys[j]) // s:(y1 - ys[j]) // s, (x0 - xs[i]) // s:(x1 - xs[i]) // s]
    return maps  # type: ignore[return-value]


#: Public names of the window helpers.
window_starts = _starts
owned_spans = _owned


def _frac(valid: tuple[int, int], padded: tuple[int, int]) -> tuple[float, float]:
    """(h, w) of the image inside a padded (H, W) input -> the fractions (h / H, w / W)."""
    return valid[0] / padded[0], valid[1] / padded[1]


def upsample_crop(low: torch.Tensor, padded: tuple[int, int], valid: tuple[int, int]) -> torch.Tensor:
    """``(B, N, hl, wl)`` -> ``(B, N, h, w)``: bilinear to ``padded`` (align_corners=False), cropped to ``valid``.

    """
    H, W = padded
    h, w = valid
    if tuple(low.shape[-2:]) == (H, W):
        return low[..., :h, :w]
    return F.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)[..., :h, :w]


def upsample_rows(lg: torch.Tensor, size: tuple[int, int], rows: int, region: tuple[float, float] | None = None):
    """Yield (y0, y1, band) with ``band`` = logits ``(N, h, w)`` bilinearly resampled to rows y0:y1 of an image
    of ``size`` = (W, H); bands keep memory bounded for huge images. ``region`` = (w, h) in ``lg`` pixels that
    the image covers (default: all of ``lg``; smaller when ``lg`` also holds padding)."""
    W, H = size
    src = lg[None].float()
    hs, ws = lg.shape[-2:]
    rw, rh = region if region is not None else (ws, hs)
    xs = ((torch.arange(W, dtype=torch.float32) + 0.5) / W * rw) / ws * 2 - 1
    for y0 in range(0, H, rows):
        y1 = min(H, y0 + rows)
        ys = ((torch.arange(y0, y1, dtype=torch.float32) + 0.5) / H * rh) / hs * 2 - 1
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([gx, gy], -1)[None].to(src.device)
        yield y0, y1, F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def labels_from_logits(lg: torch.Tensor, size: tuple[int, int], threshold: float, background: bool = False,
                       region: tuple[float, float] | None = None):
    """logits ``(N, h, w)`` -> (labels ``(H, W)`` uint16, scores ``(H, W)`` float32) at ``size`` = (W, H).

    When ``size`` is the logits' own size the resampling is skipped (it would be the identity). When it is at
    least twice as large on average, only the classes that can win at each pixel are resampled
    (:mod:`fusionseg.labelmap`: the same labels and scores, several times faster for photos above the working
    size), unless the maps are too noisy for that to pay. That pruning is a fast path: with
    :func:`fusionseg.runtime.fast_paths` off every class is resampled (the plain reference)."""
    W, H = size
    n = lg.shape[0]
    hs, ws = lg.shape[-2:]
    if H * W >= 4 * hs * ws and fast_paths():
        out = resample_argmax(lg, size, threshold, background, region)
        if out is not None:
            return out
    labels = np.empty((H, W), dtype=np.uint16)
    scores = np.empty((H, W), dtype=np.float32)
    rows = max(1, int(4_000_000 // max(1, W * n)))  # rows per band: bounded memory
    if region is None and (hs, ws) == (H, W):
        bands = ((y0, min(H, y0 + rows), lg[:, y0:y0 + rows].float()) for y0 in range(0, H, rows))
    else:
        bands = upsample_rows(lg, size, rows, region)
    for y0, _, up in bands:
        write_band(labels, scores, y0, *argmax_classes(up), threshold, background)
    return labels, scores


def relative_labels(lg: torch.Tensor, size: tuple[int, int], region: tuple[float, float] | None = None,
                    fraction: float = RELATIVE_FRACTION, gate: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The relative decision: logits ``(N, h, w)`` -> (labels, scores) at ``size`` = (W, H), as
    :func:`labels_from_logits` returns them.

    Each name's sigmoid map is divided by its own peak over the image (``region``, as in
    :func:`labels_from_logits`: the part of ``lg`` that shows it), so a name the model scores weakly everywhere
    (a small or rare object) still claims the place it scores best. A name whose peak is below ``gate``
    (default :func:`presence_gate` of N) counts as absent. A pixel takes the name with the highest relative
    score when that reaches ``fraction``, else 0 ("none of these"). Scores are the chosen name's sigmoid score
    (for label 0: the best present name's, or 0 when no name is present)."""
    n = int(lg.shape[0])
    W, H = size
    if n == 0:
        return np.zeros((H, W), np.uint16), np.zeros((H, W), np.float32)
    gate = presence_gate(n) if gate is None else float(gate)
    p = lg.float().sigmoid()
    seen = p if region is None else p[:, :max(1, int(np.ceil(region[1]))), :max(1, int(np.ceil(region[0])))]
    peak = seen.flatten(1).amax(1)  # (N,)
    present = peak >= gate
    q = (p / peak.clamp_min(1e-12)[:, None, None]).clamp_(1e-7, 1 - 1e-7)
    rel = torch.logit(q)  # the relative score as a logit: the label resampling below works on logits
    rel[~present] = -30.0  # sigmoid ~1e-13: never reaches the fraction
    labels, scores = labels_from_logits(rel, size, 0.0, background=True, region=region)
    # labels 1..N here; index luts by label (slot 0 unused), in place and in row bands (huge photos: no
    # full-size int64 or float64 temporaries)
    peak_lut = np.concatenate([[0.0], peak.numpy()]).astype(np.float32)
    present_lut = np.concatenate([[False], present.numpy()])
    rows = max(1, 4_000_000 // max(1, W))
    for y0 in range(0, H, rows):
        lab, sc = labels[y0:y0 + rows], scores[y0:y0 + rows]
        drop = (sc < fraction) | ~present_lut[lab]
        sc *= peak_lut[lab]  # relative -> the name's own sigmoid score
        lab[drop] = 0
    return labels, scores
