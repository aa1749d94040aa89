"""Train on your own images laid out as ROOT/train/good, ROOT/test/<defect>/ (MVTec AD style)
or ROOT/train/0.normal, ROOT/test/{0.normal,1.abnormal} (seed style).

    python examples/train_folder.py ROOT [mvtec|seed] [IMAGE_SIZE]
"""

import sys

from twostage_ad.config import load_config
from twostage_ad.workflow import run_pipeline

root = sys.argv[1]
layout = sys.argv[2] if len(sys.argv) > 2 else "mvtec"
size = sys.argv[3] if len(sys.argv) > 3 else "128"
config = load_config(None, [f"data.source={layout}", f"data.path={root}", f"data.image_size={size}", "run.name=folder"])
result = run_pipeline(config)
print(f"run folder: {result.run_dir}")
print("image AUROC:", result.metrics["image_auroc"])
print("pixel AUROC:", result.metrics["pixel_auroc"], "PRO:", result.metrics["pro"])
