"""Re-score finished runs: cascade fusion rules, seed ensembles, map statistics, flipped views,
per-position normality.

    python benchmarks/rescore.py fusion RUN_DIR [RUN_DIR ...]      # e.g. runs-root/*/*/seed*
    python benchmarks/rescore.py ensemble RUN_DIR [RUN_DIR ...]    # runs of one data set, different seeds
    python benchmarks/rescore.py maps RUN_DIR [RUN_DIR ...]        # from maps/test_maps.npz
    python benchmarks/rescore.py flips RUN_DIR [RUN_DIR ...]       # loads checkpoints/stage1.pt
    python benchmarks/rescore.py positions RUN_DIR [RUN_DIR ...]   # loads checkpoints/stage1.pt and the data
    python benchmarks/rescore.py scales WHOLE_RUN TILED_RUN        # two screens of one data set, fused

``fusion`` and ``ensemble`` work on each run's ``scores.csv`` and ``config.yaml`` only (validation
and test scores of both stages), ``maps`` on its saved test maps; ``flips`` and ``positions`` load
its stage-1 checkpoint, ``positions`` its data too. Statistics and thresholds come from normal
images (validation normals, as the pipeline does; ``positions`` also tries training normals);
test labels are used only for the reported metrics.

``fusion``: for every run (with ``--synthetic``: on its validation normals beside their
synthetic-defect copies from ``synthetic_scores.csv``, no test label), the cascade (stage-1 threshold from the run's calibration, flagged
images ordered by their second-stage score) with the second-stage score ``z1 + w·z2`` for
w = 0, 0.25, 0.5, 1 (``sum``), 2, with ``max(z1, z2)`` (``max``) and with the stage-2 score alone
(``stage2``); ``z`` = a stage's score standardised by validation normals. Reports cascade image
AUROC, and the false-positive and true-positive rates at the calibrated thresholds for the
package's three fusion modes. Rows are grouped by data set (the run's ``run.name``).

``ensemble``: the mean of the runs' standardised stage-1 scores, for every subset size; reports
the mean, min and max test AUROC over the subsets of each size.

``maps``: from the saved stage-1 maps (1 − A rounded to 8 bits) and masks: pixel AUROC by defect
category and pooled, pooled after a Gaussian blur (σ = 8 px), the image AUROC of the top-k mean
of the blurred per-pixel BCE for several top-k shares and with a 4 or 8 px border left out, and
the mean map of normal test images in the last 4 columns and in the middle column.

``scales``: two runs of one data set (e.g. the whole image at 128 px and 128-px tiles of a 512-px
decode), each screening loss in z units of its own validation normals: test AUROC of each, of their
sum and of their maximum, and the same on the validation normals beside their synthetic-defect
copies when both runs drew the same copies (one seed): would a screen that sees both scales keep
what each sees?

``flips``: stage 1 scores the test images as saved, flipped left-right, upside down and both; the
image AUROC of each view, of the mean of the first two and of all four screening losses.

``positions``: stage 1 scores the train, validation and test images again; the per-pixel BCE maps
of the test images are standardised position by position with the mean and standard deviation of
the validation (or training) normals' maps before the screening's blur and top-k mean: does a
per-position normality (tile borders, lighting) explain the false alarms? Image AUROC of the plain
score (the run's own recomputed; the mode stops if it does not match the run's ``scores.csv``), of
``map − mean``, and of ``(map − mean) / (std + 0.1)`` (0.1 keeps positions whose normal maps
hardly vary from dominating; typical normal-pixel BCE is 0.02–0.3). The BCE is recomputed from the
float32 map ``1 − A`` as ``−log(A)``, exact to float32 rounding up to about 16 (logits above −16).
It needs a run scored with ``stage1.position_normality: none`` and no feature map
(``stage1.feature_map_weight: 0``); the mode says how to re-score a recipe run's weights so.
``maps`` reads the saved maps as stage-1 pixels, so it refuses a run whose stage 2 decoded larger.

Appends to ``benchmarks/results/rescore_{fusion,ensemble,maps,flips,positions}.{csv,md}``; never edit those
by hand.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import pandas as pd

from twostage_ad.cascade import fit_cascade
from twostage_ad.config import effective_tile
from twostage_ad.metrics import image_auroc, pixel_auroc, pixel_auroc_by_category
from twostage_ad.runs import read_synthetic_scores
from twostage_ad.workflow import load_run_config

from _results import append_row, decode_run_split, git_commit, run_image_size

WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)


def _splits(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    table = pd.read_csv(run_dir / "scores.csv")
    table = table[table["error"].isna()] if "error" in table else table
    return table[table["split"] == "val"], table[table["split"] == "test"].sort_values("image")


def _synthetic_set(run_dir: Path, val: pd.DataFrame, synthetic: pd.DataFrame | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label-free evaluation rows: the validation normals (0) and their synthetic-defect copies (1,
    ``synthetic``: the run's ``synthetic_scores.csv``)."""
    if synthetic is None:
        raise SystemExit(f"{run_dir} has no synthetic_scores.csv (a run with fewer than 2 validation normals): "
                         "--synthetic needs it")
    normal = val[val["label"] == 0]
    labels = np.r_[np.zeros(len(normal), int), np.ones(len(synthetic), int)]
    return (labels, np.r_[normal["stage1_loss"].to_numpy(), synthetic["stage1_loss"].to_numpy()],
            np.r_[normal["stage2_score"].to_numpy(), synthetic["stage2_score"].to_numpy()])


