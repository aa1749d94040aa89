"""The allocator tuning: large freed blocks are reused instead of page-faulted in again.

Each check runs in a fresh interpreter, so the test process keeps its own allocator settings.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from twostage_ad.allocator import tune_malloc

_FAULTS = """
import resource, sys, torch
from twostage_ad.allocator import tune_malloc
from twostage_ad.models.attention_net import AttentionNet
applied = tune_malloc() if sys.argv[1] == "tuned" else None
torch.manual_seed(0)
net = AttentionNet(1, 128, attention_max_tokens=256).eval()
x = torch.rand(16, 1, 128, 128)
with torch.inference_mode():
    for _ in range(2):  # warm-up: the first batches fault their memory in either way
        net(x, reconstruct=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        net(x, reconstruct=False)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    """Minor page faults of ten stage-1 scoring batches (16 images, 128 px) after two warm-up ones."""
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc-only")
def test_tuned_allocator_reuses_large_blocks():
    applied, tuned = _faults("tuned")
    _, plain = _faults("plain")
    assert applied == "True"
    # ten batches, measured here: 245 000-313 000 faults plain (every large activation a fresh mmap; glibc's
    # adaptive threshold makes the count vary: five batches once gave 45 000), 0-12 000 tuned
    assert plain > 60_000
    assert tuned < plain / 3


@pytest.mark.parametrize("bad", [0, -1, 2**31, 1.5])
def test_tune_malloc_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="mmap_threshold must be an int"):
        tune_malloc(mmap_threshold=bad)


def test_the_run_setting_decides_whether_the_allocator_is_tuned(monkeypatch):
    from twostage_ad import workflow

    calls = []
    monkeypatch.setattr(workflow, "tune_malloc", lambda: calls.append(1) or True)
    workflow._apply_process_settings(0, False)
    assert calls == []
    workflow._apply_process_settings(0, True)
    assert calls == [1]
