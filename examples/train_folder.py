"""Train on your own images laid out as ROOT/train/good, ROOT/test/<defect>/ (MVTec AD style)
or ROOT/train/0.normal, ROOT/test/{0.normal,1.abnormal} (folders style), with the package's
default recipe.

    python examples/train_folder.py ROOT [mvtec|folders] [IMAGE_SIZE]
"""

import sys

from twostage_ad.config_io import config_from_dict
from twostage_ad.workflow import run_pipeline

root = sys.argv[1]
layout = sys.argv[2] if len(sys.argv) > 2 else "mvtec"
size = int(sys.argv[3]) if len(sys.argv) > 3 else 128
# the package defaults are the real-data recipe; only the data and the run's name are set here
config = config_from_dict({"data": {"source": layout, "path": root, "image_size": size}, "run": {"name": "folder"}})
result = run_pipeline(config)
print(f"run folder: {result.run_dir}")
print("image AUROC:", result.metrics["image_auroc"])
print("pixel AUROC:", result.metrics["pixel_auroc"], "PRO:", result.metrics["pro"])
