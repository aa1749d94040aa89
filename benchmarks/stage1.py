"""Stage-1 benchmark on real data: run the pipeline and append the measured numbers to a table.

    python benchmarks/stage1.py --config pipelines/mtd.yaml [--set stage1.epochs=30 ...] [--note "..."]

Each run appends one row to ``benchmarks/results/stage1.csv`` (git commit, config, overrides,
epochs, training seconds, AUROCs, images/s) and rewrites ``benchmarks/results/stage1.md`` from
that CSV. The numbers are written by this script only; never edit them by hand.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import pandas as pd

from twostage_ad.config_io import load_config
from twostage_ad.workflow import run_pipeline

from _results import append_row, git_commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--output", type=Path, help="run folder (default: a temporary folder)")
    parser.add_argument("--note", default="", help="what this run tries, for the experiment log")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    config = load_config(args.config, args.overrides)
    output = args.output or Path(tempfile.mkdtemp(prefix="twostage-bench-")) / config.run.name
    started = time.strftime("%Y-%m-%d %H:%M")
    metrics = run_pipeline(config, output, progress=False).metrics
    row = {
        "date": started,
        "commit": git_commit(),
        "config": args.config.name,
        "category": config.data.category or "",
        "overrides": " ".join(args.overrides),
        "image_size": config.data.image_size,
        "epochs": config.stage1.epochs,
        "steps": (metrics.get("steps") or {}).get("stage1"),
        "train_s": round(metrics["seconds"]["train_stage1"], 1),
        "total_s": round(metrics["seconds"]["total"], 1),
        "image_auroc_stage1": metrics["image_auroc"]["stage1"],
        "pixel_auroc_stage1": metrics["pixel_auroc"]["stage1"],
        "att_topk_auroc": metrics["image_auroc_stage1_components"]["stage1_att_topk"],
        "recon_auroc": metrics["image_auroc_stage1_components"]["stage1_recon"],
        "flagged_fraction": metrics["flagged_fraction"],
        "recall_at_threshold": metrics["stage1_recall_at_threshold"],
        "score_images_per_s": round(metrics["images_per_s"]["stage1"], 1),
        "note": args.note,
    }
    append_row("stage1", row, "Stage-1 benchmark runs (written by benchmarks/stage1.py; do not edit)")
    print(pd.DataFrame([row]).T.to_string(header=False))
    print(f"run folder: {output}")


if __name__ == "__main__":
    main()
