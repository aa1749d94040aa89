"""Shared by the benchmark scripts: the git commit of a run and the append-only result tables."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from twostage_ad.config import Config
from twostage_ad.data.images import DecodedImages, decode_records, resize_images, resize_maps
from twostage_ad.data.records import load_records, split_records
from twostage_ad.runs import write_atomic, write_text_atomic
from twostage_ad.stages.attention import AttentionStage
from twostage_ad.stages.screening import ScreeningResult

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def decode_run_split(config: Any, split: str, size: int) -> DecodedImages:
    """A run's ``split`` (``train``, ``val``, ``test``) decoded at ``size``: pass the detector's
    ``image_size`` (the larger stage's), as ``run`` decodes, so that synthetic defects are drawn on
    the pixels the run drew them on and a larger stage 2 reads its own resolution."""
    records = split_records(load_records(config.data, seed=config.run.seed))[split]
    return decode_records(records, size, config.data.channels, config.data.invert_masks, progress=False,
                          bit_depth=config.data.bit_depth or 16)


def refuse_overlap(parser: Any, out_dir: Path, source_root: Path) -> None:
    """Stop with ``parser``'s usage error when ``out_dir`` (where a script writes derived data) is or
    holds the repository or the source data set, or lies inside either: the data are not ours to copy in."""
    for other, what in ((HERE.parent, "the repository"), (source_root, "the source data set")):
        if out_dir == other or other in out_dir.parents or out_dir in other.parents:
            parser.error(f"{str(out_dir)!r} overlaps {what}; write elsewhere")


def run_image_size(config: Config) -> int:
    """The size ``run`` decoded a run's images at: the larger stage's (``TwoStageDetector.image_size``)."""
    return max(config.data.image_size, config.stage2.image_size or config.data.image_size)


def score_stage1_as_run(stage1: AttentionStage, images: np.ndarray, **options: Any) -> ScreeningResult:
    """Stage 1's :class:`ScreeningResult` on images decoded at :func:`run_image_size`, as the
    detector scores them: resized to stage 1's input, the maps brought back to the images' size."""
    result = stage1.score(resize_images(images, stage1.image_size), **options)
    maps = resize_maps(result.anomaly_maps, images.shape[1])
    return result if maps is result.anomaly_maps else replace(result, anomaly_maps=maps)


def git_commit() -> str:
    """Short hash of HEAD, ``+dirty`` when tracked files differ from it."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True)
        # result tables being rewritten by a running benchmark do not make the code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"],
                               cwd=HERE.parent, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timed_median(call: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """``(result of the last call, median seconds)`` over ``repeats`` timed calls of ``call()``."""
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        seconds.append(time.perf_counter() - start)
    return result, float(np.median(seconds))


def markdown_table(table: pd.DataFrame) -> str:
    def cell(value: object) -> str:
        """Decimals with 4 places whether the value is a new row's float or an old row's CSV text."""
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return ""
        if isinstance(value, float):
            return f"{value:.4f}"
        if isinstance(value, str) and re.fullmatch(r"-?\d+\.\d+", value):
            return f"{float(value):.4f}"
        return str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def append_row(name: str, row: dict[str, Any], title: str) -> pd.DataFrame:
    """Append ``row`` to ``results/<name>.csv`` and rewrite ``results/<name>.md`` from the CSV."""
    RESULTS.mkdir(exist_ok=True)
    csv_path = RESULTS / f"{name}.csv"
    new = pd.DataFrame([row])
    # earlier rows stay the text they were written as: parsed, a commit like 40761e5 would become 4076100000.0
    table = pd.concat([pd.read_csv(csv_path, dtype=str, keep_default_na=False), new]) if csv_path.exists() else new
    write_atomic(csv_path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.4f"))
    write_text_atomic(RESULTS / f"{name}.md", f"# {title}\n\n" + markdown_table(table))
    return table


def record_rows(name: str, title: str, rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Append each row to ``results/<name>.csv`` as it comes (an interrupted benchmark keeps what it
    measured), print it rounded, and return them all as a frame with ``dataset`` cut to the data set."""
    kept = []
    for row in rows:
        append_row(name, row, title)
        kept.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    table = pd.DataFrame(kept)
    table["dataset"] = table["dataset"].str.split("/").str[0]
    return table
