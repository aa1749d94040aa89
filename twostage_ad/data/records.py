"""Readers that turn each supported data layout into one list of :class:`Record` (docs/design.md §3).

Layouts:
- folders (seed): ``root/train/0.normal``, ``root/test/0.normal``, ``root/test/1.abnormal``, and one
  level of subfolders in each (the subfolder names the category)
- MVTec AD: ``root/train/good``, ``root/test/<defect>/``, ``root/ground_truth/<defect>/<name>_mask.png``
  (or ``<name>.<ext>``, any image extension and case: VisA, BTAD)
- manifest: a CSV with columns ``image,label,split,mask,category`` (paths relative to the CSV)
- digits: scikit-learn's bundled 8×8 digits (no download), one digit normal, the others anomalous

A validation split of normals is carved from train (seeded) when the source has none.
"""

from __future__ import annotations

import logging
import posixpath
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from twostage_ad.config import DataConfig

__all__ = [
    "DataError",
    "Record",
    "IMAGE_EXTENSIONS",
    "read_folders_layout",
    "read_seed_layout",
    "read_mvtec_layout",
    "read_manifest",
    "read_digits",
    "ensure_val_split",
    "load_records",
    "split_records",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm")  # netpbm: machine-vision tools
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("image", "label", "split", "mask", "category")


class DataError(ValueError):
    """The data on disk does not match what the configured layout promises."""


@dataclass(frozen=True, eq=False)
class Record:
    """One image: where it is (or its pixels), its label (1 = anomalous), split and mask.

    ``name`` is a stable identifier (the path relative to the data root); ``array`` holds the
    pixels for in-memory sources (digits) and is None for files.
    """

    name: str
    label: int
    split: str
    category: str = ""
    image: Path | None = None
    mask: Path | None = None
    array: np.ndarray | None = None


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"{what}: folder {str(path)!r} does not exist")


def read_folders_layout(root: str | Path) -> list[Record]:
    """``root/train/0.normal``, optional ``root/val/0.normal``, ``root/test/{0.normal,1.abnormal}``;
    images in subfolders count too, the subfolder naming their category (e.g. ``1.abnormal/scratch``)."""
    root = Path(root)
    _require_dir(root / "train" / "0.normal", "folders layout needs training normals")
    records: list[Record] = []
    for split in SPLITS:
        for label, sub in ((0, "0.normal"), (1, "1.abnormal")):
            folder = root / split / sub
            if not folder.is_dir():
                continue
            for sub_folder in [folder, *_category_folders(folder)]:
                category = sub if sub_folder == folder else sub_folder.name
                records.extend(Record(name=str(path.relative_to(root)), label=label, split=split, category=category,
                                      image=path) for path in _image_files(sub_folder))
    return records


# Subfolders the folders layout never reads as a category: masks beside the images, and the
# hidden, private or system folders tools leave behind (.ipynb_checkpoints, __pycache__, @eaDir).
_NOT_A_CATEGORY = {"mask", "masks", "ground_truth", "gt"}


def _category_folders(folder: Path) -> list[Path]:
    """``folder``'s subfolders that hold images of one category (one level deep)."""
    return sorted(d for d in folder.iterdir() if d.is_dir() and d.name[:1] not in ".@_"
                  and d.name.lower() not in _NOT_A_CATEGORY)


read_seed_layout = read_folders_layout  # the folders layout's first name ("seed"), kept for callers


