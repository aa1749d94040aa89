"""The pipeline as Python functions; the CLI in :mod:`twostage_ad.pipeline` only parses arguments.

Data flows one way: records → decoded images → stage 1 (train, score) → calibration → scores,
metrics and plots in the run folder (DESIGN §7).
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
import yaml

from twostage_ad.calibration import NORMAL_ONLY_METHODS, CalibrationError, Threshold, calibrate
from twostage_ad.config import CalibrationConfig, Config, ConfigError, config_from_dict, save_config
from twostage_ad.data.images import DecodedImages, decode_records, infer_channels
from twostage_ad.data.records import DataError, load_records, split_records
from twostage_ad.metrics import image_auroc, pixel_auroc, recall_at_threshold
from twostage_ad.report import plot_loss_distribution, plot_overlays, plot_training_curves, write_html_report
from twostage_ad.runs import RUN_FILES, create_run_dir, default_run_dir, read_json, write_atomic, write_json
from twostage_ad.stages.attention import SCREENING_COMPONENTS, AttentionStage, ScreeningResult, resolve_device

__all__ = ["RunResult", "run_pipeline", "calibrate_run", "current_calibration", "load_run_config"]

log = logging.getLogger(__name__)


class RunResult(dict):
    """What :func:`run_pipeline` returns: ``run_dir``, ``metrics``, ``scores`` (DataFrame)."""

    @property
    def run_dir(self) -> Path:
        return self["run_dir"]

    @property
    def metrics(self) -> dict[str, Any]:
        return self["metrics"]

    @property
    def scores(self) -> pd.DataFrame:
        return self["scores"]


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / RUN_FILES["config"]
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run folder: {RUN_FILES['config']} is missing")
    try:
        return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (yaml.YAMLError, ConfigError) as exc:
        raise ConfigError(f"{str(path)!r}: {exc}") from exc


def _score_table(decoded: DecodedImages, result: ScreeningResult) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "image": [r.name for r in decoded.records],
            "label": decoded.labels,
            "split": [r.split for r in decoded.records],
            "category": [r.category for r in decoded.records],
            "stage1_loss": result.loss,
        }
    )
    for name in SCREENING_COMPONENTS:
        table[name] = result.components[name]
    return table


def _threshold_metrics(table: pd.DataFrame, threshold: Threshold) -> dict[str, Any]:
    test = table[table["split"] == "test"]
    recall = recall_at_threshold(test["label"].to_numpy(), test["stage1_loss"].to_numpy(), threshold.value)
    return {
        "flagged_fraction": float(test["flagged"].mean()) if len(test) else None,
        "stage1_recall_at_threshold": recall.value,
        "stage1_false_positive_rate": float(test.loc[test["label"] == 0, "flagged"].mean()) if (test["label"] == 0).any() else None,
    }


def _per_category_auroc(test: pd.DataFrame) -> dict[str, float | None]:
    normal = test[test["label"] == 0]
    out = {}
    for category, group in test[test["label"] == 1].groupby("category"):
        both = pd.concat([normal, group])
        out[str(category)] = image_auroc(both["label"].to_numpy(), both["stage1_loss"].to_numpy()).value
    return out


def _write_scores(run_dir: Path, table: pd.DataFrame) -> None:
    write_atomic(run_dir / RUN_FILES["scores"], lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g"))


def _thresholds_payload(run_dir: Path, threshold: Threshold) -> dict[str, Any]:
    """New thresholds.json content; earlier stage-1 thresholds are kept under ``history``."""
    path = run_dir / RUN_FILES["thresholds"]
    history: list[dict[str, Any]] = []
    if path.is_file():
        previous = read_json(path)
        history = list(previous.get("history", []))
        if previous.get("stage1"):
            history.append(previous["stage1"])
    return {"stage1": {**threshold.to_dict(), "calibrated_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, "stage2": None, "history": history}


def _apply_threshold(run_dir: Path, table: pd.DataFrame, threshold: Threshold, metrics: dict[str, Any]) -> dict[str, Any]:
    """Flag by ``threshold`` and bring every threshold-dependent output up to date.

    Writes ``scores.csv``, ``thresholds.json`` (earlier thresholds kept as history),
    ``metrics.json``, the loss-distribution plot and ``report.html``. Shared by ``run`` and
    ``calibrate`` so both produce the same files.
    """
    table["flagged"] = table["stage1_loss"] > threshold.value
    table["decision"] = table["flagged"].astype(int)
    _write_scores(run_dir, table)
    write_json(run_dir / RUN_FILES["thresholds"], _thresholds_payload(run_dir, threshold))
    metrics = {**metrics, **_threshold_metrics(table, threshold)}
    metrics["thresholds"] = {**metrics.get("thresholds", {}), "stage1": threshold.value}
    metrics["calibration"] = {"method": threshold.method, "params": threshold.params}
    write_json(run_dir / RUN_FILES["metrics"], metrics)
    auroc = (metrics.get("image_auroc") or {}).get("stage1")
    plot_loss_distribution(
        table, "stage1_loss", threshold.value, run_dir / RUN_FILES["plots"] / "stage1_loss_distribution.png",
        title=f"stage 1 screening loss (test), AUROC {_auroc_text(auroc)}",
    )
    write_html_report(run_dir, metrics, title=f"twostage_ad run {run_dir.name}")
    return metrics


def _auroc_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _check_calibration_feasible(records_val_labels: list[int], calibration: CalibrationConfig) -> None:
    """Fail before training when the method needs validation anomalies that do not exist."""
    if calibration.method not in NORMAL_ONLY_METHODS and 1 not in records_val_labels:
        raise CalibrationError(
            f"calibration.method {calibration.method!r} needs labelled anomalies in the validation split, "
            f"which has none; use one of {NORMAL_ONLY_METHODS} or add labelled anomalies with split=val"
        )


def _draw_overlays(run_dir: Path, decoded: DecodedImages, maps: np.ndarray, count: int, seed: int) -> str | None:
    anomalies = np.flatnonzero(decoded.labels == 1)
    if count == 0 or len(anomalies) == 0:
        return None
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(anomalies, size=min(count, len(anomalies)), replace=False))
    titles = [f"{decoded.records[i].category}: {Path(decoded.records[i].name).name}" for i in chosen]
    path = run_dir / RUN_FILES["plots"] / "stage1_overlays.png"
    plot_overlays(decoded.images[chosen], maps[chosen], decoded.masks[chosen], titles, path)
    return str(path.relative_to(run_dir))


def run_pipeline(
    config: Config,
    output: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> RunResult:
    """Train stage 1, calibrate on validation normals, score the test split, write the run folder."""
    config.validate()
    device = resolve_device(config.run.device)  # fail on a missing GPU before any work
    records = load_records(config.data, seed=config.run.seed)
    splits = split_records(records)
    _check_calibration_feasible([r.label for r in splits["val"]], config.calibration)
    run_dir = create_run_dir(output or default_run_dir(config.run.output_root, config.run.name), overwrite=overwrite)
    log.info("run folder: %s (device %s)", run_dir, device)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    started = time.perf_counter()

    channels = config.data.channels or infer_channels(splits["train"][0])
    config = replace(config, data=replace(config.data, channels=channels))
    save_config(config, run_dir / RUN_FILES["config"])
    size = config.data.image_size
    decoded = {
        name: decode_records(recs, size, channels, config.data.invert_masks, desc=f"decode {name}", progress=progress)
        for name, recs in splits.items()
    }
    failed = [item for d in decoded.values() for item in d.failed]
    if len(decoded["train"]) < 2:
        raise DataError(
            f"only {len(decoded['train'])} readable normal training image(s) in {config.data.path or config.data.source!r}; "
            "stage 1 needs at least 2"
        )
    if len(decoded["val"]) == 0:
        raise DataError("no readable validation image: calibration needs held-out normal images")
    log.info(
        "images: %d train, %d val, %d test (%d unreadable), %d×%d, %d channel(s)",
        len(decoded["train"]), len(decoded["val"]), len(decoded["test"]), len(failed), size, size, channels,
    )
    decode_seconds = time.perf_counter() - started

    stage1 = AttentionStage(
        config=config.stage1, augment=config.augment, image_size=size, channels=channels,
        device=str(device), seed=config.run.seed, num_workers=config.run.num_workers,
    )
    stage1.fit(decoded["train"].images, checkpoint_path=run_dir / RUN_FILES["checkpoints"] / "stage1.pt", progress=progress)

    val_result = stage1.score(decoded["val"].images, progress=progress, desc="stage 1 score val")
    test_result = stage1.score(decoded["test"].images, progress=progress, desc="stage 1 score test")
    table = pd.concat(
        [_score_table(decoded["val"], val_result), _score_table(decoded["test"], test_result)], ignore_index=True
    )
    _write_scores(run_dir, table)  # scores are safe on disk before anything can fail in calibration

    test = table[table["split"] == "test"]
    labels = test["label"].to_numpy()
    image_metric = image_auroc(labels, test["stage1_loss"].to_numpy())
    pixel_metric = pixel_auroc(labels, decoded["test"].masks, decoded["test"].has_mask, test_result.anomaly_maps)
    component_auroc = {name: image_auroc(labels, test[name].to_numpy()).value for name in SCREENING_COMPONENTS}
    write_atomic(
        run_dir / RUN_FILES["maps"] / "stage1_test_maps.npz",
        lambda tmp: np.savez_compressed(
            tmp,
            maps=np.clip(np.rint(test_result.anomaly_maps * 255), 0, 255).astype(np.uint8),
            masks=decoded["test"].masks,
            has_mask=decoded["test"].has_mask,
            images=np.array([r.name for r in decoded["test"].records]),
        ),
    )
    plots_dir = run_dir / RUN_FILES["plots"]
    plot_training_curves(stage1.history_, plots_dir / "stage1_training.png")
    _draw_overlays(run_dir, decoded["test"], test_result.anomaly_maps, config.run.overlays, config.run.seed)

    notes = {}
    if image_metric.reason:
        notes["image_auroc.stage1"] = image_metric.reason
    if pixel_metric.reason:
        notes["pixel_auroc.stage1"] = pixel_metric.reason
    notes["stage2"] = "stage 2 (GANomaly2D) is not part of this version: stage-2 and cascade metrics are null"
    metrics: dict[str, Any] = {
        "image_auroc": {"stage1": image_metric.value, "stage2": None, "cascade": None},
        "image_auroc_stage1_components": component_auroc,
        "image_auroc_stage1_by_category": _per_category_auroc(test),
        "pixel_auroc": {"stage1": pixel_metric.value, "stage2": None, "fused": None},
        "pro": None,
        "thresholds": {"stage1": None, "stage2": None},
        "images_per_s": {"stage1": test_result.images_per_s, "stage2": None, "cascade": None},
        "seconds": {
            "decode": decode_seconds,
            "train_stage1": stage1.train_seconds_,
            "train_stage2": None,
            "score": val_result.seconds + test_result.seconds,
            "total": time.perf_counter() - started,
        },
        "counts": {
            "train": len(decoded["train"]),
            "val": len(decoded["val"]),
            "test_normal": int((labels == 0).sum()),
            "test_anomalous": int((labels == 1).sum()),
            "unreadable": len(failed),
        },
        "unreadable_images": [{"image": name, "reason": reason} for name, reason in failed],
        "epochs": {"stage1": config.stage1.epochs},
        "device": str(device),
        "notes": notes,
    }
    val = table[table["split"] == "val"]
    threshold = calibrate(val["stage1_loss"].to_numpy(), val["label"].to_numpy(), config.calibration)
    metrics = _apply_threshold(run_dir, table, threshold, metrics)
    log.info(
        "done in %.1f s: stage-1 image AUROC %s, pixel AUROC %s, flagged %.1f%% of test images -> %s",
        metrics["seconds"]["total"], _auroc_text(image_metric.value), _auroc_text(pixel_metric.value),
        100 * (metrics["flagged_fraction"] or 0.0), run_dir,
    )
    return RunResult(run_dir=run_dir, metrics=metrics, scores=table)


def current_calibration(run_dir: str | Path) -> CalibrationConfig:
    """The run's calibration config with the method and parameters of its current threshold."""
    run_dir = Path(run_dir)
    calibration = load_run_config(run_dir).calibration
    path = run_dir / RUN_FILES["thresholds"]
    if path.is_file():
        current = read_json(path).get("stage1") or {}
        if current.get("method"):
            calibration = replace(calibration, method=current["method"], **current.get("params", {}))
    return calibration


