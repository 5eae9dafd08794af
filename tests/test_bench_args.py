"""README, Performance: the benchmark scripts refuse out-of-range sizes, counts and repeats with one line on
stderr and exit code 2, before any work (in-process: each script's main() with a bad argument)."""
from __future__ import annotations

import sys

import pytest

from conftest import load_benchmark


_load = load_benchmark


BAD = [
    ("bench_segment", ["--classes", "0"], "--classes"),
    ("bench_segment", ["--classes", "1,x"], "--classes"),
    ("bench_segment", ["--size", "0"], "--size"),
    ("bench_segment", ["--repeats", "0"], "--repeats"),
    ("default_latency", ["--images", "0"], "--images"),
    ("default_latency", ["--repeats", "0"], "--repeats"),
    ("default_latency", ["--bridge-size", "5"], "--bridge-size"),
    ("default_latency", ["--size", "32"], "--size"),
    ("serve_load", ["--requests", "0"], "--requests"),
    ("serve_load", ["--clients", "0"], "--clients"),
    ("train_speed", ["--steps", "0"], "--steps"),
    ("train_speed", ["--setups", "fast"], "--setups"),
]


@pytest.mark.parametrize("script, args, flag", BAD, ids=[f"{s} {' '.join(a)}" for s, a, _ in BAD])
def test_out_of_range_argument_is_one_line_and_exit_2(script, args, flag, monkeypatch, capsys):
    import fusionseg.runtime
    monkeypatch.setattr(fusionseg.runtime, "tune_malloc", lambda: None)  # an entry point's; not in this process
    mod = _load(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *args])
    with pytest.raises(SystemExit) as e:
        mod.main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and "Traceback" not in err, err
