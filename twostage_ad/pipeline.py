"""Command line: ``python -m twostage_ad.pipeline {run,calibrate,report,compare,predict,export} ...`` — thin over :mod:`twostage_ad.workflow`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from twostage_ad.config import CALIBRATION_METHODS, CalibrationConfig, ConfigError
from twostage_ad.config_io import load_config

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
    run.add_argument("--resume", action="store_true",
                     help="continue the interrupted run in --output from each stage's last complete epoch")
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
    cal.add_argument("--q", type=float, help="q for --method conformal (a new normal exceeds τ with probability <= 1 − q) or quantile")
    cal.add_argument("--k", type=float, help="k for --method meanstd (mean + k·std)")
    cal.add_argument("--fpr", type=float, help="target false-positive rate for --method fpr")
    cal.add_argument("--recall", type=float, help="target recall for --method recall (labelled val anomalies) or synthetic_recall (synthetic defects)")

    rep = sub.add_parser("report", help="redraw every plot and report.html from a run's saved files (no model)")
    rep.add_argument("run_dir", type=Path)
    rep.add_argument("--log-scale", action="store_true", help="log-scale score axes (where every score is > 0)")
    rep.add_argument("--examples", type=int, metavar="N", help="images per overlay / worst-case plot (default run.overlays)")

    exp = sub.add_parser("export", help="export both stages of a finished run (TorchScript; ONNX if onnx is installed)")
    exp.add_argument("run_dir", type=Path)
    exp.add_argument("--output", type=Path, help="folder (default RUN_DIR/export)")
    exp.add_argument("--format", dest="formats", action="append", choices=("torchscript", "onnx"),
                     help="repeatable; default both")

    cmp = sub.add_parser("compare", help="finished runs of one data set side by side; marks the label-free choice")
    cmp.add_argument("run_dirs", type=Path, nargs="+")
    cmp.add_argument("--output", type=Path, help="also write the table to this CSV")
    cmp.add_argument("--overwrite", action="store_true", help="replace an existing --output file")

    pred = sub.add_parser("predict", help="score new images with a finished run")
    pred.add_argument("run_dir", type=Path)
    pred.add_argument("paths", nargs="+", help="image files, folders and glob patterns (quote globs)")
    pred.add_argument("--output", type=Path, default=Path("predictions.csv"), help="CSV to write (default predictions.csv)")
    pred.add_argument("--maps", type=Path, metavar="NPZ", help="also save the anomaly maps to this .npz file")
    pred.add_argument("--overwrite", action="store_true", help="replace existing output files")
    pred.add_argument("--all-stages", action="store_true", help="run stage 2 on every image, not only flagged ones")
    pred.add_argument("--batch-size", type=int, help="images per batch (default: the run's score_batch_size)")
    pred.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    pred.add_argument("--no-tune-malloc", action="store_true",
                      help="leave the C allocator as it is (default: the run's run.tune_malloc)")
    return parser


_PARAM_METHODS = {"q": ("conformal", "quantile"), "k": ("meanstd",), "fpr": ("fpr",),
                  "recall": ("recall", "synthetic_recall")}


def _calibration_from_args(current: CalibrationConfig, args: argparse.Namespace) -> CalibrationConfig:
    """Apply ``--method`` and its parameter; a lone parameter implies its method (``--fpr`` -> fpr,
    ``--q`` -> conformal), or keeps the current one where it takes that parameter (``--q`` on a
    ``quantile`` threshold stays ``quantile``)."""
    given = {k: getattr(args, k) for k in _PARAM_METHODS if getattr(args, k) is not None}
    method = args.method
    if method is None and given:
        implied = {_PARAM_METHODS[k] for k in given}
        if len(implied) > 1:
            raise ConfigError(f"parameters {sorted(given)} belong to different methods; pass --method")
        methods = implied.pop()
        method = current.method if current.method in methods else methods[0]
    return replace(current, **given, **({"method": method} if method else {}))


def _configure_logging(quiet: bool) -> None:
    """INFO to stderr; warnings only with ``--quiet`` and on every torchrun rank but 0 (prefixed with its rank)."""
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.WARNING if quiet or rank != "0" else logging.INFO,
        format=("" if rank == "0" else f"[rank {rank}] ") + "%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.quiet)
    from twostage_ad import workflow  # imports torch; keep --help fast

    try:
        if args.command == "run":
            given = args.config is not None or bool(args.overrides)
            config = load_config(args.config, args.overrides) if given or not args.resume else None
            result = workflow.run_pipeline(
                config, args.output, overwrite=args.overwrite, progress=not args.quiet,
                stage1_checkpoint=args.stage1_from, stage2_checkpoint=args.stage2_from, resume=args.resume,
            )
            keys = ("image_auroc", "pixel_auroc", "pro", "flagged_fraction", "stage1_recall_at_threshold",
                    "cascade_recall", "cascade_false_positive_rate", "images_per_s", "seconds")
            if result.metrics is not None:  # None on torchrun ranks other than 0, which write nothing
                print(json.dumps({"run_dir": str(result.run_dir), **{k: result.metrics[k] for k in keys}}, indent=2))
        elif args.command == "calibrate":
            stages = {"1": ("stage1",), "2": ("stage2",), "both": ("stage1", "stage2")}[args.stage]
            chosen = args.method is not None or any(getattr(args, k) is not None for k in _PARAM_METHODS)
            # no method and no parameter: each threshold is re-picked with its own current method
            calibration = None
            if chosen:
                current = [workflow.current_calibration(args.run_dir, stage) for stage in stages]
                if args.method is None and len({c.method for c in current}) > 1:
                    raise ConfigError(f"τ₁ and τ₂ use different methods ({current[0].method}, {current[1].method}): pass "
                                      f"--method, or --stage 1 or 2")
                calibration = _calibration_from_args(current[0], args)
            cascade = workflow.calibrate_run(args.run_dir, calibration, stages=stages)
            print(json.dumps({"stage1": cascade.stage1.to_dict(), "stage2": cascade.stage2.to_dict()}, indent=2))
        elif args.command == "report":
            if args.examples is not None and args.examples < 0:
                raise ConfigError(f"--examples must be >= 0, got {args.examples}")
            print(workflow.build_report(args.run_dir, log_scale=args.log_scale, examples=args.examples))
        elif args.command == "export":
            from twostage_ad.export import export_run

            written = export_run(args.run_dir, args.output, tuple(args.formats or ("torchscript", "onnx")))
            print(json.dumps(written, indent=2))
        elif args.command == "compare":
            from twostage_ad.compare import CHOICE_COLUMN, compare_runs

            table = compare_runs(args.run_dirs)
            if args.output is not None:
                if args.output.exists() and not args.overwrite:
                    raise FileExistsError(f"{str(args.output)!r} exists; pass --overwrite to replace it")
                from twostage_ad.runs import write_atomic

                write_atomic(args.output, lambda tmp: table.to_csv(tmp, index=False))
            print(table.drop(columns="data").to_string(index=False, float_format=lambda v: f"{v:.4f}"))
            chosen = table.loc[table["choice"], "run"]
            print(f"choice without test labels (highest {CHOICE_COLUMN}): {chosen.iloc[0]}" if len(chosen) else
                  f"no choice: no run has a {CHOICE_COLUMN} (synthetic validation needs validation normals)")
        elif args.command == "predict":
            if args.batch_size is not None and args.batch_size < 1:
                raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
            summary = workflow.predict_files(
                args.run_dir, args.paths, args.output, maps_path=args.maps, overwrite=args.overwrite,
                all_stages=args.all_stages, batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                tune_malloc=False if args.no_tune_malloc else None,
            )
            print(json.dumps(summary, indent=2))
    except (ValueError, RuntimeError, FileExistsError, FileNotFoundError) as exc:
        # ConfigError, DataError and CalibrationError are ValueErrors; all carry a message
        # naming the field or file and the fix. Anything else is a bug and keeps its traceback.
        log.error("%s", exc)
        log.debug("details", exc_info=True)
        return 2
    finally:
        from twostage_ad.distributed import shutdown_distributed

        # under torchrun: leave the process group before the interpreter exits (run_pipeline
        # synchronised the ranks where they parted; after an error no rank waits for the others)
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
