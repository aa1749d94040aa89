"""The pipeline as Python functions; the CLI in :mod:`twostage_ad.pipeline` only parses arguments.

Data flows one way: records → decoded images → stage 1 (train, score) → stage 2 (train, fix map
statistics on validation normals, score) → cascade calibration → scores, metrics and plots in
the run folder (DESIGN §7).

Stage 2 is scored on *every* validation and test image so that ``calibrate`` can move τ₁ without
a model and ``image_auroc.stage2`` can be reported for analysis; the cascade's own throughput is
measured on the path a deployment takes (stage 1 on all test images, stage 2 on flagged ones).
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

from twostage_ad.allocator import tune_malloc
from twostage_ad.calibration import NORMAL_ONLY_METHODS, CalibrationError
from twostage_ad.cascade import Cascade, fit_cascade, fused_anomaly_map
from twostage_ad.config import (
    CalibrationConfig,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    save_config,
)
from twostage_ad.data.images import DecodedImages, decode_records, infer_channels
from twostage_ad.data.records import DataError, load_records, split_records
from twostage_ad.distributed import DistributedContext, init_distributed
from twostage_ad.metrics import (
    image_auroc,
    image_auroc_by_category,
    pixel_auroc,
    pixel_auroc_by_category,
    pro_score,
    recall_at_threshold,
)
from twostage_ad.report import (
    plot_category_distribution,
    plot_loss_distribution,
    plot_map_pairs,
    plot_overlays,
    plot_roc_curves,
    plot_training_curves,
    write_html_report,
)
from twostage_ad.runs import (
    RUN_FILES,
    create_run_dir,
    default_run_dir,
    read_json,
    write_atomic,
    write_json,
)
from twostage_ad.stages.attention import (
    SCREENING_COMPONENTS,
    AttentionStage,
    ScreeningResult,
    resolve_device,
)
from twostage_ad.stages.patch_scorer import PatchScoreResult, PatchScorerStage

__all__ = ["RunResult", "run_pipeline", "calibrate_run", "current_calibration", "load_run_config", "build_report", "predict_files"]

log = logging.getLogger(__name__)

STAGE1_SCORING_FIELDS = ("screen_con", "screen_enc", "screen_att", "screen_topk", "score_batch_size", "score_bf16")
STAGE2_SCORING_FIELDS = ("score_reduction", "score_topk", "guidance", "guidance_floor", "score_batch_size")


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


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / RUN_FILES["config"]
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run folder: {RUN_FILES['config']} is missing")
    try:
        return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (yaml.YAMLError, ConfigError) as exc:
        raise ConfigError(f"{str(path)!r}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# the score table and everything that depends on the thresholds


def _score_table(decoded: DecodedImages, stage1: ScreeningResult, stage2_scores: np.ndarray) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "image": [r.name for r in decoded.records],
            "label": decoded.labels,
            "split": [r.split for r in decoded.records],
            "category": [r.category for r in decoded.records],
            "stage1_loss": stage1.loss,
        }
    )
    for name in SCREENING_COMPONENTS:
        table[name] = stage1.components[name]
    table["stage2_score"] = stage2_scores
    return table


def _write_scores(run_dir: Path, table: pd.DataFrame, errors: pd.DataFrame | None = None) -> None:
    """``scores.csv``: the scored rows, then one row per unreadable val/test image (``error`` set)."""
    out = table.assign(error="")
    if errors is not None and len(errors):
        out = pd.concat([out, errors], ignore_index=True)
    # 17 significant digits: exact round trip, so `calibrate` and `predict` see the scores `run` saw
    write_atomic(run_dir / RUN_FILES["scores"], lambda tmp: out.to_csv(tmp, index=False, float_format="%.17g"))


def _error_rows(decoded: dict[str, DecodedImages], splits: dict[str, list]) -> pd.DataFrame:
    """Unreadable validation and test images as ``scores.csv`` rows with an ``error`` and no scores."""
    by_name = {r.name: r for split in ("val", "test") for r in splits[split]}
    rows = [
        {"image": name, "label": by_name[name].label, "split": by_name[name].split, "category": by_name[name].category, "error": reason}
        for split in ("val", "test") for name, reason in decoded[split].failed
    ]
    return pd.DataFrame(rows, columns=["image", "label", "split", "category", "error"])


def _split_errors(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A read ``scores.csv`` -> (scored rows, unreadable rows)."""
    if "error" not in table.columns:
        return table, table.iloc[0:0]
    failed = table["error"].fillna("").astype(str) != ""
    scored = table[~failed].drop(columns="error").reset_index(drop=True)
    if "flagged" in scored.columns:
        scored["flagged"] = scored["flagged"].astype(str).str.lower() == "true"
    return scored, table[failed][["image", "label", "split", "category", "error"]]


