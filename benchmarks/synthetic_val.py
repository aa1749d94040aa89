"""The synthetic-defect validation score of finished runs, beside their test AUROC.

    python benchmarks/synthetic_val.py RUN_DIR [RUN_DIR ...] [--seed N] [--note "..."]
    python benchmarks/synthetic_val.py RUN_DIR --variant stage1.position_normality=none
    python benchmarks/synthetic_val.py RUN_DIR --copies 16   # 16 synthetic copies of each validation normal

For each run: its validation normals are scored against copies with one synthetic defect each
(``twostage_ad.data.augment.synthetic_defects``, drawn from ``--seed`` plus a fixed offset, apart
from training's stream) — the score ``run`` writes to ``metrics.json`` as ``synthetic_val`` — and
the run's own test AUROC is copied beside it, so that the two rankings of several runs (variants
of a recipe) can be compared. No model is trained; test labels are only read from the run's
``metrics.json``, never used to compute the synthetic score. Each run appends one row to
``benchmarks/results/synthetic_val.csv`` and rewrites ``synthetic_val.md``; with two or more runs,
the Spearman rank correlation of synthetic and test stage-1 AUROC is printed.

``--variant section.field=value`` (repeatable) changes a *scoring* field of a finished run's
stages (``stage1.position_normality``, ``stage1.screen_topk``, ...) without retraining: the
thresholds are re-calibrated on the validation scores as ``run`` would, and the test AUROC beside
it is recomputed from a fresh scoring of the test split instead of copied.

``--copies K`` gives each validation normal K synthetic copies, each with its own defect, kind and
texture partner (``run`` makes one; :func:`copy_order`): a class with 4 validation normals is then scored on 4 × 4K (normal, copy) pairs
instead of 16, so its AUROC moves in steps of 1/(16K) rather than 1/16.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from twostage_ad.cascade import MapFusion, fit_cascade
from twostage_ad.config_io import apply_overrides
from twostage_ad.data.images import resize_images
from twostage_ad.detector import TwoStageDetector
from twostage_ad.evaluate import synthetic_validation_metrics
from twostage_ad.metrics import image_auroc
from twostage_ad.runs import RUN_FILES, load_run_config, read_json

from _results import append_row, decode_run_split, git_commit


def apply_variant(detector: TwoStageDetector, variant: list[str]) -> None:
    """``section.field=value`` strings onto the stages' scoring fields (anything else is refused)."""
    changes: dict[str, dict] = {}
    apply_overrides(changes, variant)
    for section, fields in changes.items():
        stage = {"stage1": detector.stage1, "stage2": detector.stage2}.get(section)
        if stage is None or not set(fields) <= set(type(stage.config).scoring_fields):
            raise SystemExit(f"--variant changes scoring fields of stage1 / stage2 only, got {section}: {sorted(fields)}")
        config = replace(stage.config, **fields)
        config.validate()
        stage.use_scoring_fields(config)  # stage 1 drops feature banks fitted under another screening; the caller refits them


def copy_order(n: int, copies: int, seed: int) -> np.ndarray:
    """Indices of ``n`` validation normals for ``copies`` synthetic copies of each: the normals in
    order (so one copy is exactly what ``run`` scores), then a fresh seeded permutation per copy.
    ``synthetic_defects`` gives image ``i`` kind ``i mod K`` and the next image's texture, so with the
    permutations each normal meets several kinds and texture partners (a plain repeat would tie
    them to the normal when ``n`` and ``K`` share a factor); no image follows a copy of itself."""
    rng = np.random.default_rng(seed)
    order = [np.arange(n)]
    for _ in range(copies - 1):
        permutation = rng.permutation(n)
        while n > 1 and permutation[0] == order[-1][-1]:
            permutation = rng.permutation(n)
        order.append(permutation)
    return np.concatenate(order)


