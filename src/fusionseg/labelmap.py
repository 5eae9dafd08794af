"""Label map and scores from low-resolution logits, without resampling every class to full size.

The plain way to label an image is to resample all ``N`` logit maps bilinearly to the output size and take the
arg-max over classes there: ``N`` full-size maps, for a 4000 x 3000 photo and 20 names 240 M values. This
module gives the same labels and scores while resampling only the few classes that can win.

Why that is exact: a bilinearly resampled pixel is a convex combination of the four source values at the
corners of the source cell it falls in, with weights that are the same for every class. If class ``c`` is at
most class ``a`` at all four corners of a cell, ``c`` is at most ``a`` at every pixel of that cell, so ``c``
never wins there. Per cell, the classes that no corner's winner dominates this way are the *candidates* (on
real logit maps one to three of them in nearly every cell); the winner at every pixel of the cell is among
them. Every pixel is resampled for its cell's first candidate, separably; the pixels of the cells with
several candidates are then resampled for those (for every class beyond ``SLOTS``), pixel by pixel.

Sampling convention (both of the plain paths it replaces): output index ``y`` reads the source at
``(y + 0.5) * scale - 0.5``, clamped to ``[0, n_src - 1]`` (``F.interpolate(..., align_corners=False)`` with
``scale = n_src / n_out``, and ``grid_sample(..., padding_mode="border", align_corners=False)`` over a region).
Results match the plain path to float rounding (about 1e-6 on logits); labels differ only at exact ties.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

#: At most this many candidate classes are resampled per pixel; cells with more are resampled for every class.
SLOTS = 4
#: Elements per working band (4 x rows x width): bounds memory for huge outputs.
BAND_ELEMENTS = 4_000_000
#: Above this fraction of cells with several candidates, :func:`resample_argmax` declines (returns None): their
#: pixels are resampled one by one, which costs more than resampling every class densely.
MAX_MIXED = 0.15


def source_coords(n_out: int, scale: float, n_src: int) -> tuple[Tensor, Tensor]:
    """Output indices ``0 .. n_out - 1`` -> (lower source index int64, weight of the next one float32) under the
    align_corners=False, border-clamped convention (see the module text)."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_(0, n_src - 1)
    lo = src.floor().long().clamp_(max=n_src - 1)
    return lo, (src - lo).float()