def _threshold_metrics(table: pd.DataFrame, cascade: Cascade) -> dict[str, Any]:
    test = table[table["split"] == "test"]
    labels = test["label"].to_numpy()
    recall = recall_at_threshold(labels, test["stage1_loss"].to_numpy(), cascade.stage1.value)
    cascade_auroc = image_auroc(labels, test["cascade_score"].to_numpy())
    normal = labels == 0
    anomalous = labels == 1
    return {
        "flagged_fraction": float(test["flagged"].mean()) if len(test) else None,
        "stage1_recall_at_threshold": recall.value,
        "stage1_false_positive_rate": float(test.loc[normal, "flagged"].mean()) if normal.any() else None,
        "cascade_recall": float(test.loc[anomalous, "decision"].mean()) if anomalous.any() else None,
        "cascade_false_positive_rate": float(test.loc[normal, "decision"].mean()) if normal.any() else None,
        "_cascade_auroc": cascade_auroc,
    }


def _categories(test: pd.DataFrame) -> np.ndarray:
    """Test rows' categories as strings, blank for none (NaN after a CSV round trip)."""
    return test["category"].fillna("").astype(str).to_numpy()


def _per_category_auroc(test: pd.DataFrame, column: str) -> dict[str, float | None]:
    return image_auroc_by_category(test["label"].to_numpy(), _categories(test), test[column].to_numpy())


def _thresholds_payload(run_dir: Path, cascade: Cascade) -> dict[str, Any]:
    """New thresholds.json content; every earlier threshold is kept under ``history``."""
    path = run_dir / RUN_FILES["thresholds"]
    history: list[dict[str, Any]] = []
    if path.is_file():
        previous = read_json(path)
        history = list(previous.get("history", []))
        for stage in ("stage1", "stage2"):
            if previous.get(stage):
                history.append({"stage": stage, **previous[stage]})
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    return {
        "stage1": {**cascade.stage1.to_dict(), "calibrated_at": now},
        "stage2": {**cascade.stage2.to_dict(), "calibrated_at": now, "applies_to": f"second-stage score (fusion {cascade.fusion!r})"},
        "cascade": {k: v for k, v in cascade.to_dict().items() if k not in ("stage1", "stage2")},
        "history": history,
    }


def _apply_cascade(
    run_dir: Path, table: pd.DataFrame, cascade: Cascade, metrics: dict[str, Any], errors: pd.DataFrame | None = None
) -> dict[str, Any]:
    """Decide every image with ``cascade`` and bring every threshold-dependent output up to date.

    Writes ``scores.csv``, ``thresholds.json`` (earlier thresholds kept as history),
    ``metrics.json``, the score-distribution plots and ``report.html``. Shared by ``run`` and
    ``calibrate`` so both produce the same files.
    """
    out = cascade.apply(table["stage1_loss"].to_numpy(), table["stage2_score"].to_numpy())
    table["flagged"] = out.flagged
    table["stage2_decision_score"] = out.second_score
    table["cascade_score"] = out.cascade_score
    table["decision"] = out.decision
    _write_scores(run_dir, table, errors)
    write_json(run_dir / RUN_FILES["thresholds"], _thresholds_payload(run_dir, cascade))
    extra = _threshold_metrics(table, cascade)
    cascade_auroc = extra.pop("_cascade_auroc")
    metrics = {**metrics, **extra}
    metrics["image_auroc"] = {**metrics.get("image_auroc", {}), "cascade": cascade_auroc.value}
    notes = dict(metrics.get("notes", {}))
    notes.pop("image_auroc.cascade", None)
    if cascade_auroc.reason:
        notes["image_auroc.cascade"] = cascade_auroc.reason
    metrics["notes"] = notes
    test = table[table["split"] == "test"]
    metrics["image_auroc_cascade_by_category"] = _per_category_auroc(test, "cascade_score")
    metrics["thresholds"] = {**metrics.get("thresholds", {}), "stage1": cascade.stage1.value, "stage2": cascade.stage2.value}
    metrics["calibration"] = {
        "stage1": {"method": cascade.stage1.method, "params": cascade.stage1.params},
        "stage2": {"method": cascade.stage2.method, "params": cascade.stage2.params},
        "fusion": cascade.fusion,
    }
    metrics["confusion"] = {"stage1_flag": _confusion(test, "flagged"), "cascade_decision": _confusion(test, "decision")}
    write_json(run_dir / RUN_FILES["metrics"], metrics)
    build_report(run_dir)
    return metrics


