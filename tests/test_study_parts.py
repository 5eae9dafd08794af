"""scripts/zero_shot_study.py: which names a part holds out, and the tables its selftrain and testtime parts
write (no training here)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import zero_shot_study as zs  # noqa: E402  (a module: its testtime_table is no test of pytest's)
from zero_shot_study import TESTTIME_ROWS, fold_names, part_names, selftrain_table, table_fields  # noqa: E402

NAMES80 = [f"name{i}" for i in range(78)] + ["airplane", "person"]


def test_a_fold_part_holds_out_its_twenty_names_and_their_spellings():
    exclude, holdout, novel, heldout = part_names("fold1", NAMES80, {}, "--testtime-on")
    assert novel == fold_names(NAMES80, 1) and len(novel) == 20
    assert set(novel) <= set(exclude)
    assert ("airplane" in novel) == ("aeroplane" in exclude)  # the other folders' spelling goes too
    assert ("person" in novel) == ("pedestrian" in exclude)
    assert holdout == ["000000358083"]  # the README's demo photo is never trained on
    assert callable(heldout)


def test_a_bad_part_names_the_flag():
    with pytest.raises(SystemExit, match="--testtime-on: expected fold0..fold3 or msrc6, got 'fold7'"):
        part_names("fold7", NAMES80, {}, "--testtime-on")


def _report(d: float, m: float) -> dict:
    return {"discrimination": d, "chance": 0.2, "miou": m, "fbiou": 0.5, "trivial_miou": 0.3,
            "shuffled_miou": 0.1, "auc_gap": 0.05, "seconds": 12.5, "per_class": {"x": 1}}


def test_the_testtime_table_has_a_row_per_reading_with_its_seconds():
    rows = {label: table_fields(_report(0.5 + i / 100, 0.1 + i / 100), "seconds")
            for i, (label, _, _) in enumerate(TESTTIME_ROWS)}
    assert all("per_class" not in r for r in rows.values())  # only what the table shows is kept
    md = "\n".join(zs.testtime_table({"fold0": {"images": 40, "novel_present": ["a", "b"], "rows": rows}}))
    assert md.startswith("<!-- study-testtime:begin -->") and md.endswith("<!-- study-testtime:end -->")
    assert "**fold0** (40 held-out images, 2 unseen names present; discrimination chance 0.200" in md
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert lines[0].endswith("| AUC gap | seconds |") and len(lines) == 1 + len(TESTTIME_ROWS)
    assert lines[1] == f"| {TESTTIME_ROWS[0][0]} | 0.500 | 0.100 | 0.100 | 0.050 | 12.5 |"
    sel = "\n".join(selftrain_table({"msrc6": {"images": 9, "novel_present": ["a"], "pseudo": "runs/pl",
                                               "synonym_rate": 0.5, "train": {"x": {"steps": 400}},
                                               "rows": {"r": table_fields(_report(0.6, 0.2))}}}))
    assert "pseudo-labels: `runs/pl`, synonym rate 0.5; discrimination chance" in sel
    assert "| r | 0.600 | 0.200 | 0.100 | 0.050 |" in sel and "seconds" not in sel
