"""Evaluation: the score table, the cascade's decisions on it, and every metric of ``metrics.json``.

Pure functions of scores, labels and maps (no model, no files): ``run`` and ``calibrate`` both
call :func:`decide` and :func:`threshold_metrics`, so a re-calibrated run reports exactly what a
run with those thresholds would (docs/design.md §7). Test labels are used here only, to measure.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from twostage_ad.cascade import Cascade, MapFusion
from twostage_ad.data.augment import HELD_OUT_KINDS
from twostage_ad.data.records import Record
from twostage_ad.metrics import (
    MetricResult,
    image_auroc,
    image_auroc_by_category,
    pixel_auroc,
    pixel_auroc_by_category,
    pro_score,
    recall_at_threshold,
    usable_for_pixels,
)
from twostage_ad.stages.attention import SCREENING_COMPONENTS

if TYPE_CHECKING:
    from twostage_ad.detector import CascadeScores

__all__ = ["DECISION_COLUMNS", "OPERATING_QUANTILES", "PRO_MAX_FPR", "decide", "map_metrics", "merge_threshold_metrics",
           "operating_points", "score_metrics", "score_table", "synthetic_validation_metrics", "threshold_metrics"]

PRO_MAX_FPR = 0.3
# τ₁ at these quantiles of validation normals' screening losses: from every image (0: τ₁ = −∞) to 1 % of normals
OPERATING_QUANTILES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)
DECISION_COLUMNS = ("flagged", "stage2_decision_score", "cascade_score", "decision")  # what decide() adds


def score_table(records: list[Record], stage1_loss: np.ndarray, components: dict[str, np.ndarray], stage2_score: np.ndarray) -> pd.DataFrame:
    """One row per scored image: ``image, label, split, category, stage1_loss``, its components, ``stage2_score``."""
    table = pd.DataFrame({
        "image": [r.name for r in records],
        "label": [r.label for r in records],
        "split": [r.split for r in records],
        "category": [r.category for r in records],
        "stage1_loss": stage1_loss,
    })
    for name in SCREENING_COMPONENTS:
        table[name] = components[name]
    table["stage2_score"] = stage2_score
    return table


def decide(table: pd.DataFrame, cascade: Cascade) -> pd.DataFrame:
    """The table with the cascade's columns: ``flagged, stage2_decision_score, cascade_score, decision``."""
    out = cascade.apply(table["stage1_loss"].to_numpy(), table["stage2_score"].to_numpy())
    return table.assign(**dict(zip(DECISION_COLUMNS, (out.flagged, out.second_score, out.cascade_score, out.decision))))


def _test_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["split"] == "test"]


def _categories(test: pd.DataFrame) -> np.ndarray:
    """Test rows' categories as strings, blank for none (NaN after a CSV round trip)."""
    return test["category"].fillna("").astype(str).to_numpy()


def _by_category(test: pd.DataFrame, column: str) -> dict[str, float | None]:
    return image_auroc_by_category(test["label"].to_numpy(), _categories(test), test[column].to_numpy())


def _notes(prefix: str, results: dict[str, MetricResult]) -> dict[str, str]:
    return {f"{prefix}.{k}": m.reason for k, m in results.items() if m.reason}


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


def score_metrics(table: pd.DataFrame) -> dict[str, Any]:
    """Image AUROC of each stage alone (and of each screening component), overall and by category."""
    test = _test_rows(table)
    labels = test["label"].to_numpy()
    image = {"stage1": image_auroc(labels, test["stage1_loss"].to_numpy()), "stage2": image_auroc(labels, test["stage2_score"].to_numpy())}
    return {
        "image_auroc": {k: m.value for k, m in image.items()},
        "image_auroc_stage1_components": {name: image_auroc(labels, test[name].to_numpy()).value for name in SCREENING_COMPONENTS},
        "image_auroc_stage1_by_category": _by_category(test, "stage1_loss"),
        "image_auroc_stage2_by_category": _by_category(test, "stage2_score"),
        "notes": _notes("image_auroc", image),
    }


