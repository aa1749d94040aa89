"""Threshold methods on small validation sets: what share of new normals each one rejects.

    python benchmarks/thresholds.py RUN [RUN ...] [--methods conformal quantile] [--sizes 3 4 8 16 32]
        [--draws 200] [--note "..."]

Re-picks τ₁ and τ₂ from each finished run's saved scores (``scores.csv``, ``synthetic_scores.csv``;
no model, no retraining) with every method in ``--methods`` at the run's ``q``, two ways:

- **held out, no label:** ``--draws`` random subsets of ``n`` validation normals (every subset when
  there are fewer) calibrate both thresholds as ``run`` does; the validation normals left out
  measure the screen's and the cascade's false-positive rate, and their synthetic-defect copies
  the screen's and the cascade's recall. ``n`` from ``--sizes``, below the run's count of
  validation normals. This is the score to choose a method by.
- **test (reported, never steering):** the full validation set calibrates; the test split gives
  the same rates on real normals and defects.

Writes ``results/thresholds.csv`` (one row per run, method and ``n``) and rewrites
``results/thresholds.md`` from it, with a summary over runs per data set, method and ``n``.
Numbers are written by this script only.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from twostage_ad.calibration import NORMAL_ONLY_METHODS
from twostage_ad.cascade import fit_cascade
from twostage_ad.runs import load_run_config, read_scores, read_synthetic_scores, write_text_atomic

from _results import RESULTS, append_row, git_commit, markdown_table

NAME = "thresholds"
TITLE = "Threshold methods: false-positive rate and recall on held-out validation normals and on the test split"
MIN_HELD_OUT_FOR_P90 = 20
RATES = ["screen_fpr", "screen_fpr_p90", "cascade_fpr", "synthetic_screen_recall", "synthetic_cascade_recall",
         "test_screen_fpr", "test_cascade_fpr", "test_screen_recall", "test_cascade_recall"]


def calibration_subsets(n_total: int, n: int, draws: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index sets of ``n`` out of ``n_total``: every one when there are at most ``draws``, else ``draws`` at random."""
    if math.comb(n_total, n) <= draws:
        return [np.array(c) for c in itertools.combinations(range(n_total), n)]
    return [np.sort(rng.choice(n_total, size=n, replace=False)) for _ in range(draws)]


def held_out_rates(s1: np.ndarray, s2: np.ndarray, syn1: np.ndarray, syn2: np.ndarray, calibration: Any, fusion: str,
                   subsets: list[np.ndarray]) -> dict[str, float]:
    """Mean rates over ``subsets``: each calibrates on its normals and is measured on the others and their
    synthetic copies (``syn1``/``syn2``: row i is validation normal i with a defect)."""
    screen_fpr, cascade_fpr, screen_recall, cascade_recall = [], [], [], []
    for chosen in subsets:
        rest = np.setdiff1d(np.arange(len(s1)), chosen)
        cascade = fit_cascade(s1[chosen], s2[chosen], np.zeros(len(chosen), int), calibration, fusion=fusion)
        normals, synthetic = cascade.apply(s1[rest], s2[rest]), cascade.apply(syn1[rest], syn2[rest])
        screen_fpr.append(np.mean(normals.flagged))
        cascade_fpr.append(np.mean(normals.decision))
        screen_recall.append(np.mean(synthetic.flagged))
        cascade_recall.append(np.mean(synthetic.decision))
    # how badly one calibration set can go; a rate over a handful of held-out normals is too coarse for it
    p90 = float(np.quantile(screen_fpr, 0.9)) if len(s1) - len(subsets[0]) >= MIN_HELD_OUT_FOR_P90 else float("nan")
    return {"screen_fpr": float(np.mean(screen_fpr)), "screen_fpr_p90": p90,
            "cascade_fpr": float(np.mean(cascade_fpr)), "synthetic_screen_recall": float(np.mean(screen_recall)),
            "synthetic_cascade_recall": float(np.mean(cascade_recall)), "draws": len(subsets)}