def read_mvtec_layout(root: str | Path, category: str | None = None) -> list[Record]:
    """MVTec AD: ``root[/category]/train/good``, ``test/<defect>/``, ``ground_truth/<defect>/``."""
    root = Path(root)
    if category and (root / category).is_dir():
        root = root / category
    train_good = _child_folder(root / "train", "good")
    _require_dir(train_good, "MVTec layout needs training normals")
    records = [
        Record(name=str(p.relative_to(root)), label=0, split="train", category="good", image=p)
        for p in _image_files(train_good)
    ]
    test_root = root / "test"
    if test_root.is_dir():
        for defect_dir in sorted(d for d in test_root.iterdir() if d.is_dir()):
            defect = defect_dir.name
            label = 0 if defect.lower() == "good" else 1
            masks = _mask_files(_child_folder(root / "ground_truth", defect)) if label else {}
            unmatched = 0
            for path in _image_files(defect_dir):
                mask = masks.get(path.stem.lower())
                unmatched += bool(label and masks and mask is None)
                records.append(
                    Record(name=str(path.relative_to(root)), label=label, split="test", category=defect, image=path, mask=mask)
                )
            if unmatched:
                log.warning("MVTec layout: %d image(s) in %s have no mask in ground_truth/%s (looked for <name>_mask.<ext> "
                            "and <name>.<ext>); they count in the image metrics only", unmatched, defect_dir, defect)
    return records


def _child_folder(parent: Path, name: str) -> Path:
    """``parent / name``, or its subfolder whose name differs only in case."""
    if not (parent / name).is_dir() and parent.is_dir():
        for child in parent.iterdir():
            if child.is_dir() and child.name.lower() == name.lower():
                return child
    return parent / name


def _mask_files(folder: Path) -> dict[str, Path]:
    """The masks in ``folder`` by their image's lower-case stem: ``<stem>_mask.<ext>`` (MVTec AD)
    or ``<stem>.<ext>`` (VisA, BTAD), any image extension, any case."""
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in _image_files(folder):
        stem = path.stem.lower()
        if stem.endswith("_mask"):
            found[stem.removesuffix("_mask")] = path  # MVTec's own name wins over a same-stem file
        found.setdefault(stem, path)  # also under its full name: an image may itself be called x_mask
    return found


def _inside(base: Path, relative: str, where: str, column: str, allow_outside: bool) -> Path:
    """``base / relative``, refusing absolute paths and ``..`` that leave ``base`` (a manifest from
    elsewhere must not make the tool read arbitrary files) unless ``allow_outside``."""
    path = Path(relative.replace("\\", "/"))  # a manifest written on Windows
    if not allow_outside:
        normal = posixpath.normpath(relative.replace("\\", "/"))
        lexical_escape = path.is_absolute() or normal.startswith("/") or normal == ".." or normal.startswith("../")
        # symbolic links inside the folder may point anywhere: judge where the path really leads
        if lexical_escape or not (base / path).resolve().is_relative_to(base.resolve()):
            raise DataError(
                f"{where}: the {column} path {relative!r} leads outside the manifest's folder {str(base)!r}; "
                "move the files under that folder or set data.allow_outside_paths: true if you trust this manifest"
            )
    return base / path


