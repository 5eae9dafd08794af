"""Benchmark loaders on small synthetic copies laid out exactly like the real datasets."""
from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusionseg.data import benchmarks as B
from fusionseg.data.benchmarks import (FSS1000, Coco20i, Mosaic4, MosaicSample, Pascal5i, coco_fold_classes,
                                       decode_coco_segmentation, generate_pascal_split, largest_component,
                                       open_dataset, pascal_fold_classes, render_coco_mask)
from fusionseg.data.datasets import DatasetError, FolderDataset

from conftest import shared_data


@pytest.fixture(autouse=True)
def _no_global_splits(monkeypatch, tmp_path):
    """Tests see only the split lists they write: no $FUSIONSEG_SPLITS."""
    monkeypatch.delenv(B.SPLITS_ENV, raising=False)


def _rgb(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")


# --------------------------------------------------------------------------------------------------- PASCAL
PASCAL_MASKS = {  # id -> list of (class, (x0, y0, x1, y1)) painted in order, then a 255 border around each
    "2007_000033": [(1, (2, 2, 10, 8)), (7, (12, 2, 20, 10))],   # aeroplane (fold 0) + car (fold 1)
    "2007_000061": [(8, (0, 0, 6, 6)), (15, (8, 8, 20, 14))],    # cat (fold 1) + person (fold 2)
    "2008_000002": [(6, (1, 1, 9, 9)), (12, (10, 5, 18, 13))],   # bus (fold 1) + dog (fold 2)
    "2009_000001": [(2, (3, 3, 15, 12))],                         # bicycle (fold 0)
}
PASCAL_LISTS = {
    "val/fold1.txt": ["2007_000033__07", "2007_000061__08", "2008_000002__06"],
    "val/fold0.txt": ["2007_000033__01", "2009_000001__02"],
    "trn/fold0.txt": ["2007_000033__01", "2009_000001__02"],
    "trn/fold1.txt": ["2007_000033__07", "2008_000002__06"],
    "trn/fold2.txt": ["2008_000002__12", "2007_000061__15"],
    "trn/fold3.txt": [],
}


def make_voc(root: Path, palette: bool = True) -> tuple[Path, Path]:
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClassAug").mkdir()
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    for k, (id, objs) in enumerate(PASCAL_MASKS.items()):
        m = np.zeros((16, 22), np.uint8)
        for c, (x0, y0, x1, y1) in objs:
            m[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = 255   # VOC-style boundary
            m[y0:y1, x0:x1] = c
        _rgb(22, 16, k).save(voc / "JPEGImages" / f"{id}.jpg")
        im = Image.fromarray(m, "L")
        if palette:
            im = im.convert("P")
        im.save(voc / "SegmentationClassAug" / f"{id}.png")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n2007_000061\n2008_000002\n")
    splits = root / "splits"
    for rel, lines in PASCAL_LISTS.items():
        p = splits / "hsnet" / "pascal" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(line + "\n" for line in lines))
    return voc, splits


def test_fold_class_sets():
    assert pascal_fold_classes(1) == [6, 7, 8, 9, 10]
    assert pascal_fold_classes(3) == [16, 17, 18, 19, 20]
    c0 = coco_fold_classes(0)
    assert c0 == list(range(1, 80, 4)) and len(c0) == 20 and c0[:3] == [1, 5, 9] and c0[-1] == 77
    assert coco_fold_classes(3)[:2] == [4, 8] and coco_fold_classes(3)[-1] == 80
    assert sorted(sum((coco_fold_classes(f) for f in range(4)), [])) == list(range(1, 81))
    for bad in (4, -1, None, 1.5, True, "x"):
        with pytest.raises(DatasetError, match="fold"):
            pascal_fold_classes(bad)


def test_pascal_val_fold1(tmp_path):
    voc, splits = make_voc(tmp_path)
    ds = Pascal5i(tmp_path / "VOCdevkit", fold=1, split="val", split_dir=splits)
    assert ds.root == voc and len(ds.class_names) == 20 and ds.class_names[5] == "bus"
    assert ds.class_names[10] == "dining table" and ds.class_names[19] == "tv monitor"
    assert ds.novel_classes == [6, 7, 8, 9, 10]
    assert ds.ids == ["2007_000033", "2007_000061", "2008_000002"]
    s = ds[0]
    assert s.image.mode == "RGB" and s.image.size == (22, 16) and s.mask.dtype == np.uint8
    # val keeps all classes (no novel -> ignore), with the 255 boundary
    assert set(np.unique(s.mask)) == {0, 1, 7, 255}
    assert s.mask[5, 5] == 1 and s.mask[5, 15] == 7 and s.mask[1, 1] == 255
    # HSNet: 1,000 episodes cycling through the list
    eps = ds.episodes()
    assert len(eps) == 1000 and eps[:4] == [(0, 7), (1, 8), (2, 6), (0, 7)] and eps[999] == eps[0]
    assert ds.episodes(n=None) == [(0, 7), (1, 8), (2, 6)]
    assert all(c in ds.novel_classes for _, c in eps)
    assert ds.split_source.endswith("val/fold1.txt")


def test_pascal_trn_novel_becomes_ignore(tmp_path):
    _, splits = make_voc(tmp_path)
    ds = Pascal5i(tmp_path, fold=1, split="trn", split_dir=splits)   # a root holding VOCdevkit/VOC2012 works too
    assert ds.novel_as_ignore and ds.base_classes == [1, 2, 3, 4, 5] + list(range(11, 21))
    # union of trn/fold0, fold2, fold3 (not fold1), first-appearance order
    assert ds.ids == ["2007_000033", "2009_000001", "2008_000002", "2007_000061"]
    assert ds.episodes(n=None) == [(0, 1), (1, 2), (2, 12), (3, 15)]
    m = ds.load_mask("2007_000033")
    assert m[5, 5] == 1 and m[5, 15] == 255 and 7 not in np.unique(m)   # car (novel in fold 1) -> ignore
    m = ds.load_mask("2008_000002")
    assert m[5, 5] == 255 and m[8, 14] == 12                              # bus -> ignore, dog kept
    kept = Pascal5i(tmp_path, fold=1, split="trn", split_dir=splits, novel_as_ignore=False)
    assert kept.load_mask("2007_000033")[5, 15] == 7


def test_pascal_errors(tmp_path):
    voc, splits = make_voc(tmp_path)
    with pytest.raises(DatasetError, match="fold"):
        Pascal5i(voc, fold=4, split_dir=splits)
    with pytest.raises(DatasetError, match="split"):
        Pascal5i(voc, fold=0, split="bogus", split_dir=splits)
    # a list holding classes of another fold is refused
    wrong = tmp_path / "wrong" / "val"
    wrong.mkdir(parents=True)
    (wrong / "fold0.txt").write_text("2007_000033__07\n")
    with pytest.raises(DatasetError, match="right fold"):
        Pascal5i(voc, fold=0, split_dir=tmp_path / "wrong")
    (wrong / "fold0.txt").write_text("2007_000033_01\n")
    with pytest.raises(DatasetError, match=r"fold0.txt:1"):
        Pascal5i(voc, fold=0, split_dir=tmp_path / "wrong")
    with pytest.raises(DatasetError, match="not found in"):
        Pascal5i(voc, fold=2, split_dir=tmp_path / "wrong")
    # a listed image without its file
    (voc / "JPEGImages" / "2009_000001.jpg").unlink()
    with pytest.raises(DatasetError, match="2009_000001.jpg"):
        Pascal5i(voc, fold=0, split_dir=splits)
    # bad layouts name the missing piece
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"no JPEGImages/ folder .*SegmentationClassAug/"):
        Pascal5i(empty, fold=0, split_dir=splits)
    (empty / "JPEGImages").mkdir()
    with pytest.raises(DatasetError, match=r"no SegmentationClassAug/ folder \(PASCAL-5i needs VOC2012"):
        Pascal5i(empty, fold=0, split_dir=splits)
    with pytest.raises(DatasetError, match="not found"):
        Pascal5i(tmp_path / "nowhere", fold=0)


