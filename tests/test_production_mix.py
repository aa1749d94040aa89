"""The production-mix benchmark's resampling: the promised share of normals, reproducible, and
refusing a mix it cannot draw."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
production_mix = pytest.importorskip("production_mix").production_mix


def test_mix_has_the_promised_share_of_normals_and_is_reproducible() -> None:
    labels = np.array([0] * 30 + [1] * 70)  # a test split with more anomalies than normals, like MTD's
    chosen = production_mix(labels, 400, 0.95, seed=3)
    assert len(chosen) == 400 and (labels[chosen] == 0).sum() == 380
    assert np.array_equal(chosen, production_mix(labels, 400, 0.95, seed=3))
    assert not np.array_equal(chosen, production_mix(labels, 400, 0.95, seed=4))
    assert len(np.unique(chosen[labels[chosen] == 1])) > 1  # anomalies resampled, not one repeated


@pytest.mark.parametrize(("labels", "share", "match"), [
    ([0, 0, 0], 0.95, "normal and anomalous"),
    ([0, 1], 1.0, "normal_share"),
    ([0, 1], 0.0, "normal_share"),
])
def test_mix_refuses_what_it_cannot_draw(labels, share, match) -> None:
    with pytest.raises(ValueError, match=match):
        production_mix(np.array(labels), 10, share)
