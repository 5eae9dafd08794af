"""scripts/bootstrap_present.py: a paired bootstrap over images of the present-names mIoU."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bootstrap_present import miou_of, paired_bootstrap  # noqa: E402


def _cm(tp, fp, fn):
    """A 2-label matrix (0: none, 1: the class) with the given counts."""
    return np.array([[0, fp], [fn, tp]], np.int64)


def test_miou_of_leaves_out_none_and_empty_classes():
    cm = np.array([[9, 1, 0], [2, 6, 0], [0, 0, 0]])
    assert miou_of(cm) == pytest.approx(6 / (6 + 1 + 2))  # class 2 has no union: left out
    assert np.isnan(miou_of(np.zeros((3, 3), np.int64)))


def test_paired_resamples_score_every_model_on_the_same_images():
    # model B is model A plus 10 true-positive pixels on every image: B beats A on every resample
    a = np.stack([_cm(10 + i, 5, 5) for i in range(8)])
    b = a.copy()
    b[:, 1, 1] += 10
    boot = paired_bootstrap([a, b], samples=200, seed=1)
    assert boot.shape == (200, 2)
    assert (boot[:, 1] > boot[:, 0]).all()
    # the full sample's mIoU lies inside the spread of the resamples, which is not a single value
    full = miou_of(a.sum(0))
    assert boot[:, 0].min() <= full <= boot[:, 0].max() and boot[:, 0].std() > 0
    # identical models: zero difference on every resample
    assert np.allclose(paired_bootstrap([a, a.copy()], 50)[:, 1], paired_bootstrap([a, a.copy()], 50)[:, 0])
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap([a, a[:5]], 10)


def test_test_time_rows_parse_and_print_their_command():
    """A row's (or a bootstrap model's) TTA field: scales, ``+flip`` to mirror too; the command says both."""
    from everyday_study import command, parse_row, tta_args
    assert tta_args("1,1.4+flip") == ((1.0, 1.4), True)
    assert tta_args("1,1.4") == ((1.0, 1.4), False)
    assert tta_args(None) == ((1.0,), False)
    with pytest.raises(ValueError, match="SCALES"):
        tta_args("1,1.4+flop")
    with pytest.raises(SystemExit, match="TTA"):
        parse_row("x=default:auto::relative:1,9")
    assert parse_row("x=default:auto::relative:1,1.4+flip")[-3:] == ("1,1.4+flip", None, None)
    assert parse_row("x=default:auto::relative:1,1.4+flip:448")[-2:] == (448, None)
    assert parse_row("x=default:auto::relative::448:448")[-3:] == (None, 448, 448)  # SIZE: the working size
    with pytest.raises(SystemExit, match="SIZE"):
        parse_row("x=default:auto::relative:::big")
    assert command("default", "auto", None, "d", None, None, 448, 448).endswith("--bridge-size 448 --size 448")
    assert command("default", "auto", None, "d", None, "1,1.4", 448).endswith("--tta-scales 1,1.4 --bridge-size 448")
    c = command("default", "auto", None, "d", "relative", "1,1.4+flip")
    assert c.endswith("--decision relative --tta-scales 1,1.4 --tta-flip")
    assert "--tta" not in command("default", "auto", None, "d", "relative")


def test_everyday_rows_measured_by_another_process_meanwhile_are_kept(tmp_path, monkeypatch):
    """Two study processes side by side: each row is merged into the file as it is when written, so a row the
    other process wrote meanwhile is not lost (it was, once: the file was written from the copy read at start)."""
    import json
    import everyday_study as es
    jp = tmp_path / "everyday.json"
    jp.write_text(json.dumps({"old": {"model": "m", "mode": "auto", "threshold": None, "results": {}}}))

    def run_row(*a, **k):  # meanwhile, another process writes its row
        now = json.loads(jp.read_text())
        now["theirs"] = {"model": "t", "mode": "auto", "threshold": None, "results": {}}
        jp.write_text(json.dumps(now))
        return {"coco2017_mini": {"miou": 0.5}}
    monkeypatch.setattr(es, "run_row", run_row)
    monkeypatch.setattr(sys, "argv", ["everyday_study.py", "--row", "mine=default:auto", "--json", str(jp)])
    es.main()
    rows = json.loads(jp.read_text())
    assert list(rows) == ["old", "theirs", "mine"] and rows["mine"]["results"]["coco2017_mini"]["miou"] == 0.5


def test_a_new_label_for_a_measured_reading_stops_unless_again(tmp_path, monkeypatch):
    """Labels are the rows' keys: a label typed slightly differently for a reading already measured would add
    the same row twice; it stops with one line naming the row that holds it, and --again measures it anyway."""
    import json
    import everyday_study as es
    jp = tmp_path / "everyday.json"
    jp.write_text(json.dumps({"default, auto": {"model": "default", "mode": "auto", "threshold": None,
                                                "decision": "relative", "results": {}}}))
    calls = []
    monkeypatch.setattr(es, "run_row", lambda *a, **k: calls.append(a) or {"coco2017_mini": {"miou": 0.5}})
    monkeypatch.setattr(sys, "argv", ["everyday_study.py", "--row", "default,  auto=default:auto::relative",
                                      "--json", str(jp)])
    with pytest.raises(SystemExit) as e:
        es.main()
    assert "'default, auto' already holds this reading" in str(e.value) and not calls
    assert list(json.loads(jp.read_text())) == ["default, auto"]
    monkeypatch.setattr(sys, "argv", sys.argv + ["--again"])
    es.main()
    assert len(calls) == 1 and list(json.loads(jp.read_text())) == ["default, auto", "default,  auto"]
    # another reading under a new label is measured as before
    monkeypatch.setattr(sys, "argv", ["everyday_study.py", "--row", "fusion=default:fusion::relative", "--json", str(jp)])
    es.main()
    assert len(calls) == 2
