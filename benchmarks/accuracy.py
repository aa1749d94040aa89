"""Accuracy benchmark: our cascade and anomalib's GANomaly on MTD and every PIPED class.

    python benchmarks/accuracy.py                                   # everything: 3 seeds, both data sets, the peer
    python benchmarks/accuracy.py --datasets piped --classes PA_BDP01_TL --seeds 0   # a slice
    python benchmarks/accuracy.py --no-peer                         # ours only

For every (data set, class, seed): ``python -m twostage_ad.pipeline run`` with the shipped
``pipelines/<data set>.yaml`` (``data.category`` set per PIPED class, ``run.seed`` per seed),
and, unless ``--no-peer``, ``benchmarks/peer_anomalib.py train`` on the same split, image size
and channels, run with the peer's own interpreter (``--peer-python``, default ``.peer-venv``
made by ``benchmarks/setup_peer_env.sh``; anomalib is never a dependency of the package).

Each finished run is kept under ``--runs-root`` (our run folder, the peer's JSON), so an
interrupted benchmark continues where it stopped; ``--rerun`` starts the rows again. The
script then writes ``benchmarks/results/accuracy_runs.csv`` (one row per data set, class and
seed) and ``benchmarks/results/accuracy.{csv,md}`` (mean ± std over seeds per class, the PIPED
mean over classes, the issue's goals). Test labels are used for the metrics only: thresholds
come from validation normals, settings from the config files, and every run has a fixed length.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pandas as pd

from twostage_ad.config import load_config
from twostage_ad.runs import read_json, write_atomic, write_text_atomic
from twostage_ad.workflow import run_pipeline

from _results import RESULTS, git_commit, markdown_table

log = logging.getLogger("accuracy")
REPO = Path(__file__).resolve().parent.parent
PIPELINES = {"mtd": REPO / "pipelines" / "mtd.yaml", "piped": REPO / "pipelines" / "piped.yaml"}
GOALS = {"mtd": 0.90, "piped": 0.90}  # image and pixel AUROC goals


def classes_of(dataset: str) -> list[str | None]:
    """PIPED: one model per class (the manifest's category column); MTD: one model for everything."""
    if dataset != "piped":
        return [None]
    config = load_config(PIPELINES[dataset])
    return sorted(pd.read_csv(config.data.path)["category"].dropna().unique())


def run_ours(dataset: str, category: str | None, seed: int, folder: Path, rerun: bool) -> dict[str, Any]:
    metrics_path, stamp = folder / "metrics.json", folder / "benchmark.json"
    if metrics_path.is_file() and not rerun:
        return {**read_json(metrics_path), "commit": read_json(stamp)["commit"] if stamp.is_file() else "unknown"}
    overrides = [f"run.seed={seed}"] + ([f"data.category={category}"] if category else [])
    config = load_config(PIPELINES[dataset], overrides)
    log.info("ours: %s %s seed %d -> %s", dataset, category or "", seed, folder)
    metrics = run_pipeline(config, folder, overwrite=True, progress=False).metrics
    commit = git_commit()
    write_text_atomic(stamp, json.dumps({"commit": commit, "overrides": overrides}) + "\n")
    return {**metrics, "commit": commit}


def run_peer(dataset: str, category: str | None, seed: int, path: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    if args.no_peer or (args.peer_seeds is not None and seed not in args.peer_seeds):
        return None
    if path.is_file() and not args.rerun:
        return json.loads(path.read_text())
    config = load_config(PIPELINES[dataset])
    command = [
        str(args.peer_python), str(REPO / "benchmarks" / "peer_anomalib.py"), "train",
        "--manifest", str(config.data.path), "--image-size", str(config.data.image_size),
        "--channels", str(config.data.channels or 3), "--epochs", str(args.peer_epochs),
        "--batch-size", str(args.peer_batch_size), "--seed", str(seed), "--output", str(path),
    ] + (["--category", category] if category else [])
    log.info("peer: %s", " ".join(command))
    path.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the peer failed on {dataset} {category or ''} seed {seed}:\n{done.stderr[-4000:]}")
    return json.loads(path.read_text())


def row_of(dataset: str, category: str | None, seed: int, ours: dict[str, Any], peer: dict[str, Any] | None) -> dict[str, Any]:
    seconds = ours["seconds"]
    return {
        "dataset": dataset,
        "class": category or "all",
        "seed": seed,
        "commit": ours["commit"],
        "image_auroc_stage1": ours["image_auroc"]["stage1"],
        "image_auroc_stage2": ours["image_auroc"]["stage2"],
        "image_auroc_cascade": ours["image_auroc"]["cascade"],
        "pixel_auroc_stage1": ours["pixel_auroc"]["stage1"],
        "pixel_auroc_fused": ours["pixel_auroc"]["fused"],
        "pro_stage1": ours["pro"]["stage1"],
        "pro_fused": ours["pro"]["fused"],
        "flagged_fraction": ours["flagged_fraction"],
        "train_seconds": seconds["train_stage1"] + seconds["train_stage2"],
        "images_per_s_cascade": ours["images_per_s"]["cascade"],
        "peer_image_auroc": None if peer is None else peer["image_auroc"],
        "peer_train_seconds": None if peer is None else peer["train_seconds"],
        "peer_images_per_s": None if peer is None else peer["score_images_per_s"],
    }


METRICS = ["image_auroc_stage1", "image_auroc_stage2", "image_auroc_cascade", "pixel_auroc_stage1", "pixel_auroc_fused",
           "pro_stage1", "pro_fused", "train_seconds", "images_per_s_cascade", "peer_image_auroc", "peer_train_seconds",
           "peer_images_per_s"]


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds per (data set, class); per data set with classes, the mean over
    classes (its std: over seeds, of the per-seed class mean)."""
    rows = []
    for (dataset, category), group in runs.groupby(["dataset", "class"], sort=True):
        rows.append({"dataset": dataset, "class": category, "seeds": len(group), "peer_seeds": int(group["peer_image_auroc"].notna().sum()),
                     **{f"{m}_mean": group[m].mean() for m in METRICS}, **{f"{m}_std": group[m].std(ddof=0) for m in METRICS}})
    for dataset, group in runs.groupby("dataset"):
        if group["class"].nunique() > 1:
            per_seed = group.groupby("seed")[METRICS].mean()
            rows.append({"dataset": dataset, "class": f"mean of {group['class'].nunique()} classes", "seeds": len(per_seed),
                         "peer_seeds": int(per_seed["peer_image_auroc"].notna().sum()),
                         **{f"{m}_mean": per_seed[m].mean() for m in METRICS},
                         **{f"{m}_std": per_seed[m].std(ddof=0) for m in METRICS}})
    return pd.DataFrame(rows)


def _pm(mean: float, std: float, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(summary: pd.DataFrame, runs: pd.DataFrame, args: argparse.Namespace) -> str:
    table = pd.DataFrame({
        "data set": summary["dataset"],
        "class": summary["class"],
        "seeds": summary["seeds"],
        "stage 1": [_pm(a, b) for a, b in zip(summary["image_auroc_stage1_mean"], summary["image_auroc_stage1_std"])],
        "stage 2": [_pm(a, b) for a, b in zip(summary["image_auroc_stage2_mean"], summary["image_auroc_stage2_std"])],
        "**cascade**": [_pm(a, b) for a, b in zip(summary["image_auroc_cascade_mean"], summary["image_auroc_cascade_std"])],
        "pixel (stage 1)": [_pm(a, b) for a, b in zip(summary["pixel_auroc_stage1_mean"], summary["pixel_auroc_stage1_std"])],
        "pixel (fused)": [_pm(a, b) for a, b in zip(summary["pixel_auroc_fused_mean"], summary["pixel_auroc_fused_std"])],
        "PRO (fused)": [_pm(a, b) for a, b in zip(summary["pro_fused_mean"], summary["pro_fused_std"])],
        "**peer** image": [_pm(a, b) if n > 1 else ("n/a" if n == 0 else f"{a:.3f} (1 seed)")
                           for a, b, n in zip(summary["peer_image_auroc_mean"], summary["peer_image_auroc_std"], summary["peer_seeds"])],
        "train s (ours / peer)": [f"{a:.0f} / {'n/a' if np.isnan(b) else f'{b:.0f}'}"
                                  for a, b in zip(summary["train_seconds_mean"], summary["peer_train_seconds_mean"])],
        "images/s (cascade / peer)": [f"{a:.0f} / {'n/a' if np.isnan(b) else f'{b:.0f}'}"
                                      for a, b in zip(summary["images_per_s_cascade_mean"], summary["peer_images_per_s_mean"])],
    })
    goals = []
    for dataset, goal in GOALS.items():
        rows = summary[(summary["dataset"] == dataset) & (summary["class"].str.startswith("mean") | (summary["class"] == "all"))]
        if len(rows):
            r = rows.iloc[0]
            image, pixel, peer = r["image_auroc_cascade_mean"], r["pixel_auroc_fused_mean"], r["peer_image_auroc_mean"]
            goals.append(f"- {dataset}: cascade image AUROC {image:.3f} (goal {goal:.2f}: {'met' if image >= goal else 'not met'}), "
                         f"fused pixel AUROC {pixel:.3f} (goal {goal:.2f}: {'met' if pixel >= goal else 'not met'}), "
                         + ("peer not run" if np.isnan(peer) else f"peer {peer:.3f} ({'ours ahead' if image > peer else 'peer ahead'})"))
    header = (
        "# Accuracy benchmark (written by benchmarks/accuracy.py; do not edit)\n\n"
        f"{time.strftime('%Y-%m-%d %H:%M')}, commit {git_commit()}, command: `python benchmarks/accuracy.py "
        f"{' '.join(sys.argv[1:])}`; seeds {sorted(runs['seed'].unique().tolist())}; peer: anomalib GANomaly, "
        f"{args.peer_epochs} epochs, batch {args.peer_batch_size}, raw scores, seeds "
        f"{'all' if args.peer_seeds is None else sorted(args.peer_seeds)}. Image AUROC unless named; mean ± std over seeds "
        "(for the PIPED mean, the std over seeds of the class mean). Training seconds: both stages; images/s: the "
        "cascade's deployment path (stage 1 on all test images, stage 2 on flagged ones) and the peer's forward passes, "
        "both on decoded tensors, 2 CPU cores.\n\n"
    )
    return header + markdown_table(table) + "\n## Goals\n\n" + "\n".join(goals) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mtd", "piped"], choices=sorted(PIPELINES))
    parser.add_argument("--classes", nargs="+", help="PIPED classes (default: every class in the manifest)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs-root", type=Path, default=REPO / "runs" / "accuracy", help="where runs are kept (resumable)")
    parser.add_argument("--rerun", action="store_true", help="run rows again even when a finished run exists")
    parser.add_argument("--no-peer", action="store_true", help="skip anomalib's GANomaly")
    parser.add_argument("--peer-python", type=Path, default=REPO / ".peer-venv" / "bin" / "python",
                        help="interpreter of the peer's environment (benchmarks/setup_peer_env.sh makes it)")
    parser.add_argument("--peer-epochs", type=int, default=15, help="peer training epochs (ours: see pipelines/*.yaml)")
    parser.add_argument("--peer-batch-size", type=int, default=16)
    parser.add_argument("--peer-seeds", type=int, nargs="+", help="run the peer for these seeds only (default: every seed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.no_peer and not args.peer_python.is_file():
        parser.error(f"no peer interpreter at {args.peer_python}: run benchmarks/setup_peer_env.sh or pass --no-peer")

    rows = []
    for dataset in args.datasets:
        for category in (args.classes if dataset == "piped" and args.classes else classes_of(dataset)):
            for seed in args.seeds:
                name = f"{dataset}/{category or 'all'}/seed{seed}"
                ours = run_ours(dataset, category, seed, args.runs_root / name, args.rerun)
                peer = run_peer(dataset, category, seed, args.runs_root / "peer" / f"{name}-e{args.peer_epochs}.json", args)
                rows.append(row_of(dataset, category, seed, ours, peer))
                log.info("%s: cascade %.3f, pixel %.3f, peer %s", name, rows[-1]["image_auroc_cascade"] or float("nan"),
                         rows[-1]["pixel_auroc_fused"] or float("nan"),
                         "n/a" if peer is None else f"{peer['image_auroc']:.3f}")
                text = write_tables(rows, args)  # after every row: an interrupted benchmark leaves a table
    print(text)


def write_tables(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    runs = pd.DataFrame(rows).astype({m: float for m in METRICS})
    summary = summarise(runs)
    RESULTS.mkdir(exist_ok=True)
    write_atomic(RESULTS / "accuracy_runs.csv", lambda tmp: runs.to_csv(tmp, index=False, float_format="%.4f"))
    write_atomic(RESULTS / "accuracy.csv", lambda tmp: summary.to_csv(tmp, index=False, float_format="%.4f"))
    text = markdown(summary, runs, args)
    write_text_atomic(RESULTS / "accuracy.md", text)
    return text


if __name__ == "__main__":
    main()
