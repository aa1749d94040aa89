"""Command line: ``python -m twostage_ad.pipeline {run,calibrate} ...`` — thin over :mod:`twostage_ad.workflow`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from twostage_ad.config import CALIBRATION_METHODS, CalibrationConfig, ConfigError, load_config

__all__ = ["main", "build_parser"]

log = logging.getLogger("twostage_ad")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twostage-ad", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train, calibrate, score the test split and write a run folder")
    run.add_argument("--config", type=Path, help="YAML config (default: the embedded digits pipeline)")
    run.add_argument("--output", type=Path, help="run folder (default: <run.output_root>/<run.name>-<time>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                     help="override a config field, e.g. --set stage1.epochs=5 (repeatable)")
    run.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty run folder")
    run.add_argument("--stage1-from", type=Path, metavar="CHECKPOINT",
                     help="reuse a trained stage 1 (e.g. OLD_RUN/checkpoints/stage1.pt) instead of training it")
    run.add_argument("--stage2-from", type=Path, metavar="CHECKPOINT",
                     help="reuse a trained stage 2 (e.g. OLD_RUN/checkpoints/stage2.pt) instead of training it")

    cal = sub.add_parser("calibrate", help="re-pick thresholds from a run's saved validation scores")
    cal.add_argument("run_dir", type=Path)
    cal.add_argument("--stage", choices=("1", "2", "both"), default="both",
                     help="which threshold to re-pick (default both); the other keeps its current method")
    cal.add_argument("--method", choices=CALIBRATION_METHODS,
                     help="default: implied by the parameter given, else the run's current method")
    cal.add_argument("--q", type=float, help="quantile for --method quantile")
    cal.add_argument("--k", type=float, help="k for --method meanstd (mean + k·std)")
    cal.add_argument("--fpr", type=float, help="target false-positive rate for --method fpr")
    cal.add_argument("--recall", type=float, help="target recall for --method recall")
    return parser


_PARAM_METHOD = {"q": "quantile", "k": "meanstd", "fpr": "fpr", "recall": "recall"}


def _calibration_from_args(current: CalibrationConfig, args: argparse.Namespace) -> CalibrationConfig:
    """Apply ``--method`` and its parameter; a lone parameter implies its method (``--fpr`` -> fpr)."""
    given = {k: getattr(args, k) for k in _PARAM_METHOD if getattr(args, k) is not None}
    method = args.method
    if method is None and given:
        implied = {_PARAM_METHOD[k] for k in given}
        if len(implied) > 1:
            raise ConfigError(f"parameters {sorted(given)} belong to different methods; pass --method")
        method = implied.pop()
    return replace(current, **given, **({"method": method} if method else {}))


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.quiet)
    from twostage_ad import workflow  # imports torch; keep --help fast

    try:
        if args.command == "run":
            config = load_config(args.config, args.overrides)
            result = workflow.run_pipeline(
                config, args.output, overwrite=args.overwrite, progress=not args.quiet,
                stage1_checkpoint=args.stage1_from, stage2_checkpoint=args.stage2_from,
            )
            keys = ("image_auroc", "pixel_auroc", "pro", "flagged_fraction", "stage1_recall_at_threshold",
                    "cascade_recall", "cascade_false_positive_rate", "images_per_s", "seconds")
            print(json.dumps({"run_dir": str(result.run_dir), **{k: result.metrics[k] for k in keys}}, indent=2))
        elif args.command == "calibrate":
            stages = {"1": ("stage1",), "2": ("stage2",), "both": ("stage1", "stage2")}[args.stage]
            current = workflow.current_calibration(args.run_dir, stages[0])
            cascade = workflow.calibrate_run(args.run_dir, _calibration_from_args(current, args), stages=stages)
            print(json.dumps({"stage1": cascade.stage1.to_dict(), "stage2": cascade.stage2.to_dict()}, indent=2))
    except (ValueError, RuntimeError, FileExistsError, FileNotFoundError) as exc:
        # ConfigError, DataError and CalibrationError are ValueErrors; all carry a message
        # naming the field or file and the fix. Anything else is a bug and keeps its traceback.
        log.error("%s", exc)
        log.debug("details", exc_info=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
