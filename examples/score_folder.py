"""Score a folder of new images with a finished run and list the ones to inspect.

    python examples/score_folder.py RUN_DIR FOLDER
"""

import sys

from twostage_ad import TwoStageDetector
from twostage_ad.detector import expand_image_paths

run_dir, folder = sys.argv[1], sys.argv[2]
detector = TwoStageDetector.from_run(run_dir)
predictions = detector.predict(expand_image_paths([folder]))
table = predictions.to_frame().sort_values("cascade_score", ascending=False)
print(f"{len(predictions)} images in {predictions.seconds:.1f} s ({predictions.images_per_s:.0f} images/s); "
      f"{int(table['flagged'].sum())} flagged by stage 1, {int(table['decision'].sum())} anomalous")
print(table.loc[table["decision"] == 1, ["image", "stage1_loss", "stage2_score", "cascade_score"]].to_string(index=False))
for name, reason in predictions.failed:
    print(f"skipped {name}: {reason}")
