"""The pipeline as Python functions; the CLI in :mod:`twostage_ad.pipeline` only parses arguments.

Data flows one way (docs/design.md §6): records -> decoded images -> ``TwoStageDetector.fit``
(both stages, stage 2's map statistics and the thresholds, on train and validation images only)
-> one scoring pass over the test split -> evaluation -> the run folder -> the report.

Stage 2 is scored on *every* validation and test image so that ``calibrate`` can move τ₁ without
a model and ``image_auroc.stage2`` can be reported for analysis. The cascade's throughput is that
of the deployment path, from the same pass: stage 1 on every test image plus stage 2's measured
time per image on the flagged share.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from twostage_ad.allocator import tune_malloc
from twostage_ad.calibration import NORMAL_ONLY_METHODS, SYNTHETIC_METHODS, CalibrationError
from twostage_ad.cascade import Cascade, MapFusion, fit_cascade
from twostage_ad.config import CalibrationConfig, Config, ConfigError
from twostage_ad.config_io import config_to_dict, save_config
from twostage_ad.data.images import DecodedImages, decode_records, infer_bit_depth, training_channels, warn_if_much_reduced
from twostage_ad.data.records import DataError, Record, load_records, split_records
from twostage_ad.detector import CascadeScores, TwoStageDetector, expand_image_paths
from twostage_ad.device import resolve_device
from twostage_ad.distributed import DistributedContext, init_distributed
from twostage_ad.evaluate import (
    decide,
    map_metrics,
    merge_threshold_metrics,
    score_metrics,
    score_table,
    synthetic_validation_metrics,
)
from twostage_ad.report import auroc_text, build_report
from twostage_ad.runs import (
    RUN_FILES,
    SCORE_KEYS,
    create_run_dir,
    default_run_dir,
    load_run_config,
    read_json,
    read_scores,
    read_synthetic_scores,
    same_setting,
    write_atomic,
    write_json,
    write_prediction_maps,
    write_scores,
    write_synthetic_scores,
    write_test_maps,
    write_thresholds,
)

__all__ = [
    "RunResult",
    "apply_process_settings",
    "build_report",
    "calibrate_run",
    "current_calibration",
    "load_run_config",
    "predict_files",
    "run_pipeline",
]

log = logging.getLogger(__name__)


class RunResult(dict):
    """What :func:`run_pipeline` returns: ``run_dir``, ``metrics``, ``scores`` (DataFrame).

    Under ``torchrun`` only rank 0 computes metrics and the decision columns; other ranks get
    ``metrics=None`` and the raw scores.
    """

    @property
    def run_dir(self) -> Path:
        return self["run_dir"]

    @property
    def metrics(self) -> dict[str, Any]:
        return self["metrics"]

    @property
    def scores(self) -> pd.DataFrame:
        return self["scores"]


def apply_process_settings(threads: int, malloc: bool) -> None:
    """Process-wide settings a run asks for: torch's thread count and the allocator tuning."""
    if threads:
        torch.set_num_threads(threads)
    if malloc and not tune_malloc():
        log.debug("allocator tuning not applied (not glibc, or refused); running with the system defaults")


def _check_calibration_feasible(val_labels: list[int], calibration: CalibrationConfig) -> None:
    """Fail before training when the method needs validation anomalies (or normals to put synthetic
    defects on) that do not exist."""
    label_free = NORMAL_ONLY_METHODS + SYNTHETIC_METHODS
    if calibration.method not in label_free and 1 not in val_labels:
        raise CalibrationError(
            f"calibration.method {calibration.method!r} needs labelled anomalies in the validation split, "
            f"which has none; use one of {label_free} or add labelled anomalies with split=val"
        )
    if calibration.method in SYNTHETIC_METHODS and sum(label == 0 for label in val_labels) < 2:
        raise CalibrationError(f"calibration.method {calibration.method!r} puts synthetic defects on the validation "
                               "normals and needs at least 2 of them")


