"""twostage_ad: two-stage visual anomaly detection (attention-network screen, GANomaly2D scorer).

Public API (imported lazily, so ``python -m twostage_ad.pipeline --help`` does not load torch):
``TwoStageDetector`` (a finished run: ``TwoStageDetector.from_run(run_dir).predict(images)``),
``load_config``, ``run_pipeline`` (train from a config object), ``calibrate_run``, ``compare_runs``
(finished runs side by side, the label-free choice marked) and ``tune_malloc`` (the allocator setting the pipeline applies; call it when using the stages directly).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["TwoStageDetector", "load_config", "run_pipeline", "calibrate_run", "compare_runs", "tune_malloc"]

_LOCATIONS = {
    "TwoStageDetector": "twostage_ad.detector",
    "load_config": "twostage_ad.config_io",
    "run_pipeline": "twostage_ad.workflow",
    "calibrate_run": "twostage_ad.workflow",
    "compare_runs": "twostage_ad.compare",
    "tune_malloc": "twostage_ad.allocator",
}


def __getattr__(name: str) -> Any:
    if name in _LOCATIONS:
        import importlib

        return getattr(importlib.import_module(_LOCATIONS[name]), name)
    raise AttributeError(f"module 'twostage_ad' has no attribute {name!r}")
