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