def _confusion(test: pd.DataFrame, column: str) -> dict[str, int]:
    """Counts on the test split; positive = predicted anomalous, truth = label 1."""
    predicted = test[column].astype(bool).to_numpy()
    truth = test["label"].to_numpy() == 1
    return {
        "true_positive": int((predicted & truth).sum()),
        "false_positive": int((predicted & ~truth).sum()),
        "true_negative": int((~predicted & ~truth).sum()),
        "false_negative": int((~predicted & truth).sum()),
    }


def _auroc_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _check_calibration_feasible(records_val_labels: list[int], calibration: CalibrationConfig) -> None:
    """Fail before training when the method needs validation anomalies that do not exist."""
    if calibration.method not in NORMAL_ONLY_METHODS and 1 not in records_val_labels:
        raise CalibrationError(
            f"calibration.method {calibration.method!r} needs labelled anomalies in the validation split, "
            f"which has none; use one of {NORMAL_ONLY_METHODS} or add labelled anomalies with split=val"
        )


# --------------------------------------------------------------------------------------------
# the report: every plot and report.html, from the saved files alone


def _read_scores(run_dir: Path) -> pd.DataFrame:
    """The scored rows of ``scores.csv`` (unreadable images left out)."""
    path = run_dir / RUN_FILES["scores"]
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} has no {RUN_FILES['scores']}: run the pipeline first")
    return _split_errors(pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"image": str, "category": str, "error": str}))[0]


def build_report(run_dir: str | Path, *, log_scale: bool = False, examples: int | None = None) -> Path:
    """Draw every plot and write ``report.html`` from a run folder's files; no model is loaded.

    Score distributions (by label and by defect category, threshold lines, optional log scale),
    ROC curves of both stages and the cascade, training curves, heat-map overlays (stage 1 on test
    anomalies, stage 2 on flagged test images) and the worst false negatives and false positives
    of the cascade with both maps, all on colour scales fixed from validation normals.
    """
    run_dir = Path(run_dir)
    table = _read_scores(run_dir)
    metrics = read_json(run_dir / RUN_FILES["metrics"])
    cascade = Cascade.from_dict(read_json(run_dir / RUN_FILES["thresholds"]))
    config = load_run_config(run_dir)
    count = config.run.overlays if examples is None else examples
    plots = run_dir / RUN_FILES["plots"]
    auroc = metrics.get("image_auroc", {})
    test = table[table["split"] == "test"].reset_index(drop=True)
    tau2 = cascade.stage2.value if cascade.fusion == "stage2" else None
    distributions = (("stage1_loss", cascade.stage1.value, "stage 1 screening loss", "stage1"),
                     ("stage2_score", tau2, "stage 2 image score (every test image)", "stage2"),
                     ("cascade_score", 1.5, "cascade score (> 1 flagged, > 1.5 anomalous)", "cascade"))
    for column, threshold, name, key in distributions:
        title = f"{name}, AUROC {_auroc_text(auroc.get(key))}"
        plot_loss_distribution(table, column, threshold, plots / f"{column}_distribution.png", title=title, log_scale=log_scale)
        if test.loc[test["label"] == 1, "category"].nunique() > 1:
            plot_category_distribution(table, column, threshold, plots / f"{column}_by_category.png", title=title, log_scale=log_scale)
    plot_roc_curves(table, {"stage 1": "stage1_loss", "stage 2": "stage2_score", "cascade": "cascade_score"}, plots / "roc.png")
    history_path = run_dir / RUN_FILES["history"]
    history = read_json(history_path) if history_path.is_file() else {}
    for stage, rows in history.items():
        plot_training_curves([{k: v for k, v in h.items() if k != "discriminator_resets"} for h in rows],
                             plots / f"{stage}_training.png", title=f"{stage.replace('stage', 'stage ')} training")
    maps_path = run_dir / RUN_FILES["maps"] / "test_maps.npz"
    if maps_path.is_file() and count > 0:
        _draw_maps(run_dir, maps_path, test, table, cascade, count, config.run.seed)
    return write_html_report(run_dir, metrics, title=f"twostage_ad run {run_dir.name}")


