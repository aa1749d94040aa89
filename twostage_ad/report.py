"""Plots and the HTML summary of a run, drawn from saved outputs (no model needed).

- score distributions: seaborn ``histplot`` + ``kdeplot`` of a test score, hue = label (or the
  defect category), with the calibrated threshold drawn; a log-scale option;
- ROC curves of stage 1, stage 2 and the cascade with their AUROC in the legend;
- training curves of both stages;
- overlays: test anomalies with their ground truth outlined and the anomaly map on one global
  colour scale (``1 − A`` in [0, 1], fixed, never per image), a colour bar and the 0.5 contour;
  the cascade's map on the same images, in validation-normal σ on a fixed 0–6 σ scale;
- :func:`build_report`: all of them and ``report.html`` from a run folder.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from twostage_ad.cascade import Cascade
from twostage_ad.evaluate import operating_points
from twostage_ad.runs import RUN_FILES, TEST_MAPS, load_run_config, read_json, read_scores, write_atomic, write_text_atomic

__all__ = [
    "plot_loss_distribution",
    "plot_category_distribution",
    "plot_roc_curves",
    "plot_training_curves",
    "plot_overlays",
    "plot_map_pairs",
    "write_html_report",
    "auroc_text",
    "build_report",
]

log = logging.getLogger(__name__)

LABEL_NAMES = {0: "normal", 1: "anomalous"}
PALETTE = {"normal": "#4C72B0", "anomalous": "#DD5246"}
# the cascade's map is in σ of the validation normals' stage-1 pixels: its colour scale ends at 6 σ
# and its contour marks 3 σ, the same on every run, so two reports can be compared by eye
FUSED_SCALE_SIGMA = 6.0
FUSED_CONTOUR_SIGMA = 3.0


def _save(fig: Figure, path: Path) -> Path:
    """Figures are built without pyplot (no global backend switch, nothing left open)."""
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    return path


def _subplots(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (7, 4)) -> tuple[Figure, Any]:
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def plot_loss_distribution(
    table: pd.DataFrame, score_column: str, threshold: float | None, path: Path, *, title: str, log_scale: bool = False
) -> Path:
    """Histogram + KDE of ``score_column`` on the test rows, normal vs anomalous, threshold line."""
    test = table[(table["split"] == "test") & table[score_column].notna()].copy()
    test["label"] = test["label"].map(LABEL_NAMES)
    return _distribution(test, score_column, "label", PALETTE, threshold, path, title=title, log_scale=log_scale)


def plot_category_distribution(
    table: pd.DataFrame, score_column: str, threshold: float | None, path: Path, *, title: str, log_scale: bool = False
) -> Path:
    """Like :func:`plot_loss_distribution`, one colour per defect category (normals in grey)."""
    test = table[(table["split"] == "test") & table[score_column].notna()].copy()
    test["group"] = np.where(test["label"] == 0, "normal", test["category"].astype(str))
    groups = sorted(set(test["group"]) - {"normal"})
    palette = {"normal": "#7f7f7f", **dict(zip(groups, sns.color_palette("tab10", len(groups)).as_hex()))}
    return _distribution(test, score_column, "group", palette, threshold, path, title=title, log_scale=log_scale, histogram=False)


def _distribution(
    test: pd.DataFrame, score_column: str, hue: str, palette: dict[str, str], threshold: float | None, path: Path,
    *, title: str, log_scale: bool, histogram: bool = True,
) -> Path:
    """Histogram (optional) + KDE per ``hue`` group; one KDE line per group reads better for many groups."""
    fig, axes = _subplots()
    ax = axes[0, 0]
    if log_scale and len(test) and (test[score_column] <= 0).any():
        log_scale = False  # a log axis cannot show scores <= 0 (standardised stage-2 scores)
        title += " (linear: scores <= 0)"
    can_kde = len(test) and test[score_column].nunique() > 1 and all(len(g) > 1 for _, g in test.groupby(hue))
    if len(test) and (histogram or not can_kde):
        sns.histplot(
            data=test, x=score_column, hue=hue, palette=palette, stat="density", common_norm=False,
            element="step", alpha=0.3, log_scale=log_scale, ax=ax,
        )
    if can_kde:
        sns.kdeplot(
            data=test, x=score_column, hue=hue, palette=palette, common_norm=False,
            log_scale=log_scale, ax=ax, legend=not histogram, warn_singular=False, cut=0, linewidth=1.6,
        )
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2)
        ax.annotate(f"threshold {threshold:.4g}", xy=(threshold, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(4, -12), textcoords="offset points", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(score_column)
    return _save(fig, path)


def plot_roc_curves(table: pd.DataFrame, columns: dict[str, str], path: Path, *, title: str = "ROC, test split") -> Path:
    """ROC curve of each ``{legend name: score column}`` on the test rows, AUROC in the legend."""
    test = table[table["split"] == "test"]
    fig, axes = _subplots(figsize=(5.5, 5))
    ax = axes[0, 0]
    labels = test["label"].to_numpy()
    if len(np.unique(labels)) == 2:
        for name, column in columns.items():
            scores = test[column].to_numpy(dtype=float)
            if not np.all(np.isfinite(scores)):
                continue
            fpr, tpr, _ = roc_curve(labels, scores)
            ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(labels, scores):.3f})", linewidth=1.5)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_operating_points(points: pd.DataFrame, path: Path, *, title: str = "the screen's operating point (test split)") -> Path:
    """Recall, cascade AUROC and throughput against the share of validation normals τ₁ flags
    (:func:`twostage_ad.evaluate.operating_points`); the run's own τ₁ marked."""
    fig, axes = _subplots(figsize=(7, 4.5))
    ax = axes[0, 0]
    measures = {"stage1_recall": "stage-1 recall (flagged anomalies)", "cascade_recall": "cascade recall",
                "cascade_auroc": "cascade AUROC", "test_normals_flagged": "test normals flagged"}
    present = [c for c in measures if c in points and points[c].notna().any()]
    long = points.melt(id_vars=["val_normals_flagged", "current"], value_vars=present, var_name="measure", value_name="value")
    long["measure"] = long["measure"].map(measures)
    sns.lineplot(data=long[~long["current"]], x="val_normals_flagged", y="value", hue="measure", marker="o", ax=ax,
                 estimator=None, errorbar=None)  # quantiles that tie (few validation normals) are points, not means
    current = points[points["current"]]
    if len(current):
        ax.axvline(float(current["val_normals_flagged"].iloc[0]), color="grey", linestyle="--", linewidth=1, label="τ₁ of this run")
    ax.set_xlabel("share of validation normals flagged (1 − q)")
    ax.set_ylabel("share / AUROC")
    ax.set_ylim(-0.02, 1.02)
    if "images_per_s" in points and points["images_per_s"].notna().any():
        speed = ax.twinx()
        ordered = points[~points["current"]].sort_values("val_normals_flagged")
        speed.plot(ordered["val_normals_flagged"], ordered["images_per_s"], color="black", linestyle=":", marker="x",
                   label="images/s (right)")
        speed.set_ylabel("cascade images/s (deployment path)")
        speed.set_ylim(bottom=0)
        speed.legend(loc="lower right", fontsize=8)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def plot_training_curves(history: list[dict[str, float]], path: Path, *, title: str = "stage 1 training") -> Path:
    frame = pd.DataFrame(history)
    if frame.empty:
        return path
    x = "steps" if "steps" in frame else "epoch"  # optimiser steps at each epoch's end (a capped last epoch is short)
    columns = [c for c in frame.columns if c not in ("epoch", "steps", "seconds", "out_of_time")]
    long = frame.melt(id_vars=x, value_vars=columns, var_name="loss", value_name="value")
    fig, axes = _subplots()
    ax = axes[0, 0]
    sns.lineplot(data=long, x=x, y="value", hue="loss", marker="o", ax=ax)
    ax.set_xlabel("optimiser steps" if x == "steps" else "epoch")
    ax.set_yscale("log")
    ax.set_title(title)
    return _save(fig, path)


