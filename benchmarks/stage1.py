"""Stage-1 benchmark on real data: run the pipeline and append the measured numbers to a table.

    python benchmarks/stage1.py --config pipelines/mtd.yaml [--set stage1.epochs=30 ...] [--note "..."]

Each run appends one row to ``benchmarks/results/stage1.csv`` (git commit, config, overrides,
epochs, training seconds, AUROCs, images/s) and rewrites ``benchmarks/results/stage1.md`` from
that CSV. The numbers are written by this script only; never edit them by hand.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd

from twostage_ad.config import load_config
from twostage_ad.runs import write_atomic, write_text_atomic
from twostage_ad.workflow import run_pipeline

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _markdown(table: pd.DataFrame) -> str:
    def cell(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


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
        "commit": _commit(),
        "config": args.config.name,
        "category": config.data.category or "",
        "overrides": " ".join(args.overrides),
        "image_size": config.data.image_size,
        "epochs": config.stage1.epochs,
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
    RESULTS.mkdir(exist_ok=True)
    csv_path = RESULTS / "stage1.csv"
    table = pd.concat([pd.read_csv(csv_path, keep_default_na=False), pd.DataFrame([row])]) if csv_path.exists() else pd.DataFrame([row])
    write_atomic(csv_path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.4f"))
    write_text_atomic(
        RESULTS / "stage1.md",
        "# Stage-1 benchmark runs (written by benchmarks/stage1.py; do not edit)\n\n" + _markdown(table),
    )
    print(pd.DataFrame([row]).T.to_string(header=False))
    print(f"run folder: {output}")


if __name__ == "__main__":
    main()
