"""Train both stages on the bundled digits from Python and look at the results.

    python examples/train_digits.py [OUTPUT_DIR]
"""

import sys

from twostage_ad.config_io import load_config
from twostage_ad.workflow import run_pipeline

config = load_config(None, ["data.normal_digit=1", "stage1.epochs=5", "stage2.epochs=5"])
result = run_pipeline(config, sys.argv[1] if len(sys.argv) > 1 else None)
print("image AUROC:", result.metrics["image_auroc"])  # stage1, stage2, cascade
test = result.scores[result.scores["split"] == "test"]
print(test.groupby("category")[["stage1_loss", "stage2_score", "flagged", "decision"]].mean())
