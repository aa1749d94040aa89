"""Plots and the HTML summary of a run, drawn from saved outputs (no model needed).

- loss distribution: seaborn ``histplot`` + ``kdeplot`` of the test screening loss, hue = label,
  with the calibrated threshold drawn;
- training curves of stage 1;
- overlays: test anomalies with their ground truth outlined and the anomaly map on one global
  colour scale (``1 − A`` in [0, 1], fixed, never per image), a colour bar and the 0.5 contour.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from twostage_ad.runs import write_atomic, write_text_atomic

__all__ = ["plot_loss_distribution", "plot_training_curves", "plot_overlays", "write_html_report"]

LABEL_NAMES = {0: "normal", 1: "anomalous"}
PALETTE = {"normal": "#4C72B0", "anomalous": "#DD5246"}


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
    test = table[table["split"] == "test"].copy()
    test["label"] = test["label"].map(LABEL_NAMES)
    fig, axes = _subplots()
    ax = axes[0, 0]
    if len(test):
        sns.histplot(
            data=test, x=score_column, hue="label", palette=PALETTE, stat="density", common_norm=False,
            element="step", alpha=0.3, log_scale=log_scale, ax=ax,
        )
        if test[score_column].nunique() > 1 and all(len(g) > 1 for _, g in test.groupby("label")):
            sns.kdeplot(
                data=test, x=score_column, hue="label", palette=PALETTE, common_norm=False,
                log_scale=log_scale, ax=ax, legend=False, warn_singular=False, cut=0,
            )
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2)
        ax.annotate(f"threshold {threshold:.4g}", xy=(threshold, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(4, -12), textcoords="offset points", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(score_column)
    return _save(fig, path)


def plot_training_curves(history: list[dict[str, float]], path: Path, *, title: str = "stage 1 training") -> Path:
    frame = pd.DataFrame(history)
    if frame.empty:
        return path
    columns = [c for c in frame.columns if c not in ("epoch", "seconds")]
    long = frame.melt(id_vars="epoch", value_vars=columns, var_name="loss", value_name="value")
    fig, axes = _subplots()
    ax = axes[0, 0]
    sns.lineplot(data=long, x="epoch", y="value", hue="loss", marker="o", ax=ax)
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


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def write_html_report(run_dir: Path, metrics: dict[str, Any], title: str) -> Path:
    """A small page beside the run's files: headline metrics and every plot in ``plots/``."""
    plots = sorted(str(p.relative_to(run_dir)) for p in (run_dir / "plots").glob("*.png"))
    rows = []
    for group in ("image_auroc", "pixel_auroc", "pro", "thresholds", "images_per_s", "seconds"):
        values = metrics.get(group)
        if not isinstance(values, dict):
            rows.append(f"<tr><td>{group}</td><td>{_fmt(values)}</td></tr>")
            continue
        for key, value in values.items():
            rows.append(f"<tr><td>{group}.{html.escape(key)}</td><td>{_fmt(value)}</td></tr>")
    for key in ("flagged_fraction", "stage1_recall_at_threshold", "cascade_recall", "cascade_false_positive_rate"):
        rows.append(f"<tr><td>{key}</td><td>{_fmt(metrics.get(key))}</td></tr>")
    notes = "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}</li>" for k, v in (metrics.get("notes") or {}).items())
    figures = "".join(
        f'<figure><img src="{html.escape(p)}" alt="{html.escape(p)}"><figcaption>{html.escape(p)}</figcaption></figure>'
        for p in plots
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td{{border:1px solid #ccc;padding:3px 10px}}
img{{max-width:100%;border:1px solid #ddd}}figure{{margin:1.5em 0}}</style></head>
<body><h1>{html.escape(title)}</h1>
<h2>Metrics (test split)</h2><table>{''.join(rows)}</table>
{f'<h3>Notes</h3><ul>{notes}</ul>' if notes else ''}
<h2>Plots</h2>{figures}
<p>Per-image decisions: <a href="scores.csv">scores.csv</a>; thresholds: <a href="thresholds.json">thresholds.json</a>.</p>
</body></html>
"""
    path = run_dir / "report.html"
    write_text_atomic(path, page)
    return path
