"""benchmarks/default_latency.py --runs K: each child run gets this run's arguments with its own --runs 1 and
--json, and the K results combine into the medians of their medians and ratios, with each run's ratio kept."""
from __future__ import annotations

from conftest import load_benchmark as _load


def _run(ratio, ms, repeats, tta=None):
    res = {"tables": [{"header": ["model", "decision", "median ms per photo", "vs peer", "target"],
                       "rows": [["today's default", "relative", ms, ratio, "<= 1.5x"],
                                ["default@13c47f5", "threshold", round(ms / ratio, 1), 1.0, "peer"]]}],
           "ratio_today_vs_peer": ratio, "ratio_per_repeat": repeats, "settings": "x, interleaved"}
    if tta is not None:
        res["ratio_tta_vs_one_pass"] = tta
    return res


def test_child_args_replace_runs_and_json_in_either_spelling():
    mod = _load("default_latency")
    got = mod.child_args(["--size", "448", "--runs", "3", "--json=docs/bench/x.json", "--repeats", "5"], "/tmp/r0.json")
    assert got == ["--size", "448", "--repeats", "5", "--runs", "1", "--json", "/tmp/r0.json"]
    got = mod.child_args(["--runs=4", "--json", "a.json", "--tta-flip"], "/tmp/r1.json")
    assert got == ["--tta-flip", "--runs", "1", "--json", "/tmp/r1.json"]


def test_combine_runs_takes_medians_and_keeps_each_runs_ratio():
    mod = _load("default_latency")
    runs = [_run(1.30, 90.0, [1.28, 1.31]), _run(1.70, 110.0, [1.66, 1.74]), _run(1.50, 100.0, [1.49, 1.52])]
    rows, extra, notes = mod.combine_runs(runs)
    assert rows[0] == ["today's default", "relative", 100.0, 1.5, "<= 1.5x"]
    assert rows[1][0] == "default@13c47f5" and rows[1][3] == 1.0
    assert extra["ratio_today_vs_peer"] == 1.5
    assert extra["ratio_per_run"] == [1.3, 1.7, 1.5]
    assert extra["ratio_per_repeat"] == [1.28, 1.31, 1.66, 1.74, 1.49, 1.52]
    assert "ratio_tta_vs_one_pass" not in extra  # only when every run measured it
    assert "1.30x, 1.70x, 1.50x (median 1.50x)" in notes[0] and "1.28x to 1.74x" in notes[0]
    _, extra, _ = mod.combine_runs([_run(1.2, 80.0, [1.2], tta=3.0), _run(1.4, 90.0, [1.4], tta=4.0)])
    assert extra["ratio_tta_vs_one_pass"] == 3.5