def calibrate_run(run_dir: str | Path, calibration: CalibrationConfig | None = None) -> Threshold:
    """Re-pick the stage-1 threshold from the saved validation scores; no model, no retraining.

    Updates ``thresholds.json`` (earlier thresholds kept as history), the ``flagged`` and
    ``decision`` columns of ``scores.csv``, the threshold-dependent entries of ``metrics.json``,
    the loss-distribution plot and ``report.html``.
    """
    run_dir = Path(run_dir)
    calibration = calibration or current_calibration(run_dir)
    calibration.validate()
    scores_path = run_dir / RUN_FILES["scores"]
    if not scores_path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} has no {RUN_FILES['scores']}: run the pipeline first")
    table = pd.read_csv(scores_path, keep_default_na=False, dtype={"image": str, "category": str})
    missing = [c for c in ("split", "label", "stage1_loss") if c not in table.columns]
    if missing:
        raise DataError(f"{str(scores_path)!r} lacks column(s) {missing}; it was not written by twostage_ad")
    val = table[table["split"] == "val"]
    threshold = calibrate(val["stage1_loss"].to_numpy(), val["label"].to_numpy(), calibration)
    metrics_path = run_dir / RUN_FILES["metrics"]
    metrics = _apply_threshold(run_dir, table, threshold, read_json(metrics_path) if metrics_path.is_file() else {})
    log.info("stage-1 threshold %s (%s %s): flags %.1f%% of test images", f"{threshold.value:.6g}", threshold.method,
             threshold.params, 100 * (metrics.get("flagged_fraction") or 0.0))
    return threshold