def fusion_row(run_dir: Path, *, synthetic: bool = False) -> dict:
    """One run's cascade under each fusion rule, on its test split or (``synthetic``) on its validation
    normals beside their synthetic-defect copies, which needs no test label. With ``synthetic`` the
    false-positive rates are measured on the normals the thresholds were calibrated on."""
    config = load_run_config(run_dir)
    val, test = _splits(run_dir)
    s1v, s2v = val["stage1_loss"].to_numpy(), val["stage2_score"].to_numpy()
    copies = read_synthetic_scores(run_dir)  # also for runs calibrated by synthetic_recall, as the pipeline does
    if synthetic:
        labels, s1, s2 = _synthetic_set(run_dir, val, copies)
    else:
        labels, s1, s2 = test["label"].to_numpy(), test["stage1_loss"].to_numpy(), test["stage2_score"].to_numpy()
    row: dict = {"data": config.run.name, "scored": "synthetic" if synthetic else "test", "run": str(run_dir)}
    copies1, copies2 = (None, None) if copies is None else (copies["stage1_loss"].to_numpy(), copies["stage2_score"].to_numpy())
    for fusion in ("sum", "max", "stage2"):
        cascade = fit_cascade(s1v, s2v, val["label"].to_numpy(), config.calibration, fusion=fusion,
                              synthetic_stage1=copies1, synthetic_stage2=copies2)
        out = cascade.apply(s1, s2)
        row[f"auroc_{fusion}"] = image_auroc(labels, out.cascade_score).value
        row[f"fpr_{fusion}"] = float(out.decision[labels == 0].mean())
        row[f"tpr_{fusion}"] = float(out.decision[labels == 1].mean())
        if fusion == "sum":  # the weight sweep reuses this cascade's stage-1 threshold and statistics
            z1 = (s1 - cascade.stage1_mean) / cascade.stage1_std
            z2 = (s2 - cascade.stage2_mean) / cascade.stage2_std
            flagged = out.flagged
    for w in WEIGHTS:  # flagged above unflagged, each ordered as the cascade orders them
        score = np.where(flagged, 10 + np.arctan(z1 + w * z2), np.arctan(z1))
        row[f"auroc_w{w:g}"] = image_auroc(labels, score).value
    return row


def ensemble_rows(run_dirs: list[Path]) -> list[dict]:
    standardised, labels, images = [], None, None
    for run_dir in run_dirs:
        val, test = _splits(run_dir)
        val = val[val["label"] == 0]  # statistics from validation normals only
        if images is not None and not np.array_equal(test["image"].to_numpy(), images):
            raise SystemExit(f"{run_dir} has other test images than {run_dirs[0]}: ensembles need runs of one split")
        images, labels = test["image"].to_numpy(), test["label"].to_numpy()
        standardised.append((test["stage1_loss"].to_numpy() - val["stage1_loss"].mean()) / val["stage1_loss"].std())
    rows = []
    for size in range(1, len(run_dirs) + 1):
        aurocs = [image_auroc(labels, np.mean([standardised[i] for i in subset], axis=0)).value
                  for subset in itertools.combinations(range(len(run_dirs)), size)]
        rows.append({"data": load_run_config(run_dirs[0]).run.name, "models": size, "subsets": len(aurocs),
                     "auroc_mean": float(np.mean(aurocs)), "auroc_min": float(np.min(aurocs)),
                     "auroc_max": float(np.max(aurocs)), "runs": " ".join(str(r) for r in run_dirs)})
    return rows


