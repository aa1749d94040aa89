"""A 2048 × 2048 image through ``predict`` with stage 2 at full resolution over tiles: the whole
deployment process (imports, both models, decoding, both stages, both maps) peaks under 2 GiB of
resident memory, and the maps cover every pixel."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# trains a tiny detector with stage 2 at 2048 px over 128-px tiles and saves it as a run folder
FIT = textwrap.dedent('''
    import sys
    from pathlib import Path
    import numpy as np
    from PIL import Image
    from twostage_ad.config import CalibrationConfig, Config
    from twostage_ad.config_io import save_config
    from twostage_ad.detector import TwoStageDetector
    from twostage_ad.runs import write_thresholds

    size, run_dir = 2048, Path(sys.argv[1])
    rng = np.random.default_rng(0)
    xx = np.mgrid[:size, :size][1]
    def surface():
        return np.clip(128 + 40 * np.sin(xx / 5.0) + rng.normal(0, 6, (size, size)), 0, 255).astype(np.uint8)[..., None]
    config = Config()
    config.data.image_size, config.data.channels = 32, 1
    config.stage1.epochs, config.stage1.base_width, config.stage1.max_width, config.stage1.batch_size = 1, 8, 32, 4
    config.stage1.min_steps = config.stage2.min_steps = 0
    config.stage2.epochs, config.stage2.width_divisor, config.stage2.batch_size = 1, 16, 4
    config.stage2.image_size, config.stage2.tile_size = size, 128
    config.validate()
    detector = TwoStageDetector.from_config(config, device="cpu")
    detector.fit(np.stack([surface() for _ in range(4)]), np.stack([surface() for _ in range(2)]), np.zeros(2, int),
                 CalibrationConfig(), progress=False, checkpoint_dir=run_dir / "checkpoints")
    save_config(config, run_dir / "config.yaml")
    write_thresholds(run_dir, detector.cascade)
    defective = surface()[..., 0]
    defective[1000:1100, 1010:1090] = 255  # across tile borders (origins every 64 px)
    Image.fromarray(defective).save(run_dir / "large.png")
''')

# a fresh process, as a deployment: load the run, score the file, report the peak
PREDICT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import numpy as np
    from twostage_ad.detector import TwoStageDetector

    run_dir = Path(sys.argv[1])
    result = TwoStageDetector.from_run(run_dir, device="cpu").predict([run_dir / "large.png"], all_stages=True, progress=False)
    image = result.images[0]
    peak = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"peak_kib": peak, "stage1_map": list(image.stage1_map.shape), "stage2_map": list(image.stage2_map.shape),
                      "finite": bool(np.isfinite(image.stage2_map).all()), "seconds": result.seconds}))
''')


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak resident memory from Linux /proc")
def test_2048_px_image_scores_under_2_gib(tmp_path: Path) -> None:
    for script in (FIT, PREDICT):
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["stage1_map"] == [2048, 2048] and report["stage2_map"] == [2048, 2048] and report["finite"]
    assert report["peak_kib"] < 2 * 1024 * 1024, report
