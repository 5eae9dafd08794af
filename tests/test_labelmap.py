"""The label map from low-resolution logits: resampling only the classes that can win equals resampling all."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusionseg.labelmap import argmax_classes, resample_argmax, source_coords
from fusionseg.segmenter import labels_from_logits, upsample_rows


def smooth_logits(n: int, h: int, w: int, seed: int = 0, scale: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, n, max(2, h // 4), max(2, w // 4), generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0] * scale


def dense(lg: torch.Tensor, size: tuple[int, int], threshold: float, background: bool = False, region=None):
    """The plain way: every class resampled to full size (grid_sample), then the arg-max."""
    (_, _, up), = list(upsample_rows(lg, size, 10 ** 9, region))
    best, idx = up.max(0)
    prob = best.sigmoid()
    lab = idx + 1
    if not background:
        lab = torch.where(prob >= threshold, lab, torch.zeros_like(lab))
    return lab.numpy().astype(np.uint16), prob.numpy()


def fast(lg, size, threshold, background=False, region=None, **kw):
    return resample_argmax(lg, size, threshold, background, region, **kw)


@pytest.mark.parametrize("n", [1, 3, 20])
@pytest.mark.parametrize("size,region", [((160, 96), None), ((97, 203), None), ((150, 100), (13.5, 9.0)), ((24, 12), None)])
def test_resampling_the_candidates_equals_resampling_every_class(n, size, region):
    lg = smooth_logits(n, 12, 16, seed=n)
    want_lab, want_sc = dense(lg, size, 0.5, region=region)
    got = fast(lg, size, 0.5, region=region, max_mixed=1.0)
    assert got is not None
    lab, sc = got
    assert lab.shape == sc.shape == (size[1], size[0])
    assert np.array_equal(lab, want_lab)
    assert np.abs(sc - want_sc).max() < 1e-5
    if n > 1:
        assert len(np.unique(lab)) > 2  # several classes and "none" really compete


def test_background_mode_and_thresholds():
    lg = smooth_logits(5, 10, 10, seed=4)
    for thr in (0.0, 0.3, 0.9):
        for bg in (False, True):
            want = dense(lg, (64, 48), thr, bg)
            got = fast(lg, (64, 48), thr, bg, max_mixed=1.0)
            assert np.array_equal(got[0], want[0]) and np.abs(got[1] - want[1]).max() < 1e-5
    assert fast(lg, (64, 48), 0.0, True, max_mixed=1.0)[0].min() >= 1  # background mode never leaves 0


def test_a_class_that_wins_at_no_corner_still_wins_between_them():
    """Classes a and b each win at one corner of a cell; c, second at both, wins in the middle. Only the
    corners' winners would miss it: c must count as a candidate (it is not below a or b at every corner)."""
    lg = torch.tensor([[[10.0, -10.0]], [[-10.0, 10.0]], [[6.0, 6.0]]])  # (3 classes, 1 row, 2 columns)
    lab, _ = fast(lg, (8, 1), 0.5, region=None, max_mixed=1.0)
    want, _ = dense(lg, (8, 1), 0.5)
    assert np.array_equal(lab, want)
    assert 3 in lab[0] and 1 in lab[0] and 2 in lab[0]


def test_cells_with_more_candidates_than_slots_take_every_class():
    lg = smooth_logits(12, 8, 8, seed=7, scale=1.0)
    want = dense(lg, (70, 50), 0.5)
    for slots in (1, 2):
        lab, sc = fast(lg, (70, 50), 0.5, slots=slots, max_mixed=1.0)
        assert np.array_equal(lab, want[0]) and np.abs(sc - want[1]).max() < 1e-5


def test_noisy_maps_are_declined_and_the_caller_resamples_densely():
    lg = torch.randn(20, 16, 16, generator=torch.Generator().manual_seed(0)) * 3
    assert fast(lg, (128, 128), 0.5) is None  # nearly every cell has several candidates
    lab, sc = labels_from_logits(lg, (128, 128), 0.5)  # falls back to the dense path
    want = dense(lg, (128, 128), 0.5)
    assert np.array_equal(lab, want[0]) and np.abs(sc - want[1]).max() < 1e-5


def test_labels_from_logits_upsampling_matches_dense_with_padding_region():
    lg = smooth_logits(8, 24, 32, seed=2)
    want = dense(lg, (300, 200), 0.5, region=(30.0, 20.0))
    lab, sc = labels_from_logits(lg, (300, 200), 0.5, region=(30.0, 20.0))
    assert np.array_equal(lab, want[0]) and np.abs(sc - want[1]).max() < 1e-5


def test_labels_from_logits_fast_path_switch(monkeypatch):
    """With the fast paths off (fusionseg.runtime.fast_paths) labels_from_logits resamples every class (the plain
    reference, resample_argmax never called); on, it prunes: the same labels, scores within 1e-5."""
    import fusionseg.tiling as T
    from fusionseg.runtime import fast_paths_as
    lg = smooth_logits(6, 24, 32, seed=5)
    calls = []
    real = T.resample_argmax
    monkeypatch.setattr(T, "resample_argmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    with fast_paths_as(False):
        plain = labels_from_logits(lg, (300, 200), 0.5)
    assert calls == []
    fast_ = labels_from_logits(lg, (300, 200), 0.5)
    assert calls == [1]
    assert np.array_equal(plain[0], fast_[0]) and np.abs(plain[1] - fast_[1]).max() < 1e-5
    assert len(np.unique(plain[0])) > 2


def test_ties_go_to_the_lower_class_everywhere():
    lg = smooth_logits(1, 6, 6).expand(4, -1, -1).clone()  # four identical maps
    lab, _ = fast(lg, (30, 30), 0.0, background=True, max_mixed=1.0)
    assert (lab == 1).all()
    lab2, _ = labels_from_logits(lg, (6, 6), 0.0, background=True)  # identity size: argmax_classes
    assert (lab2 == 1).all()


def test_argmax_classes_equals_max_with_first_index_at_ties():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 4, (7, 33, 20), generator=g).float()  # many ties
    best, idx = argmax_classes(x)
    assert torch.equal(best, x.amax(0))
    first = (x == best).float().argmax(0)  # argmax of a 0/1 map returns the first maximal index
    assert torch.equal(idx, first)
    y = torch.randn(300, 5, generator=g)  # more classes than uint8 holds: plain max
    assert torch.equal(argmax_classes(y)[1], y.max(0).indices)


def test_source_coords_follow_interpolate():
    """Weights reproduce F.interpolate(align_corners=False) along one axis, including the clamped borders."""
    src = torch.randn(1, 1, 1, 7)
    out = F.interpolate(src, size=(1, 25), mode="bilinear", align_corners=False)[0, 0, 0]
    lo, w = source_coords(25, 7 / 25, 7)
    hi = (lo + 1).clamp(max=6)
    mine = torch.lerp(src[0, 0, 0][lo], src[0, 0, 0][hi], w)
    assert torch.allclose(mine, out, atol=1e-6)
