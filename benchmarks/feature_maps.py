"""Stage 1's map with feature normality: how much of the feature-distance map to blend into 1 − A.

    python benchmarks/feature_maps.py RUN_DIR [RUN_DIR ...] [--weights 0 0.25 0.5 0.75 1]

For each finished run and each ``stage1.feature_map_weight`` w, stage 1 scores (the package's
own scoring path, ``AttentionStage.score``) its validation normals, the same normals with one
synthetic defect each (``synthetic_defects``, drawn from the run's seed apart from training's
stream) and the test split. The map is ``(1 − w)·(1 − A) + w·sigmoid(z)`` (z: each cell's
feature distance in the training normals' units). Reported: the synthetic-validation pixel AUROC
(what the choice is made on) and the test pixel AUROC beside it (reported, not steered by). A run
trained before feature normality existed gets its bank fitted on its training images first. Each
(run, w) appends one row to ``results/feature_maps.csv`` and rewrites ``feature_maps.md``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from twostage_ad.data.augment import synthetic_defects
from twostage_ad.data.images import decode_records
from twostage_ad.data.records import load_records, split_records
from twostage_ad.detector import TwoStageDetector
from twostage_ad.metrics import pixel_auroc
from twostage_ad.runs import load_run_config

from _results import append_row, git_commit


def rows_for(run_dir: Path, weights: list[float]) -> list[dict]:
    config = load_run_config(run_dir)
    splits = split_records(load_records(config.data, seed=config.run.seed))
    decoded = {name: decode_records(splits[name], config.data.image_size, config.data.channels, config.data.invert_masks,
                                    progress=False) for name in ("train", "val", "test")}
    stage = TwoStageDetector.from_run(run_dir, device="cpu").stage1
    if stage.config.screen_feature == 0:
        stage.config = replace(stage.config, screen_feature=1.0)
    stage.fit_missing_statistics(decoded["train"].images)
    normals = decoded["val"].images[decoded["val"].labels == 0]
    defective, masks, _ = synthetic_defects(normals, config.augment, seed=config.run.seed)
    labels = np.r_[np.zeros(len(normals), int), np.ones(len(defective), int)]
    all_masks = np.concatenate([np.zeros((len(normals), *masks.shape[1:]), np.uint8), masks])
    test = decoded["test"]
    rows = []
    for weight in weights:
        stage.config = replace(stage.config, feature_map_weight=weight)
        maps = np.concatenate([stage.score(normals, progress=False).anomaly_maps, stage.score(defective, progress=False).anomaly_maps])
        test_maps = stage.score(test.images, progress=False).anomaly_maps
        rows.append({
            "date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit(), "run": str(run_dir), "feature_map_weight": weight,
            "synthetic_pixel_auroc_stage1": pixel_auroc(labels, all_masks, np.ones(len(labels), bool), maps).value,
            "test_pixel_auroc_stage1": pixel_auroc(test.labels, test.masks, test.has_mask, test_maps).value,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="finished run folders")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    args = parser.parse_args()
    for run_dir in args.runs:
        for row in rows_for(run_dir, args.weights):
            append_row("feature_maps", row, "Stage 1's map: 1 − A blended with the feature-distance map (benchmarks/feature_maps.py)")
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})


if __name__ == "__main__":
    main()