def _standardised(run_dir: Path) -> dict:
    """A run's test rows and, in z units of its validation normals, the screening losses of its
    test images, of those normals and of their synthetic-defect copies (None without
    synthetic_scores.csv), with the copies' kinds and the run's config."""
    val, test = _splits(run_dir)
    normal = val.loc[val["label"] == 0, "stage1_loss"]
    copies = read_synthetic_scores(run_dir)

    def z(losses: pd.Series) -> np.ndarray:
        return ((losses - normal.mean()) / normal.std()).to_numpy()

    return {"test": test, "z_test": z(test["stage1_loss"]), "z_normal": z(normal),
            "z_copies": None if copies is None else z(copies["stage1_loss"]),
            "kinds": None if copies is None else copies["kind"].tolist(), "config": load_run_config(run_dir)}


def scales_row(whole: Path, tiled: Path) -> dict:
    """Two screens of one data set (e.g. the whole image at 128 px and tiles of a larger decode)
    and their fusions, each screen's loss in z units of its validation normals: test AUROC of each,
    of ``z_a + z_b`` and of ``max(z_a, z_b)``; the same on the validation normals beside their
    synthetic-defect copies when both runs drew the same copies (same seed and kinds), else NaN."""
    a, b = _standardised(whole), _standardised(tiled)
    if not np.array_equal(a["test"]["image"].to_numpy(), b["test"]["image"].to_numpy()):
        raise SystemExit(f"{whole} and {tiled} scored other test images: scales needs two runs of one split")
    same_copies = a["kinds"] is not None and a["kinds"] == b["kinds"] and a["config"].run.seed == b["config"].run.seed
    config_b = b["config"]
    row: dict = {"data": config_b.run.name, "decode_a": a["config"].data.image_size,
                 "decode_b": config_b.data.image_size,
                 "tile_b": effective_tile(config_b.stage1.tile_size, config_b.data.image_size)}
    labels = a["test"]["label"].to_numpy()
    synthetic_labels = None if not same_copies else np.r_[np.zeros(len(a["z_normal"]), int), np.ones(len(a["z_copies"]), int)]
    for name, combine in (("a", lambda x, y: x), ("b", lambda x, y: y), ("sum", np.add), ("max", np.maximum)):
        row[f"test_{name}"] = image_auroc(labels, combine(a["z_test"], b["z_test"])).value
        row[f"synthetic_{name}"] = float("nan") if not same_copies else image_auroc(
            synthetic_labels, np.r_[combine(a["z_normal"], b["z_normal"]), combine(a["z_copies"], b["z_copies"])]).value
    return {**row, "runs": f"{whole} {tiled}"}


def _test_maps(run_dir: Path) -> tuple[dict, pd.DataFrame]:
    """The saved test maps and the test rows of ``scores.csv`` in the same order."""
    saved = dict(np.load(run_dir / "maps" / "test_maps.npz"))
    table = pd.read_csv(run_dir / "scores.csv")
    test = table[table["split"] == "test"].set_index("image").loc[saved["names"]].reset_index()
    return saved, test


