"""The mosaic benchmark's data set (large images, small real defects): splits never mix, each
anomalous mosaic holds exactly one anomalous source image, and its mask sits in that cell."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO, textured, write_image

sys.path.insert(0, str(REPO / "benchmarks"))
mosaic = pytest.importorskip("mosaic")


def _source(folder, rng) -> pd.DataFrame:
    """A manifest data set in ``folder``: 24-px images: 6 train, 5 val and 5 test normals, 3 test anomalies
    with masks (a 4×4 white square at a known place)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, count in (("train", 6), ("val", 5), ("test", 5)):
        for i in range(count):
            write_image(folder / f"{split}{i}.png", textured(rng, 24))
            rows.append({"image": f"{split}{i}.png", "label": 0, "split": split, "mask": "", "category": "good"})
    for i in range(3):
        image = textured(rng, 24)
        image[4:8, 10:14] = 255
        write_image(folder / f"bad{i}.png", image)
        mask = np.zeros((24, 24), np.uint8)
        mask[4:8, 10:14] = 255
        write_image(folder / f"bad{i}_mask.png", mask)
        rows.append({"image": f"bad{i}.png", "label": 1, "split": "test", "mask": f"bad{i}_mask.png", "category": "spot"})
    table = pd.DataFrame(rows)
    table.to_csv(folder / "split.csv", index=False)
    return table


def test_plan_keeps_splits_apart_and_places_one_anomaly(tmp_path, rng) -> None:
    table = _source(tmp_path, rng)
    plans = mosaic.mosaic_plan(table, grid=2, n_train=7, n_val=3, seed=1)
    counts = pd.Series([(p["split"], p["label"]) for p in plans]).value_counts().to_dict()
    assert counts == {("train", 0): 7, ("val", 0): 3, ("test", 0): 5, ("test", 1): 3}
    for plan in plans:
        sources = table.iloc[plan["cells"]]
        assert len(set(plan["cells"])) == 4  # no image twice in one mosaic
        assert (sources["split"] == plan["split"]).all()  # never another split's images
        assert int(sources["label"].sum()) == plan["label"]  # one anomalous image in an anomalous mosaic, none else
        if plan["label"]:
            assert table.iloc[plan["cells"][plan["anomalous_cell"]]]["label"] == 1
    anomalous = [table.iloc[p["cells"][p["anomalous_cell"]]]["image"] for p in plans if p["label"]]
    assert sorted(anomalous) == ["bad0.png", "bad1.png", "bad2.png"]  # each anomaly once
    assert plans == mosaic.mosaic_plan(table, grid=2, n_train=7, n_val=3, seed=1)


def test_plan_refuses_a_split_with_too_few_normals(tmp_path, rng) -> None:
    table = _source(tmp_path, rng)
    with pytest.raises(SystemExit, match="train split has 6 normal images; a 3×3 mosaic needs 9"):
        mosaic.mosaic_plan(table, grid=3, n_train=1, n_val=1)


def test_written_mosaics_put_the_mask_in_the_anomalous_cell(tmp_path, rng) -> None:
    _source(tmp_path / "src", rng)
    out = mosaic.write_mosaics(tmp_path / "src" / "split.csv", tmp_path / "out", grid=2, tile=32, n_train=2, n_val=2, seed=0)
    assert len(out) == 2 + 2 + 5 + 3 and set(out["split"]) == {"train", "val", "test"}
    for row in out.itertuples():
        image = np.asarray(Image.open(tmp_path / "out" / row.image))
        assert image.shape == (64, 64)
        if row.label == 1:
            assert row.category == "spot"
            mask = np.asarray(Image.open(tmp_path / "out" / row.mask)) > 0
            cells = [mask[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32].any() for r in range(2) for c in range(2)]
            assert sum(cells) == 1  # the defect in one cell only
            where = cells.index(True)
            r, c = divmod(where, 2)
            tile_mask = mask[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32]
            ys, xs = np.nonzero(tile_mask)  # the 4×4 square at rows 4-7, cols 10-13 of 24 px, scaled to 32
            assert 4 <= ys.min() <= 6 and 9 <= ys.max() <= 11 and 12 <= xs.min() <= 14 and 17 <= xs.max() <= 19
            assert image[r * 32 + 8, c * 32 + 16] > 200  # the white square is drawn where its mask is
        else:
            assert row.mask == "" or pd.isna(row.mask)
