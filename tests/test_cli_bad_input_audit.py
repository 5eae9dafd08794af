"""Bad and unusual input found by a pass over every subcommand: each case failed before its fix (one line on
stderr and exit 2 for bad input, the normal result for unusual-but-valid input)."""
import pytest

from conftest import make_shapes_dataset, run_cli as run


def _one_error_line(err: str, *words: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and ": warning: " not in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "error" in lines[0] and all(w in lines[0] for w in words), lines[0]
    return lines[0]


def test_train_one_step_with_the_default_warmup(tmp_path, capsys):
    """``--steps 1`` (the smallest run) scaled the default warm-up to 1 step and then refused it as not shorter
    than the run; it now trains with no warm-up."""
    ds = make_shapes_dataset(tmp_path / "shapes", n=4, size=64)
    code, out, err = run(["train", "--data", ds, "--out", tmp_path / "run", "--image-encoder", "test-pool",
                          "--text-encoder", "test-hash", "--preset", "tiny", "--steps", "1", "--size", "64",
                          "--batch-size", "2", "--val-fraction", "0", "--cache-dir", tmp_path / "c"], capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "final.safetensors").is_file()
    assert "trained 1 steps" in out