def plot_overlays(
    images: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray,
    titles: list[str],
    path: Path,
    *,
    vmax: float = 1.0,
    contour: float = 0.5,
    map_label: str = "anomaly (1 − A)",
) -> Path:
    """Rows of (image with ground truth outlined, anomaly map overlay), one global colour scale."""
    n = len(images)
    fig, axes = _subplots(n, 2, figsize=(6, 3 * max(n, 1)))
    mappable = None
    for row in range(n):
        image = images[row]
        grey = image[..., 0] if image.shape[-1] == 1 else None
        left, right = axes[row]
        for ax in (left, right):
            if grey is not None:
                ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
        if masks[row].any():
            left.contour(masks[row], levels=[0.5], colors="lime", linewidths=1.0)
        left.set_title(titles[row], fontsize=8)
        mappable = right.imshow(maps[row], cmap="inferno", vmin=0.0, vmax=vmax, alpha=0.6)
        if maps[row].max() > contour:
            right.contour(maps[row], levels=[contour], colors="cyan", linewidths=0.8)
        right.set_title(f"max {maps[row].max():.2f}", fontsize=8)
    if mappable is not None:
        fig.colorbar(mappable, ax=axes[:, 1].tolist(), shrink=0.6, label=map_label)
    return _save(fig, path)