def _draw_maps(run_dir: Path, maps_path: Path, test: pd.DataFrame, table: pd.DataFrame, cascade: Cascade, count: int, seed: int) -> None:
    with np.load(maps_path) as saved:
        names, images, masks = saved["names"], saved["images"], saved["masks"]
        stage1 = saved["stage1"].astype(np.float32) / 255.0
        stage2 = saved["stage2"].astype(np.float32)
    if list(names) != test["image"].tolist():
        log.warning("%s does not match scores.csv; heat maps left out of the report", maps_path)
        return
    labels = test["label"].to_numpy()
    # stage-2 colour scale fixed from validation normals: it ends, and the contour is drawn, at the
    # highest image score a validation normal reached (τ₂ itself when stage 2 decides alone)
    val_normal = table[(table["split"] == "val") & (table["label"] == 0)]["stage2_score"]
    level = cascade.stage2.value if cascade.fusion == "stage2" else float(val_normal.max())
    level = level if np.isfinite(level) and level > 0 else 1.0
    plots = run_dir / RUN_FILES["plots"]

    def title(i: int) -> str:
        return f"{test['category'][i]}: {Path(test['image'][i]).name} ({'anomalous' if labels[i] else 'normal'})"

    chosen = _pick(np.flatnonzero(labels == 1), count, seed)
    if len(chosen):
        plot_overlays(images[chosen], stage1[chosen], masks[chosen], [title(i) for i in chosen], plots / "stage1_overlays.png")
    chosen = _pick(np.flatnonzero(test["flagged"].to_numpy(bool)), count, seed)
    if len(chosen):
        plot_overlays(images[chosen], stage2[chosen], masks[chosen], [title(i) for i in chosen], plots / "stage2_overlays_flagged.png",
                      vmax=level, contour=level * 0.999, map_label="stage 2 (validation-normal σ)")
    decision, score = test["decision"].to_numpy(int), test["cascade_score"].to_numpy(float)
    worst = {
        "worst_false_negatives.png": np.flatnonzero((labels == 1) & (decision == 0)),
        "worst_false_positives.png": np.flatnonzero((labels == 0) & (decision == 1)),
    }
    for name, candidates in worst.items():
        ordered = candidates[np.argsort(score[candidates])]
        ordered = ordered[: min(count, 6)] if "negatives" in name else ordered[::-1][: min(count, 6)]
        if len(ordered):
            titles = [f"{title(i)}, cascade {score[i]:.3f}" for i in ordered]
            plot_map_pairs(images[ordered], stage1[ordered], stage2[ordered], masks[ordered], titles, plots / name,
                           stage2_max=level, stage2_level=level * 0.999)


def _pick(candidates: np.ndarray, count: int, seed: int) -> np.ndarray:
    if count == 0 or len(candidates) == 0:
        return np.zeros(0, dtype=int)
    return np.sort(np.random.default_rng(seed).choice(candidates, size=min(count, len(candidates)), replace=False))


# --------------------------------------------------------------------------------------------
# scoring, sharded by index across ranks under torchrun (a plain call otherwise)


def _score_stage1(
    stage: AttentionStage, images: np.ndarray, context: DistributedContext, progress: bool, desc: str
) -> ScreeningResult:
    """Each rank scores its contiguous shard; every rank gets all results, in order."""
    start = time.perf_counter()
    part = stage.score(images[context.shard(len(images))], progress=progress, desc=desc)
    if not context.enabled:
        return part
    return ScreeningResult(
        loss=context.gather(part.loss),
        components={k: context.gather(v) for k, v in part.components.items()},
        anomaly_maps=context.gather(part.anomaly_maps),
        seconds=time.perf_counter() - start,
    )


