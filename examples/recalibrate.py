"""Compare screening thresholds on a finished run without retraining.

    python examples/recalibrate.py RUN_DIR
"""

import sys
from dataclasses import replace

from twostage_ad.workflow import calibrate_run, load_run_config

run_dir = sys.argv[1]
base = load_run_config(run_dir).calibration
for calibration in (replace(base, method="conformal", q=0.95), replace(base, method="quantile", q=0.95), replace(base, method="fpr", fpr=0.2),
                    replace(base, method="meanstd", k=2.0)):
    cascade = calibrate_run(run_dir, calibration)  # re-picks τ₁ and τ₂ with the same method
    tau1, tau2 = cascade.stage1, cascade.stage2
    print(f"{tau1.method:9s} {tau1.params}: τ₁ {tau1.value:.5g} flags {100 * tau1.stats['flagged_fraction_normal']:.1f}% "
          f"of validation normals; τ₂ {tau2.value:.5g}")
calibrate_run(run_dir, base)  # restore the run's own method; all of them stay in thresholds.json history
