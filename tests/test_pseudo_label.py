"""`fusionseg pseudo-label`: teacher rules, ground truth wins, image-level labels, parts, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_shapes_dataset, run_cli
from fusionseg.data.datasets import FolderDataset
from fusionseg.engine.pseudo_label import (PART_CLASSES, PseudoLabelError, excluded_teacher_classes,
                                           expand_collection, pseudo_label, pseudo_mask, read_labels_csv)


class StubTeacher:
    """K classes; class 0 peaks on the left half of every image, class 1 on the right half (weakly), the rest 0."""

    def __init__(self, k: int = 3):
        self.names = [f"thing{i}" for i in range(k)]
        self.synonyms = [[n, "animal" if i == 2 else "object"] for i, n in enumerate(self.names)]

    def describe(self):
        return {"kind": "stub"}

    def probabilities(self, image):
        p = torch.zeros(len(self.names), 4, 4)
        p[0, :, :2] = 0.9
        p[1, :, 2:] = 0.4
        return p


def test_pseudo_mask_rules():
    prob = torch.zeros(3, 2, 4)
    prob[0, :, :2] = 0.9      # confident
    prob[1, :, 2:] = 0.4      # peak below min_peak 0.5: dropped, its pixels ignored
    lab = pseudo_mask(prob, 0.5, 0.3)
    assert (lab[:, :2] == 0).all() and (lab[:, 2:] == -1).all()
    lab = pseudo_mask(prob, 0.3, 0.3)  # now kept
    assert (lab[:, 2:] == 1).all()
    # an image-level label: its own map decides, even where another class scores higher; the rest ignored
    prob[2, :, 1:3] = 0.2
    lab = pseudo_mask(prob, 0.5, 0.3, known=2, known_fraction=0.5)
    assert (lab[:, 1:3] == 2).all() and (lab[:, [0, 3]] == -1).all()


def test_exclusion_reaches_synonyms_and_group_words():
    syn = [["tabby", "tabby cat", "cat"], ["great white shark", "shark"], ["laptop", "notebook computer"]]
    assert excluded_teacher_classes(syn, ["cat"]) == {0}
    assert excluded_teacher_classes(syn, ["shark", "Notebook-Computer"]) == {1, 2}
    assert excluded_teacher_classes(syn, ["dog"]) == set()


def test_labels_csv_errors_name_the_line(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("image,class_index\na.jpg,1\nb.jpg,x\n")
    with pytest.raises(PseudoLabelError, match=r"labels.csv:3: class_index 'x'"):
        read_labels_csv(p, 10)
    p.write_text("image,class_index\na.jpg,12\n")
    with pytest.raises(PseudoLabelError, match=r"labels.csv:2: class_index 12 is outside 0..9"):
        read_labels_csv(p, 10)
    p.write_text("file,label\n")
    with pytest.raises(PseudoLabelError, match=r"labels.csv:1"):
        read_labels_csv(p, 10)
    p.write_text("image,class_index,name\na.jpg,3,x\n\n")
    assert read_labels_csv(p, 10) == {"a.jpg": 3}


def _photos(root, n=3, size=(64, 48)):
    (root / "images").mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", size, (i * 40, 100, 100)).save(root / "images" / f"p{i}.jpg")
    return root


def test_ground_truth_wins_and_image_labels_constrain(tmp_path):
    shapes = make_shapes_dataset(tmp_path / "shapes", n=2, size=64)
    photos = _photos(tmp_path / "photos")
    (photos / "labels.csv").write_text("image,class_index\np0.jpg,2\n")
    rep = pseudo_label([str(shapes), str(photos)], tmp_path / "out", StubTeacher(), progress=False, examples=2)
    assert rep["images"] == 5 and rep["format"] == "fusionseg-collection/1"
    parts = expand_collection(tmp_path / "out")
    assert len(parts) == 1
    ds = FolderDataset(parts[0])
    names = ds.class_names
    assert names[:3] == ("thing0", "thing1", "thing2") and set(names[3:]) == {"square", "disc"}
    man = json.loads((parts[0] / "dataset.json").read_text())
    assert man["synonyms"]["3"] == ["thing2", "animal"]
    for i in range(2):  # shapes: GT classes where the GT names one; GT "none" keeps the sure teacher (left half)
        s = ds[ds.ids.index(f"img{i:03d}")]
        gt = FolderDataset(shapes)[i].mask
        sq, di = names.index("square") + 1, names.index("disc") + 1
        assert (s.mask[gt == 1] == sq).all() and (s.mask[gt == 2] == di).all()
        none = gt == 0
        left = np.zeros_like(none)
        left[:, :28] = True  # well inside the teacher's left half (bilinear edge in between)
        assert (s.mask[none & left] == 1).all()
        assert set(np.unique(s.mask[none & ~left])) <= {0, 1}
    s = ds[ds.ids.index("p0")]  # labelled class 2 ("thing2"): its map is all zero -> its own map, nothing else
    assert set(np.unique(s.mask)) <= {3, 255}
    s = ds[ds.ids.index("p1")]  # no label: the teacher's sure class 0 on the left, class 1 dropped (peak 0.4)
    assert (s.mask[:, :20] == 1).all() and (s.mask[:, 40:] == 255).all()
    assert (parts[0] / "images" / "p1.jpg").is_symlink()  # referenced, not copied
    assert (tmp_path / "out" / "examples.png").is_file()


def test_excluded_names_never_become_classes(tmp_path):
    photos = _photos(tmp_path / "photos", n=1)
    rep = pseudo_label([str(photos)], tmp_path / "out", StubTeacher(), exclude_classes=["animal"], progress=False,
                       examples=0)
    assert rep["dropped_classes"] == ["thing2"]
    ds = FolderDataset(expand_collection(tmp_path / "out")[0])
    assert "thing2" not in ds.class_names


def test_many_teacher_classes_are_split_into_parts(tmp_path):
    photos = _photos(tmp_path / "photos", n=2)
    rep = pseudo_label([str(photos)], tmp_path / "out", StubTeacher(k=PART_CLASSES + 10), progress=False, examples=0)
    parts = expand_collection(tmp_path / "out")
    assert len(parts) == 2 and rep["images_per_part"] == [2, 0]
    assert len(FolderDataset(parts[0]).class_names) == PART_CLASSES
    assert json.loads((parts[1] / "dataset.json").read_text())["classes"]["1"] == f"thing{PART_CLASSES}"


def test_train_reads_a_pseudo_labelled_collection(tmp_path):
    from fusionseg.engine.train import open_datasets
    photos = _photos(tmp_path / "photos", n=2)
    pseudo_label([str(photos)], tmp_path / "out", StubTeacher(), progress=False, examples=0)
    sets = open_datasets([str(tmp_path / "out")])
    assert [d.root.name for d in sets] == ["out-part-00"]


def test_train_skips_the_empty_parts_of_a_collection(tmp_path):
    # a small folder labelled by a teacher with more names than one part holds fills only some parts; training
    # on the collection (README: `train --data OUT` reads the parts together) must not stop at an empty one
    from fusionseg.engine.train import open_datasets
    photos = _photos(tmp_path / "photos", n=2)
    rep = pseudo_label([str(photos)], tmp_path / "out", StubTeacher(k=PART_CLASSES + 10), progress=False,
                       examples=0)
    assert rep["images_per_part"] == [2, 0]
    assert [p.name for p in expand_collection(tmp_path / "out")] == ["out-part-00", "out-part-01"]
    sets = open_datasets([str(tmp_path / "out")])
    assert [d.root.name for d in sets] == ["out-part-00"] and len(sets[0]) == 2


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    photos = _photos(tmp_path / "photos", n=1)
    code, _, err = run_cli(["pseudo-label", "--data", photos, "--out", photos / "inside"], capsys)
    assert code == 2 and "inside the input folder" in err and len(err.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(["pseudo-label", "--data", empty, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "holds no images" in err
    (photos / "labels.csv").write_text("image,class_index\np0.jpg,oops\n")
    code, _, err = run_cli(["pseudo-label", "--data", photos, "--out", tmp_path / "o2"], capsys)
    assert code == 2 and "labels.csv:2" in err and "Traceback" not in err
    code, _, err = run_cli(["pseudo-label", "--data", photos, "--out", tmp_path / "o3", "--min-peak", "2"], capsys)
    assert code == 2 and "--min-peak" in err
    code, _, err = run_cli(["pseudo-label", "--data", photos, "--out", tmp_path / "o4", "--teacher", "bridge",
                            "--image-encoder", "test-pool"], capsys)
    assert code == 2 and "classifier head" in err and "efficientnet-lite0" in err


def test_train_excludes_through_synonyms_and_trains_with_them(tmp_path):
    from fusionseg.engine.sampling import build_vocabulary, dataset_synonyms, open_datasets
    from fusionseg.engine.train import TrainConfig, train
    from fusionseg.model.checkpoint import load_model
    photos = _photos(tmp_path / "photos", n=4)
    shapes = make_shapes_dataset(tmp_path / "shapes", n=4, size=64)
    pseudo_label([str(photos), str(shapes)], tmp_path / "out", StubTeacher(), progress=False, examples=0)
    sets = open_datasets([str(tmp_path / "out")])
    assert dataset_synonyms(sets[0])[2] == ["thing2", "animal"]
    vocab, maps, _ = build_vocabulary(sets, ["animal", "disc"])
    assert "thing2" not in vocab and "disc" not in vocab and "thing0" in vocab
    run = train(TrainConfig(data=[str(tmp_path / "out")], out=str(tmp_path / "run"), image_encoder="test-pool",
                            text_encoder="test-hash", preset="tiny", steps=3, batch_size=4, size=64, val_fraction=0.0,
                            cache_dir=str(tmp_path / "cache"), progress=False, synonym_rate=1.0,
                            exclude_classes=["animal"]))
    _, meta = load_model(run)
    assert "thing2" not in meta["training"]["vocabulary"] and "square" in meta["training"]["vocabulary"]


def test_model_teacher_labels_with_its_training_names(tmp_path):
    """A trained model as the teacher (self-training rounds): its vocabulary by default, sigmoid scores."""
    from conftest import train_tiny
    from fusionseg.engine.teachers import ModelTeacher
    from fusionseg.segmenter import Segmenter
    ckpt, ds = train_tiny(tmp_path, n=4, steps=10)
    seg = Segmenter.from_pretrained(ckpt, device="cpu", mode="fusion")
    t = ModelTeacher(seg)
    assert t.names == ["square", "disc"] and t.describe()["kind"] == "model"
    img = Image.open(next((ds / "images").iterdir())).convert("RGB")
    p = t.probabilities(img)
    assert p.shape[0] == 2 and float(p.min()) >= 0 and float(p.max()) <= 1
    expect = seg.logits_from(seg.encode(img), ["square", "disc"]).sigmoid()
    assert torch.allclose(p, expect)


def test_model_teacher_reads_with_test_time_augmentation(tmp_path, capsys):
    """`pseudo-label --teacher MODEL --tta-scales 1,1.5 --tta-flip`: the teacher's probabilities are the sigmoid of
    the segmenter's averaged views (not its one pass), recorded in dataset.json; the training-free teachers refuse
    the flags in one line."""
    from conftest import train_tiny
    from fusionseg.engine.teachers import ModelTeacher, build_teacher
    from fusionseg.segmenter import Segmenter
    ckpt, ds = train_tiny(tmp_path, n=4, steps=10)
    seg = Segmenter.from_pretrained(ckpt, device="cpu", mode="fusion", tta_scales=(1.0, 1.5), tta_flip=True)
    t = ModelTeacher(seg)
    img = Image.open(next((ds / "images").iterdir())).convert("RGB")
    names = ["square", "disc"]
    expect = seg.tta_logits(seg.prepare(img), names, seg.text_embeddings(names)).sigmoid()
    plain = Segmenter(seg.model, seg.meta, mode="fusion")
    one = plain.logits_from(plain.encode(img), names).sigmoid()
    p = t.probabilities(img)
    assert torch.allclose(p, expect) and not torch.allclose(p, one, atol=1e-4)
    assert t.describe()["test_time"] == {"scales": [1.0, 1.5], "flip": True, "bridge_size": 320}
    assert "test_time" not in ModelTeacher(plain).describe()  # one plain pass: nothing to record
    wide = ModelTeacher(Segmenter(seg.model, seg.meta, mode="fusion", bridge_size=448)).describe()
    assert wide["test_time"] == {"scales": [1.0], "flip": False, "bridge_size": 448}  # the bridge size alone counts
    with pytest.raises(ValueError, match="model teacher"):
        build_teacher("bridge", tta_flip=True)
    photos = _photos(tmp_path / "photos", n=2)
    code, _, err = run_cli(["pseudo-label", "--data", photos, "--out", tmp_path / "o", "--tta-flip"], capsys)
    assert code == 2 and "model teacher" in err and len(err.strip().splitlines()) == 1
    # labels.csv gives ImageNet class indices: they do not address a model's own names, so they are not used
    # (index 500 would otherwise be refused as outside the teacher's two classes, or a small one mislabel)
    (photos / "labels.csv").write_text("image,class_index\np0.jpg,500\np1.jpg,1\n")
    code, _, err = run_cli(["pseudo-label", "--data", photos, "--out", tmp_path / "o", "--teacher", ckpt,
                            "--tta-scales", "1,1.5", "--tta-flip", "--examples", "0"], capsys)
    assert code == 0, err
    assert "labels.csv" in err and "not used" in err  # the CLI prints the warning as one line
    meta = json.loads((tmp_path / "o" / "dataset.json").read_text())
    assert meta["teacher"]["test_time"] == {"scales": [1.0, 1.5], "flip": True, "bridge_size": 320}


def test_teacher_names_are_distinct_under_the_class_name_policy():
    """ImageNet names two classes "crane" (the bird, the machine), "Cardigan" (the corgi) and "cardigan" (the
    sweater), two "maillot": a pseudo-labelled part holding both was a dataset that evaluate refuses (names equal up
    to case) and that merged two meanings in training. The bridge teacher names them apart from their own words."""
    from fusionseg.encoders.base import build_image_encoder
    from fusionseg.engine.teachers import BridgeTeacher, distinct_names
    from fusionseg.names import match_key
    t = BridgeTeacher(build_image_encoder("efficientnet-lite0"))
    assert len({match_key(n) for n in t.names}) == len(t.names) == 1000
    assert (t.names[134], t.names[517]) == ("crane (bird)", "crane")
    assert (t.names[264], t.names[474]) == ("Cardigan Welsh corgi", "cardigan")
    assert (t.names[638], t.names[639]) == ("maillot", "maillot (tank suit)")
    assert t.names[0] == "tench" and t.synonyms[134][:3] == ["crane (bird)", "crane", "bird"]  # old words kept
    # every class keeps its name when names are distinct; a group with no words at all is numbered
    assert distinct_names(["cat", "dog"], [["cat"], ["dog"]]) == ["cat", "dog"]
    assert distinct_names(["a", "A", "a"], [["a"], ["A"], ["a", "x"]]) == ["a", "A #1", "a (x)"]
