"""Precision benchmark: float32 against bf16 scoring of finished runs, on their own test split.

    python benchmarks/precision.py RUN_DIR [RUN_DIR ...] [--repeats 3] [--note "..."]

For each run folder (e.g. the accuracy benchmark's): decode its validation and test images as the
run did, load both trained stages, and score the test split with the stage-1 network in float32
and under bf16 autocast (``run.precision: bf16``). One row per run: image AUROC and stage-1 pixel
AUROC of both, the largest relative change of a screening loss, the Spearman rank correlation
of the two score lists, and scoring images/s of each (median of ``--repeats`` passes). Stage 2 is
checked the same way as a diagnostic (the package has no bf16 option for it: its score is a
difference of two latents). Labels are used only to report the metrics. Appends the rows to
``benchmarks/results/precision.{csv,md}``; never edit those by hand.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch
from scipy.stats import spearmanr

from twostage_ad.allocator import tune_malloc
from twostage_ad.data.images import resize_images, resize_maps
from twostage_ad.device import has_fast_bf16
from twostage_ad.metrics import image_auroc, pixel_auroc
from twostage_ad.stages.attention import AttentionStage
from twostage_ad.stages.patch_scorer import PatchScorerStage
from twostage_ad.workflow import load_run_config

from _results import append_row, decode_run_split, git_commit, run_image_size, score_stage1_as_run, timed_median


def compare(run_dir: Path, repeats: int) -> dict:
    config = load_run_config(run_dir)
    size = run_image_size(config)  # as run decoded them; each stage reads its own size of them
    val, test = decode_run_split(config, "val", size), decode_run_split(config, "test", size)
    labels = test.labels
    stage1 = AttentionStage.load(run_dir / "checkpoints" / "stage1.pt", device="cpu")
    stage1_view = resize_images(test.images, stage1.image_size)  # timed without the resizing
    if stage1.config.screen_enc != 0:
        raise SystemExit(f"{run_dir}: stage 1 screens with the latent term, which bf16 scoring refuses (stage1.screen_enc)")
    stage2 = PatchScorerStage.load(run_dir / "checkpoints" / "stage2.pt", device="cpu")
    guided = stage2.config.guidance != "none"
    results = {}
    for precision, bf16 in (("fp32", False), ("bf16", True)):
        stage1.precision = "bf16" if bf16 else "float32"
        stage1.score(stage1_view[:8], progress=False)  # warm-up
        first, seconds = timed_median(lambda: stage1.score(stage1_view, progress=False), repeats)
        results[precision] = (replace(first, anomaly_maps=resize_maps(first.anomaly_maps, size)), len(labels) / seconds)
    (s32, ips32), (s16, ips16) = results["fp32"], results["bf16"]
    row = {
        "run": str(run_dir),
        "test_images": len(labels),
        "native_bf16": has_fast_bf16(torch.device("cpu")),
        "image_auroc_fp32": image_auroc(labels, s32.loss).value,
        "image_auroc_bf16": image_auroc(labels, s16.loss).value,
        "pixel_auroc_fp32": pixel_auroc(labels, test.masks, test.has_mask, s32.anomaly_maps).value,
        "pixel_auroc_bf16": pixel_auroc(labels, test.masks, test.has_mask, s16.anomaly_maps).value,
        "max_rel_change_loss": float(np.max(np.abs(s16.loss - s32.loss) / np.abs(s32.loss))),
        "spearman": float(spearmanr(s32.loss, s16.loss).statistic),
        "score_ips_fp32": ips32,
        "score_ips_bf16": ips16,
    }
    # stage 2, diagnostic: its network under bf16 autocast (normalisation fixed in float32, with
    # float32 stage-1 guidance maps for validation and test alike)
    stage1.precision = "float32"
    normals = val.labels == 0
    val_maps = score_stage1_as_run(stage1, val.images[normals], progress=False).anomaly_maps if guided else None
    stage2.fit_normalisation(resize_images(val.images[normals], stage2.image_size), stage1_maps=val_maps)
    maps = s32.anomaly_maps if guided else None
    stage2_view = resize_images(test.images, stage2.image_size)
    scores = {}
    for precision, bf16 in (("fp32", False), ("bf16", True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            scores[precision] = stage2.score(stage2_view, stage1_maps=maps, progress=False).scores
    row["stage2_image_auroc_fp32"] = image_auroc(labels, scores["fp32"]).value
    row["stage2_image_auroc_bf16"] = image_auroc(labels, scores["bf16"]).value
    row["stage2_spearman"] = float(spearmanr(scores["fp32"], scores["bf16"]).statistic)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="finished run folders (checkpoints/, config.yaml)")
    parser.add_argument("--repeats", type=int, default=3, help="timed scoring passes; images/s is the median")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    tune_malloc()  # as the pipeline scores
    for run_dir in args.runs:
        row = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit(), **compare(run_dir, args.repeats),
               "note": args.note}
        row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        append_row("precision", row, "Precision benchmark: float32 vs bf16 scoring (written by benchmarks/precision.py; do not edit)")
        print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
