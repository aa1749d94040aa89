"""Write a large-image, small-defect data set from a manifest data set: mosaics of its tiles.

    python benchmarks/mosaic.py ../shared/data/mtd/split.csv /tmp/mtd_mosaic [--grid 4] [--tile 256]
        [--train 300] [--val 60] [--seed 0]
    python -m twostage_ad.pipeline run --config pipelines/mtd.yaml --set data.path=/tmp/mtd_mosaic/split.csv

Each output image is a ``grid × grid`` mosaic of source images, each resized to ``tile × tile``
(``--grid 4 --tile 256``: 1024-px images). A normal mosaic holds only normal images of one split;
an anomalous mosaic holds one anomalous test image at a random cell among normal test images, and
its mask is that image's mask in that cell (zeros elsewhere). So the defects are real ones, but
each covers at most a ``grid²``-th of its image: at the package's default 128-px decode a 256-px
tile becomes 32 px, and a crack a few pixels wide in the source falls below one pixel. This is
the case the README's "Large images, small defects" speaks of, measured with real defects.

Splits never mix: train mosaics are drawn from the source's train normals, val mosaics from its
val normals, test mosaics from its test images (one anomalous mosaic per anomalous test image, as
many normal mosaics as normal test images). Tiles are drawn without replacement within a mosaic
and with replacement across mosaics (seeded). Images are decoded as the package decodes them,
masks binarised by the package's own rule; both written as PNG (masks defect = white) with a
manifest of the source's columns to ``OUT_DIR``, which must be outside the repository and the
source folder (the data are not ours to copy in).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from twostage_ad.data.images import decode_native, read_mask  # the package's own decoding

from _results import refuse_overlap


def _tile(source_root: Path, relative: str, tile: int, mode: str) -> np.ndarray:
    image = decode_native(source_root / relative, mode=mode)
    return np.asarray(image.resize((tile, tile), Image.BILINEAR))


def _mosaic(tiles: list[np.ndarray], grid: int) -> np.ndarray:
    """``grid²`` equal ``T×T[×C]`` tiles, row by row, into one ``(grid·T)×(grid·T)[×C]`` image."""
    if len(tiles) != grid * grid:
        raise ValueError(f"a {grid}×{grid} mosaic needs {grid * grid} tiles, got {len(tiles)}")
    rows = [np.concatenate(tiles[r * grid:(r + 1) * grid], axis=1) for r in range(grid)]
    return np.concatenate(rows, axis=0)


def mosaic_plan(table: pd.DataFrame, grid: int, n_train: int, n_val: int, seed: int = 0) -> list[dict]:
    """What each mosaic holds: ``split``, ``label``, ``cells`` (row indices into ``table``, one per
    cell, row by row) and ``anomalous_cell`` (the cell of the anomalous image, or -1). Only
    ``table``'s ``split`` and ``label`` columns are read."""
    rng = np.random.default_rng(seed)
    cells = grid * grid
    plans: list[dict] = []

    def normals(split: str) -> np.ndarray:
        found = np.flatnonzero((table["split"] == split).to_numpy() & (table["label"] == 0).to_numpy())
        if len(found) < cells:
            raise SystemExit(f"the {split} split has {len(found)} normal images; a {grid}×{grid} mosaic needs {cells}")
        return found

    for split, count in (("train", n_train), ("val", n_val)):
        pool = normals(split)
        plans += [{"split": split, "label": 0, "cells": list(rng.choice(pool, cells, replace=False)), "anomalous_cell": -1}
                  for _ in range(count)]
    test_normals = normals("test")
    anomalies = np.flatnonzero((table["split"] == "test").to_numpy() & (table["label"] == 1).to_numpy())
    for _ in range(len(test_normals)):
        plans.append({"split": "test", "label": 0, "cells": list(rng.choice(test_normals, cells, replace=False)),
                      "anomalous_cell": -1})
    for anomaly in anomalies:
        chosen = list(rng.choice(test_normals, cells, replace=False))
        where = int(rng.integers(cells))
        chosen[where] = anomaly
        plans.append({"split": "test", "label": 1, "cells": chosen, "anomalous_cell": where})
    return plans


def write_mosaics(manifest: Path, out_dir: Path, grid: int, tile: int, n_train: int, n_val: int, seed: int = 0,
                  invert_masks: bool = False) -> pd.DataFrame:
    """Write the mosaics, their masks and ``split.csv`` to ``out_dir``; return the manifest."""
    source_root = manifest.parent
    table = pd.read_csv(manifest)
    table["label"] = table["label"].astype(int)
    with Image.open(source_root / table["image"].iloc[0]) as first:
        mode = "L" if first.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F") else "RGB"
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    cache: dict[int, np.ndarray] = {}
    rows = []
    for number, plan in enumerate(tqdm(mosaic_plan(table, grid, n_train, n_val, seed), desc="mosaics", unit="image")):
        for index in plan["cells"]:
            if index not in cache:
                cache[index] = _tile(source_root, table["image"].iloc[index], tile, mode)
        name = f"{plan['split']}_{number:05d}.png"
        Image.fromarray(_mosaic([cache[i] for i in plan["cells"]], grid)).save(out_dir / "images" / name)
        mask, category = "", "normal"
        if plan["anomalous_cell"] >= 0:
            source = table.iloc[plan["cells"][plan["anomalous_cell"]]]
            category = source.get("category", "anomalous")
            if isinstance(source.get("mask"), str) and source["mask"]:  # an anomaly without a mask keeps none
                canvas = np.zeros((grid * tile, grid * tile), np.uint8)
                row, col = divmod(plan["anomalous_cell"], grid)
                canvas[row * tile:(row + 1) * tile, col * tile:(col + 1) * tile] = (
                    read_mask(source_root / source["mask"], tile, invert=invert_masks) * 255)
                mask = f"masks/{name}"
                Image.fromarray(canvas).save(out_dir / mask)
        rows.append({"image": f"images/{name}", "label": plan["label"], "split": plan["split"], "mask": mask,
                     "category": category})
    out = pd.DataFrame(rows, columns=["image", "label", "split", "mask", "category"])
    out.to_csv(out_dir / "split.csv", index=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path, help="split.csv of the source data set (train/val/test, label 0/1, mask)")
    parser.add_argument("out_dir", type=Path, help="where the mosaics go (outside the repository)")
    parser.add_argument("--grid", type=int, default=4, help="cells per side (default 4)")
    parser.add_argument("--tile", type=int, default=256, help="px per cell side (default 256: 1024-px mosaics)")
    parser.add_argument("--train", type=int, default=300, help="train mosaics (default 300)")
    parser.add_argument("--val", type=int, default=60, help="val mosaics (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--invert-masks", action="store_true", help="source masks mark defects black (as data.invert_masks)")
    args = parser.parse_args()
    if args.grid < 1 or args.tile < 8:
        parser.error(f"--grid must be >= 1 and --tile >= 8, got {args.grid!r} and {args.tile!r}")
    out_dir, source_root = args.out_dir.resolve(), args.manifest.resolve().parent
    refuse_overlap(parser, out_dir, source_root)
    table = write_mosaics(args.manifest.resolve(), out_dir, args.grid, args.tile, args.train, args.val, args.seed,
                          args.invert_masks)
    counts = table.groupby(["split", "label"]).size().to_dict()
    print(f"{len(table)} mosaics of {args.grid * args.tile} px ({counts}) -> {out_dir / 'split.csv'}")


if __name__ == "__main__":
    main()
