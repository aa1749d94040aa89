"""Instance normalisation as ``nn.InstanceNorm2d`` against ``AffineInstanceNorm2d`` (``nn.GroupNorm``
with one channel a group), on the same trained weights, in one process.

    python benchmarks/norm_layers.py RUN_DIR [--repeats 5] [--note "..."]

Loads the run's stage 1 and stage 2 (the package builds them with ``AffineInstanceNorm2d``), and
makes a copy of each whose norm layers are ``nn.InstanceNorm2d`` holding the same parameters
(what the package used before). Both are timed on the same 512 decoded validation and test
images of the run (repeated when the splits are smaller), one form after the other, median of
``--repeats`` passes: stage-1 scoring in float32 and, where the CPU has native bf16, under bf16 autocast as
``run.precision: auto`` scores; stage-2 scoring; and one stage-1 training step (forward and
backward of the attention BCE, batch 16, float32, channels-last, as training runs). Also the
largest difference of the screening losses between the two forms (float32). One row per
measurement in ``benchmarks/results/norm_layers.{csv,md}``; never edit those by hand.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from twostage_ad.allocator import tune_malloc
from twostage_ad.data.images import decode_records
from twostage_ad.data.records import load_records, split_records
from twostage_ad.detector import TwoStageDetector
from twostage_ad.device import has_fast_bf16
from twostage_ad.models.blocks import AffineInstanceNorm2d
from twostage_ad.workflow import load_run_config

from _results import append_row, git_commit, timed_median

IMAGES = 512


def with_instance_norm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose ``AffineInstanceNorm2d`` layers are ``nn.InstanceNorm2d`` with the same parameters."""
    copied = copy.deepcopy(module)

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, AffineInstanceNorm2d):
                replacement = nn.InstanceNorm2d(child.num_channels, eps=child.eps, affine=True)
                replacement.load_state_dict(child.state_dict())
                setattr(parent, name, replacement)
            else:
                swap(child)

    swap(copied)
    return copied


def _images(run_dir: Path, size: int) -> np.ndarray:
    config = load_run_config(run_dir)
    splits = split_records(load_records(config.data, seed=config.run.seed))
    records = splits["val"] + splits["test"]
    images = decode_records(records, size, config.data.channels, config.data.invert_masks, progress=False).images
    return np.resize(images, (IMAGES, *images.shape[1:]))  # repeated when the splits hold fewer


def _training_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    logits = model(x, reconstruct=False).attention_logits
    F.binary_cross_entropy_with_logits(logits, target).backward()


def measure(run_dir: Path, repeats: int) -> list[dict]:
    detector = TwoStageDetector.from_run(run_dir, device="cpu")
    stage1, stage2 = detector.stage1, detector.stage2
    images = _images(run_dir, detector.image_size)
    if stage1.image_size != images.shape[1]:
        raise SystemExit(f"{run_dir}: stage 1 works at {stage1.image_size} px, the decode at {images.shape[1]}; "
                         "run it on a run whose stages share one size")
    forms = {"InstanceNorm2d": (with_instance_norm(stage1.model_), with_instance_norm(stage2.model_)),
             "AffineInstanceNorm2d": (stage1.model_, stage2.model_)}
    native, precision = stage1.model_, stage1.precision
    rows, losses = [], {}
    precisions = ["float32"] + (["bf16"] if has_fast_bf16(torch.device("cpu")) else [])
    maps = stage1.score(images, progress=False).anomaly_maps  # guidance for stage 2, the same for both forms
    for name, (model1, model2) in forms.items():
        stage1.model_, stage2.model_ = model1, model2
        for scoring in precisions:
            stage1.precision = scoring
            stage1.score(images[:64], progress=False)  # warm-up
            result, seconds = timed_median(lambda: stage1.score(images, progress=False), repeats)
            if scoring == "float32":
                losses[name] = result.loss
            rows.append({"what": f"stage-1 scoring, {scoring}", "norm": name, "images_per_s": len(images) / seconds})
        stage2.score(images[:64], stage1_maps=maps[:64], progress=False)
        _, seconds = timed_median(lambda: stage2.score(images, stage1_maps=maps, progress=False), repeats)
        rows.append({"what": "stage-2 scoring", "norm": name, "images_per_s": len(images) / seconds})
        model1.train()
        x = torch.from_numpy(images[:16]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        x = x.contiguous(memory_format=torch.channels_last)
        target = (torch.rand(16, 1, *x.shape[-2:], generator=torch.Generator().manual_seed(0)) > 0.9).float()
        _training_step(model1, x, target)  # warm-up
        _, seconds = timed_median(functools.partial(_training_step, model1, x, target), repeats)
        rows.append({"what": "stage-1 training step, batch 16, float32", "norm": name, "images_per_s": 16 / seconds})
        model1.eval()
    stage1.model_, stage1.precision = native, precision
    difference = float(np.max(np.abs(losses["InstanceNorm2d"] - losses["AffineInstanceNorm2d"])))
    baseline = {row["what"]: row["images_per_s"] for row in rows if row["norm"] == "InstanceNorm2d"}
    for row in rows:
        row["speedup_vs_instance_norm"] = row["images_per_s"] / baseline[row["what"]]
        row["max_loss_difference_float32"] = difference
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run folder")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    tune_malloc()
    torch.manual_seed(0)
    commit = git_commit()
    for row in measure(args.run, args.repeats):
        row = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit, "run": str(args.run), "threads": torch.get_num_threads(), **row, "note": args.note}
        append_row("norm_layers", row, "Instance normalisation: nn.InstanceNorm2d against AffineInstanceNorm2d "
                                       "(benchmarks/norm_layers.py)")
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})


if __name__ == "__main__":
    main()