def _score_stage2(
    stage: PatchScorerStage, images: np.ndarray, stage1_maps: np.ndarray | None, context: DistributedContext,
    progress: bool, desc: str,
) -> PatchScoreResult:
    start = time.perf_counter()
    shard = context.shard(len(images))
    part = stage.score(images[shard], stage1_maps=None if stage1_maps is None else stage1_maps[shard], progress=progress, desc=desc)
    if not context.enabled:
        return part
    return PatchScoreResult(scores=context.gather(part.scores), maps=context.gather(part.maps), seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# stages: train or reuse a checkpoint


def _stage1(
    config: Config, images: np.ndarray, run_dir: Path, device: torch.device, checkpoint: Path | None, progress: bool, resume: bool,
    context: DistributedContext,
) -> AttentionStage:
    path = run_dir / RUN_FILES["checkpoints"] / "stage1.pt"
    if checkpoint is None:
        stage = AttentionStage(
            config=config.stage1, augment=config.augment, image_size=config.data.image_size, channels=config.data.channels,
            device=str(device), seed=config.run.seed, num_workers=config.run.num_workers,
        )
        return stage.fit(images, checkpoint_path=path, progress=progress, resume=resume, context=context)
    stage = AttentionStage.load(checkpoint, device=str(device))
    _check_reused(checkpoint, stage.image_size, stage.channels, config)
    stage.config = replace(stage.config, **{f: getattr(config.stage1, f) for f in STAGE1_SCORING_FIELDS})
    stage.train_seconds_ = 0.0
    if context.is_main:
        stage.save(path)
    log.info("stage 1 reused from %s (trained %d epochs)", checkpoint, len(stage.history_))
    return stage


def _stage2(
    config: Config, images: np.ndarray, run_dir: Path, device: torch.device, checkpoint: Path | None, progress: bool, resume: bool,
    context: DistributedContext,
) -> PatchScorerStage:
    path = run_dir / RUN_FILES["checkpoints"] / "stage2.pt"
    if checkpoint is None:
        stage = PatchScorerStage(config=config.stage2, image_size=config.data.image_size,
                                 channels=config.data.channels, device=str(device), seed=config.run.seed,
                                 num_workers=config.run.num_workers)
        return stage.fit(images, checkpoint_path=path, progress=progress, resume=resume, context=context)
    stage = PatchScorerStage.load(checkpoint, device=str(device))
    _check_reused(checkpoint, stage.image_size, stage.channels, config)
    stage.config = replace(stage.config, **{f: getattr(config.stage2, f) for f in STAGE2_SCORING_FIELDS})
    stage.train_seconds_ = 0.0
    log.info("stage 2 reused from %s (trained %d epochs)", checkpoint, len(stage.history_))
    return stage


def _check_reused(checkpoint: Path, image_size: int, channels: int, config: Config) -> None:
    if (image_size, channels) != (config.data.image_size, config.data.channels):
        raise ConfigError(
            f"checkpoint {str(checkpoint)!r} was trained on {image_size}px, {channels} channel(s); this run uses "
            f"{config.data.image_size}px, {config.data.channels} channel(s): set data.image_size / data.channels to match"
        )


# --------------------------------------------------------------------------------------------
# the pipeline


def _infer_channels(records: list) -> int:
    """Channels of the first readable training image (unreadable ones are reported later, when decoded)."""
    for record in records:
        try:
            return infer_channels(record)
        except DataError:
            continue
    raise DataError(
        f"none of the {len(records)} training image(s) can be read (e.g. {records[0].name!r}); check the files "
        "or the data.path" if records else "no training images"
    )


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


def _resume_config(run_dir: Path, config: Config | None) -> Config:
    """The interrupted run's own config; a given ``config`` must agree with it."""
    saved = load_run_config(run_dir)
    if config is not None:
        given = config_to_dict(replace(config, data=replace(config.data, channels=config.data.channels or saved.data.channels)))
        for section, values in config_to_dict(saved).items():
            for key, value in values.items():
                if given[section][key] != value:
                    raise ConfigError(
                        f"cannot resume {str(run_dir)!r}: {section}.{key} is {given[section][key]!r} here but "
                        f"{value!r} in the run's config.yaml; resume without --config / --set, or start a new run"
                    )
    return saved


def _apply_process_settings(threads: int, malloc: bool) -> None:
    """Process-wide settings a run asks for: torch's thread count and the allocator tuning."""
    if threads:
        torch.set_num_threads(threads)
    if malloc and not tune_malloc():
        log.debug("allocator tuning not applied (not glibc, or refused); running with the system defaults")


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
    if resume:
        if output is None:
            raise ConfigError("resume needs the run folder to continue (--output RUN_DIR)")
        config = _resume_config(Path(output), config)
    if config is None:
        raise ConfigError("run_pipeline needs a config (or resume=True with an existing run folder)")
    config.validate()
    device = resolve_device(config.run.device)  # fail on a missing GPU before any work
    context, device = init_distributed(device)  # under torchrun: join the group, one device per rank
    progress = progress and context.is_main
    if resume:
        stage1_checkpoint, stage2_checkpoint = _resume_reused(Path(output), stage1_checkpoint, stage2_checkpoint)
    for checkpoint in (stage1_checkpoint, stage2_checkpoint):
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist")
    records = load_records(config.data, seed=config.run.seed)
    splits = split_records(records)
    _check_calibration_feasible([r.label for r in splits["val"]], config.calibration)
    # rank 0 alone writes the run folder; when it cannot create it, every rank stops with its error
    run_dir = Path(context.run_on_main(lambda: str(create_run_dir(
        output or default_run_dir(config.run.output_root, config.run.name), overwrite=overwrite, resume=resume))))
    log.info("run folder: %s (device %s%s)", run_dir, device,
             f", {context.world_size} processes" if context.enabled else "")
    _apply_process_settings(config.run.threads, config.run.tune_malloc)
    started = time.perf_counter()

    channels = config.data.channels or _infer_channels(splits["train"])
    config = replace(config, data=replace(config.data, channels=channels))
    if not resume and context.is_main:
        save_config(config, run_dir / RUN_FILES["config"])  # first, so an interrupted run can be resumed
        write_json(run_dir / RUN_FILES["reused"], {"stage1": stage1_checkpoint, "stage2": stage2_checkpoint})
    size = config.data.image_size
    decoded = {
        name: decode_records(recs, size, channels, config.data.invert_masks, desc=f"decode {name}", progress=progress)
        for name, recs in splits.items()
    }
    failed = [item for d in decoded.values() for item in d.failed]
    if len(decoded["train"]) < 2:
        raise DataError(
            f"only {len(decoded['train'])} readable normal training image(s) in {config.data.path or config.data.source!r}; "
            "the stages need at least 2"
        )
    if len(decoded["val"]) == 0:
        raise DataError("no readable validation image: calibration needs held-out normal images")
    val_normal = decoded["val"].labels == 0
    if not val_normal.any():
        raise DataError("the validation split holds no normal image: calibration needs held-out normal images")
    log.info(
        "images: %d train, %d val, %d test (%d unreadable), %d×%d, %d channel(s)",
        len(decoded["train"]), len(decoded["val"]), len(decoded["test"]), len(failed), size, size, channels,
    )
    decode_seconds = time.perf_counter() - started
    for name, stage_config, reused in (("stage1", config.stage1, stage1_checkpoint), ("stage2", config.stage2, stage2_checkpoint)):
        batch = min(stage_config.batch_size, len(decoded["train"]))
        if context.enabled and reused is None and batch % context.world_size:
            raise ConfigError(
                f"{name}.batch_size: the global batch of {batch} images does not split evenly over {context.world_size} "
                f"processes; choose a multiple of {context.world_size}"
            )

    # stage 1: train (or reuse), score validation and test images
    stage1 = _stage1(config, decoded["train"].images, run_dir, device, stage1_checkpoint and Path(stage1_checkpoint), progress,
                     resume, context)
    val1 = _score_stage1(stage1, decoded["val"].images, context, progress, "stage 1 score val")
    test1 = _score_stage1(stage1, decoded["test"].images, context, progress, "stage 1 score test")

    # stage 2: train (or reuse), fix map statistics on validation normals, score everything
    stage2 = _stage2(config, decoded["train"].images, run_dir, device, stage2_checkpoint and Path(stage2_checkpoint), progress,
                     resume, context)
    guided = stage2.config.guidance != "none"
    stage2.fit_normalisation(decoded["val"].images[val_normal], stage1_maps=val1.anomaly_maps[val_normal] if guided else None)
    if context.is_main:
        stage2.save(run_dir / RUN_FILES["checkpoints"] / "stage2.pt")
    val2 = _score_stage2(stage2, decoded["val"].images, val1.anomaly_maps if guided else None, context, progress,
                         "stage 2 score val")
    test2 = _score_stage2(stage2, decoded["test"].images, test1.anomaly_maps if guided else None, context, progress,
                          "stage 2 score test (all, for analysis)")
    config = replace(config, stage1=stage1.config, stage2=stage2.config)
    if context.is_main:
        save_config(config, run_dir / RUN_FILES["config"])

    table = pd.concat(
        [_score_table(decoded["val"], val1, val2.scores), _score_table(decoded["test"], test1, test2.scores)], ignore_index=True
    )
    errors = _error_rows(decoded, splits)
    if context.is_main:
        _write_scores(run_dir, table, errors)  # scores are safe on disk before anything can fail in calibration
    val = table[table["split"] == "val"]
    cascade = fit_cascade(val["stage1_loss"].to_numpy(), val["stage2_score"].to_numpy(), val["label"].to_numpy(),
                          config.calibration, fusion=config.cascade.fusion)

    # the deployment path, timed: stage 1 on every test image, stage 2 on the flagged ones only
    flagged_test = np.flatnonzero(test1.loss > cascade.stage1.value)
    cascade2 = _score_stage2(stage2, decoded["test"].images[flagged_test], test1.anomaly_maps[flagged_test] if guided else None,
                             context, progress, "stage 2 score flagged test")
    # the ranks part here: every collective is done on every rank (so none closes its connections
    # while another still needs them); rank 0 alone computes the metrics and writes the run folder
    context.barrier()
    if not context.is_main:
        return RunResult(run_dir=run_dir, metrics=None, scores=table)
    if not np.allclose(cascade2.scores, test2.scores[flagged_test], rtol=1e-4, atol=1e-5):
        log.warning("stage-2 scores of flagged images differ between batchings by up to %.3g",
                    float(np.max(np.abs(cascade2.scores - test2.scores[flagged_test]))))
    cascade_seconds = test1.seconds + cascade2.seconds

    test = table[table["split"] == "test"]
    labels, categories = test["label"].to_numpy(), _categories(test)
    masks, has_mask = decoded["test"].masks, decoded["test"].has_mask
    fused_maps = fused_anomaly_map(test1.anomaly_maps, test2.maps, stage2.map_mean_, stage2.map_std_)
    pixel = {
        "stage1": pixel_auroc(labels, masks, has_mask, test1.anomaly_maps),
        "stage2": pixel_auroc(labels, masks, has_mask, test2.maps),
        "fused": pixel_auroc(labels, masks, has_mask, fused_maps),
    }
    pro = {
        "stage1": pro_score(labels, masks, has_mask, test1.anomaly_maps),
        "stage2": pro_score(labels, masks, has_mask, test2.maps),
        "fused": pro_score(labels, masks, has_mask, fused_maps),
    }
    image = {
        "stage1": image_auroc(labels, test["stage1_loss"].to_numpy()),
        "stage2": image_auroc(labels, test["stage2_score"].to_numpy()),
    }
    write_atomic(
        run_dir / RUN_FILES["maps"] / "test_maps.npz",
        lambda tmp: np.savez_compressed(
            tmp,
            stage1=np.clip(np.rint(test1.anomaly_maps * 255), 0, 255).astype(np.uint8),  # 1 − A, ×255
            stage2=np.clip(test2.maps, -6e4, 6e4).astype(np.float16),  # standardised with validation normals
            masks=masks,
            has_mask=has_mask,
            images=decoded["test"].images,  # uint8 N×H×W×C, as the models saw them
            names=np.array([r.name for r in decoded["test"].records]),
        ),
    )
    write_json(run_dir / RUN_FILES["history"], {"stage1": stage1.history_, "stage2": stage2.history_})

    notes = {f"image_auroc.{k}": m.reason for k, m in image.items() if m.reason}
    notes.update({f"pixel_auroc.{k}": m.reason for k, m in pixel.items() if m.reason})
    notes.update({f"pro.{k}": m.reason for k, m in pro.items() if m.reason})
    for name, checkpoint in (("stage1", stage1_checkpoint), ("stage2", stage2_checkpoint)):
        if checkpoint is not None:
            notes[f"{name}.reused"] = f"{name} was not trained in this run: loaded from {checkpoint}"
    n_test = len(decoded["test"])
    metrics: dict[str, Any] = {
        "image_auroc": {k: m.value for k, m in image.items()},
        "image_auroc_stage1_components": {name: image_auroc(labels, test[name].to_numpy()).value for name in SCREENING_COMPONENTS},
        "image_auroc_stage1_by_category": _per_category_auroc(test, "stage1_loss"),
        "image_auroc_stage2_by_category": _per_category_auroc(test, "stage2_score"),
        "pixel_auroc": {k: m.value for k, m in pixel.items()},
        "pixel_auroc_stage1_by_category": pixel_auroc_by_category(labels, categories, masks, has_mask, test1.anomaly_maps),
        "pixel_auroc_fused_by_category": pixel_auroc_by_category(labels, categories, masks, has_mask, fused_maps),
        "pro": {k: m.value for k, m in pro.items()},
        "pro_max_fpr": 0.3,
        "thresholds": {"stage1": None, "stage2": None},
        "stage2_map_stats": {"mean": stage2.map_mean_, "std": stage2.map_std_},
        "images_per_s": {
            "stage1": test1.images_per_s,
            "stage2": test2.images_per_s,
            "cascade": n_test / cascade_seconds if cascade_seconds > 0 else None,
        },
        "seconds": {
            "decode": decode_seconds,
            "train_stage1": stage1.train_seconds_,
            "train_stage2": stage2.train_seconds_,
            "score": val1.seconds + test1.seconds + val2.seconds + test2.seconds + cascade2.seconds,
            "score_cascade_test": cascade_seconds,
            "total": time.perf_counter() - started,
        },
        "counts": {
            "train": len(decoded["train"]),
            "val": len(decoded["val"]),
            "test_normal": int((labels == 0).sum()),
            "test_anomalous": int((labels == 1).sum()),
            "test_flagged": len(flagged_test),
            "unreadable": len(failed),
        },
        "unreadable_images": [{"image": name, "reason": reason} for name, reason in failed],
        "epochs": {"stage1": len(stage1.history_), "stage2": len(stage2.history_)},
        "stage2_discriminator_resets": int(sum(h.get("discriminator_resets", 0) for h in stage2.history_)),
        "stage1_discriminator_resets": int(sum(h.get("discriminator_resets", 0) for h in stage1.history_)),
        "device": str(device),
        "processes": context.world_size,
        "notes": notes,
    }
    metrics = _apply_cascade(run_dir, table, cascade, metrics, errors)
    log.info(
        "done in %.1f s: image AUROC stage 1 %s, stage 2 %s, cascade %s; pixel AUROC %s / %s / fused %s; "
        "flagged %.1f%% of test images -> %s",
        metrics["seconds"]["total"], *(_auroc_text(metrics["image_auroc"][k]) for k in ("stage1", "stage2", "cascade")),
        *(_auroc_text(metrics["pixel_auroc"][k]) for k in ("stage1", "stage2", "fused")),
        100 * (metrics["flagged_fraction"] or 0.0), run_dir,
    )
    return RunResult(run_dir=run_dir, metrics=metrics, scores=table)


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
    scores_path = run_dir / RUN_FILES["scores"]
    if not scores_path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} has no {RUN_FILES['scores']}: run the pipeline first")
    table, errors = _split_errors(
        pd.read_csv(scores_path, keep_default_na=False, na_values=[""], dtype={"image": str, "category": str, "error": str})
    )
    missing = [c for c in ("split", "label", "stage1_loss", "stage2_score") if c not in table.columns]
    if missing:
        raise DataError(f"{str(scores_path)!r} lacks column(s) {missing}; it was not written by this version of twostage_ad")
    val = table[table["split"] == "val"]
    cascade = fit_cascade(val["stage1_loss"].to_numpy(), val["stage2_score"].to_numpy(), val["label"].to_numpy(),
                          chosen["stage1"], fusion=load_run_config(run_dir).cascade.fusion, calibration2=chosen["stage2"])
    metrics_path = run_dir / RUN_FILES["metrics"]
    metrics = _apply_cascade(run_dir, table, cascade, read_json(metrics_path) if metrics_path.is_file() else {}, errors)
    log.info("τ₁ %.6g (%s %s), τ₂ %.6g (%s %s): flags %.1f%% of test images, cascade AUROC %s",
             cascade.stage1.value, cascade.stage1.method, cascade.stage1.params, cascade.stage2.value, cascade.stage2.method,
             cascade.stage2.params, 100 * (metrics.get("flagged_fraction") or 0.0), _auroc_text(metrics["image_auroc"].get("cascade")))
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
    from twostage_ad.detector import TwoStageDetector, expand_image_paths

    output = Path(output)
    for path in (output, maps_path):
        if path is not None and Path(path).exists() and not overwrite:
            raise FileExistsError(f"{str(path)!r} exists; pass --overwrite (overwrite=True) to replace it")
    paths = expand_image_paths(inputs)
    _apply_process_settings(0, load_run_config(run_dir).run.tune_malloc if tune_malloc is None else tune_malloc)
    detector = TwoStageDetector.from_run(run_dir, device=device)
    result = detector.predict(paths, batch_size=batch_size, all_stages=all_stages, maps=maps_path is not None, progress=progress)
    table = result.to_frame()
    table["error"] = ""
    if result.failed:
        table = pd.concat([table, pd.DataFrame({"image": [n for n, _ in result.failed], "error": [r for _, r in result.failed]})],
                          ignore_index=True)
    write_atomic(output, lambda tmp: table.to_csv(tmp, index=False, float_format="%.9g"))
    if maps_path is not None:
        size = detector.image_size
        stage2 = np.full((len(result), size, size), np.nan, np.float16)
        for i, p in enumerate(result.images):
            if p.stage2_map is not None:
                stage2[i] = np.clip(p.stage2_map, -6e4, 6e4)
        write_atomic(Path(maps_path), lambda tmp: np.savez_compressed(
            tmp,
            images=np.array([p.image for p in result.images]),
            stage1=np.array([p.stage1_map for p in result.images], dtype=np.float32).reshape(-1, size, size),
            stage2=stage2,  # NaN where stage 2 did not run
        ))
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
