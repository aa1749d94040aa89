"""The cascade's map: how much of stage 2's map to add to stage 1's (``cascade.map_weight``), against
the former geometric mean of both and against blurring the maps.

    python benchmarks/map_fusion.py RUN_DIR [RUN_DIR ...] [--weights 0 0.1 0.25 0.5 1] [--blur 0.01 0.02 0.04]

For each finished run, the run's detector scores (both stages on every image) its validation normals,
the same normals with one synthetic defect each (``score_synthetic``, drawn from the run's seed apart
from training's stream) and the test split. Variants of the fused map:

- ``weight w``: the package's map, ``(m₁ − μ₁)/σ₁ + w·z₂`` (:class:`~twostage_ad.cascade.MapFusion`,
  μ₁ and σ₁ from the validation normals' stage-1 maps; ``w = 0`` is stage 1's map alone);
- ``geometric``: the former map, ``sqrt(m₁ · max(raw₂, 0) / mean₂)`` (raw₂: stage 2's map before
  its standardisation), recomputed here for the comparison;
- ``stage2``: stage 2's map alone;
- ``blur b``: stage 1's map, and the weight-``w`` map for the first ``--weights`` value above 0,
  blurred with a Gaussian of σ = b × the image side.

Reported per variant: pixel AUROC and PRO (FPR ≤ 0.3) on the synthetic validation set (what the
choice is made on) and on the test split (reported, never steering). Each (run, variant) appends one
row to ``results/map_fusion.csv`` and rewrites ``map_fusion.md``; the mean over the runs given, per
data set, is printed at the end with the mean of the four synthetic columns (MTD and PIPED pixel
AUROC and PRO) for the variants measured on both.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from twostage_ad.cascade import MapFusion
from twostage_ad.detector import TwoStageDetector
from twostage_ad.evaluate import PRO_MAX_FPR
from twostage_ad.metrics import pixel_auroc, pro_score
from twostage_ad.runs import load_run_config

from _results import decode_run_split, git_commit, record_rows

TITLE = "The cascade's map: stage 1's plus w × stage 2's, against the former geometric mean and blurred maps (benchmarks/map_fusion.py)"


def _blur(maps: np.ndarray, fraction: float) -> np.ndarray:
    """Each ``N×H×W`` map blurred with a Gaussian of σ = ``fraction`` × its side (not across images)."""
    sigma = fraction * maps.shape[-1]
    return gaussian_filter(maps.astype(np.float32), sigma=(0, sigma, sigma))


def fused_variants(map1: np.ndarray, map2: np.ndarray, fusion: MapFusion, map_mean: float, map_std: float,
                   weights: list[float], blurs: list[float]) -> Iterator[tuple[str, np.ndarray]]:
    """``(variant, N×H×W fused map)`` for each variant of the module docstring."""
    for weight in weights:
        yield f"weight {weight:g}", MapFusion(fusion.stage1_mean, fusion.stage1_std, weight).apply(map1, map2)
    raw2 = np.maximum(map2.astype(np.float32) * map_std + map_mean, 0.0)
    yield "geometric", np.sqrt(np.clip(map1, 0.0, None).astype(np.float32) * raw2 / (map_mean if map_mean > 0 else 1.0))
    yield "stage2", map2
    blurred_weight = next((w for w in weights if w > 0), None)
    for fraction in blurs:
        yield f"blur {fraction:g}, weight 0", _blur(map1, fraction)
        if blurred_weight is not None:
            yield (f"blur {fraction:g}, weight {blurred_weight:g}",
                   MapFusion(fusion.stage1_mean, fusion.stage1_std, blurred_weight).apply(_blur(map1, fraction), _blur(map2, fraction)))


def rows_for(run_dir: Path, weights: list[float], blurs: list[float]) -> list[dict]:
    config = load_run_config(run_dir)
    detector = TwoStageDetector.from_run(run_dir, device="cpu")
    decoded = {name: decode_run_split(config, name, detector.image_size) for name in ("val", "test")}
    val, test = decoded["val"], decoded["test"]
    normals = val.images[val.labels == 0]
    on_normals = detector.score(normals, all_stages=True, progress=False)
    scored = detector.score_synthetic(normals, config.augment, seed=config.run.seed, progress=False)
    if scored is None:
        raise SystemExit(f"{run_dir}: fewer than 2 validation normals")
    synthetic, masks, _ = scored
    on_test = detector.score(test.images, all_stages=True, progress=False)
    fusion = MapFusion.fit(on_normals.stage1.anomaly_maps, stage2_weight=0.0)
    stats = (fusion, detector.stage2.map_mean_, detector.stage2.map_std_, weights, blurs)
    labels = np.r_[np.zeros(len(normals), int), np.ones(len(masks), int)]
    all_masks = np.concatenate([np.zeros((len(normals), *masks.shape[1:]), np.uint8), masks])
    with_mask = np.ones(len(labels), bool)
    synthetic_maps = fused_variants(np.concatenate([on_normals.stage1.anomaly_maps, synthetic.stage1.anomaly_maps]),
                                    np.concatenate([on_normals.stage2.maps, synthetic.stage2.maps]), *stats)
    test_maps = fused_variants(on_test.stage1.anomaly_maps, on_test.stage2.maps, *stats)
    dataset = Path(str(config.data.path)).parent.name + (f"/{config.data.category}" if config.data.category else "")
    rows = []
    for (variant, synthetic_map), (_, test_map) in zip(synthetic_maps, test_maps):
        rows.append({
            "date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit(), "run": str(run_dir), "dataset": dataset,
            "variant": variant,
            "synthetic_pixel_auroc": pixel_auroc(labels, all_masks, with_mask, synthetic_map).value,
            "synthetic_pro": pro_score(labels, all_masks, with_mask, synthetic_map, max_fpr=PRO_MAX_FPR).value,
            "test_pixel_auroc": pixel_auroc(test.labels, test.masks, test.has_mask, test_map).value,
            "test_pro": pro_score(test.labels, test.masks, test.has_mask, test_map, max_fpr=PRO_MAX_FPR).value,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="finished run folders")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5, 1.0], help="cascade.map_weight values")
    parser.add_argument("--blur", type=float, nargs="*", default=[], help="Gaussian σ of blurred variants, as a share of the image side")
    args = parser.parse_args()
    table = record_rows("map_fusion", TITLE, (row for run_dir in args.runs for row in rows_for(run_dir, args.weights, args.blur)))
    columns = ["synthetic_pixel_auroc", "synthetic_pro", "test_pixel_auroc", "test_pro"]
    means = table.groupby(["variant", "dataset"], sort=False)[columns].mean().unstack("dataset")
    print(table.groupby(["dataset", "variant"], sort=False)[columns].agg(["mean", "count"]).round(4).to_string())
    synthetic = means[["synthetic_pixel_auroc", "synthetic_pro"]].dropna()
    print("\nmean of the synthetic columns over the data sets (the choice):")
    print(synthetic.mean(axis=1).sort_values(ascending=False).round(4).to_string())


if __name__ == "__main__":
    main()