def test_pascal_bad_mask_value(tmp_path):
    voc, splits = make_voc(tmp_path, palette=False)
    Image.fromarray(np.full((16, 22), 40, np.uint8), "L").save(voc / "SegmentationClassAug" / "2007_000033.png")
    ds = Pascal5i(voc, fold=1, split_dir=splits)
    with pytest.raises(DatasetError, match="mask value 40"):
        ds[0]


def test_pascal_generated_split(tmp_path):
    voc, _ = make_voc(tmp_path)
    assert generate_pascal_split(voc, 1, "val") == [("2007_000033", 7), ("2007_000061", 8), ("2008_000002", 6)]
    assert generate_pascal_split(voc, 1, "trn") == [("2009_000001", 2)]   # masks not in val.txt
    with pytest.warns(UserWarning, match="not the published split"):
        ds = Pascal5i(voc, fold=1)   # no list anywhere -> generated from the masks
    assert ds.split_source == "generated" and len(ds) == 3


def test_split_lists_are_looked_up_where_the_docs_say(tmp_path, monkeypatch):
    from fusionseg.data.benchmarks.splits import _find_split_file
    root = tmp_path / "VOC2012"
    monkeypatch.setenv(B.SPLITS_ENV, str(tmp_path / "env"))
    path, tried = _find_split_file("pascal", "val/fold0.txt", None, root)
    assert path is None
    # $FUSIONSEG_SPLITS first, then ROOT/splits; each plain, under <benchmark>/ and under hsnet/<benchmark>/
    assert tried == [tmp_path / "env" / "val/fold0.txt", tmp_path / "env" / "pascal" / "val/fold0.txt",
                     tmp_path / "env" / "hsnet/pascal" / "val/fold0.txt", root / "splits" / "val/fold0.txt",
                     root / "splits" / "pascal" / "val/fold0.txt", root / "splits" / "hsnet/pascal" / "val/fold0.txt"]
    assert all(p.is_relative_to(tmp_path) for p in tried)   # no other place (the package ships no lists)
    f = root / "splits" / "hsnet" / "pascal" / "val" / "fold0.txt"
    f.parent.mkdir(parents=True)
    f.write_text("2007_000033__01\n")
    assert _find_split_file("pascal", "val/fold0.txt", None, root)[0] == f
    g = tmp_path / "env" / "pascal" / "val" / "fold0.txt"
    g.parent.mkdir(parents=True)
    g.write_text("2007_000033__01\n")
    assert _find_split_file("pascal", "val/fold0.txt", None, root)[0] == g          # the variable wins
    assert _find_split_file("pascal", "val/fold0.txt", tmp_path / "nowhere", root) == (
        None, [tmp_path / "nowhere" / "val/fold0.txt", tmp_path / "nowhere" / "pascal" / "val/fold0.txt",
               tmp_path / "nowhere" / "hsnet/pascal" / "val/fold0.txt"])           # split_dir: nothing else


