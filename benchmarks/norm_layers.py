"""Instance normalisation as ``nn.InstanceNorm2d`` against ``AffineInstanceNorm2d`` (``nn.GroupNorm``
with one channel a group), on the same trained weights, in one process.

    python benchmarks/norm_layers.py RUN_DIR [--repeats 5] [--note "..."]

Loads the run's stage 1 and stage 2 (the package builds them with ``AffineInstanceNorm2d``), and
makes a copy of each whose norm layers are ``nn.InstanceNorm2d`` holding the same parameters
(what the package used before). Both are timed on the same 512 decoded validation and test
images of the run (repeated when the splits are smaller), the two forms in turn, median of
``--repeats`` rounds: stage-1 scoring in float32 and, where the CPU has native bf16, under bf16 autocast as
``run.precision: auto`` scores; stage-2 scoring (GANomaly2D's generator has no instance norm:
a control for the machine's noise); and one stage-1 training step (forward and
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
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from twostage_ad.allocator import tune_malloc
from twostage_ad.detector import TwoStageDetector
from twostage_ad.device import has_fast_bf16
from twostage_ad.models.blocks import AffineInstanceNorm2d
from twostage_ad.stages.screening import uses_reconstruction
from twostage_ad.workflow import load_run_config

from _results import append_row, decode_run_split, git_commit

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
    images = np.concatenate([decode_run_split(config, split, size).images for split in ("val", "test")])
    return np.resize(images, (IMAGES, *images.shape[1:]))  # repeated when the splits hold fewer


def _training_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    logits = model(x, reconstruct=False).attention_logits
    F.binary_cross_entropy_with_logits(logits, target).backward()


def _interleaved(calls: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, object], dict[str, float]]:
    """Each call once as warm-up, then ``repeats`` rounds of each call in turn (so a drift of the
    machine falls on both forms alike): ``(last result, median seconds)`` per name."""
    results = {name: call() for name, call in calls.items()}
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            results[name] = call()
            seconds[name].append(time.perf_counter() - start)
    return results, {name: float(np.median(values)) for name, values in seconds.items()}


def measure(run_dir: Path, repeats: int) -> list[dict]:
    detector = TwoStageDetector.from_run(run_dir, device="cpu")
    stage1, stage2 = detector.stage1, detector.stage2
    images = _images(run_dir, detector.image_size)
    if stage1.image_size != images.shape[1] or stage2.image_size != images.shape[1]:
        raise SystemExit(f"{run_dir}: the stages work at {stage1.image_size} and {stage2.image_size} px, the decode at {images.shape[1]}; "
                         "run it on a run whose stages share one size")
    native = {"model1": stage1.model_, "model2": stage2.model_, "precision": stage1.precision}
    forms = {"InstanceNorm2d": (with_instance_norm(stage1.model_), with_instance_norm(stage2.model_)),
             "AffineInstanceNorm2d": (stage1.model_, stage2.model_)}
    precisions = ["float32"] + (["bf16"] if has_fast_bf16(torch.device("cpu")) and not uses_reconstruction(stage1.config) else [])
    maps = stage1.score(images, progress=False).anomaly_maps  # guidance for stage 2, the same for both forms
    x = torch.from_numpy(images[:16]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous(memory_format=torch.channels_last)
    target = (torch.rand(16, 1, *x.shape[-2:], generator=torch.Generator().manual_seed(0)) > 0.9).float()

    def scoring(form: str, precision: str) -> Callable[[], object]:
        def call() -> object:
            stage1.model_, stage1.precision = forms[form][0], precision
            return stage1.score(images, progress=False).loss
        return call

    def stage2_scoring(form: str) -> Callable[[], object]:
        def call() -> object:
            stage2.model_ = forms[form][1]
            return stage2.score(images, stage1_maps=maps, progress=False).scores
        return call

    rows, losses = [], {}
    try:
        for precision in precisions:
            results, seconds = _interleaved({form: scoring(form, precision) for form in forms}, repeats)
            if precision == "float32":
                losses = results
            rows += [{"what": f"stage-1 scoring, {precision}", "norm": form, "images_per_s": len(images) / seconds[form]}
                     for form in forms]
        # stage 2 scores with GANomaly2D's generator (BatchNorm): no instance norm in its path, a noise control
        _, seconds = _interleaved({form: stage2_scoring(form) for form in forms}, repeats)
        rows += [{"what": "stage-2 scoring (no instance norm in its path: a control)", "norm": form,
                  "images_per_s": len(images) / seconds[form]} for form in forms]
        for model, _ in forms.values():
            model.train()
        _, seconds = _interleaved({form: functools.partial(_training_step, forms[form][0], x, target) for form in forms}, repeats)
        rows += [{"what": "stage-1 training step, batch 16, float32", "norm": form, "images_per_s": 16 / seconds[form]}
                 for form in forms]
    finally:
        for model, _ in forms.values():
            model.zero_grad(set_to_none=True)
            model.eval()
        stage1.model_, stage2.model_, stage1.precision = native["model1"], native["model2"], native["precision"]
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
