"""Compare screening thresholds on a finished run without retraining.

    python examples/recalibrate.py RUN_DIR
"""

import sys
from dataclasses import replace

from twostage_ad.workflow import calibrate_run, load_run_config

run_dir = sys.argv[1]
base = load_run_config(run_dir).calibration
for calibration in (replace(base, method="quantile", q=0.95), replace(base, method="fpr", fpr=0.2), replace(base, method="meanstd", k=2.0)):
    threshold = calibrate_run(run_dir, calibration)
    print(f"{threshold.method:8s} {threshold.params} -> {threshold.value:.5g} "
          f"(flags {100 * threshold.stats['flagged_fraction_normal']:.1f}% of validation normals)")
calibrate_run(run_dir, base)  # restore the run's own method; all of them stay in thresholds.json history