def test_hsnet_lists_follow_the_fold_rule():
    splits = shared_data("splits/hsnet")
    counts = {"val": [346, 451, 725, 346], "trn": [2286, 3425, 5883, 2086]}
    for split in ("val", "trn"):
        for f in range(4):
            entries = B._read_pascal_list(splits / "pascal" / split / f"fold{f}.txt")
            assert len(entries) == counts[split][f]
            assert {c for _, c in entries} == set(pascal_fold_classes(f))   # trn/fold{f} lists fold f's classes
    lists = B._load_coco_list(splits / "coco" / "val" / "fold3.pkl")
    assert sorted(k + 1 for k, v in lists.items() if v) == coco_fold_classes(3)
    assert all(p.startswith("val2014/COCO_val2014_") for p in lists[3][:10])


# --------------------------------------------------------------------------------------------------- COCO
MISSING_COCO_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
COCO_CAT_IDS = [i for i in range(1, 91) if i not in MISSING_COCO_IDS]


def _rle_encode_string(mask: np.ndarray) -> str:
    """Test-side encoder for COCO compressed RLE (column-major runs, 6-bit chars, delta from run i-2)."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    counts, prev, run = [], 0, 0
    for v in flat:
        if v != prev:
            counts.append(run)
            run, prev = 0, v
        run += 1
    counts.append(run)
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _rect_poly(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def make_coco(root: Path, split: str = "val") -> Path:
    sub = f"{split}2014"
    (root / sub).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    H, W = 30, 40
    cats = [{"id": i, "name": "person" if i == 1 else f"thing{i}", "supercategory": "x"} for i in COCO_CAT_IDS]
    images, anns = [], []
    crowd = np.zeros((H, W), np.uint8)
    crowd[15:30, 15:40] = 1   # overlaps the person box [0, 20) x [0, 20)
    crowd_rle = {"size": [H, W], "counts": [int(v) for v in _runs(crowd)]}
    blob = np.zeros((H, W), np.uint8)
    blob[5:15, 5:25] = 1
    spec = {  # image number -> annotations (category id, segmentation, iscrowd, area)
        139: [(1, _rect_poly(0, 0, 20, 20), 0, 400.0),          # person (class 1) big, painted first
              (2, _rect_poly(10, 10, 15, 15), 0, 25.0),         # bicycle (class 2) small, on top
              (1, crowd_rle, 1, 100.0)],                        # crowd region -> 255 where not covered
        285: [(5, {"size": [H, W], "counts": _rle_encode_string(blob)}, 0, 200.0)],   # airplane (class 5)
        632: [(9, _rect_poly(2, 2, 6, 8), 0, 24.0)],            # boat (class 9)
        724: [(2, _rect_poly(0, 0, 8, 8), 0, 64.0)],            # class 2 only: no fold-0 class
    }
    for k, (num, items) in enumerate(spec.items()):
        fname = f"COCO_{sub}_{num:012d}.jpg"
        _rgb(W, H, k).save(root / sub / fname)
        images.append({"id": num, "file_name": fname, "height": H, "width": W})
        for j, (cid, seg, crowd_flag, area) in enumerate(items):
            anns.append({"id": num * 10 + j, "image_id": num, "category_id": cid, "segmentation": seg,
                         "iscrowd": crowd_flag, "area": area, "bbox": [0, 0, 1, 1]})
    (root / "annotations" / f"instances_{sub}.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def _runs(mask: np.ndarray) -> list[int]:
    flat = mask.T.reshape(-1)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return runs if flat[0] == 0 else [0] + runs


def test_rle_and_polygon_decoding():
    m = np.zeros((7, 5), np.uint8)
    m[2:5, 1:4] = 1
    m[6, 4] = 1
    assert (decode_coco_segmentation({"size": [7, 5], "counts": _rle_encode_string(m)}, 7, 5) == m).all()
    assert (decode_coco_segmentation({"size": [7, 5], "counts": _rle_encode_string(m).encode()}, 7, 5) == m).all()
    assert (decode_coco_segmentation({"size": [7, 5], "counts": _runs(m)}, 7, 5) == m).all()
    poly = decode_coco_segmentation(_rect_poly(1, 2, 4, 5), 7, 5)
    assert (poly == m.astype(bool) & ~(np.arange(7)[:, None] == 6)).all()   # rectangle [1,4) x [2,5)
    tri = decode_coco_segmentation([[0, 0, 4, 0, 0, 4]], 5, 5)
    # pycocotools' rasterisation of the triangle: the pixels with x + y < 3
    assert tri.sum() == 6 and tri[0, 2] and not tri[0, 3] and tri[2, 0] and not tri[3, 0]
    # an instance of several polygons is their union; fragments of fewer than 3 points are dropped
    two = decode_coco_segmentation(_rect_poly(1, 2, 4, 5) + [[0, 0, 4, 0, 0, 4], [1, 1, 2, 2]], 7, 5)
    assert (two == (poly | np.pad(tri, ((0, 2), (0, 0))))).all()
    assert not decode_coco_segmentation([[1, 1, 2, 2]], 7, 5).any()
    with pytest.raises(DatasetError, match="RLE runs add up to 7 pixels"):
        decode_coco_segmentation({"size": [7, 5], "counts": [3, 4]}, 7, 5)
    with pytest.raises(DatasetError, match="RLE size 5x7 differs"):
        decode_coco_segmentation({"size": [5, 7], "counts": [35]}, 7, 5)
    with pytest.raises(DatasetError, match="unreadable COCO RLE"):
        decode_coco_segmentation({"size": [7, 5], "counts": "9" * 50}, 7, 5)   # runs past the image
    with pytest.raises(DatasetError, match="unsupported COCO segmentation"):
        decode_coco_segmentation(3, 7, 5)


def test_compressed_rle_round_trips_through_pycocotools():
    mu = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        rle = mu.encode(np.asfortranarray(m))
        seg = {"size": [h, w], "counts": rle["counts"].decode()}
        assert seg["counts"] == _rle_encode_string(m)   # the test-side encoder writes what pycocotools writes
        assert (decode_coco_segmentation(seg, h, w) == m.astype(bool)).all()


def test_missing_pycocotools_is_one_clear_error(tmp_path, monkeypatch):
    import sys
    root = make_coco(tmp_path / "coco")
    monkeypatch.setitem(sys.modules, "pycocotools", None)        # import pycocotools -> ImportError
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    for call in (lambda: Coco20i(root, fold=0), lambda: open_dataset(f"coco20i:{root}", fold=0),
                 lambda: decode_coco_segmentation(_rect_poly(1, 2, 4, 5), 7, 5)):
        with pytest.raises(DatasetError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "pycocotools" in msg and "pip install 'fusionseg[coco]'" in msg


def test_coco_val_fold0(tmp_path):
    root = make_coco(tmp_path / "coco")
    with pytest.warns(UserWarning, match="generating"):
        ds = Coco20i(root, fold=0, split="val")
    assert len(ds.class_names) == 80 and ds.class_names[0] == "person"
    assert ds.novel_classes == coco_fold_classes(0) and len(ds.novel_classes) == 20
    # generated lists: images with a non-crowd instance of a fold-0 class (1, 5, 9 here); 724 has only class 2
    assert ds.ids == ["COCO_val2014_000000000139", "COCO_val2014_000000000285", "COCO_val2014_000000000632"]
    assert ds.images_of(1) == [0] and ds.images_of(5) == [1] and ds.images_of(9) == [2]
    s = ds[0]
    assert s.image.size == (40, 30) and s.mask.shape == (30, 40)
    m = s.mask
    assert m[5, 5] == 1 and m[12, 12] == 2 and m[0, 19] == 1 and m[0, 20] == 0   # small bicycle on top
    assert m[25, 35] == 255 and m[14, 35] == 0 and m[17, 17] == 1   # crowd -> ignore where no instance is
    assert (ds.load_mask("COCO_val2014_000000000285") == np.pad(np.ones((10, 20), np.uint8) * 5,
                                                                ((5, 15), (5, 15)))).all()
    # the 80 classes are in COCO category-id order (id 13 "thing13" is class 12: ids 12 is missing)
    assert ds.class_names[11] == "thing13"
    eps = ds.episodes(n=50, seed=3)
    assert len(eps) == 50 and eps == ds.episodes(n=50, seed=3) and eps != ds.episodes(n=50, seed=4)
    assert {c for _, c in eps} == {1, 5, 9} and all(ds.images_of(c) == [i] for i, c in eps)


def test_coco_pkl_lists_and_trn(tmp_path):
    root = make_coco(tmp_path / "coco", split="train")
    lists = {k: [] for k in range(80)}
    lists[1] = ["train2014/COCO_train2014_000000000139.jpg", "train2014/COCO_train2014_000000000724.jpg"]
    (tmp_path / "sp" / "trn").mkdir(parents=True)
    (tmp_path / "sp" / "trn" / "fold0.pkl").write_bytes(pickle.dumps(lists, protocol=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = Coco20i(root, fold=0, split="trn", split_dir=tmp_path / "sp")
    assert ds.ids == ["COCO_train2014_000000000139", "COCO_train2014_000000000724"]
    assert ds.novel_as_ignore and ds.split_classes == ds.base_classes and len(ds.base_classes) == 60
    m = ds.load_mask(ds.ids[0])
    assert m[5, 5] == 255 and m[12, 12] == 2     # person (novel in fold 0) -> ignore, bicycle kept
    assert ds.episodes(n=None) == [(0, 2), (1, 2)]
    # a list with a novel class is the wrong file
    lists[0] = ["train2014/COCO_train2014_000000000139.jpg"]
    (tmp_path / "sp" / "trn" / "fold0.pkl").write_bytes(pickle.dumps(lists, protocol=3))
    with pytest.raises(DatasetError, match="right fold"):
        Coco20i(root, fold=0, split="trn", split_dir=tmp_path / "sp")
    # a pickle with objects is refused, not executed
    (tmp_path / "sp" / "trn" / "fold0.pkl").write_bytes(pickle.dumps({0: [Path("x")]}))
    with pytest.raises(DatasetError, match="not a plain"):
        Coco20i(root, fold=0, split="trn", split_dir=tmp_path / "sp")


def test_coco_errors(tmp_path):
    root = make_coco(tmp_path / "coco")
    with pytest.raises(DatasetError, match=r"no train2014/ folder \(COCO-20i needs the COCO 2014 layout"):
        Coco20i(root, fold=0, split="trn")
    (root / "annotations" / "instances_val2014.json").rename(root / "elsewhere.json")
    with pytest.raises(DatasetError, match=r"annotations/instances_val2014.json"):
        Coco20i(root, fold=0)
    with pytest.warns(UserWarning):
        ds = Coco20i(root, fold=0, instances_json=root / "elsewhere.json")
    assert len(ds) == 3
    with pytest.raises(DatasetError, match="fold"):
        Coco20i(root, fold=7, instances_json=root / "elsewhere.json")


def test_render_matches_shared_coco_masks():
    root = shared_data("coco2017_mini")
    meta = json.loads((root / "instances.json").read_text())
    cats = sorted(meta["categories"], key=lambda c: c["id"])
    index = {c["id"]: k for k, c in enumerate(cats, start=1)}
    anns: dict[int, list] = {}
    for a in meta["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    diff = total = 0
    for im in sorted(meta["images"], key=lambda x: x["file_name"])[:30]:
        ref = np.asarray(Image.open(root / "masks" / (Path(im["file_name"]).stem + ".png")))
        ours = render_coco_mask(anns.get(im["id"], []), im["height"], im["width"], index)
        diff += int((ours != ref).sum())
        total += int((ref > 0).sum())
    assert diff <= 0.01 * total   # our polygon fill vs the pycocotools rendering shipped with the data


# --------------------------------------------------------------------------------------------------- FSS-1000
FSS_CLASSES = ["bus", "hotel_slipper", "burj_al", "abacus", "zebra"]


def make_fss(root: Path, n_img: int = 3) -> tuple[Path, Path]:
    for k, cat in enumerate(FSS_CLASSES):
        d = root / cat
        d.mkdir(parents=True)
        for j in [1, 2, 10][:n_img]:
            ext = ".jpeg" if (cat == "burj_al" and j == 2) else ".jpg"
            _rgb(24, 24, 100 * k + j).save(d / f"{j}{ext}")
            g = np.zeros((24, 24), np.uint8)
            g[4:20, 4:20] = 255
            g[4:20, 3] = 128     # anti-aliased edge: kept
            g[4:20, 2] = 127     # just below the threshold
            Image.fromarray(np.stack([g] * 3, -1), "RGB").save(d / f"{j}.png")   # RGB masks, as some are
    _rgb(24, 24, 999).save(root / "bus" / "1.jpeg")    # stray .jpeg beside 1.jpg: ignored
    splits = root.parent / "fss_splits"
    splits.mkdir(exist_ok=True)
    (splits / "test.txt").write_text("\n".join(FSS_CLASSES[:4]) + "\n")
    (splits / "val.txt").write_text("zebra\n")
    return root, splits


def test_fss1000(tmp_path):
    root, splits = make_fss(tmp_path / "FSS")
    ds = FSS1000(root, split="test", split_dir=splits)
    assert ds.categories == ("abacus", "burj_al", "bus", "hotel_slipper")          # sorted, as HSNet
    assert ds.class_names == ("abacus", "burj al", "bus", "hotel slipper")
    assert len(ds) == 12 and ds.ids[:3] == ["abacus/1", "abacus/2", "abacus/10"]   # numeric order
    assert ds._image_path("burj_al/2").name == "2.jpeg"                            # only a .jpeg: used
    assert ds._image_path("bus/1").name == "1.jpg"                                 # stray .jpeg ignored
    s = ds[ds.ids.index("bus/1")]
    assert s.image.size == (24, 24)
    assert s.image.mode == "RGB"
    assert s.mask[10, 10] == 3 and s.mask[10, 3] == 3 and s.mask[10, 2] == 0 and s.mask[0, 0] == 0
    assert set(np.unique(s.mask)) == {0, 3}
    assert ds.episodes() == [(i, ds.class_of(i)) for i in range(12)] and len(ds.episodes(n=30)) == 30
    assert FSS1000(root, split="val", split_dir=splits).class_names == ("zebra",)
    assert len(FSS1000(root, split="all")) == 15
    # a 0/1 mask (the authors' example format) is read with threshold 1
    Image.fromarray(np.pad(np.ones((4, 4), np.uint8), 10), "L").save(root / "abacus" / "1.png")
    assert ds.load_mask("abacus/1").sum() == 16


def test_fss1000_errors(tmp_path):
    root, splits = make_fss(tmp_path / "FSS")
    with pytest.raises(DatasetError, match="class list trn.txt not found"):
        FSS1000(root, split="trn", split_dir=splits)
    (splits / "test.txt").write_text("bus\nmissing_class\n")
    with pytest.raises(DatasetError, match="no folder 'missing_class'"):
        FSS1000(root, split="test", split_dir=splits)
    (splits / "test.txt").write_text("bus\n")
    (root / "bus" / "2.png").unlink()
    with pytest.raises(DatasetError, match="no mask 2.png"):
        FSS1000(root, split="test", split_dir=splits)
    with pytest.raises(DatasetError, match="does not look like FSS-1000"):
        FSS1000(tmp_path / "fss_splits", split="test", split_dir=splits)


# --------------------------------------------------------------------------------------------------- Mosaic-4
def _arrays(ds):
    return [(np.asarray(s.image).copy(), s.mask.copy(), s.query) for s in ds]


def test_mosaic4_from_fss_is_deterministic(tmp_path):
    root, splits = make_fss(tmp_path / "FSS")
    fss = FSS1000(root, split="all")
    a = Mosaic4(fss, n=6, seed=0, size=48)
    b = Mosaic4(fss, n=6, seed=0, size=48)
    c = Mosaic4(fss, n=6, seed=1, size=48)
    A, Bm, C = _arrays(a), _arrays(b), _arrays(c)
    assert all((x[0] == y[0]).all() and (x[1] == y[1]).all() and x[2] == y[2] for x, y in zip(A, Bm))
    assert any((x[0] != y[0]).any() or (x[1] != y[1]).any() for x, y in zip(A, C))
    for s in a:
        assert isinstance(s, MosaicSample) and s.image.size == (48, 48) and s.mask.shape == (48, 48)
        tile_classes = [c for _, c in s.tiles]
        assert len(set(tile_classes)) == 4 and s.query in tile_classes
        assert s.query_name == fss.class_names[s.query - 1]
        # each quadrant holds its own tile's class only
        for q, cls in enumerate(tile_classes):
            r, k = divmod(q, 2)
            quad = s.mask[r * 24:(r + 1) * 24, k * 24:(k + 1) * 24]
            assert set(np.unique(quad)) == {0, cls}
        present = [int(v) for v in np.unique(s.mask) if 0 < v < 255]
        assert sorted(present) == sorted(tile_classes)
    assert a.episodes() == [(i, s.query) for i, s in enumerate(a)]


def make_blocks_dataset(root: Path, n: int = 10) -> Path:
    """A folder dataset with 5 classes: each image has two coloured blocks of two classes, some with void."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    colours = {1: (220, 30, 30), 2: (30, 220, 30), 3: (30, 30, 220), 4: (220, 220, 30), 5: (30, 220, 220)}
    for i in range(n):
        img = np.full((40, 60, 3), 128, np.uint8)
        mask = np.zeros((40, 60), np.uint8)
        a, b = i % 5 + 1, (i + 2) % 5 + 1
        img[5:25, 5:25], mask[5:25, 5:25] = colours[a], a
        img[20:35, 30:55], mask[20:35, 30:55] = colours[b], b
        mask[2:4, 30:40] = a                 # a second, smaller component of class a
        mask[0, :] = 255                     # a void row
        Image.fromarray(img).save(root / "images" / f"im{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"im{i:02d}.png")
    (root / "dataset.json").write_text(json.dumps({
        "format": "fusionseg-folder/1", "images": "images", "masks": "masks",
        "classes": {str(k): f"class{k}" for k in range(1, 6)}, "background_values": [0], "ignore_values": [255]}))
    return root


def test_largest_component():
    m = np.zeros((6, 8), bool)
    m[1:3, 1:4] = True       # 6 pixels
    m[4:6, 5:8] = True       # 6 pixels ...
    m[3, 7] = True           # ... + 1 above them = 7: the largest
    m[3, 4] = True           # touches the 7-block only diagonally: a component of its own
    m[5, 0:3] = True         # 3 pixels
    assert largest_component(m) == (7, (5, 3, 8, 6))
    u = np.zeros((5, 5), bool)
    u[0:4, 0] = u[0:4, 4] = True
    u[3, :] = True           # a U: one component of 4 + 4 + 3 = 11
    assert largest_component(u) == (11, (0, 0, 5, 4))
    assert largest_component(np.zeros((3, 3), bool)) is None


def test_mosaic4_from_folder_dataset(tmp_path):
    src = FolderDataset(make_blocks_dataset(tmp_path / "blocks"))
    a = Mosaic4(src, n=5, seed=0, size=64)
    b = Mosaic4(src, n=5, seed=0, size=64)
    assert sorted(a.tiles) == [1, 2, 3, 4, 5]
    # the crop of class a is the 20x20 block (largest component) grown by 10% on each side, square
    idx, box = a.tiles[1][0]
    assert box == (3, 3, 27, 27)
    for x, y in zip(_arrays(a), _arrays(b)):
        assert (x[0] == y[0]).all() and (x[1] == y[1]).all() and x[2] == y[2]
    assert any((x[1] != y[1]).any() for x, y in zip(_arrays(a), _arrays(Mosaic4(src, n=5, seed=9, size=64))))
    for s in a:
        cls = [c for _, c in s.tiles]
        assert len(set(cls)) == 4 and s.query in cls
        for q, c in enumerate(cls):
            r, k = divmod(q, 2)
            quad = s.mask[r * 32:(r + 1) * 32, k * 32:(k + 1) * 32]
            assert set(np.unique(quad)) <= {0, c, 255} and (quad == c).mean() > 0.4
    # others='background': other classes in a crop become 0, void stays 255
    bg = Mosaic4(src, n=5, seed=0, size=64, others="background", margin=1.0)
    for s in bg:
        cls = [c for _, c in s.tiles]
        assert {int(v) for v in np.unique(s.mask)} - {0, 255} <= set(cls)
    # the same large crops with others='ignore' (default) mark the other block 255 instead of 0
    ig = Mosaic4(src, n=5, seed=0, size=64, margin=1.0)
    turned = [((x.mask == 255) & (y.mask == 0)).sum() for x, y in zip(ig, bg)]
    assert sum(turned) > 0 and all((x.mask[(y.mask != 0)] == y.mask[y.mask != 0]).all() for x, y in zip(ig, bg))
    with pytest.raises(DatasetError, match="at least 4 classes"):
        Mosaic4(src, n=2, min_area=0.2)


def test_mosaic4_from_msrc():
    root = shared_data("msrc_v2")
    src = FolderDataset(root)
    m = Mosaic4(src, n=4, seed=0, size=128)
    for s in m:
        assert s.image.size == (128, 128) and s.mask.shape == (128, 128)
        cls = [c for _, c in s.tiles]
        assert len(set(cls)) == 4 and s.query in cls
        present = {int(v) for v in np.unique(s.mask) if 0 < v < 255}
        assert present == set(cls)   # others -> ignore: exactly the four tile classes remain


# --------------------------------------------------------------------------------------------------- dispatch
def test_open_dataset_dispatch(tmp_path):
    voc, splits = make_voc(tmp_path / "voc")
    root, fsplits = make_fss(tmp_path / "FSS")
    blocks = make_blocks_dataset(tmp_path / "blocks")
    ds = open_dataset(f"pascal5i:{voc}", fold=1, split_dir=splits)
    assert isinstance(ds, Pascal5i) and ds.novel_classes == [6, 7, 8, 9, 10] and ds.split == "val"
    with pytest.warns(UserWarning, match="generating"):   # no split lists found: generated, with a warning
        assert isinstance(open_dataset(f"pascal5i:{voc}", fold=1), Pascal5i)
    assert open_dataset(f"pascal5i:{voc}", fold=1, split="trn", split_dir=splits).split == "trn"
    assert isinstance(open_dataset(f"fss1000:{root}", split_dir=fsplits), FSS1000)
    mos = open_dataset(f"mosaic4:{root}", split="all", n=3, seed=2, size=32)
    assert isinstance(mos, Mosaic4) and len(mos) == 3 and isinstance(mos.source, FSS1000)
    fm = open_dataset(f"mosaic4:{blocks}", n=2, size=32)
    assert isinstance(fm.source, FolderDataset) and len(fm) == 2
    assert isinstance(open_dataset(str(blocks)), FolderDataset)
    coco = make_coco(tmp_path / "coco")
    with pytest.warns(UserWarning):
        assert isinstance(open_dataset(f"coco20i:{coco}", fold=0), Coco20i)


def test_open_dataset_errors(tmp_path):
    voc, splits = make_voc(tmp_path / "voc")
    with pytest.raises(DatasetError, match="unknown dataset 'voc12'"):
        open_dataset(f"voc12:{voc}")
    with pytest.raises(DatasetError, match="fold must be 0, 1, 2 or 3"):
        open_dataset(f"pascal5i:{voc}", fold=4)
    with pytest.raises(DatasetError, match="needs a fold"):
        open_dataset(f"pascal5i:{voc}")
    with pytest.raises(DatasetError, match="no SegmentationClassAug/ folder"):
        (tmp_path / "bare" / "JPEGImages").mkdir(parents=True)
        open_dataset(f"pascal5i:{tmp_path / 'bare'}", fold=0)
    with pytest.raises(DatasetError, match="no val2014/ folder"):
        open_dataset(f"coco20i:{tmp_path / 'bare'}", fold=0)
    with pytest.raises(DatasetError, match="has no folds"):
        open_dataset(f"fss1000:{tmp_path}", fold=0)
    with pytest.raises(DatasetError, match="dataset.json"):
        open_dataset(str(tmp_path / "bare"))
    with pytest.raises(DatasetError, match="not found"):
        open_dataset(str(tmp_path / "absent"))
    with pytest.raises(DatasetError, match="root after the colon"):
        open_dataset("fss1000:")
    # the project's dispatcher forwards benchmark specs here and checks the fold range itself
    with pytest.raises(DatasetError, match="fold"):
        open_dataset(f"pascal5i:{voc}", fold=9)
