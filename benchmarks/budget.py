"""Training budget: how one stage's scores grow with its epochs, from a single training.

    python benchmarks/budget.py RUN_DIR --stage stage1 --epochs 15 20 25 30 --output ROOT
    python benchmarks/budget.py RUN_DIR --stage stage1 --epochs 15 20 25 30 --output ROOT --table-only

``RUN_DIR`` is a finished run of the recipe (its config and seed are used, and the other stage's
checkpoint is reused, so only the stage under test varies). The stage is trained once, for the
largest ``--epochs`` value, in ``ROOT/e<max>``, keeping its checkpoint after each listed epoch;
each snapshot is then scored as a run of its own (``run --stageK-from``: the statistics a stage
fits after training are refitted on the same training images) in ``ROOT/e<N>``. The learning
rate is constant and every epoch's sampling is seeded by the seed and the epoch alone, so the
epoch-N snapshot holds exactly the weights an N-epoch training ends with (the first 30 epochs'
losses of a 30- and a 40-epoch training are equal to every digit); the snapshot training runs
without the stage's step bounds (``min_steps`` / ``max_steps``), so that holds past the cap too.
``RUN_DIR`` itself is the point at its own epoch count.

One row per point: the synthetic-validation scores (validation normals with one synthetic
defect each, drawn apart from training's: what a choice is made on) and the test scores
(reported, never steering), and the training seconds of the trained point. Appends rows to
``results/budget.{csv,md}``; ``--table-only`` records the points of an earlier ``ROOT``
without training.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from twostage_ad.pipeline import main as pipeline
from twostage_ad.runs import load_run_config
from twostage_ad.stages.training import TrainableStage

from _results import git_commit, record_rows

TITLE = "Training budget: one stage's scores against its epochs, snapshots of one training (benchmarks/budget.py)"
STAGES = ("stage1", "stage2")


@contextmanager
def keep_snapshots(stage: str, epochs: list[int], root: Path) -> Iterator[None]:
    """While active, every per-epoch checkpoint ``stage`` writes after an epoch in ``epochs`` is
    also copied to ``root/<stage>-e<N>.pt`` (the weights an N-epoch training ends with)."""
    save = TrainableStage.save

    def save_with_snapshots(self: TrainableStage, path: str | Path, *, epoch: int | None = None,
                            training_state: dict[str, Any] | None = None) -> None:
        save(self, path, epoch=epoch, training_state=training_state)
        if self.config_name == stage and epoch in epochs and training_state is not None:
            shutil.copy(path, root / f"{stage}-e{epoch}.pt")

    root.mkdir(parents=True, exist_ok=True)
    TrainableStage.save = save_with_snapshots  # type: ignore[method-assign]
    try:
        yield
    finally:
        TrainableStage.save = save  # type: ignore[method-assign]


def train_with_snapshots(run_dir: Path, stage: str, epochs: list[int], root: Path) -> None:
    """Train ``stage`` for ``max(epochs)`` (the other stage reused from ``run_dir``), keeping its
    checkpoint after each epoch in ``epochs``, then score each snapshot as a run."""
    other = STAGES[1 - STAGES.index(stage)]
    base = ["-q", "run", "--config", str(run_dir / "config.yaml"),  # the run's own config: its recipe and seed
            f"--{other}-from", str(run_dir / "checkpoints" / f"{other}.pt")]
    with keep_snapshots(stage, epochs, root):
        # unbounded steps and time: the epoch-N snapshot is then exactly the N-epoch training, whatever the caps
        pipeline([*base, "--set", f"{stage}.epochs={max(epochs)}", "--set", f"{stage}.min_steps=0", "--set", f"{stage}.max_steps=0",
                  "--set", f"{stage}.max_seconds=0",
                  "--output", str(root / f"e{max(epochs)}")])
    for n in sorted(epochs)[:-1]:
        pipeline([*base, f"--{stage}-from", str(root / f"{stage}-e{n}.pt"), "--output", str(root / f"e{n}")])


def point_row(run_dir: Path, stage: str, epochs: int) -> dict[str, Any]:
    """One point of the curve from a finished run's ``metrics.json``."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    synthetic = metrics.get("synthetic_val") or {}
    config = load_run_config(run_dir)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit(), "run": str(run_dir),
        "dataset": Path(str(config.data.path)).parent.name + (f"/{config.data.category}" if config.data.category else ""),
        "seed": config.run.seed, "stage": stage, "epochs": epochs, "steps": (metrics.get("steps") or {}).get(stage),
        "synthetic_stage1": synthetic.get("image_auroc", {}).get("stage1"),
        "synthetic_stage2": synthetic.get("image_auroc", {}).get("stage2"),
        "synthetic_cascade": synthetic.get("image_auroc", {}).get("cascade"),
        "synthetic_held_out_stage1": synthetic.get("image_auroc_stage1_held_out_kinds"),
        "synthetic_pixel_stage1": (synthetic.get("pixel_auroc") or {}).get("stage1", synthetic.get("pixel_auroc_stage1")),
        "test_stage1": metrics["image_auroc"]["stage1"], "test_stage2": metrics["image_auroc"]["stage2"],
        "test_cascade": metrics["image_auroc"]["cascade"], "test_pixel_stage1": metrics["pixel_auroc"]["stage1"],
        "train_seconds": metrics["seconds"][f"train_{stage}"] or None,
        "synthetic_pixel_stage2": (synthetic.get("pixel_auroc") or {}).get("stage2"),
        "synthetic_pixel_fused": (synthetic.get("pixel_auroc") or {}).get("fused"),
        "test_pixel_fused": metrics["pixel_auroc"].get("fused"),
    }


def rows(run_dir: Path, stage: str, epochs: list[int], root: Path) -> Iterator[dict[str, Any]]:
    full = len(json.loads((run_dir / "history.json").read_text())[stage])
    for n in sorted(epochs):
        yield point_row(root / f"e{n}", stage, n)
    yield point_row(run_dir, stage, full)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished run of the recipe")
    parser.add_argument("--stage", choices=STAGES, required=True)
    parser.add_argument("--epochs", type=int, nargs="+", required=True, help="epoch counts to score (each >= 1)")
    parser.add_argument("--output", type=Path, required=True, help="folder for the training and the snapshots' runs")
    parser.add_argument("--table-only", action="store_true", help="record the points of an earlier --output, no training")
    args = parser.parse_args()
    if min(args.epochs) < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if not args.table_only:
        train_with_snapshots(args.run_dir, args.stage, sorted(set(args.epochs)), args.output)
    record_rows("budget", TITLE, rows(args.run_dir, args.stage, sorted(set(args.epochs)), args.output))


if __name__ == "__main__":
    main()