def argmax_classes(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x.max(0)`` for ``(N, ...)`` scores: (best value, index of the first class reaching it), in about half the
    time: ``max`` with indices along the outer dimension is a slow, scalar reduction on the CPU, while ``amax``
    and the comparisons below are vectorised. The index is read off ``(x == best) * (N - class)`` (uint8, so
    N <= 255; else ``max``)."""
    n = x.shape[0]
    if n > 255 or x.device.type != "cpu":
        return x.max(0)
    best = x.amax(0)
    hit = torch.eq(x, best).view(torch.uint8)
    hit.mul_(torch.arange(n, 0, -1, dtype=torch.uint8).view((n,) + (1,) * (x.dim() - 1)))
    return best, (n - hit.amax(0).long()).clamp_(max=n - 1)  # a NaN score matches nothing: the last class


def write_band(labels: np.ndarray, scores: np.ndarray, y0: int, best: Tensor, idx: Tensor, threshold: float,
               background: bool) -> None:
    """Rows ``y0 ..`` of the label map (``idx + 1``, or 0 where the sigmoid of ``best`` is below ``threshold``
    unless ``background``) and of the scores (that sigmoid), from a band's best logit and its class index."""
    prob = best.sigmoid()
    lab = idx + 1
    if not background:
        lab = torch.where(prob >= threshold, lab, torch.zeros_like(lab))
    labels[y0:y0 + lab.shape[0]] = lab.cpu().numpy().astype(np.uint16)
    scores[y0:y0 + lab.shape[0]] = prob.cpu().numpy()


def _corners(hs: int, ws: int, device) -> Tensor:
    """``(4, hs * ws)``: flat source index of the corners (i, j), (i, j+1), (i+1, j), (i+1, j+1) of each cell
    (i, j), clamped at the last row and column (where the weight of the clamped corner is zero anyway)."""
    i = torch.arange(hs, device=device)[:, None]
    j = torch.arange(ws, device=device)[None, :]
    i1, j1 = (i + 1).clamp_(max=hs - 1), (j + 1).clamp_(max=ws - 1)
    return torch.stack([i * ws + j, i * ws + j1, i1 * ws + j, i1 * ws + j1]).view(4, -1)


def _candidates(flat: Tensor, corners: Tensor, slots: int) -> tuple[Tensor, Tensor | None]:
    """Logits ``(N, P)`` of ``P`` source points and each cell's corners ``(4, P)`` -> (candidate class per slot
    ``(k, P)`` int64, ``k <= slots``; the number of candidates per cell ``(P,)``, or None when every cell has
    one). Candidates fill the slots in class order (as the plain arg-max breaks ties); spare slots repeat the
    first; a cell with more than ``slots`` candidates keeps only its first ones (its pixels are resampled for
    every class)."""
    n, npts = flat.shape
    win = argmax_classes(flat)[1][corners]  # (4, P): each corner's winner
    idx = win[:1].clone()
    mixed = (win != win[:1]).any(0).nonzero().squeeze(1)  # cells whose corners have different winners
    if mixed.numel() == 0:  # one winner at all four corners dominates every other class: a single candidate
        return idx, None
    cm, wm = corners[:, mixed], win[:, mixed]  # (4, m)
    c = flat[:, cm]  # (N, 4, m): every class at each corner
    classes = torch.arange(n, device=flat.device)[:, None]
    dominated = torch.zeros(n, mixed.numel(), dtype=torch.bool, device=flat.device)
    for q in range(4):
        ref = c.gather(0, wm[q][None, None].expand(1, 4, -1))  # (1, 4, m): corner q's winner at the 4 corners
        dominated |= (c <= ref).all(1) & (classes != wm[q])
    cand = ~dominated
    rank = cand.cumsum(0) - 1
    count = rank[-1] + 1
    k = min(slots, int(count.max()))
    to = torch.where(cand & (rank < k), rank, torch.full_like(rank, k))
    sub = torch.zeros(k + 1, mixed.numel(), dtype=torch.long, device=flat.device)
    sub.scatter_(0, to, classes.expand_as(to).contiguous())
    sub = torch.where(torch.arange(k, device=flat.device)[:, None] >= count, sub[:1], sub[:k])
    idx = idx.expand(k, -1).clone()
    idx[:, mixed] = sub
    counts = torch.ones(npts, dtype=torch.long, device=flat.device)
    counts[mixed] = count
    return idx, counts


def _lerp4(v00: Tensor, v01: Tensor, v10: Tensor, v11: Tensor, wy: Tensor, wx: Tensor) -> Tensor:
    """Bilinear value from a cell's four corners: along y, then along x."""
    return torch.lerp(torch.lerp(v00, v10, wy), torch.lerp(v01, v11, wy), wx)


def resample_argmax(src: Tensor, size: tuple[int, int], threshold: float, background: bool = False,
                    region: tuple[float, float] | None = None, slots: int = SLOTS,
                    max_mixed: float = MAX_MIXED) -> tuple[np.ndarray, np.ndarray] | None:
    """logits ``(N, hs, ws)`` resampled to ``size`` = (W, H) -> (labels ``(H, W)`` uint16: arg-max + 1, or 0 where
    its sigmoid score is below ``threshold`` unless ``background``; scores ``(H, W)`` float32: the best class's
    sigmoid), or None when more than ``max_mixed`` of the cells have several candidates (noisy maps: resample
    densely instead). ``region`` = (w, h) in source pixels that the output covers (default: all of ``src``;
    smaller when it also holds padding), as :func:`fusionseg.tiling.upsample_rows` takes it.

    Every pixel is first resampled for its cell's first candidate only, separably; the pixels of cells with
    more candidates are then resampled for those (or, beyond ``slots``, for every class) one by one."""
    s = src.float().contiguous()
    n, hs, ws = s.shape
    npts = hs * ws
    W, H = size
    rw, rh = region if region is not None else (ws, hs)
    y0, wy = (t.to(s.device) for t in source_coords(H, rh / H, hs))
    x0, wx = (t.to(s.device) for t in source_coords(W, rw / W, ws))
    flat = s.view(n, npts)
    values = s.view(-1)
    corners = _corners(hs, ws, s.device)
    idx, counts = (_candidates(flat, corners, slots) if n > 1
                   else (torch.zeros(1, npts, dtype=torch.long, device=s.device), None))
    if counts is not None and float((counts > 1).float().mean()) > max_mixed:
        return None

    def columns_first(v: Tensor) -> Tensor:  # (P,) per cell -> (ws, hs), so that picking columns copies rows
        return v.view(hs, ws).t().contiguous()

    # The first candidate at each cell's four corners. Columns are picked first, at the source rows (few), then
    # each output row is a lerp of two copied rows; both picks are along the first dimension, which copies
    # whole rows (picking along the last one is many times slower).
    m00, m01, m10, m11 = (columns_first(values[idx[0] * npts + corners[q]]) for q in range(4))
    first = columns_first(idx[0].to(torch.int16)) if n > 1 else None  # class ids < 1000
    multi = columns_first(counts > 1) if counts is not None else None
    wxc = wx[:, None]
    labels = np.empty((H, W), dtype=np.uint16)
    scores = np.empty((H, W), dtype=np.float32)
    step = max(1, BAND_ELEMENTS // max(1, 4 * W))
    for r0 in range(0, H, step):
        r1 = min(H, r0 + step)
        ry, rw = y0[r0:r1], wy[r0:r1]
        a, b = int(ry[0]), int(ry[-1]) + 1  # source rows this band reads (rows are monotonic)
        rel = ry - a

        def cols(v: Tensor) -> Tensor:  # (ws, hs) per cell -> (W, b - a): the band's source rows, output columns
            return v[:, a:b].index_select(0, x0)

        def rows(v: Tensor) -> Tensor:  # (W, b - a) -> (R, W) per output pixel of the band
            return v.t().contiguous().index_select(0, rel)

        best = torch.lerp(rows(torch.lerp(cols(m00), cols(m01), wxc)), rows(torch.lerp(cols(m10), cols(m11), wxc)),
                          rw[:, None])  # (R, W)
        if first is not None:
            lab = rows(cols(first)).long()
        else:
            lab = torch.zeros((r1 - r0, W), dtype=torch.long, device=s.device)
        if multi is not None:
            rr, cc = rows(cols(multi)).nonzero(as_tuple=True)
            if rr.numel():
                cell = ry[rr] * ws + x0[cc]
                at = corners[:, cell]  # (4, m)
                few = counts[cell] <= slots
                every = torch.arange(n, device=s.device)[:, None]
                # the cell's candidates, or every class where it has more than the slots hold
                for f, table in ((few, idx[:, cell]), (~few, None)):
                    f = f.nonzero().squeeze(1)
                    if f.numel() == 0:
                        continue
                    cls = table[:, f] if table is not None else every.expand(-1, f.numel())  # (k, m)
                    val = _lerp4(*(values[cls * npts + at[q, f]] for q in range(4)), rw[rr[f]], wx[cc[f]])
                    vb, vs = argmax_classes(val)
                    best[rr[f], cc[f]] = vb
                    lab[rr[f], cc[f]] = cls.gather(0, vs[None])[0]
        write_band(labels, scores, r0, best, lab, threshold, background)
    return labels, scores