def _resume_reused(run_dir: Path, stage1: str | Path | None, stage2: str | Path | None) -> tuple[str | None, str | None]:
    """The checkpoints the interrupted run reused (``reused.json``); given ones must match them."""
    path = run_dir / RUN_FILES["reused"]
    saved = read_json(path) if path.is_file() else {"stage1": None, "stage2": None}
    for name, given in (("stage1", stage1), ("stage2", stage2)):
        if given is not None and str(given) != str(saved.get(name)):
            raise ConfigError(
                f"cannot resume {str(run_dir)!r}: it {'reused ' + repr(saved.get(name)) if saved.get(name) else 'trained its own ' + name} "
                f"but --{name}-from {str(given)!r} was given; resume without it or start a new run"
            )
    return saved.get("stage1"), saved.get("stage2")


def _resume_config(run_dir: Path, config: Config | None, reused: dict[str, Any]) -> Config:
    """The interrupted run's own config; a given ``config`` must agree with it (for a reused stage,
    whose model and training fields the run took from its checkpoint, in the scoring fields)."""
    saved = load_run_config(run_dir)
    if config is not None:
        given = config_to_dict(replace(config, data=replace(config.data, channels=config.data.channels or saved.data.channels,
                                                            bit_depth=config.data.bit_depth or saved.data.bit_depth)))
        stored = config_to_dict(saved)
        for section, values in stored.items():
            for key, value in values.items():
                if reused.get(section) is not None and key not in getattr(saved, section).scoring_fields:
                    continue
                if not same_setting(given, stored, section, key):
                    raise ConfigError(
                        f"cannot resume {str(run_dir)!r}: {section}.{key} is {given[section][key]!r} here but "
                        f"{value!r} in the run's config.yaml; resume without --config / --set, or start a new run"
                    )
    return saved


# --------------------------------------------------------------------------------------------
# the pipeline


def _decode_splits(config: Config, splits: dict[str, list[Record]], size: int, progress: bool) -> dict[str, DecodedImages]:
    """Every split decoded at ``size`` (the larger stage's scale); refuses too few readable training
    or validation normals."""
    channels = config.data.channels
    decoded = {name: decode_records(recs, size, channels, config.data.invert_masks, desc=f"decode {name}", progress=progress,
                                    bit_depth=config.data.bit_depth) for name, recs in splits.items()}
    if len(decoded["train"]) < 2:
        raise DataError(
            f"only {len(decoded['train'])} readable normal training image(s) in {config.data.path or config.data.source!r}; "
            "the stages need at least 2"
        )
    if len(decoded["val"]) == 0:
        raise DataError("no readable validation image: calibration needs held-out normal images")
    if not (decoded["val"].labels == 0).any():
        raise DataError("the validation split holds no normal image: calibration needs held-out normal images")
    failed = sum(len(d.failed) for d in decoded.values())
    log.info("images: %d train, %d val, %d test (%d unreadable), %d×%d, %d channel(s)",
             len(decoded["train"]), len(decoded["val"]), len(decoded["test"]), failed, size, size, channels)
    warn_if_much_reduced(decoded["train"], config.data.image_size)  # once, against the screen's size
    return decoded


def _check_global_batches(config: Config, n_train: int, reuse: dict[str, str | None], context: DistributedContext) -> None:
    for name in ("stage1", "stage2"):
        batch = min(getattr(config, name).batch_size, n_train)
        if context.enabled and reuse.get(name) is None and batch % context.world_size:
            raise ConfigError(
                f"{name}.batch_size: the global batch of {batch} images does not split evenly over {context.world_size} "
                f"processes; choose a multiple of {context.world_size}"
            )


def _error_rows(decoded: dict[str, DecodedImages], splits: dict[str, list[Record]]) -> pd.DataFrame:
    """Unreadable validation and test images as ``scores.csv`` rows with an ``error`` and no scores."""
    by_name = {r.name: r for split in ("val", "test") for r in splits[split]}
    rows = [
        {"image": name, "label": by_name[name].label, "split": by_name[name].split, "category": by_name[name].category, "error": reason}
        for split in ("val", "test") for name, reason in decoded[split].failed
    ]
    return pd.DataFrame(rows, columns=[*SCORE_KEYS, "error"])


def _table(decoded: DecodedImages, scored: CascadeScores) -> pd.DataFrame:
    return score_table(decoded.records, scored.stage1.loss, scored.stage1.components, scored.stage2.scores)


