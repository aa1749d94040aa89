"""Shared fixtures: tiny image folders in every supported layout and a tiny fast config."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def textured(rng: np.random.Generator, size: int = 40, channels: int = 1) -> np.ndarray:
    """A smooth normal-looking surface: stripes plus a little noise."""
    yy, xx = np.mgrid[:size, :size]
    base = 128 + 40 * np.sin(xx / 3.0) + rng.normal(0, 5, (size, size))
    base = np.clip(base, 0, 255).astype(np.uint8)
    return base if channels == 1 else np.stack([base] * channels, axis=-1)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def seed_layout(tmp_path: Path, rng: np.random.Generator) -> Path:
    root = tmp_path / "seed"
    for i in range(8):
        write_image(root / "train" / "0.normal" / f"n{i}.png", textured(rng))
    for i in range(3):
        write_image(root / "test" / "0.normal" / f"t{i}.png", textured(rng))
    for i in range(3):
        bad = textured(rng)
        bad[10:20, 10:20] = 0
        write_image(root / "test" / "1.abnormal" / f"a{i}.png", bad)
    return root


@pytest.fixture
def mvtec_layout(tmp_path: Path, rng: np.random.Generator) -> Path:
    root = tmp_path / "mvtec" / "tile"
    for i in range(6):
        write_image(root / "train" / "good" / f"{i:03d}.png", textured(rng, channels=3))
    for i in range(2):
        write_image(root / "test" / "good" / f"{i:03d}.png", textured(rng, channels=3))
    for i in range(2):
        bad = textured(rng, channels=3)
        bad[5:15, 5:15] = 255
        write_image(root / "test" / "crack" / f"{i:03d}.png", bad)
        mask = np.zeros((40, 40), np.uint8)
        mask[5:15, 5:15] = 255
        write_image(root / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask)
    return root.parent


# Stage 1 with every objective trained and screened (the digits demo's setting; the package
# defaults train and screen the attention head alone): tests of those terms spell it out.
ALL_OBJECTIVES = {"w_con": 1.0, "w_enc": 1.0, "w_adv": 0.1, "w_rep": 1.0, "screen_con": 1.0, "screen_enc": 1.0}