def maps_row(run_dir: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter

    config = load_run_config(run_dir)
    if run_image_size(config) != config.data.image_size:
        raise SystemExit(f"{run_dir}: maps reads the saved maps as stage-1 pixels, but this run saved them at stage 2's "
                         f"{run_image_size(config)} px (stage 1 works at {config.data.image_size})")
    saved, test = _test_maps(run_dir)
    labels, categories = test["label"].to_numpy(), test["category"].fillna("").astype(str).to_numpy()
    maps = saved["stage1"].astype(np.float32) / 255
    masks, has_mask = saved["masks"], saved["has_mask"]
    row: dict = {"data": load_run_config(run_dir).run.name, "run": str(run_dir),
                 "pixel_pooled": pixel_auroc(labels, masks, has_mask, maps).value}
    row.update({f"pixel_{c}": v for c, v in pixel_auroc_by_category(labels, categories, masks, has_mask, maps).items()})
    blurred = np.stack([gaussian_filter(m, 8) for m in maps])
    row["pixel_pooled_blur8"] = pixel_auroc(labels, masks, has_mask, blurred).value
    bce = -np.log(np.clip(1 - maps, 1 / 255, 1))  # the screening's per-pixel BCE, from the rounded map
    smoothed = F.avg_pool2d(torch.from_numpy(bce)[:, None], 3, 1, 1, count_include_pad=False)[:, 0].numpy()
    ranked = np.sort(smoothed.reshape(len(smoothed), -1), axis=1)
    for share in (0.001, 0.005, 0.01, 0.02, 0.05):
        k = max(1, round(share * ranked.shape[1]))
        row[f"image_top{share:g}"] = image_auroc(labels, ranked[:, -k:].mean(axis=1)).value
    k = max(1, round(0.01 * ranked.shape[1]))
    for border in (4, 8):
        inner = np.sort(smoothed[:, border:-border, border:-border].reshape(len(smoothed), -1), axis=1)
        row[f"image_top0.01_border{border}"] = image_auroc(labels, inner[:, -k:].mean(axis=1)).value
    normal = maps[labels == 0]
    row["normal_map_last4_columns"] = float(normal[:, :, -4:].mean())
    row["normal_map_middle_column"] = float(normal[:, :, normal.shape[2] // 2].mean())
    return row


def flips_row(run_dir: Path) -> dict:
    from twostage_ad.data.images import resize_images
    from twostage_ad.stages.attention import AttentionStage

    saved, test = _test_maps(run_dir)
    stage = AttentionStage.load(run_dir / "checkpoints" / "stage1.pt", device="cpu")
    labels, images = test["label"].to_numpy(), resize_images(saved["images"], stage.image_size)  # saved at the decode size
    views = {"as_saved": images, "left_right": images[:, :, ::-1], "upside_down": images[:, ::-1], "both": images[:, ::-1, ::-1]}
    losses = {name: stage.score(np.ascontiguousarray(view), progress=False).loss for name, view in views.items()}
    row: dict = {"data": load_run_config(run_dir).run.name, "run": str(run_dir)}
    row.update({f"image_{name}": image_auroc(labels, loss).value for name, loss in losses.items()})
    row["image_mean_as_saved_left_right"] = image_auroc(labels, losses["as_saved"] + losses["left_right"]).value
    row["image_mean_of_four"] = image_auroc(labels, sum(losses.values())).value
    return row


def _topk_of_bce(bce: np.ndarray, share: float) -> np.ndarray:
    """The screening's image score from per-pixel BCE maps ``N×H×W`` (the package's own top-k)."""
    import torch

    from twostage_ad.stages.attention import screening_topk

    return screening_topk(torch.from_numpy(bce)[:, None], share).numpy()


def positions_row(run_dir: Path) -> dict:
    from twostage_ad.data.images import resize_images
    from twostage_ad.stages.attention import AttentionStage

    config = load_run_config(run_dir)
    if config.stage1.screen_con or config.stage1.screen_enc:
        raise SystemExit(f"{run_dir}: positions needs attention-only screening (screen_con = screen_enc = 0)")
    feature_map = config.stage1.screen_feature > 0 and config.stage1.feature_map_weight > 0
    if config.stage1.position_normality != "none" or feature_map:
        raise SystemExit(
            f"{run_dir}: positions re-derives the per-pixel BCE from the map 1 − A and compares its top-k with the "
            "run's own attention term, so it needs a run scored without position statistics (they are in that term) "
            f"and without the feature map (it changes the map); this run: stage1.position_normality "
            f"{config.stage1.position_normality!r}, stage1.feature_map_weight {config.stage1.feature_map_weight}. Re-score "
            "its weights first: run --config RUN/config.yaml --stage1-from RUN/checkpoints/stage1.pt --stage2-from "
            "RUN/checkpoints/stage2.pt --set stage1.position_normality=none --set stage1.feature_map_weight=0"
        )
    stage = AttentionStage.load(run_dir / "checkpoints" / "stage1.pt", device="cpu")
    bce, labels = {}, {}
    for name in ("train", "val", "test"):
        decoded = decode_run_split(config, name, run_image_size(config))  # as run decoded them, then stage 1's view
        maps = stage.score(resize_images(decoded.images, stage.image_size), progress=False).anomaly_maps  # 1 − A
        bce[name] = -np.log(np.clip(1.0 - maps, 1e-7, 1.0)).astype(np.float32)  # softplus(−logit)
        labels[name] = decoded.labels
    y, share = labels["test"], config.stage1.screen_topk
    plain = image_auroc(y, _topk_of_bce(bce["test"], share)).value
    _, saved = _splits(run_dir)
    if abs(plain - image_auroc(saved["label"].to_numpy(), saved["stage1_att_topk"].to_numpy()).value) > 1e-3:
        raise SystemExit(f"{run_dir}: the recomputed stage-1 score does not reproduce the run's own (AUROC {plain:.4f})")
    row: dict = {"data": config.run.name, "run": str(run_dir), "image_plain": plain}
    for reference in ("val", "train"):
        normal = bce[reference][labels[reference] == 0]
        mean, std = normal.mean(axis=0), normal.std(axis=0)
        row[f"image_minus_{reference}_mean"] = image_auroc(y, _topk_of_bce(bce["test"] - mean, share)).value
        row[f"image_z_{reference}"] = image_auroc(y, _topk_of_bce((bce["test"] - mean) / (std + 0.1), share)).value
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("fusion", "ensemble", "maps", "flips", "positions", "scales"))
    parser.add_argument("runs", type=Path, nargs="+", help="finished run folders (scores.csv, config.yaml; maps/, checkpoints/ for some modes)")
    parser.add_argument("--note", default="")
    parser.add_argument("--synthetic", action="store_true",
                        help="fusion: score validation normals and their synthetic-defect copies (synthetic_scores.csv) "
                             "instead of the test split: a choice that needs no test label")
    args = parser.parse_args()
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit()}
    if args.mode == "fusion":
        table = pd.DataFrame([fusion_row(r, synthetic=args.synthetic) for r in args.runs])
        summary = table.drop(columns="run").groupby(["data", "scored"]).mean().reset_index()
        summary.insert(2, "runs", table.groupby(["data", "scored"]).size().to_numpy())
        for row in summary.to_dict("records"):
            row = {**stamp, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, "note": args.note}
            append_row("rescore_fusion", row, "Cascade fusion rules re-scored from saved scores (benchmarks/rescore.py; do not edit)")
            print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    elif args.mode in ("maps", "flips", "positions"):
        make, title = {"maps": (maps_row, "Stage-1 maps re-scored from saved test maps"),
                       "flips": (flips_row, "Stage 1 on flipped test images"),
                       "positions": (positions_row, "Stage-1 maps standardised per position by normal maps")}[args.mode]
        for run_dir in args.runs:
            row = {**stamp, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in make(run_dir).items()}, "note": args.note}
            append_row(f"rescore_{args.mode}", row, f"{title} (benchmarks/rescore.py; do not edit)")
            print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    elif args.mode == "scales":
        if len(args.runs) != 2:
            raise SystemExit("scales takes two runs of one data set: the whole-image one, then the tiled one")
        row = {**stamp, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in scales_row(*args.runs).items()}, "note": args.note}
        append_row("rescore_scales", row, "Two screens of one data set fused in z units (benchmarks/rescore.py; do not edit)")
        print(", ".join(f"{k}={v}" for k, v in row.items() if k != "runs"), flush=True)
    else:
        for row in ensemble_rows(args.runs):
            row = {**stamp, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, "note": args.note}
            append_row("rescore_ensemble", row, "Seed ensembles of stage 1 re-scored from saved scores (benchmarks/rescore.py; do not edit)")
            print(", ".join(f"{k}={v}" for k, v in row.items() if k != "runs"), flush=True)


if __name__ == "__main__":
    main()
