"""The run folder (docs/design.md §7): its files, read and written here and nowhere else.

Creation without clobbering, atomic writes (every file is written to a temporary name in the same
folder and then renamed over the target, so a killed process never leaves a half-written file
that later loads), weights-only checkpoints, and the readers and writers of ``config.yaml``,
``scores.csv``, ``thresholds.json`` and ``maps/test_maps.npz``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import yaml

if TYPE_CHECKING:
    from twostage_ad.cascade import Cascade
    from twostage_ad.config import Config
    from twostage_ad.detector import ImagePrediction

__all__ = [
    "RunExistsError",
    "RUN_FILES",
    "create_run_dir",
    "default_run_dir",
    "write_atomic",
    "write_text_atomic",
    "write_json",
    "read_json",
    "save_checkpoint",
    "load_checkpoint",
    "load_run_config",
    "same_setting",
    "write_scores",
    "read_scores",
    "write_synthetic_scores",
    "read_synthetic_scores",
    "write_thresholds",
    "write_prediction_maps",
    "write_test_maps",
    "TEST_MAPS",
]

log = logging.getLogger(__name__)

RUN_FILES = {
    "config": "config.yaml",
    "thresholds": "thresholds.json",
    "scores": "scores.csv",
    "metrics": "metrics.json",
    "checkpoints": "checkpoints",
    "plots": "plots",
    "maps": "maps",
    "report": "report.html",
    "history": "history.json",
    "reused": "reused.json",
    "operating_points": "operating_points.csv",
    "synthetic_scores": "synthetic_scores.csv",
}
TEST_MAPS = "test_maps.npz"  # in maps/
SCORE_KEYS = ["image", "label", "split", "category"]  # the columns an unreadable image's row has


class RunExistsError(FileExistsError):
    """The run folder already holds results and neither overwrite nor resume was asked for."""


def default_run_dir(output_root: str | Path, name: str) -> Path:
    """``<output_root>/<name>-YYYYmmdd-HHMMSS`` (a numeric suffix if that exists already)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(output_root) / f"{name}-{stamp}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def create_run_dir(path: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Create the run folder and its sub-folders; refuse a non-empty folder unless ``overwrite``.

    With ``overwrite`` the earlier run is renamed to ``<name>.replaced-<time>`` (nothing is
    deleted, and no stale file of the old run can be mistaken for the new run's). With ``resume``
    the folder must already hold a run (its ``config.yaml``) and is continued in place.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunExistsError(f"run folder {str(path)!r} exists and is a file; choose another --output")
    if resume:
        if overwrite:
            raise ValueError("resume and overwrite exclude each other")
        if not (path / RUN_FILES["config"]).is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a run folder to resume: {RUN_FILES['config']} is missing")
    elif path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise RunExistsError(
                f"run folder {str(path)!r} already holds results; pass --resume to continue an interrupted run, "
                "--overwrite to replace it, or choose another --output"
            )
        aside = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        path.rename(aside)
        log.warning("moved the earlier run in %s aside to %s", path, aside)
    for sub in ("checkpoints", "plots", "maps"):
        (path / RUN_FILES[sub]).mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(path: str | Path, writer: Callable[[str], None], suffix: str = "") -> None:
    """Call ``writer(tmp_path)`` then rename ``tmp_path`` onto ``path`` (same folder, atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_text_atomic(path: str | Path, text: str) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    write_atomic(path, _write)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: str | Path, payload: Any) -> None:
    """Atomic JSON; NaN/inf are written as null (JSON has no NaN)."""
    text = json.dumps(_replace_nonfinite(payload), indent=2, default=_json_default, allow_nan=False)
    write_text_atomic(path, text + "\n")


def _replace_nonfinite(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _replace_nonfinite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_nonfinite(v) for v in value]
    return value


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Save tensors and plain values atomically. Load with :func:`load_checkpoint` only."""
    write_atomic(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: a file that would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise ValueError(
            f"checkpoint {str(path)!r} cannot be loaded safely: it is truncated, corrupt or holds objects that would "
            f"run code (only tensors and plain values are accepted): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc


# --------------------------------------------------------------------------------------------
# the files of a run


def _whole_or_tile(values: dict[str, Any], section: str) -> int:
    """A stage's :func:`~twostage_ad.config.effective_tile` in a config dict."""
    from twostage_ad.config import effective_tile

    size = values["data"]["image_size"] if section == "stage1" else values["stage2"]["image_size"] or values["data"]["image_size"]
    return effective_tile(values[section]["tile_size"], size)


def same_setting(given: dict[str, Any], stored: dict[str, Any], section: str, key: str) -> bool:
    """Whether two config dicts (``config_to_dict``) mean the same ``section.key``: a tile at least its
    stage's image size means what 0 does (the whole image), and a data path what its resolved form does
    (a run stored before ``--set data.path`` was recorded absolute resumes under the same command)."""
    if key == "tile_size":
        return _whole_or_tile(given, section) == _whole_or_tile(stored, section)
    if (section, key) == ("data", "path") and given["data"]["path"] and stored["data"]["path"]:
        return Path(given["data"]["path"]).expanduser().resolve() == Path(stored["data"]["path"]).expanduser().resolve()
    return given[section][key] == stored[section][key]


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved ``config.yaml`` of a run (old fields migrated, with a warning; fields added since it
    was written at the value they had then, :func:`~twostage_ad.migration.stored_run_config`)."""
    from twostage_ad.config import ConfigError
    from twostage_ad.config_io import config_from_dict
    from twostage_ad.migration import stored_run_config

    path = Path(run_dir) / RUN_FILES["config"]
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run folder: {RUN_FILES['config']} is missing")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
        return config_from_dict(stored_run_config(values) if isinstance(values, dict) else values)
    except (yaml.YAMLError, ConfigError) as exc:
        raise ConfigError(f"{str(path)!r}: {exc}") from exc


def write_scores(run_dir: Path, table: pd.DataFrame, errors: pd.DataFrame | None = None) -> None:
    """``scores.csv``: the scored rows, then one row per unreadable val/test image (``error`` set)."""
    out = table.assign(error="")
    if errors is not None and len(errors):
        out = pd.concat([out, errors], ignore_index=True)
    # 17 significant digits: exact round trip, so `calibrate` and `predict` see the scores `run` saw
    write_atomic(run_dir / RUN_FILES["scores"], lambda tmp: out.to_csv(tmp, index=False, float_format="%.17g"))


def read_scores(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``scores.csv`` -> (scored rows, unreadable rows with their ``error``)."""
    path = run_dir / RUN_FILES["scores"]
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} has no {RUN_FILES['scores']}: run the pipeline first")
    # round_trip: the C parser's default float conversion can miss the written value by an ulp
    table = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"image": str, "category": str, "error": str},
                        float_precision="round_trip")
    if "error" not in table.columns:
        return table, table.iloc[0:0]
    failed = table["error"].fillna("").astype(str) != ""
    scored = table[~failed].drop(columns="error").reset_index(drop=True)
    if "flagged" in scored.columns:
        scored["flagged"] = scored["flagged"].astype(str).str.lower() == "true"
    return scored, table[failed][[*SCORE_KEYS, "error"]]


