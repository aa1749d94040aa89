"""Write an aspect-preserving copy of a manifest data set, for the aspect-ratio experiment (docs/experiments.md).

    python benchmarks/letterbox.py ../shared/data/mtd/split.csv /tmp/mtd_letterbox [--size 128]
    python -m twostage_ad.pipeline run --config pipelines/mtd.yaml --set data.path=/tmp/mtd_letterbox/split.csv

The package stretches non-square images to ``size × size``. Here each image is resized so that
its longer side is ``size`` (one scale for both axes), then padded to a square by mirroring
(``numpy.pad(mode="symmetric")``, so the surface texture continues into the padding); masks get
the same resize (box filter, kept where any defect falls) and the same mirroring, so a defect
mirrored into the padding is labelled as one. Images are decoded as the package decodes them
(grey or RGB by their mode, 16-bit scaled to 8); masks are written defect = white, so a data set
with inverted masks (PIPED) needs ``--invert-masks`` here and ``data.invert_masks=false`` in the
run. The copy is written as PNG with a manifest of the same columns to ``OUT_DIR``, which must be
outside the repository and the source folder (the data are not ours to copy in).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from twostage_ad.data.images import decode_native  # the package's own decoding

from _results import refuse_overlap


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


def _inside(out_dir: Path, relative: str | Path) -> Path:
    """``out_dir / relative``, refusing paths that would leave ``out_dir`` (absolute or ``..``)."""
    target = (out_dir / relative).resolve()
    if out_dir not in target.parents:
        raise SystemExit(f"{str(relative)!r} would be written outside {str(out_dir)!r}; only relative manifest paths are copied")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def letterbox(manifest: Path, out_dir: Path, size: int, invert_masks: bool = False) -> pd.DataFrame:
    """Write the letterboxed images, masks (defect = white) and manifest; return the manifest."""
    source_root = manifest.parent
    table = pd.read_csv(manifest)
    rows = []
    for row in table.to_dict("records"):
        image = decode_native(source_root / row["image"])
        width, height = fitted_size(*image.size, size)
        out_image = Path(row["image"]).with_suffix(".png")
        Image.fromarray(mirror_pad(np.asarray(image.resize((width, height), Image.BILINEAR)), size)).save(_inside(out_dir, out_image))
        mask = row.get("mask")
        if isinstance(mask, str) and mask:
            grey = decode_native(source_root / mask, mode="L", what="mask")
            if grey.size != image.size:
                raise SystemExit(f"mask {mask!r} is {grey.size[0]}×{grey.size[1]} but its image is {image.size[0]}×{image.size[1]}")
            binary = (np.asarray(grey) > 127) != invert_masks
            boxed = np.asarray(Image.fromarray(binary.astype(np.uint8) * 255).resize((width, height), Image.BOX)) > 0
            mask = str(Path("masks") / Path(mask).with_suffix(".png"))
            Image.fromarray(mirror_pad(boxed.astype(np.uint8) * 255, size)).save(_inside(out_dir, mask))
        rows.append({**row, "image": str(out_image), "mask": mask if isinstance(mask, str) else ""})
    out = pd.DataFrame(rows, columns=table.columns)
    out.to_csv(out_dir / "split.csv", index=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path, help="split.csv of the source data set")
    parser.add_argument("out_dir", type=Path, help="where the copy goes (outside the repository)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--invert-masks", action="store_true", help="source masks mark defects black (as data.invert_masks)")
    args = parser.parse_args()
    out_dir, source_root = args.out_dir.resolve(), args.manifest.resolve().parent
    refuse_overlap(parser, out_dir, source_root)
    table = letterbox(args.manifest.resolve(), out_dir, args.size, args.invert_masks)
    print(f"{len(table)} images -> {out_dir / 'split.csv'}")


if __name__ == "__main__":
    main()
