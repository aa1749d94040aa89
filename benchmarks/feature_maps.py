"""Stage 1's feature normality: which cells (px per cell) the screening and the map take their distances from,
and how much of the feature-distance map to blend into 1 − A.

    python benchmarks/feature_maps.py RUN_DIR [RUN_DIR ...] [--weights 0 0.25 0.5 0.75 1]
        [--strides 16] [--map-strides 0 16 32]

For each finished run and each variant (``stage1.feature_stride``, ``stage1.feature_map_stride``,
``stage1.feature_map_weight`` w), stage 1 scores (the package's own scoring path,
``AttentionStage.score``, with the banks refitted on the run's training images by
``fit_missing_statistics``) its validation normals, the same normals with one synthetic defect each
(``synthetic_defects``, drawn from the run's seed apart from training's stream) and the test split.
The map is ``(1 − w)·(1 − A) + w·sigmoid(z)`` (z: each cell's feature distance in the training
normals' units). Reported: the synthetic-validation image and pixel AUROC of stage 1 (what choices
are made on) and the test image and pixel AUROC beside them (reported, not steered by). A run
trained before feature normality existed gets its banks fitted first. Each (run, variant) appends one
row to ``results/feature_maps.csv`` and rewrites ``feature_maps.md``; the mean of every variant over
the runs given, per data set, is printed at the end.
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from twostage_ad.data.augment import synthetic_defects
from twostage_ad.data.images import resize_images
from twostage_ad.detector import TwoStageDetector
from twostage_ad.metrics import image_auroc, pixel_auroc
from twostage_ad.runs import load_run_config

from _results import decode_run_split, git_commit, record_rows, run_image_size, score_stage1_as_run

TITLE = "Stage 1's feature normality: the cells of the screening and of the map, and the map blend (benchmarks/feature_maps.py)"


def rows_for(run_dir: Path, variants: list[tuple[int, int, float]]) -> list[dict]:
    config = load_run_config(run_dir)
    size = run_image_size(config)  # as run decoded them: synthetic defects land on the run's pixels
    decoded = {name: decode_run_split(config, name, size) for name in ("train", "val", "test")}
    stage = TwoStageDetector.from_run(run_dir, device="cpu").stage1
    if stage.config.screen_feature == 0:
        stage.config = replace(stage.config, screen_feature=1.0)
    train = resize_images(decoded["train"].images, stage.image_size)  # the view stage 1 fitted its statistics on
    normals = decoded["val"].images[decoded["val"].labels == 0]
    defective, masks, _ = synthetic_defects(normals, config.augment, seed=config.run.seed)
    labels = np.r_[np.zeros(len(normals), int), np.ones(len(defective), int)]
    all_masks = np.concatenate([np.zeros((len(normals), *masks.shape[1:]), np.uint8), masks])
    test = decoded["test"]
    dataset = Path(str(config.data.path)).parent.name + (f"/{config.data.category}" if config.data.category else "")
    rows = []
    for stride, map_stride, weight in variants:
        stage.config = replace(stage.config, feature_stride=stride, feature_map_stride=map_stride, feature_map_weight=weight)
        stage.fit_missing_statistics(train)
        synthetic = [score_stage1_as_run(stage, normals, progress=False), score_stage1_as_run(stage, defective, progress=False)]
        on_test = score_stage1_as_run(stage, test.images, progress=False)
        rows.append({
            "date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit(), "run": str(run_dir), "dataset": dataset,
            "feature_stride": stride, "feature_map_stride": map_stride, "feature_map_weight": weight,
            "synthetic_auroc_stage1": image_auroc(labels, np.concatenate([s.loss for s in synthetic])).value,
            "synthetic_pixel_auroc_stage1": pixel_auroc(labels, all_masks, np.ones(len(labels), bool),
                                                        np.concatenate([s.anomaly_maps for s in synthetic])).value,
            "test_auroc_stage1": image_auroc(test.labels, on_test.loss).value,
            "test_pixel_auroc_stage1": pixel_auroc(test.labels, test.masks, test.has_mask, on_test.anomaly_maps).value,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="finished run folders")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--strides", type=int, nargs="+", default=[16], help="stage1.feature_stride values (the screening's cells)")
    parser.add_argument("--map-strides", type=int, nargs="+", default=[0], help="stage1.feature_map_stride values (0: the screening's)")
    args = parser.parse_args()
    variants = list(itertools.product(args.strides, args.map_strides, args.weights))
    table = record_rows("feature_maps", TITLE, (row for run_dir in args.runs for row in rows_for(run_dir, variants)))
    keys = ["dataset", "feature_stride", "feature_map_stride", "feature_map_weight"]
    print(table.groupby(keys)[[c for c in table.columns if "auroc" in c]].agg(["mean", "count"]).round(4).to_string())


if __name__ == "__main__":
    main()
