"""Exact resume after SIGKILL, atomic state files, a full disk, and refusing a resume with another config."""
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fusionseg.engine.state as state_mod  # noqa: F401
import fusionseg.engine.trainer as trainer_mod
from fusionseg.engine.config import TrainConfig
from fusionseg.engine.state import CheckpointWriteError
from fusionseg.engine.train import train

from conftest import REPO, make_shapes_dataset

TESTS = Path(__file__).resolve().parent

# Runs the CLI with the test encoders registered; FUSIONSEG_TEST_KILL_AT=k sends SIGKILL to itself when the
# optimiser is about to take its k-th step of this process (a hard kill at a chosen step, no clean-up).
RUNNER = f"""
import os, signal, sys
sys.path.insert(0, {str(TESTS)!r})
import conftest  # registers test-pool / test-hash
import torch
kill_at = int(os.environ.get("FUSIONSEG_TEST_KILL_AT", "0"))
if kill_at:
    orig = torch.optim.AdamW.step
    calls = [0]
    def step(self, *a, **k):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, *a, **k)
    torch.optim.AdamW.step = step
from fusionseg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli(tmp_path, args, kill_at=0, timeout=120):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), FUSIONSEG_TEST_KILL_AT=str(kill_at), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def train_args(data, out, cache, steps=12, every=3):
    return ["train", "--data", str(data), "--out", str(out), "--image-encoder", "test-pool", "--text-encoder",
            "test-hash", "--preset", "tiny", "--steps", str(steps), "--batch-size", "4", "--size", "64",
            "--val-fraction", "0.25", "--checkpoint-every", str(every), "--cache-dir", str(cache), "--seed", "3",
            "--lr", "3e-3", "--threads", "1"]


@pytest.mark.slow  # three CLI runs in fresh processes (~35 s); test_train.py resumes in-process, bitwise, fast
def test_sigkill_at_random_step_then_resume_is_bitwise_identical(tmp_path):
    data = make_shapes_dataset(tmp_path / "shapes", n=8, size=64)
    cache = tmp_path / "cache"
    full = run_cli(tmp_path, train_args(data, tmp_path / "full", cache))
    assert full.returncode == 0, full.stderr[-2000:]
    # a step after the first checkpoint (step 3), drawn from a seed so that a failure can be replayed:
    # FUSIONSEG_TEST_SEED=n picks another one
    seed = int(os.environ.get("FUSIONSEG_TEST_SEED", "0"))
    kill_at = random.Random(seed).randint(4, 11)
    killed = run_cli(tmp_path, train_args(data, tmp_path / "run", cache), kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, (seed, kill_at, killed.returncode, killed.stderr[-2000:])
    assert not (tmp_path / "run" / "final.safetensors").exists()
    saved = torch.load(tmp_path / "run" / "state.pt", weights_only=True)["step"]
    assert saved == (kill_at - 1) // 3 * 3 and saved >= 3
    resumed = run_cli(tmp_path, ["train", "--resume", str(tmp_path / "run"), "--threads", "1"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"from step {saved}" in resumed.stdout + resumed.stderr
    a = load_file(str(tmp_path / "full" / "final.safetensors"))
    b = load_file(str(tmp_path / "run" / "final.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume from step {saved} (killed at step {kill_at}, seed {seed})"
    # the optimiser state too, bitwise
    sa = torch.load(tmp_path / "full" / "state.pt", weights_only=True)
    sb = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    for ka, kb in zip(sa["opt"]["state"].values(), sb["opt"]["state"].values()):
        assert all(torch.equal(ka[x], kb[x]) for x in ka)
    assert (tmp_path / "run" / "metrics.png").is_file() and (tmp_path / "run" / "config.toml").is_file()


def tiny_cfg(data, tmp_path, **kw):
    base = dict(data=[str(data)], out=str(tmp_path / "run"), image_encoder="test-pool", text_encoder="test-hash",
                preset="tiny", steps=6, batch_size=4, size=64, val_fraction=0.0, checkpoint_every=2,
                cache_dir=str(tmp_path / "cache"), progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("victim", ["state.pt", "step4.safetensors"])
def test_disk_full_keeps_previous_state(tmp_path, monkeypatch, victim):
    """The disk fills up half-way through the real write of the step-4 training state (or the step-4 checkpoint,
    written just before it): one clear error, the step-2 files byte for byte as they were, no temp file, and
    the run resumes from step 2."""
    from fulldisk import disk_fills_after, leftovers
    data = make_shapes_dataset(tmp_path / "shapes", n=6, size=64)
    run = tmp_path / "run"
    snap = {}
    real_save_state = trainer_mod.save_state

    def save_state(path, state):  # remember the step-2 files as they were on disk (the writers run unchanged)
        real_save_state(path, state)
        if state["step"] == 2:
            snap.update({p.name: p.read_bytes() for p in (run / "state.pt", run / "step2.safetensors")})

    monkeypatch.setattr(trainer_mod, "save_state", save_state)
    rec = disk_fills_after(monkeypatch, 1000, target=victim, nth=2 if victim == "state.pt" else 1)
    what = "training state" if victim == "state.pt" else "checkpoint"
    with pytest.raises(CheckpointWriteError, match=f"could not write (the )?{what} .*{victim}: the disk is full; "
                                                   "the previous checkpoint is intact"):
        train(tiny_cfg(data, tmp_path))
    assert rec["bytes_on_disk"] == 1000 and not rec["temp"].exists() and leftovers(tmp_path) == []
    assert {n: (run / n).read_bytes() for n in snap} == snap and len(snap) == 2
    assert torch.load(run / "state.pt", weights_only=True)["step"] == 2
    assert (run / "step4.safetensors").exists() == (victim == "state.pt")   # written before the state, if at all
    if victim != "state.pt":
        return  # the files are those of the state.pt case, which goes on to resume
    # and the run resumes from it
    monkeypatch.undo()
    final = train(tiny_cfg(data, tmp_path, resume=True))
    assert final.is_file() and torch.load(run / "state.pt", weights_only=True)["step"] == 6


def test_resume_with_other_config_is_refused(tmp_path):
    data = make_shapes_dataset(tmp_path / "shapes", n=6, size=64)
    train(tiny_cfg(data, tmp_path, steps=2))
    with pytest.raises(ValueError, match=r"different config: lr .*; seed"):
        train(tiny_cfg(data, tmp_path, steps=4, lr=1e-2, seed=5, resume=str(tmp_path / "run")))
    with pytest.raises(ValueError, match="holds no state.pt"):
        train(tiny_cfg(data, tmp_path, resume=str(tmp_path / "nothing")))
    # runtime-only keys (steps, checkpoint_every) may change: extending a run works
    final = train(tiny_cfg(data, tmp_path, steps=4, checkpoint_every=0, resume=True))
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["step"] == 4 and final.is_file()