def plot_map_pairs(
    images: np.ndarray,
    stage1_maps: np.ndarray,
    stage2_maps: np.ndarray,
    masks: np.ndarray,
    titles: list[str],
    path: Path,
    *,
    stage2_max: float,
    stage2_level: float,
) -> Path:
    """Rows of (image + ground truth, stage-1 map on [0, 1], stage-2 map on [0, ``stage2_max``])."""
    n = len(images)
    fig = Figure(figsize=(8.5, 2.8 * max(n, 1) + 0.6))
    # one extra thin row holds the colour bars, so they never cover or shift an image
    grid = fig.subplots(max(n, 1) + 1, 3, squeeze=False, gridspec_kw={"height_ratios": [1.0] * max(n, 1) + [0.06]})
    axes, bars = grid[:-1], grid[-1]
    bars[0].axis("off")
    shown = [None, None]
    for row in range(n):
        image = images[row]
        for ax in axes[row]:
            if image.shape[-1] == 1:
                ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if masks[row].any():
                ax.contour(masks[row], levels=[0.5], colors="lime", linewidths=0.8)
        axes[row, 0].set_title(titles[row], fontsize=8)
        shown[0] = axes[row, 1].imshow(stage1_maps[row], cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.6)
        axes[row, 1].set_title(f"stage 1, max {stage1_maps[row].max():.2f}", fontsize=8)
        shown[1] = axes[row, 2].imshow(stage2_maps[row], cmap="inferno", vmin=0.0, vmax=stage2_max, alpha=0.6)
        if stage2_maps[row].max() > stage2_level:
            axes[row, 2].contour(stage2_maps[row], levels=[stage2_level], colors="cyan", linewidths=0.8)
        axes[row, 2].set_title(f"stage 2, max {stage2_maps[row].max():.2f}", fontsize=8)
    if n:
        fig.colorbar(shown[0], cax=bars[1], orientation="horizontal", label="stage 1 (1 − A)")
        fig.colorbar(shown[1], cax=bars[2], orientation="horizontal", label="stage 2 (validation-normal σ)")
    return _save(fig, path)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