def map_metrics(
    table: pd.DataFrame, masks: np.ndarray, has_mask: np.ndarray, stage1_maps: np.ndarray, stage2_maps: np.ndarray,
    fusion: MapFusion,
) -> dict[str, Any]:
    """Pixel AUROC and PRO of stage 1's map, stage 2's map and their fusion, on the test rows in order."""
    test = _test_rows(table)
    labels, categories = test["label"].to_numpy(), _categories(test)
    fused = fusion.apply(stage1_maps, stage2_maps)
    maps = {"stage1": stage1_maps, "stage2": stage2_maps, "fused": fused}
    pixel = {k: pixel_auroc(labels, masks, has_mask, m) for k, m in maps.items()}
    pro = {k: pro_score(labels, masks, has_mask, m, max_fpr=PRO_MAX_FPR) for k, m in maps.items()}
    anomalous = int((labels == 1).sum())
    with_mask = int((usable_for_pixels(labels, masks, has_mask) & (labels == 1)).sum())
    notes = {**_notes("pixel_auroc", pixel), **_notes("pro", pro)}
    if 0 < with_mask < anomalous:
        notes["pixel_auroc.masks"] = (f"{anomalous - with_mask} of {anomalous} test anomalies have no usable mask (none "
                                      "given, unreadable or empty): the pixel metrics leave them out")
    return {
        "test_anomalous_with_mask": with_mask,
        "pixel_auroc": {k: m.value for k, m in pixel.items()},
        "pixel_auroc_stage1_by_category": pixel_auroc_by_category(labels, categories, masks, has_mask, stage1_maps),
        "pixel_auroc_fused_by_category": pixel_auroc_by_category(labels, categories, masks, has_mask, fused),
        "pro": {k: m.value for k, m in pro.items()},
        "pro_max_fpr": PRO_MAX_FPR,
        "map_fusion": asdict(fusion),
        "notes": notes,
    }


def threshold_metrics(table: pd.DataFrame, cascade: Cascade) -> dict[str, Any]:
    """Everything that depends on τ₁ and τ₂, from a :func:`decide`-d table: flag share, recalls and
    false-positive rates, the cascade's AUROC (moving τ₁ changes which images stage 2 orders),
    thresholds, calibration methods and confusion counts."""
    test = _test_rows(table)
    labels = test["label"].to_numpy()
    normal, anomalous = labels == 0, labels == 1
    cascade_auroc = image_auroc(labels, test["cascade_score"].to_numpy())
    return {
        "flagged_fraction": float(test["flagged"].mean()) if len(test) else None,
        "stage1_recall_at_threshold": recall_at_threshold(labels, test["stage1_loss"].to_numpy(), cascade.stage1.value).value,
        "stage1_false_positive_rate": float(test.loc[normal, "flagged"].mean()) if normal.any() else None,
        "cascade_recall": float(test.loc[anomalous, "decision"].mean()) if anomalous.any() else None,
        "cascade_false_positive_rate": float(test.loc[normal, "decision"].mean()) if normal.any() else None,
        "image_auroc_cascade": cascade_auroc,
        "image_auroc_cascade_by_category": _by_category(test, "cascade_score"),
        "thresholds": {"stage1": cascade.stage1.value, "stage2": cascade.stage2.value},
        "calibration": {
            "stage1": {"method": cascade.stage1.method, "params": cascade.stage1.params},
            "stage2": {"method": cascade.stage2.method, "params": cascade.stage2.params},
            "fusion": cascade.fusion,
        },
        "confusion": {"stage1_flag": _confusion(test, "flagged"), "cascade_decision": _confusion(test, "decision")},
    }


def merge_threshold_metrics(metrics: dict[str, Any], table: pd.DataFrame, cascade: Cascade) -> dict[str, Any]:
    """``metrics`` with every threshold-dependent entry replaced by this cascade's."""
    extra = threshold_metrics(table, cascade)
    cascade_auroc: MetricResult = extra.pop("image_auroc_cascade")
    merged = {**metrics, **extra}
    merged["image_auroc"] = {**metrics.get("image_auroc", {}), "cascade": cascade_auroc.value}
    notes = {k: v for k, v in metrics.get("notes", {}).items() if k != "image_auroc.cascade"}
    if cascade_auroc.reason:
        notes["image_auroc.cascade"] = cascade_auroc.reason
    merged["notes"] = notes
    return merged