def _setup(config: Config | None, output: str | Path | None, resume: bool, reuse: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    """The config to run (the interrupted run's own with ``resume``) and the checkpoints to reuse."""
    if resume:
        if output is None:
            raise ConfigError("resume needs the run folder to continue (--output RUN_DIR)")
        reuse = dict(zip(("stage1", "stage2"), _resume_reused(Path(output), reuse["stage1"], reuse["stage2"])))
        config = _resume_config(Path(output), config, reuse)
    if config is None:
        raise ConfigError("run_pipeline needs a config (or resume=True with an existing run folder)")
    config.validate()
    for checkpoint in reuse.values():
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist")
    return config, reuse


def run_pipeline(
    config: Config | None,
    output: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    stage1_checkpoint: str | Path | None = None,
    stage2_checkpoint: str | Path | None = None,
    resume: bool = False,
) -> RunResult:
    """Train both stages, calibrate on validation images, score the test split, write the run folder.

    ``stage1_checkpoint`` / ``stage2_checkpoint``: reuse a trained stage instead of training it
    (its architecture and training settings come from the checkpoint, scoring settings from
    ``config``; the config written to the run folder says which).

    ``resume``: continue the interrupted run in ``output`` (``config`` may be None: the run's
    own ``config.yaml`` is used) from each stage's last complete epoch; everything after training
    is recomputed, so the result equals an uninterrupted run (seeded, CPU, no loader workers).

    Under ``torchrun`` this joins the process group; call
    :func:`twostage_ad.distributed.shutdown_distributed` when done with it (the CLI does).
    """
    config, reuse = _setup(config, output, resume, {"stage1": stage1_checkpoint, "stage2": stage2_checkpoint})
    device = resolve_device(config.run.device)  # fail on a missing GPU before any work
    context, device = init_distributed(device)  # under torchrun: join the group, one device per rank
    progress = progress and context.is_main
    splits = split_records(load_records(config.data, seed=config.run.seed))
    _check_calibration_feasible([r.label for r in splits["val"]], config.calibration)
    # rank 0 alone writes the run folder; when it cannot create it, every rank stops with its error
    run_dir = Path(context.run_on_main(lambda: str(create_run_dir(
        output or default_run_dir(config.run.output_root, config.run.name), overwrite=overwrite, resume=resume))))
    log.info("run folder: %s (device %s%s)", run_dir, device, f", {context.world_size} processes" if context.enabled else "")
    apply_process_settings(config.run.threads, config.run.tune_malloc)
    started = time.perf_counter()
    config = replace(config, data=replace(config.data, channels=config.data.channels or training_channels(splits["train"]),
                                          bit_depth=config.data.bit_depth or infer_bit_depth(splits["train"])))
    detector = TwoStageDetector.from_config(config, device=str(device), reuse=reuse)
    config = replace(config, stage1=detector.stage1.config, stage2=detector.stage2.config)  # a reused stage's own
    if not resume and context.is_main:
        save_config(config, run_dir / RUN_FILES["config"])  # before training, so an interrupted run can be resumed
        write_json(run_dir / RUN_FILES["reused"], {"stage1": reuse["stage1"] and str(reuse["stage1"]),
                                                    "stage2": reuse["stage2"] and str(reuse["stage2"])})
    decoded = _decode_splits(config, splits, detector.image_size, progress)
    decode_seconds = time.perf_counter() - started
    _check_global_batches(config, len(decoded["train"]), reuse, context)
    detector.fit(decoded["train"].images, decoded["val"].images, decoded["val"].labels, None,
                 checkpoint_dir=run_dir / RUN_FILES["checkpoints"], resume=resume, progress=progress, context=context)
    test = detector.score(decoded["test"].images, all_stages=True, progress=progress, desc="test", context=context)
    synthetic = detector.score_synthetic(decoded["val"].images[decoded["val"].labels == 0], config.augment,
                                         seed=config.run.seed, progress=progress, context=context)
    table = pd.concat([_table(decoded["val"], detector.validation_), _table(decoded["test"], test)], ignore_index=True)
    # the ranks part here: every collective is done on every rank (so none closes its connections
    # while another still needs them); rank 0 alone computes the metrics and writes the run folder
    context.barrier()
    if not context.is_main:
        return RunResult(run_dir=run_dir, metrics=None, scores=table)
    errors = _error_rows(decoded, splits)
    if synthetic is not None:  # what `calibrate --method synthetic_recall` re-picks from
        scores, masks, kinds = synthetic
        write_synthetic_scores(run_dir, kinds, masks, scores.stage1.loss, scores.stage2.scores)
    try:
        detector.calibrate(config.calibration, fusion=config.cascade.fusion, synthetic=None if synthetic is None else synthetic[0],
                           map_weight=config.cascade.map_weight)
    except ValueError:  # CalibrationError among them: the scores stay on disk for `calibrate`
        write_scores(run_dir, table, errors)
        raise
    table = decide(table, detector.cascade)
    write_scores(run_dir, table, errors)
    write_thresholds(run_dir, detector.cascade)
    test_images = decoded["test"]
    write_test_maps(run_dir, images=test_images.images, stage1=test.stage1.anomaly_maps, stage2=test.stage2.maps,
                    masks=test_images.masks, has_mask=test_images.has_mask, names=[r.name for r in test_images.records])
    write_json(run_dir / RUN_FILES["history"], {"stage1": detector.stage1.history_, "stage2": detector.stage2.history_})
    fusion = detector.cascade.map_fusion
    metrics = _run_metrics(table, detector, decoded, test, reuse, fusion, seconds={"decode": decode_seconds}, context=context,
                           device=device)
    metrics["synthetic_val"] = None if synthetic is None else synthetic_validation_metrics(
        detector.validation_, decoded["val"].labels, *synthetic, detector.cascade, fusion)
    metrics["seconds"]["total"] = time.perf_counter() - started
    write_json(run_dir / RUN_FILES["metrics"], metrics)
    build_report(run_dir)
    log.info(
        "done in %.1f s: image AUROC stage 1 %s, stage 2 %s, cascade %s; pixel AUROC %s / %s / fused %s; "
        "flagged %.1f%% of test images -> %s",
        metrics["seconds"]["total"], *(auroc_text(metrics["image_auroc"][k]) for k in ("stage1", "stage2", "cascade")),
        *(auroc_text(metrics["pixel_auroc"][k]) for k in ("stage1", "stage2", "fused")),
        100 * (metrics["flagged_fraction"] or 0.0), run_dir,
    )
    return RunResult(run_dir=run_dir, metrics=metrics, scores=table)


def _run_metrics(
    table: pd.DataFrame, detector: TwoStageDetector, decoded: dict[str, DecodedImages], test: CascadeScores,
    reuse: dict[str, Any], fusion: MapFusion, *, seconds: dict[str, float], context: DistributedContext, device: torch.device,
) -> dict[str, Any]:
    """``metrics.json`` of a run (docs/design.md §7): accuracy, thresholds, speed, counts, notes."""
    stage1, stage2 = detector.stage1, detector.stage2
    images = score_metrics(table)
    maps = map_metrics(table, decoded["test"].masks, decoded["test"].has_mask, test.stage1.anomaly_maps, test.stage2.maps,
                       fusion)
    n_test = len(test)
    labels = decoded["test"].labels
    n_flagged = int((test.stage1.loss.astype(np.float64) > detector.cascade.stage1.value).sum())  # as Cascade.apply
    # the deployment path from this pass: stage 1 on every image, stage 2's time per image on the flagged ones
    cascade_seconds = test.stage1.seconds + (test.stage2.seconds * n_flagged / n_test if n_test else 0.0)
    notes = {**images.pop("notes"), **maps.pop("notes")}
    for name, checkpoint in reuse.items():
        if checkpoint is not None:
            notes[f"{name}.reused"] = f"{name} was not trained in this run: loaded from {checkpoint}"
    for name, stage in (("stage1", stage1), ("stage2", stage2)):
        if stage.out_of_time_:  # a faster machine trains another model
            notes[f"{name}.out_of_time"] = (f"{name} stopped after {stage.trained_steps} optimiser steps, when {name}.max_seconds "
                                            f"ran out (a new run with {name}.max_seconds=0 trains every step)")
    failed = [item for d in decoded.values() for item in d.failed]
    metrics: dict[str, Any] = {
        **images,
        **maps,
        "stage2_map_stats": {"mean": stage2.map_mean_, "std": stage2.map_std_},
        "precision": {"stage1": stage1.scoring_precision(), "stage2": "float32"},
        "images_per_s": {
            "stage1": test.stage1.images_per_s,
            "stage2": test.stage2.images_per_s,
            "cascade": n_test / cascade_seconds if cascade_seconds > 0 else None,
        },
        "seconds": {
            **seconds,
            "train_stage1": stage1.train_seconds_,
            "train_stage2": stage2.train_seconds_,
            "score": detector.validation_.seconds + test.seconds,
            "score_cascade_test": cascade_seconds,
        },
        "counts": {
            "train": len(decoded["train"]),
            "val": len(decoded["val"]),
            "test_normal": int((labels == 0).sum()),
            "test_anomalous": int((labels == 1).sum()),
            "test_flagged": n_flagged,
            "unreadable": len(failed),
        },
        "unreadable_images": [{"image": name, "reason": reason} for name, reason in failed],
        "unusable_masks": [{"image": name, "reason": reason} for d in decoded.values() for name, reason in d.mask_problems],
        "epochs": {"stage1": len(stage1.history_), "stage2": len(stage2.history_)},
        "steps": {"stage1": stage1.trained_steps, "stage2": stage2.trained_steps},
        "out_of_time": {"stage1": stage1.out_of_time_, "stage2": stage2.out_of_time_},
        "stage2_discriminator_resets": int(sum(h.get("discriminator_resets", 0) for h in stage2.history_)),
        "stage1_discriminator_resets": int(sum(h.get("discriminator_resets", 0) for h in stage1.history_)),
        "device": str(device),
        "processes": context.world_size,
        "notes": notes,
    }
    return merge_threshold_metrics(metrics, table, detector.cascade)


# --------------------------------------------------------------------------------------------
# re-calibration from saved scores


def current_calibration(run_dir: str | Path, stage: str = "stage1") -> CalibrationConfig:
    """The run's calibration config with the method and parameters of ``stage``'s current threshold."""
    if stage not in ("stage1", "stage2"):
        raise ValueError(f"stage must be 'stage1' or 'stage2', got {stage!r}")
    run_dir = Path(run_dir)
    calibration = load_run_config(run_dir).calibration
    path = run_dir / RUN_FILES["thresholds"]
    if path.is_file():
        current = read_json(path).get(stage) or {}
        if current.get("method"):
            calibration = replace(calibration, method=current["method"], **current.get("params", {}))
    return calibration


def calibrate_run(
    run_dir: str | Path,
    calibration: CalibrationConfig | None = None,
    *,
    stages: tuple[str, ...] = ("stage1", "stage2"),
) -> Cascade:
    """Re-pick τ₁ and / or τ₂ from the saved validation scores; no model, no retraining.

    ``calibration`` applies to the thresholds named in ``stages``; the other keeps its current
    method. Updates ``thresholds.json`` (earlier thresholds kept as history), the decision columns
    of ``scores.csv``, the threshold-dependent entries of ``metrics.json`` (the cascade AUROC
    among them: moving τ₁ changes which images stage 2 orders), the plots and ``report.html``.
    """
    run_dir = Path(run_dir)
    unknown = set(stages) - {"stage1", "stage2"}
    if unknown or not stages:
        raise ValueError(f"stages must name stage1 and/or stage2, got {stages!r}")
    chosen = {s: (calibration if calibration is not None and s in stages else current_calibration(run_dir, s)) for s in ("stage1", "stage2")}
    for c in chosen.values():
        c.validate()
    table, errors = read_scores(run_dir)
    missing = [c for c in ("split", "label", "stage1_loss", "stage2_score") if c not in table.columns]
    if missing:
        raise DataError(f"{str(run_dir / RUN_FILES['scores'])!r} lacks column(s) {missing}; it was not written by this version of twostage_ad")
    val = table[table["split"] == "val"]
    synthetic = read_synthetic_scores(run_dir)
    cascade = fit_cascade(val["stage1_loss"].to_numpy(), val["stage2_score"].to_numpy(), val["label"].to_numpy(),
                          chosen["stage1"], fusion=load_run_config(run_dir).cascade.fusion, calibration2=chosen["stage2"],
                          synthetic_stage1=None if synthetic is None else synthetic["stage1_loss"].to_numpy(),
                          synthetic_stage2=None if synthetic is None else synthetic["stage2_score"].to_numpy())
    thresholds_path = run_dir / RUN_FILES["thresholds"]
    if thresholds_path.is_file():  # the cascade's map needs the stage-1 maps, which are not saved: keep the run's
        cascade.map_fusion = Cascade.from_dict(read_json(thresholds_path)).map_fusion
    table = decide(table, cascade)
    write_scores(run_dir, table, errors)
    write_thresholds(run_dir, cascade)
    metrics_path = run_dir / RUN_FILES["metrics"]
    metrics = merge_threshold_metrics(read_json(metrics_path) if metrics_path.is_file() else {}, table, cascade)
    write_json(metrics_path, metrics)
    build_report(run_dir)
    log.info("τ₁ %.6g (%s %s), τ₂ %.6g (%s %s): flags %.1f%% of test images, cascade AUROC %s",
             cascade.stage1.value, cascade.stage1.method, cascade.stage1.params, cascade.stage2.value, cascade.stage2.method,
             cascade.stage2.params, 100 * (metrics.get("flagged_fraction") or 0.0), auroc_text(metrics["image_auroc"].get("cascade")))
    return cascade


# --------------------------------------------------------------------------------------------
# scoring new images with a finished run


def predict_files(
    run_dir: str | Path,
    inputs: list[str | Path],
    output: str | Path,
    *,
    maps_path: str | Path | None = None,
    overwrite: bool = False,
    all_stages: bool = False,
    batch_size: int | None = None,
    device: str = "auto",
    progress: bool = True,
    tune_malloc: bool | None = None,
) -> dict[str, Any]:
    """Score files, folders and globs with a run's detector; write a CSV (and maps); return a summary.

    ``tune_malloc``: apply the allocator tuning (``twostage_ad.allocator``); None = the run's
    ``run.tune_malloc``.

    The CSV has one row per input file: the columns of ``scores.csv`` that need no label, and
    ``error`` for files that could not be read (their scores are empty).
    """
    output = Path(output)
    for path in (output, maps_path):
        if path is not None and Path(path).exists() and not overwrite:
            raise FileExistsError(f"{str(path)!r} exists; pass --overwrite (overwrite=True) to replace it")
    paths = expand_image_paths(inputs)
    apply_process_settings(0, load_run_config(run_dir).run.tune_malloc if tune_malloc is None else tune_malloc)
    detector = TwoStageDetector.from_run(run_dir, device=device)
    result = detector.predict(paths, batch_size=batch_size, all_stages=all_stages, maps=maps_path is not None, progress=progress)
    table = result.to_frame()
    table["error"] = ""
    if result.failed:
        table = pd.concat([table, pd.DataFrame({"image": [n for n, _ in result.failed], "error": [r for _, r in result.failed]})],
                          ignore_index=True)
    write_atomic(output, lambda tmp: table.to_csv(tmp, index=False, float_format="%.9g"))
    if maps_path is not None:
        write_prediction_maps(Path(maps_path), result.images, detector.image_size)
    summary = {
        "run_dir": str(run_dir),
        "output": str(output),
        "images": len(result),
        "flagged": int(sum(p.flagged for p in result.images)),
        "anomalous": int(sum(p.decision for p in result.images)),
        "unreadable": [{"image": n, "reason": r} for n, r in result.failed],
        "seconds": result.seconds,
        "images_per_s": result.images_per_s,
    }
    log.info("%d images scored in %.2f s (%.1f images/s): %d flagged, %d anomalous, %d unreadable -> %s",
             summary["images"], result.seconds, result.images_per_s, summary["flagged"], summary["anomalous"],
             len(result.failed), output)
    return summary