PLOT_CAPTIONS = {
    "roc.png": "ROC curves on the test split: stage 1 alone, stage 2 alone (scored on every image), the cascade.",
    "stage1_loss_distribution.png": "Stage-1 screening loss of test images; the dashed line is τ₁ (above it: flagged).",
    "stage1_loss_by_category.png": "Stage-1 screening loss by defect category.",
    "stage2_score_distribution.png": "Stage-2 image score of every test image (for analysis; the cascade only runs it on flagged ones).",
    "stage2_score_by_category.png": "Stage-2 image score by defect category.",
    "cascade_score_distribution.png": "Cascade score: (0, 0.5] unflagged, (1, 2) flagged; above 1.5 decided anomalous.",
    "cascade_score_by_category.png": "Cascade score by defect category.",
    "worst_false_negatives.png": "Anomalies the cascade let through, lowest cascade score first, with both maps.",
    "worst_false_positives.png": "Normal images the cascade rejected, highest cascade score first, with both maps.",
    "stage1_overlays.png": "Stage-1 anomaly map (1 − A) on test anomalies; ground truth in green; one fixed colour scale.",
    "cascade_overlays.png": (f"The cascade's map (predict's 'fused') on the same test anomalies: stage 1's map in σ of the "
                             "validation normals' pixels plus cascade.map_weight × stage 2's where the image was flagged; "
                             f"colour scale 0–{FUSED_SCALE_SIGMA:g} σ, cyan contour at {FUSED_CONTOUR_SIGMA:g} σ."),
    "stage2_overlays_flagged.png": "Stage-2 map on flagged test images, in σ of validation-normal cells; cyan contour at the decision level.",
    "operating_points.png": ("What moving τ₁ does: recall of the screen and of the cascade, the cascade's AUROC, the "
                             "share of test normals flagged and the throughput, against the share of validation normals "
                             "flagged (calibrate --stage 1 --method quantile --q Q sets τ₁ at a row; table in operating_points.csv)."),
    "stage1_training.png": "Stage-1 training losses per epoch.",
    "stage2_training.png": "Stage-2 training losses per epoch.",
}


