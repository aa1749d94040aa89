"""Messy input: every case gets one clear message naming the file or field and the fix."""

import json
import logging

import numpy as np
import pandas as pd
import pytest

from twostage_ad.config import ConfigError
from twostage_ad.config_io import load_config
from twostage_ad.data.records import DataError, load_records
from twostage_ad.workflow import run_pipeline

from conftest import textured, write_image

# these configs start from the digits demo (small, fast) on other data sources, knowingly
pytestmark = pytest.mark.filterwarnings("ignore:data.source .* without a config file:UserWarning")

TINY = ["stage1.epochs=1", "stage1.base_width=8", "stage1.max_width=16", "stage2.epochs=1",
        "stage2.width_divisor=16", "run.overlays=0"]


def _manifest(root, rows):
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["image", "label", "split", "mask", "category"]).to_csv(root / "split.csv", index=False)
    return root / "split.csv"


def _seed_root_without_train(tmp_path, rng):
    write_image(tmp_path / "d" / "test" / "0.normal" / "t.png", textured(rng))
    return ["data.source=seed", f"data.path={tmp_path / 'd'}"]


def _empty_train_folder(tmp_path, rng):
    (tmp_path / "d" / "train" / "0.normal").mkdir(parents=True)
    return ["data.source=seed", f"data.path={tmp_path / 'd'}"]


def _manifest_without_split(tmp_path, rng):
    root = tmp_path / "m"
    root.mkdir()
    pd.DataFrame({"image": ["a.png"], "label": [0]}).to_csv(root / "split.csv", index=False)
    return ["data.source=manifest", f"data.path={root / 'split.csv'}"]


def _no_normal_training_images(tmp_path, rng):
    rows = [(f"a{i}.png", 1, "train", "", "") for i in range(3)] + [("t.png", 0, "test", "", "")]
    for name, *_ in rows:
        write_image(tmp_path / "m" / name, textured(rng))
    return ["data.source=manifest", f"data.path={_manifest(tmp_path / 'm', rows)}"]


def _path_outside_the_manifest(tmp_path, rng):
    write_image(tmp_path / "secret.png", textured(rng))
    path = _manifest(tmp_path / "m", [("../secret.png", 0, "train", "", "")])
    return ["data.source=manifest", f"data.path={path}"]


def _all_training_images_unreadable(tmp_path, rng):
    rows = [(f"n{i}.png", 0, "train", "", "") for i in range(3)] + [("t.png", 0, "test", "", "")]
    for name, *_ in rows:
        (tmp_path / "m").mkdir(exist_ok=True)
        (tmp_path / "m" / name).write_bytes(b"this is not a png")
    return ["data.source=manifest", f"data.path={_manifest(tmp_path / 'm', rows)}"]


@pytest.mark.parametrize(
    "build, error, message",
    [
        (_seed_root_without_train, DataError, "folders layout needs training normals: folder"),
        (_empty_train_folder, DataError, "no normal training image"),
        (_manifest_without_split, DataError, "lacks column(s) ['split']"),
        (_no_normal_training_images, DataError, "no normal training image"),
        (_path_outside_the_manifest, DataError, "leads outside the manifest's folder"),
        (_all_training_images_unreadable, DataError, "training image(s) can be read (e.g. 'n0.png')"),
    ],
    ids=lambda v: getattr(v, "__name__", None) or "",
)
def test_bad_data_fails_early_with_a_clear_message(tmp_path, rng, build, error, message):
    overrides = build(tmp_path, rng)
    with pytest.raises(error) as info:
        run_pipeline(load_config(None, TINY + overrides), tmp_path / "run", progress=False)
    assert message in str(info.value)


def test_outside_paths_are_allowed_when_the_config_says_so(tmp_path, rng):
    for i in range(4):
        write_image(tmp_path / "shared" / f"n{i}.png", textured(rng))
    path = _manifest(tmp_path / "m", [(f"../shared/n{i}.png", 0, "train", "", "") for i in range(4)])
    config = load_config(None, ["data.source=manifest", f"data.path={path}", "data.allow_outside_paths=true"])
    assert {r.image for r in load_records(config.data)} == {tmp_path / "m" / ".." / "shared" / f"n{i}.png" for i in range(4)}


