"""Re-score finished runs without a model: cascade fusion rules and seed ensembles of stage 1.

    python benchmarks/rescore.py fusion RUN_DIR [RUN_DIR ...]      # e.g. runs-root/*/*/seed*
    python benchmarks/rescore.py ensemble RUN_DIR [RUN_DIR ...]    # runs of one data set, different seeds

Works on each run's ``scores.csv`` and ``config.yaml`` only (validation and test scores of both
stages). Validation normals give every statistic and threshold (as the pipeline does); test labels
are used only for the reported metrics.

``fusion``: for every run, the cascade (stage-1 threshold from the run's calibration, flagged
images ordered by their second-stage score) with the second-stage score ``z1 + w·z2`` for
w = 0, 0.25, 0.5, 1 (``sum``), 2, with ``max(z1, z2)`` (``max``) and with the stage-2 score alone
(``stage2``); ``z`` = a stage's score standardised by validation normals. Reports cascade image
AUROC, and the false-positive and true-positive rates at the calibrated thresholds for the
package's three fusion modes. Rows are grouped by data set (the run's ``run.name``).

``ensemble``: the mean of the runs' standardised stage-1 scores, for every subset size; reports
the mean, min and max test AUROC over the subsets of each size.

Appends to ``benchmarks/results/rescore_{fusion,ensemble}.{csv,md}``; never edit those by hand.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _results import append_row, git_commit

from twostage_ad.cascade import fit_cascade
from twostage_ad.metrics import image_auroc
from twostage_ad.workflow import load_run_config

WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)


def _splits(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    table = pd.read_csv(run_dir / "scores.csv")
    table = table[table["error"].isna()] if "error" in table else table
    return table[table["split"] == "val"], table[table["split"] == "test"].sort_values("image")


def fusion_row(run_dir: Path) -> dict:
    config = load_run_config(run_dir)
    val, test = _splits(run_dir)
    labels = test["label"].to_numpy()
    s1v, s2v = val["stage1_loss"].to_numpy(), val["stage2_score"].to_numpy()
    s1, s2 = test["stage1_loss"].to_numpy(), test["stage2_score"].to_numpy()
    row: dict = {"data": config.run.name, "run": str(run_dir)}
    for fusion in ("sum", "max", "stage2"):
        cascade = fit_cascade(s1v, s2v, val["label"].to_numpy(), config.calibration, fusion=fusion)
        out = cascade.apply(s1, s2)
        row[f"auroc_{fusion}"] = image_auroc(labels, out.cascade_score).value
        row[f"fpr_{fusion}"] = float(out.decision[labels == 0].mean())
        row[f"tpr_{fusion}"] = float(out.decision[labels == 1].mean())
        if fusion == "sum":  # the weight sweep reuses this cascade's stage-1 threshold and statistics
            z1 = (s1 - cascade.stage1_mean) / cascade.stage1_std
            z2 = (s2 - cascade.stage2_mean) / cascade.stage2_std
            flagged = out.flagged
    for w in WEIGHTS:  # flagged above unflagged, each ordered as the cascade orders them
        score = np.where(flagged, 10 + np.arctan(z1 + w * z2), np.arctan(z1))
        row[f"auroc_w{w:g}"] = image_auroc(labels, score).value
    return row


def ensemble_rows(run_dirs: list[Path]) -> list[dict]:
    standardised, labels, images = [], None, None
    for run_dir in run_dirs:
        val, test = _splits(run_dir)
        val = val[val["label"] == 0]  # statistics from validation normals only
        if images is not None and not np.array_equal(test["image"].to_numpy(), images):
            raise SystemExit(f"{run_dir} has other test images than {run_dirs[0]}: ensembles need runs of one split")
        images, labels = test["image"].to_numpy(), test["label"].to_numpy()
        standardised.append((test["stage1_loss"].to_numpy() - val["stage1_loss"].mean()) / val["stage1_loss"].std())
    rows = []
    for size in range(1, len(run_dirs) + 1):
        aurocs = [image_auroc(labels, np.mean([standardised[i] for i in subset], axis=0)).value
                  for subset in itertools.combinations(range(len(run_dirs)), size)]
        rows.append({"data": load_run_config(run_dirs[0]).run.name, "models": size, "subsets": len(aurocs),
                     "auroc_mean": float(np.mean(aurocs)), "auroc_min": float(np.min(aurocs)),
                     "auroc_max": float(np.max(aurocs)), "runs": " ".join(str(r) for r in run_dirs)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("fusion", "ensemble"))
    parser.add_argument("runs", type=Path, nargs="+", help="finished run folders (scores.csv, config.yaml)")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit()}
    if args.mode == "fusion":
        table = pd.DataFrame([fusion_row(r) for r in args.runs])
        summary = table.drop(columns="run").groupby("data").mean().reset_index()
        summary.insert(1, "runs", table.groupby("data").size().to_numpy())
        for row in summary.to_dict("records"):
            row = {**stamp, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, "note": args.note}
            append_row("rescore_fusion", row, "Cascade fusion rules re-scored from saved scores (benchmarks/rescore.py; do not edit)")
            print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    else:
        for row in ensemble_rows(args.runs):
            row = {**stamp, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, "note": args.note}
            append_row("rescore_ensemble", row, "Seed ensembles of stage 1 re-scored from saved scores (benchmarks/rescore.py; do not edit)")
            print(", ".join(f"{k}={v}" for k, v in row.items() if k != "runs"), flush=True)


if __name__ == "__main__":
    main()
