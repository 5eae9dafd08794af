"""torchrun with 2 CPU processes (gloo) gives the same weights as one process with the same global batch, and
both moved well away from the initial weights (the comparison is not between two untrained models)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, make_shapes_dataset

TESTS = Path(__file__).resolve().parent
RUNNER = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import conftest  # registers test-pool / test-hash
from fusionseg.cli import main
sys.exit(main(sys.argv[1:]))
"""
TOLERANCE = 1e-5  # max abs difference of any weight after the run (float sums in another order)


@pytest.mark.slow  # ~25 s idle, ~60 s on the loaded 2-core machine: two trainings and a torchrun start
def test_two_gloo_processes_match_one_process(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    data = make_shapes_dataset(tmp_path / "shapes", n=10, size=64)
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")

    def args(out):
        return ["train", "--data", str(data), "--out", str(out), "--image-encoder", "test-pool", "--text-encoder",
                "test-hash", "--preset", "tiny", "--steps", "6", "--batch-size", "4", "--size", "64", "--lr", "3e-3",
                "--val-fraction", "0.3", "--checkpoint-every", "3", "--cache-dir", str(tmp_path / "cache"),
                "--seed", "1", "--threads", "1"]

    one = subprocess.run([sys.executable, str(script), *args(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]
    # a fresh cache folder for the DDP run, so the two ranks build the shards between them
    two_args = args(tmp_path / "two")
    two_args[two_args.index("--cache-dir") + 1] = str(tmp_path / "cache2")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), *two_args, "--set", "shard_size=2"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "final.safetensors"))
    b = load_file(str(tmp_path / "two" / "final.safetensors"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < TOLERANCE, diff
    st = torch.load(tmp_path / "two" / "state.pt", weights_only=True)
    assert st["step"] == 6
    # the weights did move: against the initial weights (the same run with lr 0: AdamW leaves them as they are)
    from fusionseg.engine.config import make_config
    from fusionseg.engine.train import train
    init_cfg = make_config(dict(data=[str(data)], out=str(tmp_path / "init"), image_encoder="test-pool",
                                text_encoder="test-hash", preset="tiny", steps=1, batch_size=4, size=64, lr=0.0,
                                val_fraction=0.3, checkpoint_every=0, cache_dir=str(tmp_path / "cache"), seed=1,
                                progress=False))
    init = load_file(str(train(init_cfg)))
    assert init.keys() == b.keys()
    # every trained tensor moved by 20x the tolerance or more (about 4e-4 after these 6 warm-up steps); the tiny
    # preset's temperature is fixed, not trained
    moved = {k: float((b[k] - init[k]).abs().max()) for k in b if k != "head.log_temperature"}
    assert len(moved) == len(b) - 1
    assert all(v > 20 * TOLERANCE for v in moved.values()), min(moved.items(), key=lambda kv: kv[1])
    assert all(float((a[k] - init[k]).abs().max()) > 20 * TOLERANCE for k in moved)
    # rank 0 alone wrote the run folder: one log, one set of checkpoints; validation was the same
    from fusionseg.model.checkpoint import read_checkpoint
    va = read_checkpoint(tmp_path / "one" / "final.safetensors")[1]["training"]
    vb = read_checkpoint(tmp_path / "two" / "final.safetensors")[1]["training"]
    assert vb["world_size"] == 2 and va["world_size"] == 1
    assert va["validation"]["shapes"]["miou"] == pytest.approx(vb["validation"]["shapes"]["miou"], abs=1e-3)
    # the cache was built in shards of 2 images, split over the ranks: 7 training + 3 validation images
    shards = list((tmp_path / "cache2").rglob("shard-*.json"))
    assert len(shards) == 4 + 2
    print(f"DDP vs single process: max abs weight difference {diff:.3g}")
