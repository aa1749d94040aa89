"""Finished runs of one data set side by side, with the choice the validation data alone makes.

Settings such as the decode size (``data.image_size``) cannot be chosen from the training loss,
and a new data set rarely has labelled defects to choose them with. Every run scores synthetic
defects on its validation normals (``metrics.json`` → ``synthetic_val``); on MTD and on large
MTD mosaics that score ranked 128 px against larger decodes over tiles as the test split did
(docs/experiments.md, Large images with small defects). :func:`compare_runs` tabulates runs of
one data set and marks the run with the highest synthetic stage-1 image AUROC: the screen decides
what reaches stage 2. Test metrics are shown beside it when the runs have a labelled test split,
for reading, never for the choice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from twostage_ad.config import effective_tile
from twostage_ad.runs import RUN_FILES, load_run_config, read_json

log = logging.getLogger(__name__)

__all__ = ["compare_runs", "run_summary", "CHOICE_COLUMN"]

CHOICE_COLUMN = "synthetic_stage1"  # what the choice maximises: no test label enters it


def _get(values: dict[str, Any] | None, *keys: str) -> float:
    """``values[k1][k2]…`` as a float, NaN where any level is missing or None."""
    for key in keys:
        if not isinstance(values, dict) or values.get(key) is None:
            return float("nan")
        values = values[key]
    return float(values)


def run_summary(run_dir: str | Path) -> dict[str, Any]:
    """One row: what the run was (data, decode, tiles, seed), its synthetic validation scores, its
    test metrics (NaN without labelled test images), training seconds and scoring images/s."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    path = run_dir / RUN_FILES["metrics"]
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a finished run: {RUN_FILES['metrics']} is missing")
    metrics = read_json(path)
    synthetic = metrics.get("synthetic_val")
    seconds = metrics.get("seconds") or {}
    reused = read_json(run_dir / RUN_FILES["reused"]) if (run_dir / RUN_FILES["reused"]).is_file() else {}
    data = config.data
    stage2_size = config.stage2.image_size or data.image_size
    return {
        "run": str(run_dir),
        # the validation images: the same only for the same source, files, category, held-out share (and digit)
        # (a relative path, recorded by older runs, is kept as written: its working directory is unknown)
        "data": f"{data.source}:{Path(data.path).expanduser().resolve() if data.path and Path(data.path).is_absolute() else data.path or ''}"
                f":{data.category or ''}:{data.val_fraction}:{data.normal_digit if data.source == 'digits' else ''}",
        "seed": config.run.seed,
        "decode": data.image_size,
        "stage1_tile": effective_tile(config.stage1.tile_size, data.image_size),
        "stage2_size": stage2_size,
        "stage2_tile": effective_tile(config.stage2.tile_size, stage2_size),
        CHOICE_COLUMN: _get(synthetic, "image_auroc", "stage1"),
        "synthetic_held_out": _get(synthetic, "image_auroc_stage1_held_out_kinds"),
        "synthetic_pixel_fused": _get(synthetic, "pixel_auroc", "fused"),
        "test_stage1": _get(metrics, "image_auroc", "stage1"),
        "test_cascade": _get(metrics, "image_auroc", "cascade"),
        "test_pixel_fused": _get(metrics, "pixel_auroc", "fused"),
        "test_pro_fused": _get(metrics, "pro", "fused"),
        # a reused stage trained in another run: its seconds are not this run's
        "train_s": float("nan") if any(reused.values()) else _get(seconds, "train_stage1") + _get(seconds, "train_stage2"),
        "stage1_images_per_s": _get(metrics, "images_per_s", "stage1"),
        "cascade_images_per_s": _get(metrics, "images_per_s", "cascade"),
    }


def compare_runs(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One row per run (:func:`run_summary`), and ``choice`` True on the run with the highest
    synthetic stage-1 image AUROC among those that have one (none without any, e.g. with fewer
    than 2 validation normals; the first of a tie).

    The runs must share their data (source, files, category, ``val_fraction``): the synthetic
    defects are drawn on each run's validation normals, so only runs on the same images compare;
    ``ValueError`` otherwise. Runs of different seeds draw other defects (and, without a fixed
    validation split, hold out other normals): a warning says their difference is partly the draw.
    """
    if not run_dirs:
        raise ValueError("compare needs at least one run folder")
    table = pd.DataFrame([run_summary(run_dir) for run_dir in run_dirs])
    if table["data"].nunique() > 1:
        listed = "; ".join(f"{run}: {data}" for run, data in zip(table["run"], table["data"]))
        raise ValueError(f"the runs were trained on different data, so their synthetic scores do not compare ({listed})")
    if table["seed"].nunique() > 1:
        log.warning("the runs have different seeds %s: their synthetic defects differ, so part of a difference in %s "
                    "is the draw", sorted(table["seed"].unique().tolist()), CHOICE_COLUMN)
    scores = table[CHOICE_COLUMN].to_numpy()
    table["choice"] = False
    if np.isfinite(scores).any():
        table.loc[int(np.nanargmax(scores)), "choice"] = True
    return table
