"""Process tuning: large freed buffers are reused from the heap instead of being page-faulted in again."""
import os
import subprocess
import sys

import pytest

from fusionseg import runtime

PROBE = r"""
import resource, torch
import torch.nn.functional as F
from fusionseg.runtime import tune_malloc
on = tune_malloc()
torch.set_num_threads(1)
x = torch.randn(4, 16, 256, 256)  # 16 MB activations; the concatenation makes 32 MB ones
w = torch.randn(16, 16, 3, 3) * 0.1
def forward():
    with torch.inference_mode():
        y = x
        for _ in range(3):
            y = F.relu(F.conv2d(torch.cat([y, y], 0)[:4], w, padding=1)) * 1.5
        return float(y.sum())
forward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    forward()
print(on, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env) -> tuple[bool, int]:
    e = {k: v for k, v in os.environ.items() if k not in runtime._USER_SETTINGS}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=e, check=True)
    on, faults = out.stdout.split()
    return on == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt tuning is for Linux/glibc only")
def test_large_buffers_are_reused_instead_of_faulted_in_again():
    if not runtime.tune_malloc():
        pytest.skip("this Python does not run on glibc (mallopt unavailable)")
    on, faults = _probe()
    off_on, off_faults = _probe(FUSIONSEG_MALLOC="0")
    assert on and not off_on
    # five small conv forwards: about 140,000 pages faulted in anew without the tuning; with it, none on most
    # runs, and a few 4,096-page (16 MB) steps on some (seen: 4,096 here, 16,382 on CI). A quarter is far from
    # both, and still fails when the tuning does nothing (the two counts are then alike).
    assert off_faults > 20_000, off_faults
    assert faults < off_faults / 4, (faults, off_faults)


def test_user_allocator_settings_win():
    on, _ = _probe(MALLOC_TRIM_THRESHOLD_="1000000")
    assert not on


LIBRARY_PROBE = r"""
import sys
import numpy as np
from PIL import Image
import fusionseg.runtime as r
from fusionseg.segmenter import Segmenter
seg = Segmenter.from_pretrained("default", device="cpu")
seg.predict(Image.fromarray(np.full((40, 60, 3), 128, np.uint8)), ["cat", "sky"])
print("library", r._state)
from fusionseg import cli
try:
    cli.main(["segment", "no-such.jpg", "--classes", ",", "--out", sys.argv[1]])  # parsed, then refused
except SystemExit:
    pass
print("cli", r._state is not None)
"""


def test_library_leaves_the_allocator_alone_and_entry_points_tune_it(tmp_path):
    """Building a Segmenter and predicting must not call mallopt (it would change a host application's
    allocator); the CLI's main (an entry point) does. Fails if tune_malloc moves back into a constructor."""
    e = {k: v for k, v in os.environ.items() if k not in runtime._USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", LIBRARY_PROBE, str(tmp_path / "out")], capture_output=True,
                         text=True, env=e, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [s for s in out.stdout.splitlines() if s.startswith(("library", "cli"))]
    assert lines == ["library None", "cli True"], out.stdout[-2000:]


def test_entry_points_call_tune_malloc():
    """Each entry point calls tune_malloc: the CLI, the server, training and the benchmarks' shared setup."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    for f in ("src/fusionseg/cli.py", "src/fusionseg/serve/__init__.py", "benchmarks/_common.py",
              "benchmarks/bench_segment.py", "benchmarks/train_speed.py"):
        assert "tune_malloc()" in (root / f).read_text(), f
    for f in ("src/fusionseg/segmenter.py", "src/fusionseg/model/fusioner.py", "src/fusionseg/serve/app.py"):
        assert "tune_malloc()" not in (root / f).read_text(), f