def test_messy_files_are_skipped_listed_and_the_run_completes(tmp_path, rng, caplog):
    root = tmp_path / "m"
    rows = []
    for i in range(10):
        rows.append((write_image(root / f"train/n{i}.png", textured(rng)).relative_to(root), 0, "train", "", "part"))
    rows.append((write_image(root / "train/colour.png", textured(rng, channels=3)).relative_to(root), 0, "train", "", "part"))
    (root / "train" / "notes.png").write_bytes(b"a text file with an image extension")
    rows.append(("train/notes.png", 0, "train", "", "part"))
    for i in range(3):
        rows.append((write_image(root / f"val/v{i}.png", textured(rng)).relative_to(root), 0, "val", "", "part"))
    for i in range(3):
        rows.append((write_image(root / f"test/t{i}.png", textured(rng)).relative_to(root), 0, "test", "", "part"))
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 10:20] = 255
    for i in range(3):
        bad = textured(rng)
        bad[10:20, 10:20] = 0
        write_image(root / f"test/a{i}.png", bad)
        write_image(root / f"masks/a{i}.png", mask)
        rows.append((f"test/a{i}.png", 1, "test", f"masks/a{i}.png", "dent"))
    full = (root / "test" / "t0.png").read_bytes()
    (root / "test" / "truncated.png").write_bytes(full[: len(full) // 2])
    rows.append(("test/truncated.png", 0, "test", "", "part"))
    write_image(root / "test/wrong_mask.png", textured(rng))
    write_image(root / "masks/wrong_mask.png", np.zeros((20, 10), np.uint8))  # 10×20: not the image's aspect ratio
    rows.append(("test/wrong_mask.png", 1, "test", "masks/wrong_mask.png", "dent"))
    write_image(root / "test/lost_mask.png", textured(rng))
    rows.append(("test/lost_mask.png", 1, "test", "masks/nowhere.png", "dent"))
    write_image(root / "masks/ghost.png", mask)  # a mask whose image does not exist
    rows.append(("test/ghost.png", 1, "test", "masks/ghost.png", "dent"))
    write_image(root / "test/small.png", textured(rng, size=16))
    rows.append(("test/small.png", 0, "test", "", "part"))
    path = _manifest(root, [tuple(map(str, r[:1])) + r[1:] for r in rows])

    with caplog.at_level(logging.WARNING):
        result = run_pipeline(load_config(None, TINY + ["data.source=manifest", f"data.path={path}", "data.channels=0"]),
                              tmp_path / "run", progress=False)
    scores = pd.read_csv(result.run_dir / "scores.csv", keep_default_na=False)
    errors = dict(zip(scores.loc[scores["error"] != "", "image"], scores.loc[scores["error"] != "", "error"]))
    assert set(errors) == {"test/truncated.png", "test/ghost.png"}  # a bad mask costs only the pixel metrics
    assert "cannot read image" in errors["test/ghost.png"] and "ghost.png" in errors["test/ghost.png"]
    assert "cannot read image" in errors["test/truncated.png"] and "truncated.png" in errors["test/truncated.png"]
    assert {"test/wrong_mask.png", "test/lost_mask.png"} <= set(scores["image"])
    assert "2 mask(s) could not be used" in caplog.text
    assert {u["image"]: u["reason"] for u in json.loads((result.run_dir / "metrics.json").read_text())["unusable_masks"]}.keys() \
        == {"test/wrong_mask.png", "test/lost_mask.png"}
    assert "Masks not used" in (result.run_dir / "report.html").read_text()
    notes = json.loads((result.run_dir / "metrics.json").read_text())["notes"]
    assert notes["pixel_auroc.masks"].startswith("2 of 5 test anomalies have no usable mask")
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    unreadable = {u["image"] for u in metrics["unreadable_images"]}
    assert unreadable == set(errors) | {"train/notes.png"}
    assert "train/notes.png" in (result.run_dir / "report.html").read_text()
    assert metrics["image_auroc"]["stage1"] is not None  # the run completed on the readable images
    assert "small.png: 16×16" in caplog.text and "set data.image_size: 32" in caplog.text
    # recalibrating keeps the unreadable rows
    from twostage_ad.workflow import calibrate_run

    calibrate_run(result.run_dir)
    again = pd.read_csv(result.run_dir / "scores.csv", keep_default_na=False)
    assert (again["error"] != "").sum() == 2 and len(again) == len(scores)


def test_yaml_that_would_build_python_objects_is_refused(tmp_path):
    marker = tmp_path / "ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"run: !!python/object/apply:pathlib.Path.touch [{str(marker)!r}]\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(config)
    assert not marker.exists()


def test_a_symbolic_link_out_of_the_manifest_folder_is_refused(tmp_path, rng):
    for i in range(4):
        write_image(tmp_path / "private" / f"n{i}.png", textured(rng))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "link").symlink_to(tmp_path / "private", target_is_directory=True)
    path = _manifest(tmp_path / "m", [(f"link/n{i}.png", 0, "train", "", "") for i in range(4)])
    with pytest.raises(DataError, match="leads outside the manifest's folder"):
        load_records(load_config(None, ["data.source=manifest", f"data.path={path}"]).data)
