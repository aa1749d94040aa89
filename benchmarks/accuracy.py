"""Accuracy benchmark: our cascade and two anomalib peers (GANomaly, DRAEM) on MTD and every PIPED class.

    python benchmarks/accuracy.py                                   # everything: 3 seeds, both data sets, both peers
    python benchmarks/accuracy.py --datasets piped --classes PA_BDP01_TL --seeds 0   # a slice
    python benchmarks/accuracy.py --peers draem --peer-seeds 0      # ours on every seed, DRAEM on seed 0
    python benchmarks/accuracy.py --no-peer                         # ours only

For every (data set, class, seed): ``python -m twostage_ad.pipeline run`` with the shipped
``pipelines/<data set>.yaml`` (``data.category`` set per PIPED class, ``run.seed`` per seed),
and, per peer in ``--peers``, ``benchmarks/peer_anomalib.py train`` on the same split, image size
and channels, run with the peer's own interpreter (``--peer-python``, default ``.peer-venv``
made by ``benchmarks/setup_peer_env.sh``; anomalib is never a dependency of the package).
GANomaly trains a fixed number of epochs (``--peer-epochs``); DRAEM trains for
``--draem-factor`` × the wall time our two stages took on that row (1 = equal time).

Each finished run is kept under ``--runs-root`` (our run folder, each peer's JSON), so an
interrupted benchmark continues where it stopped; ``--rerun`` starts the rows again. The
script writes ``benchmarks/results/<stem>_runs.csv`` (one row per data set, class and seed;
``--output-stem``, default ``accuracy``) and ``<stem>.{csv,md}`` (mean ± std over seeds per class,
the PIPED mean over classes, the issues' goals). Rows already in ``<stem>_runs.csv`` that this
invocation does not run are kept, and a re-run row keeps the earlier values of the peers it does
not run (GANomaly's result does not depend on our code; DRAEM's budget was our training time of
the row it ran beside, recorded as ``draem_train_seconds``); every row names the commit of our
run, and the header lists them. ``--fresh`` drops the earlier rows. Test labels are used for the metrics only:
thresholds come from validation normals, settings from the config files, and every run has a
fixed length (ours and GANomaly in epochs, DRAEM in seconds; ours within each stage's
``max_seconds``, which an idle 2-core CPU does not reach on these sets: a run it stopped is logged
as a warning, and its ``metrics.json`` says ``out_of_time``).
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

from twostage_ad.config_io import load_config
from twostage_ad.runs import read_json, write_atomic, write_text_atomic
from twostage_ad.workflow import run_pipeline

from _results import RESULTS, git_commit, markdown_table

log = logging.getLogger("accuracy")
REPO = Path(__file__).resolve().parent.parent
PIPELINES = {"mtd": REPO / "pipelines" / "mtd.yaml", "piped": REPO / "pipelines" / "piped.yaml"}
PEERS = ("ganomaly", "draem")
KEY = ["dataset", "class", "seed"]
STAMPS = ["commit", "calibration"]  # what each of our rows was made with
OURS = ["image_auroc_stage1", "image_auroc_stage2", "image_auroc_cascade", "pixel_auroc_stage1", "pixel_auroc_fused",
        "pro_stage1", "pro_fused", "flagged_fraction", "train_seconds", "images_per_s_cascade"]
PEER_COLUMNS = {
    "ganomaly": ["ganomaly_image_auroc", "ganomaly_train_seconds", "ganomaly_images_per_s"],
    "draem": ["draem_image_auroc", "draem_pixel_auroc", "draem_pro", "draem_train_seconds", "draem_images_per_s",
              "draem_steps", "draem_factor"],
}
METRICS = OURS + [c for columns in PEER_COLUMNS.values() for c in columns]
# (data set, column of the per-data-set row, goal, what it is); stage-1 goals from the stage-1 issue
GOALS = [
    ("mtd", "image_auroc_stage1", 0.90, "stage-1 image AUROC"),
    ("mtd", "pixel_auroc_stage1", 0.75, "stage-1 pixel AUROC"),
    ("mtd", "image_auroc_cascade", 0.90, "cascade image AUROC"),
    ("mtd", "pixel_auroc_fused", 0.80, "fused pixel AUROC"),
    ("mtd", "pro_fused", 0.80, "fused PRO"),
    ("piped", "image_auroc_stage1", 0.98, "stage-1 image AUROC"),
    ("piped", "image_auroc_cascade", 0.98, "cascade image AUROC"),
    ("piped", "pixel_auroc_fused", 0.90, "fused pixel AUROC"),
]


def classes_of(dataset: str) -> list[str | None]:
    """PIPED: one model per class (the manifest's category column); MTD: one model for everything."""
    if dataset != "piped":
        return [None]
    config = load_config(PIPELINES[dataset])
    return sorted(pd.read_csv(config.data.path)["category"].dropna().unique())


def calibration_of(folder: Path) -> str:
    """``"<τ₁ method>/<τ₂ method>"`` from the run's current ``thresholds.json`` (``"unknown"`` without one):
    the flagged share, the cascade's recall, AUROC and images/s depend on it; each stage's AUROC and
    PRO do not."""
    path = folder / "thresholds.json"
    if not path.is_file():
        return "unknown"
    thresholds = read_json(path)
    return "/".join(str(thresholds.get(stage, {}).get("method", "unknown")) for stage in ("stage1", "stage2"))


def run_ours(dataset: str, category: str | None, seed: int, folder: Path, rerun: bool) -> dict[str, Any]:
    metrics_path, stamp = folder / "metrics.json", folder / "benchmark.json"
    if metrics_path.is_file() and not rerun:
        return {**read_json(metrics_path), "commit": read_json(stamp)["commit"] if stamp.is_file() else "unknown",
                "calibration": calibration_of(folder)}
    overrides = [f"run.seed={seed}"] + ([f"data.category={category}"] if category else [])
    config = load_config(PIPELINES[dataset], overrides)
    log.info("ours: %s %s seed %d -> %s", dataset, category or "", seed, folder)
    metrics = run_pipeline(config, folder, overwrite=True, progress=False).metrics
    if any((metrics.get("out_of_time") or {}).values()):
        log.warning("%s: a stage ran out of its max_seconds, so this row trained fewer steps than the recipe plans "
                    "(a busy or slower machine): %s", folder, metrics["out_of_time"])
    commit = git_commit()
    write_text_atomic(stamp, json.dumps({"commit": commit, "overrides": overrides}) + "\n")
    return {**metrics, "commit": commit, "calibration": calibration_of(folder)}


def peer_command(peer: str, dataset: str, category: str | None, seed: int, our_seconds: float,
                 args: argparse.Namespace) -> list[str]:
    """The ``peer_anomalib.py train`` command line of one peer on one row."""
    config = load_config(PIPELINES[dataset])
    command = [
        str(args.peer_python), str(REPO / "benchmarks" / "peer_anomalib.py"), "train", "--model", peer,
        "--manifest", str(config.data.path), "--image-size", str(config.data.image_size),
        "--channels", str(config.data.channels or 3), "--seed", str(seed),
    ] + (["--category", category] if category else [])
    if peer == "ganomaly":
        return command + ["--epochs", str(args.peer_epochs), "--batch-size", str(args.peer_batch_size)]
    return command + ["--max-seconds", f"{args.draem_factor * our_seconds:.1f}", "--batch-size", str(args.draem_batch_size)] \
        + (["--invert-masks"] if config.data.invert_masks else [])


def run_peer(peer: str, dataset: str, category: str | None, seed: int, our_seconds: float, path: Path,
             args: argparse.Namespace) -> dict[str, Any] | None:
    if peer not in args.peers or (args.peer_seeds is not None and seed not in args.peer_seeds):
        return None
    if path.is_file() and not args.rerun:
        return json.loads(path.read_text())
    command = peer_command(peer, dataset, category, seed, our_seconds, args) + ["--output", str(path)]
    log.info("peer: %s", " ".join(command))
    path.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"peer {peer} failed on {dataset} {category or ''} seed {seed}:\n{done.stderr[-4000:]}")
    return json.loads(path.read_text())


