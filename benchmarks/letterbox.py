"""Write an aspect-preserving copy of a manifest data set, for the experiment of entry 42.

    python benchmarks/letterbox.py ../shared/data/mtd/split.csv /tmp/mtd_letterbox [--size 128]
    python -m twostage_ad.pipeline run --config pipelines/mtd.yaml --set data.path=/tmp/mtd_letterbox/split.csv

The package stretches non-square images to ``size × size``. Here each image is resized so that
its longer side is ``size`` (one scale for both axes), then padded to a square by mirroring
(``numpy.pad(mode="symmetric")``, so the surface texture continues into the padding); masks get
the same resize (box filter, kept where any defect falls) and the same mirroring, so a defect
mirrored into the padding is labelled as one. The copy is written as PNG with a manifest of the
same columns to ``OUT_DIR``, which must be outside the repository (the data are not ours to copy
in).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def fitted_size(width: int, height: int, size: int) -> tuple[int, int]:
    """``(W, H)`` with the longer side ``size`` and the aspect ratio kept."""
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def mirror_pad(array: np.ndarray, size: int) -> np.ndarray:
    """Centre ``H×W[×C]`` on a ``size × size`` canvas, the margins filled by mirroring."""
    height, width = array.shape[:2]
    top, left = (size - height) // 2, (size - width) // 2
    pad = [(top, size - height - top), (left, size - width - left)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, mode="symmetric")


def letterbox(manifest: Path, out_dir: Path, size: int) -> pd.DataFrame:
    """Write the letterboxed images, masks and manifest; return the manifest."""
    source_root = manifest.parent
    table = pd.read_csv(manifest)
    rows = []
    for row in table.to_dict("records"):
        with Image.open(source_root / row["image"]) as opened:
            image = opened.convert("L" if opened.mode in ("L", "I;16", "I", "1") else "RGB")
        width, height = fitted_size(*image.size, size)
        out_image = Path(row["image"]).with_suffix(".png")
        (out_dir / out_image).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mirror_pad(np.asarray(image.resize((width, height), Image.BILINEAR)), size)).save(out_dir / out_image)
        mask = row.get("mask")
        if isinstance(mask, str) and mask:
            with Image.open(source_root / mask) as opened:
                binary = np.asarray(opened.convert("L")) > 127
            boxed = np.asarray(Image.fromarray(binary.astype(np.uint8) * 255).resize((width, height), Image.BOX)) > 0
            mask = str(Path("masks") / Path(mask).with_suffix(".png"))
            (out_dir / mask).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mirror_pad(boxed.astype(np.uint8) * 255, size)).save(out_dir / mask)
        rows.append({**row, "image": str(out_image), "mask": mask if isinstance(mask, str) else ""})
    out = pd.DataFrame(rows, columns=table.columns)
    out.to_csv(out_dir / "split.csv", index=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path, help="split.csv of the source data set")
    parser.add_argument("out_dir", type=Path, help="where the copy goes (outside the repository)")
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    out_dir = args.out_dir.resolve()
    if out_dir == REPO or REPO in out_dir.parents:
        parser.error(f"{str(out_dir)!r} is inside the repository; write the copy elsewhere")
    table = letterbox(args.manifest.resolve(), out_dir, args.size)
    print(f"{len(table)} images -> {out_dir / 'split.csv'}")


if __name__ == "__main__":
    main()
