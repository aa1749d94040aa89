"""Command line: ``python -m twostage_ad.pipeline {run,calibrate} ...`` — thin over :mod:`twostage_ad.workflow`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from twostage_ad.calibration import CalibrationError
from twostage_ad.config import CALIBRATION_METHODS, ConfigError, load_config
from twostage_ad.data.records import DataError
from twostage_ad.runs import RunExistsError

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

    cal = sub.add_parser("calibrate", help="re-pick thresholds from a run's saved validation scores")
    cal.add_argument("run_dir", type=Path)
    cal.add_argument("--method", choices=CALIBRATION_METHODS, help="default: the run's calibration.method")
    cal.add_argument("--q", type=float, help="quantile for --method quantile")
    cal.add_argument("--k", type=float, help="k for --method meanstd (mean + k·std)")
    cal.add_argument("--fpr", type=float, help="target false-positive rate for --method fpr")
    cal.add_argument("--recall", type=float, help="target recall for --method recall")
    return parser


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
            result = workflow.run_pipeline(config, args.output, overwrite=args.overwrite, progress=not args.quiet)
            summary = {k: result.metrics[k] for k in ("image_auroc", "pixel_auroc", "flagged_fraction", "stage1_recall_at_threshold", "seconds")}
            print(json.dumps({"run_dir": str(result.run_dir), **summary}, indent=2))
        elif args.command == "calibrate":
            config = workflow.load_run_config(args.run_dir)
            changes = {k: getattr(args, k) for k in ("q", "k", "fpr", "recall") if getattr(args, k) is not None}
            calibration = replace(config.calibration, **changes, **({"method": args.method} if args.method else {}))
            threshold = workflow.calibrate_run(args.run_dir, calibration)
            print(json.dumps(threshold.to_dict(), indent=2))
    except (ConfigError, DataError, CalibrationError, RunExistsError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