def peer_values(peer: str, result: dict[str, Any] | None, factor: float) -> dict[str, Any]:
    """The row's columns of one peer (``None`` when it did not run)."""
    if result is None:
        return dict.fromkeys(PEER_COLUMNS[peer])
    common = {f"{peer}_image_auroc": result["image_auroc"], f"{peer}_train_seconds": result["train_seconds"],
              f"{peer}_images_per_s": result["score_images_per_s"]}
    if peer == "ganomaly":
        return common
    return {**common, "draem_pixel_auroc": result["pixel_auroc"], "draem_pro": result["pro"],
            "draem_steps": result["steps_trained"], "draem_factor": factor}


def row_of(dataset: str, category: str | None, seed: int, ours: dict[str, Any],
           peers: dict[str, dict[str, Any] | None], draem_factor: float) -> dict[str, Any]:
    seconds = ours["seconds"]
    row = {
        "dataset": dataset,
        "class": category or "all",
        "seed": seed,
        "commit": ours["commit"],
        "calibration": ours["calibration"],
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
    }
    for peer in PEERS:
        row.update(peer_values(peer, peers.get(peer), draem_factor))
    return row


def earlier_rows(path: Path) -> pd.DataFrame:
    """The runs table a previous invocation wrote to ``path`` (empty when there is none)."""
    return earlier_rows_from(pd.read_csv(path) if path.is_file() else pd.DataFrame())