def read_manifest(csv_path: str | Path, category: str | None = None, allow_outside: bool = False) -> list[Record]:
    """A CSV manifest ``image,label,split,mask,category``; paths relative to the CSV's folder.

    Paths may not leave that folder (absolute paths, ``..``) unless ``allow_outside``.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"manifest {str(csv_path)!r} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)  # a row longer than the header is an error
            table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8", index_col=False)
    except (pd.errors.ParserError, pd.errors.ParserWarning, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(
            f"manifest {str(csv_path)!r} is not a readable UTF-8 CSV ({str(exc).splitlines()[0]}); expected a header "
            f"line {','.join(MANIFEST_COLUMNS)} and one row per image"
        ) from exc
    missing = [c for c in ("image", "label", "split") if c not in table.columns]
    if missing:
        raise DataError(
            f"manifest {str(csv_path)!r} lacks column(s) {missing}; expected columns {', '.join(MANIFEST_COLUMNS)}"
        )
    if "category" not in table.columns:
        table["category"] = ""
    if "mask" not in table.columns:
        table["mask"] = ""
    if category:
        known = sorted(set(table["category"]))
        table = table[table["category"] == category]
        if table.empty:
            raise DataError(f"manifest {str(csv_path)!r} has no rows of category {category!r}; categories: {known}")
    base = csv_path.parent
    records = []
    for line, row in zip(table.index.to_numpy() + 2, table.itertuples(index=False)):
        where = f"manifest {str(csv_path)!r} line {line}"
        if row.label not in ("0", "1"):
            raise DataError(f"{where}: label must be 0 (normal) or 1 (anomalous), got {row.label!r}")
        if row.split not in SPLITS:
            raise DataError(f"{where}: split must be one of {SPLITS}, got {row.split!r}")
        if not row.image:
            raise DataError(f"{where}: the image column is empty")
        records.append(
            Record(
                name=row.image,
                label=int(row.label),
                split=row.split,
                category=row.category,
                image=_inside(base, row.image, where, "image", allow_outside),
                mask=_inside(base, row.mask, where, "mask", allow_outside) if row.mask else None,
            )
        )
    return records


def read_digits(normal_digit: int = 0, seed: int = 0, test_fraction: float = 0.3) -> list[Record]:
    """scikit-learn's bundled digits (8×8, 0..16) as 8-bit images: ``normal_digit`` is normal.

    A seeded ``test_fraction`` of the normal digit plus every other digit form the test split;
    the remaining normals are train (validation is carved later like for any source).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    rng = np.random.default_rng(seed)
    normal_idx = np.flatnonzero(digits.target == normal_digit)
    test_normals = set(rng.choice(normal_idx, size=int(round(test_fraction * len(normal_idx))), replace=False).tolist())
    records = []
    for i, (image, target) in enumerate(zip(images, digits.target)):
        label = int(target != normal_digit)
        split = "test" if (label or i in test_normals) else "train"
        records.append(Record(name=f"digits/{i:04d}", label=label, split=split, category=f"digit_{target}", array=image))
    return records


def ensure_val_split(records: list[Record], fraction: float, seed: int) -> list[Record]:
    """If no record is in ``val``, move a seeded ``fraction`` of train normals there."""
    if any(r.split == "val" for r in records):
        return records
    train_normals = [i for i, r in enumerate(records) if r.split == "train" and r.label == 0]
    n_val = max(1, int(round(fraction * len(train_normals))))
    if len(train_normals) - n_val < 1:
        raise DataError(
            f"only {len(train_normals)} training normal image(s): too few to carve a validation split; "
            "add more normal images or provide a val split"
        )
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(train_normals, size=n_val, replace=False).tolist())
    return [replace(r, split="val") if i in chosen else r for i, r in enumerate(records)]


def load_records(config: DataConfig, seed: int = 0) -> list[Record]:
    """Read the configured source, carve a validation split if needed, check the basics."""
    if config.source == "digits":
        records = read_digits(config.normal_digit, seed=seed)
    elif config.source in ("folders", "seed"):  # "seed": the folders layout's first name
        records = read_folders_layout(config.path)
    elif config.source == "mvtec":
        records = read_mvtec_layout(config.path, config.category)
    elif config.source == "manifest":
        records = read_manifest(config.path, config.category, allow_outside=config.allow_outside_paths)
    else:  # validated in DataConfig; kept for direct callers
        raise DataError(f"unknown data source {config.source!r}")
    if config.category and config.source in ("folders", "seed", "digits"):
        log.warning("data.category=%r is ignored for source %r", config.category, config.source)
    train_anomalies = [r.name for r in records if r.split == "train" and r.label == 1]
    if train_anomalies:
        log.warning(
            "%d labelled anomalies in the train split are not used for training (first: %s)",
            len(train_anomalies),
            train_anomalies[0],
        )
    if not any(r.split == "train" and r.label == 0 for r in records):
        raise DataError(f"no normal training images found in {config.path or config.source!r}")
    records = ensure_val_split(records, config.val_fraction, seed)
    if not any(r.split == "test" for r in records):
        log.warning("no test images found in %r: the run will train and calibrate only", config.path)
    return records


def split_records(records: list[Record]) -> dict[str, list[Record]]:
    """``{'train': normals only, 'val': ..., 'test': ...}``."""
    return {
        "train": [r for r in records if r.split == "train" and r.label == 0],
        "val": [r for r in records if r.split == "val"],
        "test": [r for r in records if r.split == "test"],
    }