def synthetic_validation_metrics(
    validation: CascadeScores, val_labels: np.ndarray, synthetic: CascadeScores, masks: np.ndarray, kinds: list[str],
    cascade: Cascade, fusion: MapFusion,
) -> dict[str, Any]:
    """How well the run separates the validation normals from the same normals with a synthetic
    defect each (drawn apart from training's): a score for choosing settings without test labels.

    ``validation``: the scored validation split (``val_labels``); ``synthetic``: the defective
    copies of its normals, ``masks`` ``N×H×W`` (1 = defect) and ``kinds`` (``HELD_OUT_KINDS`` are
    never drawn in training; ``image_auroc_<stage>_held_out_kinds`` scores those alone); ``cascade``: the
    calibrated cascade (the screen's recall on the synthetic defects is at its τ₁); ``fusion``: how
    the cascade's map is made (pixel AUROC and PRO of each stage's map and of the fused one).
    """
    normal = np.asarray(val_labels) == 0
    labels = np.r_[np.zeros(normal.sum(), int), np.ones(len(synthetic), int)]
    stage1 = np.r_[validation.stage1.loss[normal], synthetic.stage1.loss]
    stage2 = np.r_[validation.stage2.scores[normal], synthetic.stage2.scores]
    scores = {"stage1": stage1, "stage2": stage2, "cascade": cascade.apply(stage1, stage2).cascade_score}
    map1 = np.concatenate([validation.stage1.anomaly_maps[normal], synthetic.stage1.anomaly_maps])
    map2 = np.concatenate([validation.stage2.maps[normal], synthetic.stage2.maps])
    maps = {"stage1": map1, "stage2": map2, "fused": fusion.apply(map1, map2)}
    all_masks = np.concatenate([np.zeros((int(normal.sum()), *masks.shape[1:]), dtype=np.uint8), masks])
    with_mask = np.ones(len(labels), bool)
    categories = np.array(["normal"] * int(normal.sum()) + list(kinds))
    held_out = (labels == 0) | np.isin(categories, HELD_OUT_KINDS)  # kinds training never drew
    by_stage = {}
    for name in ("stage1", "stage2"):
        by_stage[f"image_auroc_{name}_by_kind"] = image_auroc_by_category(labels, categories, scores[name])
    for name, values in scores.items():
        by_stage[f"image_auroc_{name}_held_out_kinds"] = image_auroc(labels[held_out], values[held_out]).value
    return {
        "images": len(synthetic),
        "image_auroc": {k: image_auroc(labels, v).value for k, v in scores.items()},
        "pixel_auroc": {k: pixel_auroc(labels, all_masks, with_mask, m).value for k, m in maps.items()},
        "pro": {k: pro_score(labels, all_masks, with_mask, m, max_fpr=PRO_MAX_FPR).value for k, m in maps.items()},
        **by_stage,
        "stage1_recall_at_threshold": recall_at_threshold(labels, stage1, cascade.stage1.value).value,
    }


def operating_points(
    table: pd.DataFrame, cascade: Cascade, *, stage1_seconds: float | None = None, stage2_seconds: float | None = None,
    quantiles: tuple[float, ...] = OPERATING_QUANTILES,
) -> pd.DataFrame:
    """The screen's trade-off: the cascade at τ₁ set to each ``quantile`` of validation normals'
    screening losses (τ₂ and the fusion statistics as calibrated; ``q = 0``: τ₁ = −∞, stage 2 on
    every image), one row each, plus the run's own τ₁ (``current`` True). Columns: ``q``, ``tau1``, ``val_normals_flagged`` (what the
    quantile promises), ``test_normals_flagged``, ``test_flagged``, ``stage1_recall``,
    ``cascade_recall``, ``cascade_false_positive_rate``, ``cascade_auroc`` and, given the stages'
    seconds per image, ``images_per_s`` of the deployment path on the test split (stage 1 on
    every image, stage 2 on the flagged share). Needs stage-2 scores of every test image (``run``
    writes them). Test labels measure; they choose nothing.
    """
    val, test = table[table["split"] == "val"], _test_rows(table)
    normal_val = val.loc[val["label"] == 0, "stage1_loss"].to_numpy()
    labels = test["label"].to_numpy()
    loss, second = test["stage1_loss"].to_numpy(), test["stage2_score"].to_numpy()
    # q = 0: τ₁ = −∞, every image goes to stage 2
    taus = [(float(q), float(np.quantile(normal_val, q)) if q > 0 else -np.inf, False) for q in quantiles] if len(normal_val) else []
    taus.append((float((normal_val <= cascade.stage1.value).mean()) if len(normal_val) else np.nan, cascade.stage1.value, True))
    rows = []
    for q, tau, current in taus:
        out = replace(cascade, stage1=replace(cascade.stage1, value=tau)).apply(loss, second)
        flagged = out.flagged
        row = {
            "q": q, "tau1": tau, "current": current,
            "val_normals_flagged": float((normal_val > tau).mean()) if len(normal_val) else np.nan,
            "test_normals_flagged": float(flagged[labels == 0].mean()) if (labels == 0).any() else np.nan,
            "test_flagged": float(flagged.mean()) if len(flagged) else np.nan,
            "stage1_recall": float(flagged[labels == 1].mean()) if (labels == 1).any() else np.nan,
            "cascade_recall": float(out.decision[labels == 1].mean()) if (labels == 1).any() else np.nan,
            "cascade_false_positive_rate": float(out.decision[labels == 0].mean()) if (labels == 0).any() else np.nan,
            "cascade_auroc": image_auroc(labels, out.cascade_score).value,
        }
        if stage1_seconds is not None and stage2_seconds is not None:
            per_image = stage1_seconds + stage2_seconds * row["test_flagged"]
            row["images_per_s"] = 1.0 / per_image if per_image > 0 else np.nan
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["val_normals_flagged", "current"], ascending=[False, True], ignore_index=True)