def earlier_rows_from(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` in this script's columns (``peer_*`` columns of older tables are GANomaly's)."""
    table = table.rename(columns=lambda c: c.replace("peer_", "ganomaly_", 1) if c.startswith("peer_") else c)
    return table.reindex(columns=KEY + STAMPS + METRICS)


def merge_rows(earlier: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """New rows replace earlier ones of the same key; a peer's empty columns in a new row take the
    earlier row's values. Earlier rows of other keys are kept."""
    new = new.reindex(columns=KEY + STAMPS + METRICS)
    if len(earlier):
        previous = earlier.set_index(KEY)
        for columns in PEER_COLUMNS.values():
            missing = new[columns[0]].isna()
            for index in new.index[missing]:
                key = tuple(new.loc[index, KEY])
                if key in previous.index:
                    new.loc[index, columns] = previous.loc[key, columns].to_numpy()
        kept = earlier[~earlier.set_index(KEY).index.isin(new.set_index(KEY).index)]
        new = pd.concat([kept, new], ignore_index=True)
    return new.astype({m: float for m in METRICS}).sort_values(KEY, ignore_index=True)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds per (data set, class); per data set with classes, the mean over
    classes (its std: over seeds, of the per-seed class mean)."""
    rows = []
    counts = {f"{peer}_seeds": f"{peer}_image_auroc" for peer in PEERS}
    for (dataset, category), group in runs.groupby(["dataset", "class"], sort=True):
        rows.append({"dataset": dataset, "class": category, "seeds": len(group),
                     **{name: int(group[column].notna().sum()) for name, column in counts.items()},
                     **{f"{m}_mean": group[m].mean() for m in METRICS}, **{f"{m}_std": group[m].std(ddof=0) for m in METRICS}})
    for dataset, group in runs.groupby("dataset"):
        if group["class"].nunique() > 1:
            # a peer's class mean only over seeds where it ran on every class
            per_seed = group.groupby("seed")[METRICS].agg(lambda s: s.mean() if s.notna().all() else np.nan)
            rows.append({"dataset": dataset, "class": f"mean of {group['class'].nunique()} classes", "seeds": len(per_seed),
                         **{name: int(per_seed[column].notna().sum()) for name, column in counts.items()},
                         **{f"{m}_mean": per_seed[m].mean() for m in METRICS},
                         **{f"{m}_std": per_seed[m].std(ddof=0) for m in METRICS}})
    return pd.DataFrame(rows)


def _pm(mean: float, std: float, n: int | None = None, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and np.isnan(mean)) or n == 0:
        return "n/a"
    if n == 1:
        return f"{mean:.{digits}f} (1 seed)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _num(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.0f}"


def goal_lines(summary: pd.DataFrame) -> list[str]:
    lines = []
    for dataset in dict.fromkeys(d for d, *_ in GOALS):
        rows = summary[(summary["dataset"] == dataset) & (summary["class"].str.startswith("mean") | (summary["class"] == "all"))]
        if not len(rows):
            continue
        r = rows.iloc[0]
        parts = [f"{label} {r[f'{column}_mean']:.3f} (goal {goal:.2f}: {'met' if r[f'{column}_mean'] >= goal else 'not met'})"
                 for d, column, goal, label in GOALS if d == dataset]
        for peer, name in (("ganomaly", "GANomaly"), ("draem", "DRAEM")):
            peer_mean = r[f"{peer}_image_auroc_mean"]
            if not np.isnan(peer_mean):
                ours = r["image_auroc_cascade_mean"]
                parts.append(f"{name} {peer_mean:.3f} ({'ours ahead' if ours > peer_mean else 'peer ahead'})")
        lines.append(f"- {dataset}: " + ", ".join(parts))
    return lines


def markdown(summary: pd.DataFrame, runs: pd.DataFrame, args: argparse.Namespace) -> str:
    s = summary
    table = pd.DataFrame({
        "data set": s["dataset"],
        "class": s["class"],
        "seeds": s["seeds"],
        "stage 1": [_pm(a, b) for a, b in zip(s["image_auroc_stage1_mean"], s["image_auroc_stage1_std"])],
        "stage 2": [_pm(a, b) for a, b in zip(s["image_auroc_stage2_mean"], s["image_auroc_stage2_std"])],
        "**cascade**": [_pm(a, b) for a, b in zip(s["image_auroc_cascade_mean"], s["image_auroc_cascade_std"])],
        "pixel (stage 1)": [_pm(a, b) for a, b in zip(s["pixel_auroc_stage1_mean"], s["pixel_auroc_stage1_std"])],
        "pixel (fused)": [_pm(a, b) for a, b in zip(s["pixel_auroc_fused_mean"], s["pixel_auroc_fused_std"])],
        "PRO (fused)": [_pm(a, b) for a, b in zip(s["pro_fused_mean"], s["pro_fused_std"])],
        "GANomaly image": [_pm(a, b, n) for a, b, n in zip(s["ganomaly_image_auroc_mean"], s["ganomaly_image_auroc_std"],
                                                          s["ganomaly_seeds"])],
        "DRAEM image": [_pm(a, b, n) for a, b, n in zip(s["draem_image_auroc_mean"], s["draem_image_auroc_std"], s["draem_seeds"])],
        "DRAEM pixel": [_pm(a, b, n) for a, b, n in zip(s["draem_pixel_auroc_mean"], s["draem_pixel_auroc_std"], s["draem_seeds"])],
        "train s (ours / GANomaly / DRAEM)": [f"{_num(a)} / {_num(b)} / {_num(c)}" for a, b, c in
                                              zip(s["train_seconds_mean"], s["ganomaly_train_seconds_mean"],
                                                  s["draem_train_seconds_mean"])],
        "images/s (cascade / GANomaly / DRAEM)": [f"{_num(a)} / {_num(b)} / {_num(c)}" for a, b, c in
                                                  zip(s["images_per_s_cascade_mean"], s["ganomaly_images_per_s_mean"],
                                                      s["draem_images_per_s_mean"])],
    })
    commits = runs["commit"].value_counts()
    calibrations = runs["calibration"].fillna("unrecorded").value_counts().sort_index()
    factors = sorted(runs["draem_factor"].dropna().unique().tolist())
    header = (
        "# Accuracy benchmark (written by benchmarks/accuracy.py; do not edit)\n\n"
        f"{time.strftime('%Y-%m-%d %H:%M')}, last command: `python benchmarks/accuracy.py {' '.join(sys.argv[1:])}`; "
        f"our rows at commit{'s' if len(commits) > 1 else ''} "
        + ", ".join(f"{c} ({n} rows)" for c, n in commits.items())
        + "; thresholds τ₁/τ₂ by " + ", ".join(f"{c} ({n} rows)" for c, n in calibrations.items())
        + " (the flagged share, the cascade's AUROC and images/s depend on them; each stage's AUROC and PRO do not)"
        + f"; seeds {sorted(runs['seed'].unique().tolist())}. Peers (anomalib, from scratch): GANomaly "
        f"{args.peer_epochs} epochs, batch {args.peer_batch_size}, raw latent scores; DRAEM for "
        + (" / ".join(f"{f:g}" for f in factors) if factors else "n/a")
        + " × our two stages' training wall time of the same row, batch "
        f"{args.draem_batch_size}, Perlin-noise textures (no DTD), score = max of its anomaly map. Image AUROC "
        "unless named; mean ± std over seeds (for the PIPED mean, the std over seeds of the class mean; a peer's mean "
        "only over seeds where it ran on every class). Training seconds: ours both stages; images/s: the cascade's "
        "deployment path (stage 1 on all test images, stage 2 on flagged ones) and the peers' forward passes, all on "
        "decoded tensors, 2 CPU cores.\n\n"
    )
    return header + markdown_table(table) + "\n## Goals\n\n" + "\n".join(goal_lines(summary)) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mtd", "piped"], choices=sorted(PIPELINES))
    parser.add_argument("--classes", nargs="+", help="PIPED classes (default: every class in the manifest)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs-root", type=Path, default=REPO / "runs" / "accuracy", help="where runs are kept (resumable)")
    parser.add_argument("--rerun", action="store_true", help="run rows again even when a finished run exists")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS, help="anomalib peers to run (default both)")
    parser.add_argument("--no-peer", action="store_true", help="run no peer (same as --peers with no name)")
    parser.add_argument("--peer-python", type=Path, default=REPO / ".peer-venv" / "bin" / "python",
                        help="interpreter of the peers' environment (benchmarks/setup_peer_env.sh makes it)")
    parser.add_argument("--peer-epochs", type=int, default=15, help="GANomaly training epochs (ours: see pipelines/*.yaml)")
    parser.add_argument("--peer-batch-size", type=int, default=16, help="GANomaly batch size")
    parser.add_argument("--draem-factor", type=float, default=1.0,
                        help="DRAEM's training wall time as a multiple of our two stages' (default 1: equal time)")
    parser.add_argument("--draem-batch-size", type=int, default=8, help="DRAEM batch size (anomalib's default 8)")
    parser.add_argument("--peer-seeds", type=int, nargs="+", help="run the peers for these seeds only (default: every seed)")
    parser.add_argument("--output-stem", default="accuracy", help="results/<stem>{,_runs}.csv and <stem>.md (default accuracy)")
    parser.add_argument("--fresh", action="store_true", help="drop the rows an earlier invocation left in <stem>_runs.csv")
    args = parser.parse_args()
    if args.no_peer:
        args.peers = []
    if args.draem_factor <= 0:
        parser.error(f"--draem-factor must be > 0, got {args.draem_factor}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.peers and not args.peer_python.is_file():
        parser.error(f"no peer interpreter at {args.peer_python}: run benchmarks/setup_peer_env.sh or pass --no-peer")

    earlier = pd.DataFrame() if args.fresh else earlier_rows(RESULTS / f"{args.output_stem}_runs.csv")
    rows = []
    for dataset in args.datasets:
        for category in (args.classes if dataset == "piped" and args.classes else classes_of(dataset)):
            for seed in args.seeds:
                name = f"{dataset}/{category or 'all'}/seed{seed}"
                ours = run_ours(dataset, category, seed, args.runs_root / name, args.rerun)
                our_seconds = ours["seconds"]["train_stage1"] + ours["seconds"]["train_stage2"]
                suffix = {"ganomaly": f"e{args.peer_epochs}", "draem": f"x{args.draem_factor:g}"}
                peers = {peer: run_peer(peer, dataset, category, seed, our_seconds,
                                        args.runs_root / "peer" / f"{name}-{peer}-{suffix[peer]}.json", args)
                         for peer in PEERS}
                rows.append(row_of(dataset, category, seed, ours, peers, args.draem_factor))
                log.info("%s: cascade %.3f, pixel %.3f, %s", name, rows[-1]["image_auroc_cascade"] or float("nan"),
                         rows[-1]["pixel_auroc_fused"] or float("nan"),
                         ", ".join(f"{p} {r['image_auroc']:.3f}" for p, r in peers.items() if r is not None) or "no peer")
                text = write_tables(merge_rows(earlier, pd.DataFrame(rows)), args)  # after every row
    print(text)


def write_tables(runs: pd.DataFrame, args: argparse.Namespace) -> str:
    summary = summarise(runs)
    RESULTS.mkdir(exist_ok=True)
    stem = args.output_stem
    write_atomic(RESULTS / f"{stem}_runs.csv", lambda tmp: runs.to_csv(tmp, index=False, float_format="%.4f"))
    write_atomic(RESULTS / f"{stem}.csv", lambda tmp: summary.to_csv(tmp, index=False, float_format="%.4f"))
    text = markdown(summary, runs, args)
    write_text_atomic(RESULTS / f"{stem}.md", text)
    return text


if __name__ == "__main__":
    main()