def write_synthetic_scores(run_dir: Path, kinds: list[str], masks: np.ndarray, stage1_loss: np.ndarray,
                           stage2_score: np.ndarray) -> None:
    """``synthetic_scores.csv``: per validation normal with a synthetic defect (``masks`` N×H×W), its kind,
    defect size and both stages' scores; written exactly, as ``scores.csv`` is."""
    table = pd.DataFrame({"kind": kinds, "defect_pixels": masks.reshape(len(masks), -1).sum(axis=1).astype(int),
                          "stage1_loss": stage1_loss, "stage2_score": stage2_score})
    write_atomic(run_dir / RUN_FILES["synthetic_scores"], lambda tmp: table.to_csv(tmp, index=False, float_format="%.17g"))


def read_synthetic_scores(run_dir: Path) -> pd.DataFrame | None:
    """``synthetic_scores.csv`` (kind, defect_pixels, stage1_loss, stage2_score), or None for a run without it."""
    path = Path(run_dir) / RUN_FILES["synthetic_scores"]
    return pd.read_csv(path, dtype={"kind": str}, float_precision="round_trip") if path.is_file() else None


def write_thresholds(run_dir: Path, cascade: Cascade) -> None:
    """``thresholds.json`` from a fitted cascade; every earlier threshold is kept under ``history``."""
    path = run_dir / RUN_FILES["thresholds"]
    history: list[dict[str, Any]] = []
    if path.is_file():
        previous = read_json(path)
        history = list(previous.get("history", []))
        for stage in ("stage1", "stage2"):
            if previous.get(stage):
                history.append({"stage": stage, **previous[stage]})
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json(path, {
        "stage1": {**cascade.stage1.to_dict(), "calibrated_at": now},
        "stage2": {**cascade.stage2.to_dict(), "calibrated_at": now, "applies_to": f"second-stage score (fusion {cascade.fusion!r})"},
        "cascade": {k: v for k, v in cascade.to_dict().items() if k not in ("stage1", "stage2")},
        "history": history,
    })


def write_prediction_maps(path: Path, predictions: Sequence[ImagePrediction], size: int) -> None:
    """``predict --maps``: image names, stage-1 maps (float32), stage-2 maps (float16, NaN where stage
    2 did not run) and, when the run stores the cascade's map, ``fused`` (float32; stage 2's term 0
    where it did not run), each ``N×size×size``."""
    stage2 = np.full((len(predictions), size, size), np.nan, np.float16)
    for i, p in enumerate(predictions):
        if p.stage2_map is not None:
            stage2[i] = np.clip(p.stage2_map, -6e4, 6e4)
    fused = {} if any(p.fused_map is None for p in predictions) else {
        "fused": np.array([p.fused_map for p in predictions], dtype=np.float32).reshape(-1, size, size)}
    write_atomic(path, lambda tmp: np.savez_compressed(
        tmp,
        images=np.array([p.image for p in predictions]),
        stage1=np.array([p.stage1_map for p in predictions], dtype=np.float32).reshape(-1, size, size),
        stage2=stage2,
        **fused,
    ))


def write_test_maps(run_dir: Path, *, images: np.ndarray, stage1: np.ndarray, stage2: np.ndarray, masks: np.ndarray,
                    has_mask: np.ndarray, names: list[str]) -> None:
    """``maps/test_maps.npz``: the test images as the models saw them (uint8 N×H×W×C), stage-1 maps
    ``1 − A`` as uint8 (0–255 = 0–1), stage-2 maps in validation-normal σ (float16), masks, names."""
    write_atomic(
        run_dir / RUN_FILES["maps"] / TEST_MAPS,
        lambda tmp: np.savez_compressed(
            tmp,
            stage1=np.clip(np.rint(stage1 * 255), 0, 255).astype(np.uint8),
            stage2=np.clip(stage2, -6e4, 6e4).astype(np.float16),
            masks=masks,
            has_mask=has_mask,
            images=images,
            names=np.array(names),
        ),
    )
