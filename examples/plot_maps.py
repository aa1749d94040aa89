"""Draw the anomaly maps of a few images side by side, on the run's fixed colour scales.

    python examples/plot_maps.py RUN_DIR IMAGE [IMAGE ...] --out maps.png
"""

import argparse
from pathlib import Path

import numpy as np

from twostage_ad import TwoStageDetector
from twostage_ad.data.images import read_image
from twostage_ad.report import plot_map_pairs

parser = argparse.ArgumentParser()
parser.add_argument("run_dir")
parser.add_argument("images", nargs="+")
parser.add_argument("--out", default="maps.png")
args = parser.parse_args()

detector = TwoStageDetector.from_run(args.run_dir)
result = detector.predict(args.images, all_stages=True, progress=False)  # stage-2 maps for every image
size, channels = detector.image_size, detector.channels
pixels = np.stack([read_image(p.image, size, channels, detector.bit_depth) for p in result.images])
cascade = detector.cascade  # contour where the stage-2 map exceeds validation normals' image scores by 3 std
level = cascade.stage2.value if cascade.fusion == "stage2" else cascade.stage2_mean + 3 * cascade.stage2_std
plot_map_pairs(
    pixels,
    np.stack([p.stage1_map for p in result.images]),
    np.stack([p.stage2_map for p in result.images]),
    np.zeros((len(result), size, size), np.uint8),  # no ground truth for new images
    [f"{Path(p.image).name}: {'ANOMALOUS' if p.decision else 'normal'} ({p.cascade_score:.3f})" for p in result.images],
    Path(args.out),
    stage2_max=2 * level,
    stage2_level=level,
)
print(f"wrote {args.out}")