def _stage_table(metrics: dict[str, Any]) -> str:
    """Rows = metrics, columns = stage 1 / stage 2 / cascade (fused maps for pixel metrics)."""
    rows = [("image AUROC", "image_auroc", ("stage1", "stage2", "cascade")),
            ("image AUROC, synthetic defects on validation normals (no test label)", "synthetic_image_auroc",
             ("stage1", "stage2", "cascade")),
            ("pixel AUROC", "pixel_auroc", ("stage1", "stage2", "fused")),
            ("pixel AUROC, synthetic defects on validation normals (no test label)", "synthetic_pixel_auroc",
             ("stage1", "stage2", "fused")),
            ("PRO (FPR ≤ 0.3)", "pro", ("stage1", "stage2", "fused")),
            ("PRO, synthetic defects on validation normals (no test label)", "synthetic_pro", ("stage1", "stage2", "fused")),
            ("threshold (τ₁; τ₂ on the second-stage score)", "thresholds", ("stage1", "stage2", None)),
            ("images/s", "images_per_s", ("stage1", "stage2", "cascade"))]
    out = ["<tr><th></th><th>stage 1</th><th>stage 2</th><th>cascade (fused maps)</th></tr>"]
    synthetic = metrics.get("synthetic_val") or {}
    for name, group, keys in rows:
        values = synthetic.get(group.removeprefix("synthetic_")) if group.startswith("synthetic_") else metrics.get(group)
        if group == "synthetic_pixel_auroc" and values is None and "pixel_auroc_stage1" in synthetic:  # older metrics.json
            values = {"stage1": synthetic["pixel_auroc_stage1"]}
        cells = [_fmt(values.get(k)) if isinstance(values, dict) and k else "—" for k in keys]
        out.append(f"<tr><td>{name}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "<table>" + "".join(out) + "</table>"


_CATEGORY_COLUMNS = (("image AUROC stage 1", "image_auroc_stage1_by_category"),
                     ("stage 2", "image_auroc_stage2_by_category"),
                     ("cascade", "image_auroc_cascade_by_category"),
                     ("pixel AUROC stage 1", "pixel_auroc_stage1_by_category"),
                     ("fused", "pixel_auroc_fused_by_category"))


def _category_table(metrics: dict[str, Any]) -> str:
    """Rows = defect categories (each against the normal test images), columns = image and pixel AUROC."""
    columns = [(name, metrics.get(key) or {}) for name, key in _CATEGORY_COLUMNS]
    categories = sorted({c for _, values in columns for c in values})
    if not any(categories):  # no categories at all (or only anomalies without one): nothing to break down
        return ""
    out = ["<tr><th>category</th>" + "".join(f"<th>{html.escape(name)}</th>" for name, _ in columns) + "</tr>"]
    for category in categories:
        cells = "".join(f"<td>{_fmt(values.get(category))}</td>" for _, values in columns)
        out.append(f"<tr><td>{html.escape(category or '(none)')}</td>{cells}</tr>")
    return "<h2>By defect category (each against the normal test images)</h2><table>" + "".join(out) + "</table>"


def _confusion_table(confusion: dict[str, dict[str, int]]) -> str:
    out = ["<tr><th></th><th>anomalous, caught</th><th>anomalous, missed</th><th>normal, passed</th><th>normal, rejected</th></tr>"]
    for name, counts in confusion.items():
        cells = [counts.get(k) for k in ("true_positive", "false_negative", "true_negative", "false_positive")]
        out.append(f"<tr><td>{html.escape(name.replace('_', ' '))}</td>" + "".join(f"<td>{_fmt(c)}</td>" for c in cells) + "</tr>")
    return "<table>" + "".join(out) + "</table>"


def write_html_report(run_dir: Path, metrics: dict[str, Any], title: str) -> Path:
    """One page beside the run's files: headline metrics, confusion counts, notes and every plot."""
    present = {p.name for p in (run_dir / "plots").glob("*.png")}
    ordered = [name for name in PLOT_CAPTIONS if name in present] + sorted(present - set(PLOT_CAPTIONS))
    rows = []
    for key in ("flagged_fraction", "stage1_recall_at_threshold", "stage1_false_positive_rate", "cascade_recall",
                "cascade_false_positive_rate"):
        rows.append(f"<tr><td>{key.replace('_', ' ')}</td><td>{_fmt(metrics.get(key))}</td></tr>")
    for key, value in (metrics.get("seconds") or {}).items():
        rows.append(f"<tr><td>seconds {html.escape(key.replace('_', ' '))}</td><td>{_fmt(value)}</td></tr>")
    counts = ", ".join(f"{html.escape(k.replace('_', ' '))} {v}" for k, v in (metrics.get("counts") or {}).items())
    notes = "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}</li>" for k, v in (metrics.get("notes") or {}).items())
    unreadable, masks = ("".join(f"<li>{html.escape(u['image'])}: {html.escape(u['reason'])}</li>" for u in metrics.get(key, []))
                         for key in ("unreadable_images", "unusable_masks"))
    figures = "".join(
        f'<figure><img src="plots/{html.escape(name)}" alt="{html.escape(name)}">'
        f"<figcaption>{html.escape(PLOT_CAPTIONS.get(name, name))}</figcaption></figure>"
        for name in ordered
    )
    confusion = metrics.get("confusion")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:0.5em 0}}td,th{{border:1px solid #ccc;padding:3px 10px;text-align:right}}
td:first-child{{text-align:left}}img{{max-width:100%;border:1px solid #ddd}}figure{{margin:1.5em 0}}
figcaption{{color:#555;font-size:0.9em}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Images: {counts}.</p>
<h2>Accuracy and speed</h2>{_stage_table(metrics)}
{_category_table(metrics)}
<h2>Decisions at the calibrated thresholds (test split)</h2>{_confusion_table(confusion) if confusion else '<p>—</p>'}
<table>{''.join(rows)}</table>
{f'<h3>Notes</h3><ul>{notes}</ul>' if notes else ''}
{f'<h3>Unreadable images (skipped)</h3><ul>{unreadable}</ul>' if unreadable else ''}
{f'<h3>Masks not used (their images kept, without pixel metrics)</h3><ul>{masks}</ul>' if masks else ''}
<h2>Plots</h2>{figures}
<p>Per-image scores and decisions: <a href="scores.csv">scores.csv</a>; thresholds and their history:
<a href="thresholds.json">thresholds.json</a>; all numbers: <a href="metrics.json">metrics.json</a>;
configuration: <a href="config.yaml">config.yaml</a>.</p>
</body></html>
"""
    path = run_dir / "report.html"
    write_text_atomic(path, page)
    return path


# --------------------------------------------------------------------------------------------
# the whole report, from a run folder's saved files alone


def auroc_text(value: float | None) -> str:
    """An AUROC for people: four decimals, ``n/a`` when undefined."""
    return "n/a" if value is None else f"{value:.4f}"


def build_report(run_dir: str | Path, *, log_scale: bool = False, examples: int | None = None) -> Path:
    """Draw every plot and write ``report.html`` from a run folder's files; no model is loaded.

    Score distributions (by label and by defect category, threshold lines, optional log scale),
    ROC curves of both stages and the cascade, training curves, heat-map overlays (stage 1 and the
    cascade's map on test anomalies, stage 2 on flagged test images) and the worst false negatives and false positives
    of the cascade with both maps, all on colour scales fixed from validation normals.
    """
    run_dir = Path(run_dir)
    table = read_scores(run_dir)[0]
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
        title = f"{name}, AUROC {auroc_text(auroc.get(key))}"
        plot_loss_distribution(table, column, threshold, plots / f"{column}_distribution.png", title=title, log_scale=log_scale)
        if test.loc[test["label"] == 1, "category"].nunique() > 1:
            plot_category_distribution(table, column, threshold, plots / f"{column}_by_category.png", title=title, log_scale=log_scale)
    plot_roc_curves(table, {"stage 1": "stage1_loss", "stage 2": "stage2_score", "cascade": "cascade_score"}, plots / "roc.png")
    if test["stage2_score"].notna().all() and len(test):  # stage 2 scored every test image: τ₁ can move
        speed = metrics.get("images_per_s") or {}
        per_image = {k: 1.0 / speed[k] if speed.get(k) else None for k in ("stage1", "stage2")}
        points = operating_points(table, cascade, stage1_seconds=per_image["stage1"], stage2_seconds=per_image["stage2"])
        write_atomic(run_dir / RUN_FILES["operating_points"], lambda tmp: points.to_csv(tmp, index=False, float_format="%.6g"))
        plot_operating_points(points, plots / "operating_points.png")
    history_path = run_dir / RUN_FILES["history"]
    history = read_json(history_path) if history_path.is_file() else {}
    for stage, rows in history.items():
        plot_training_curves([{k: v for k, v in h.items() if k != "discriminator_resets"} for h in rows],
                             plots / f"{stage}_training.png", title=f"{stage.replace('stage', 'stage ')} training")
    maps_path = run_dir / RUN_FILES["maps"] / TEST_MAPS
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
    if len(chosen) and cascade.map_fusion is not None:  # runs calibrated before the fused map have none
        ran2 = test["flagged"].to_numpy(bool)[chosen]  # as predict makes it: stage 2's term only where stage 2 ran
        fused = cascade.map_fusion.apply(stage1[chosen], np.where(ran2[:, None, None], stage2[chosen], np.float32(0.0)))
        plot_overlays(images[chosen], fused, masks[chosen], [title(i) for i in chosen], plots / "cascade_overlays.png",
                      vmax=FUSED_SCALE_SIGMA, contour=FUSED_CONTOUR_SIGMA, map_label="cascade map (validation-normal σ)")
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