def row_for(run_dir: Path, seed: int | None, variant: list[str] | None = None, copies: int = 1) -> dict:
    config = load_run_config(run_dir)
    seed = config.run.seed if seed is None else seed
    detector = TwoStageDetector.from_run(run_dir, device="cpu")
    val = decode_run_split(config, "val", detector.image_size)
    if variant:
        apply_variant(detector, variant)
        train = resize_images(decode_run_split(config, "train", detector.image_size).images, detector.stage1.image_size)
        if detector.stage1.fit_missing_statistics(train):  # e.g. a feature bank of another size
            logging.getLogger("twostage_ad").info("%s: fitted stage 1's statistics for the variant on the training images", run_dir)
        if any(v.startswith("stage2.") for v in variant):  # the changed maps' statistics, as run fits them
            detector.fit_stage2_statistics(val.images, val.labels)
    validation = detector.score(val.images, all_stages=True, progress=False)
    if variant:  # thresholds for the changed scores, as run calibrates them
        detector.cascade = fit_cascade(validation.stage1.loss, validation.stage2.scores, val.labels, config.calibration,
                                       fusion=config.cascade.fusion)
    normals = val.images[val.labels == 0]
    if len(normals) < 2:
        raise SystemExit(f"{run_dir}: fewer than 2 validation normals")
    synthetic = detector.score_synthetic(normals[copy_order(len(normals), copies, seed)], config.augment, seed=seed, progress=False)
    fusion = MapFusion.fit(validation.stage1.anomaly_maps[val.labels == 0], config.cascade.map_weight)
    score = synthetic_validation_metrics(validation, val.labels, *synthetic, detector.cascade, fusion)
    test = read_json(run_dir / RUN_FILES["metrics"])
    if variant:
        test_split = decode_run_split(config, "test", detector.image_size)
        scored = detector.score(test_split.images, all_stages=True, progress=False)
        first, second = scored.stage1.loss, scored.stage2.scores
        cascade = detector.cascade.apply(first, second).cascade_score
        test = {"image_auroc": {"stage1": image_auroc(test_split.labels, first).value,
                                "stage2": image_auroc(test_split.labels, second).value,
                                "cascade": image_auroc(test_split.labels, cascade).value},
                "pixel_auroc": {"stage1": None}}
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commit": git_commit(),
        "run": str(run_dir),
        "variant": " ".join(variant or []),
        "seed": seed,
        "copies": copies,
        "synthetic_images": score["images"],
        **{f"synthetic_image_auroc_{k}": v for k, v in score["image_auroc"].items()},
        "synthetic_pixel_auroc_stage1": score["pixel_auroc"]["stage1"],
        "synthetic_pixel_auroc_stage2": score["pixel_auroc"]["stage2"],
        "synthetic_pixel_auroc_fused": score["pixel_auroc"]["fused"],
        "synthetic_pro_stage2": score["pro"]["stage2"],
        "synthetic_pro_fused": score["pro"]["fused"],
        "synthetic_stage1_recall": score["stage1_recall_at_threshold"],
        "synthetic_held_out_kinds": score["image_auroc_stage1_held_out_kinds"],
        "synthetic_held_out_kinds_stage2": score["image_auroc_stage2_held_out_kinds"],
        **{f"synthetic_{kind}": v for kind, v in score["image_auroc_stage1_by_kind"].items()},
        **{f"test_image_auroc_{k}": v for k, v in test["image_auroc"].items()},
        "test_pixel_auroc_stage1": test["pixel_auroc"]["stage1"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="finished run folders")
    parser.add_argument("--seed", type=int, help="synthetic-defect seed (default: each run's run.seed)")
    parser.add_argument("--variant", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="score with a changed scoring field (repeatable); thresholds re-calibrated, test AUROC recomputed")
    parser.add_argument("--copies", type=int, default=1, help="synthetic copies of each validation normal (default 1, as run)")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.copies < 1:
        parser.error(f"--copies must be >= 1, got {args.copies}")
    rows = []
    for run_dir in args.runs:
        row = {**row_for(run_dir, args.seed, args.variant, args.copies), "note": args.note}
        append_row("synthetic_val", row, "Synthetic-defect validation score beside test AUROC (benchmarks/synthetic_val.py)")
        rows.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    if len(rows) >= 2:
        rho = spearmanr([r["synthetic_image_auroc_stage1"] for r in rows], [r["test_image_auroc_stage1"] for r in rows]).statistic
        print(f"Spearman rank correlation, synthetic vs test stage-1 image AUROC over {len(rows)} runs: {rho:.3f}")


if __name__ == "__main__":
    main()