def test_rates(val: pd.DataFrame, test: pd.DataFrame, calibration: Any, fusion: str) -> dict[str, float]:
    """Both thresholds from every validation row, rates on the test split (labels reported only)."""
    cascade = fit_cascade(val["stage1_loss"].to_numpy(), val["stage2_score"].to_numpy(), val["label"].to_numpy(),
                          calibration, fusion=fusion)
    out = cascade.apply(test["stage1_loss"].to_numpy(), test["stage2_score"].to_numpy())
    normal = test["label"].to_numpy() == 0
    return {"test_screen_fpr": float(np.mean(out.flagged[normal])), "test_cascade_fpr": float(np.mean(out.decision[normal])),
            "test_screen_recall": float(np.mean(out.flagged[~normal])), "test_cascade_recall": float(np.mean(out.decision[~normal])),
            "tau1": cascade.stage1.value, "tau2": cascade.stage2.value}


def run_rows(run_dir: Path, methods: list[str], sizes: list[int], draws: int, seed: int) -> list[dict[str, Any]]:
    config = load_run_config(run_dir)
    scores, _ = read_scores(run_dir)
    synthetic = read_synthetic_scores(run_dir)
    val, test = scores[scores["split"] == "val"], scores[scores["split"] == "test"]
    normals = val[val["label"] == 0]
    if synthetic is None or len(synthetic) != len(normals):
        raise SystemExit(f"{run_dir}: synthetic_scores.csv missing or not one row per validation normal")
    s1, s2 = normals["stage1_loss"].to_numpy(np.float64), normals["stage2_score"].to_numpy(np.float64)
    syn1, syn2 = synthetic["stage1_loss"].to_numpy(np.float64), synthetic["stage2_score"].to_numpy(np.float64)
    fusion = config.cascade.fusion
    dataset = Path(str(config.data.path)).parent.name + (f"/{config.data.category}" if config.data.category else "")
    rows = []
    for method in methods:
        calibration = replace(config.calibration, method=method)
        common = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M"), "run": str(run_dir), "dataset": dataset,
                  "seed": config.run.seed, "method": method, "q": calibration.q, "fusion": fusion, "val_normals": len(normals)}
        for n in [n for n in sizes if n < len(normals)]:
            subsets = calibration_subsets(len(normals), n, draws, np.random.default_rng(seed))
            rows.append({**common, "n": n, **held_out_rates(s1, s2, syn1, syn2, calibration, fusion, subsets)})
        rows.append({**common, "n": len(normals), **test_rates(val, test, calibration, fusion)})
    return rows


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean over runs per data set (PIPED classes pooled), method and calibration-set size."""
    table = table.assign(dataset=table["dataset"].str.split("/").str[0])
    rates = [c for c in RATES if c in table]
    return (table.groupby(["dataset", "method", "n"], sort=True)[rates].mean()
            .join(table.groupby(["dataset", "method", "n"]).size().rename("runs")).reset_index())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders")
    parser.add_argument("--methods", nargs="+", default=["conformal", "quantile"], choices=NORMAL_ONLY_METHODS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[3, 4, 8, 16, 32],
                        help="calibration-set sizes for the held-out part (each below the run's validation normals)")
    parser.add_argument("--draws", type=int, default=200, help="subsets per size (all of them when fewer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    # conformal warns on every calibration set below q/(1 − q) normals: thousands of subsets here
    logging.getLogger("twostage_ad.calibration").setLevel(logging.ERROR)
    if args.draws < 1 or any(n < 2 for n in args.sizes):
        parser.error(f"--draws must be >= 1 and every --sizes >= 2, got {args.draws} and {args.sizes}")
    rows = []
    for run_dir in args.runs:
        for row in run_rows(run_dir, args.methods, args.sizes, args.draws, args.seed):
            append_row(NAME, {**row, "note": args.note}, TITLE)  # an interrupted benchmark keeps what it measured
            rows.append(row)
    new = summary(pd.DataFrame(rows))
    print(new.round(4).to_string(index=False))
    table = pd.read_csv(RESULTS / f"{NAME}.csv")
    text = (f"# {TITLE}\n\nSummary of every row below: mean over runs per data set, method and calibration-set size "
            f"`n` (`n` = all validation normals: the test rows). Command: `python benchmarks/thresholds.py RUN ...`.\n\n"
            + markdown_table(summary(table)) + "\n## Rows\n\n" + markdown_table(table))
    write_text_atomic(RESULTS / f"{NAME}.md", text)


if __name__ == "__main__":
    main()
