"""Cascade benchmark on real data: run the whole pipeline and append every headline number to a table.

    python benchmarks/cascade.py --config pipelines/mtd.yaml [--set stage2.guidance=attention ...]
        [--stage1-from RUN/checkpoints/stage1.pt] [--stage2-from RUN/checkpoints/stage2.pt] [--note "..."]
    python benchmarks/cascade.py --from-run RUN_DIR --note "..."   # record a finished `run` instead


Each run appends one row to ``benchmarks/results/cascade.csv`` (git commit, config, overrides,
reused checkpoints, training seconds, image AUROC of stage 1 / stage 2 / cascade, pixel AUROC
and PRO of stage 1 / stage 2 / fused maps, flagged share, images/s per path, wall time) and
rewrites ``benchmarks/results/cascade.md`` from that CSV. The numbers are written by this script
only; never edit them by hand.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import pandas as pd

from twostage_ad.config_io import load_config
from twostage_ad.runs import read_json
from twostage_ad.workflow import load_run_config, run_pipeline

from _results import append_row, git_commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="pipeline config to run")
    parser.add_argument("--from-run", type=Path, help="record an existing run folder's metrics.json instead of running")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--stage1-from", type=Path, help="reuse a trained stage 1 checkpoint")
    parser.add_argument("--stage2-from", type=Path, help="reuse a trained stage 2 checkpoint")
    parser.add_argument("--output", type=Path, help="run folder (default: a temporary folder)")
    parser.add_argument("--note", default="", help="what this run tries, for the experiment log")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if (args.config is None) == (args.from_run is None):
        parser.error("give either --config (run the pipeline) or --from-run (record a finished run)")
    if args.from_run is not None:
        output = args.from_run
        config = load_run_config(output)
        metrics = read_json(output / "metrics.json")
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime((output / "metrics.json").stat().st_mtime))
        wall = metrics["seconds"]["total"]
        reused = " ".join(f"{k}: {v}" for k, v in metrics["notes"].items() if k.endswith(".reused"))
        config_name = f"run {output.name}"
    else:
        config = load_config(args.config, args.overrides)
        output = args.output or Path(tempfile.mkdtemp(prefix="twostage-bench-")) / config.run.name
        started = time.strftime("%Y-%m-%d %H:%M")
        wall = time.perf_counter()
        metrics = run_pipeline(config, output, progress=False, stage1_checkpoint=args.stage1_from,
                               stage2_checkpoint=args.stage2_from).metrics
        wall = time.perf_counter() - wall
        reused = " ".join(f"{name}={path}" for name, path in (("stage1", args.stage1_from), ("stage2", args.stage2_from)) if path)
        config_name = args.config.name
    row = {
        "date": started,
        "commit": git_commit(),
        "config": config_name,
        "category": config.data.category or "",
        "overrides": " ".join(args.overrides),
        "reused": reused,
        "epochs": f"{metrics['epochs']['stage1']}/{metrics['epochs']['stage2']}",
        "train1_s": round(metrics["seconds"]["train_stage1"], 1),
        "train2_s": round(metrics["seconds"]["train_stage2"], 1),
        "wall_s": round(wall, 1),
        **{f"img_{k}": metrics["image_auroc"][k] for k in ("stage1", "stage2", "cascade")},
        **{f"pix_{k}": metrics["pixel_auroc"][k] for k in ("stage1", "stage2", "fused")},
        **{f"pro_{k}": metrics["pro"][k] for k in ("stage1", "stage2", "fused")},
        "flagged": metrics["flagged_fraction"],
        "recall1": metrics["stage1_recall_at_threshold"],
        "cascade_recall": metrics["cascade_recall"],
        "cascade_fpr": metrics["cascade_false_positive_rate"],
        **{f"ips_{k}": round(metrics["images_per_s"][k], 1) for k in ("stage1", "stage2", "cascade")},
        "note": args.note,
    }
    append_row("cascade", row, "Cascade benchmark runs (written by benchmarks/cascade.py; do not edit)")
    print(pd.DataFrame([row]).T.to_string(header=False))
    print(f"run folder: {output}")


if __name__ == "__main__":
    main()
