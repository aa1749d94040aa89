"""Speed benchmark: training and scoring images/s of each stage, the cascade and the anomalib peer.

    python benchmarks/speed.py [--config pipelines/mtd.yaml] [--sizes 64 128 256] [--images 64]
        [--set stage1.attention_max_tokens=256 ...] [--flag-rate 0.35]
        [--peer-python .peer-venv/bin/python | --no-peer] [--threads 0] [--repeats 3]
        [--allocator tuned|system] [--note "..."]

For each image size: the forward FLOPs per image of each network (``torch.utils.flop_counter``),
scoring images/s of stage 1 (screening loss + map) and stage 2 (standardised map + score), of
the cascade (stage 1 on every image, stage 2 on the first ``--flag-rate`` share of them, as at a
calibrated threshold) and of "stage 2 on every image" (both stages on all), one training epoch's
images/s of each stage (augmentation and every loss included), and the share of this machine's
float32 matmul peak (measured in the same run) that scoring reaches. Scoring rows are the median
of ``--repeats`` timed passes after a warm-up; ours and the peer run with the same allocator
setting (``--allocator``: the pipeline's glibc tuning by default, see twostage_ad/allocator.py).
The peer, anomalib's GANomaly, is timed in the same run by ``benchmarks/peer_anomalib.py speed``
in its own environment (random weights: its speed does not depend on them); ``peer_score_ips``
is the peer as anomalib runs it (float32), and when the config scores stage 1 in bf16
(``run.precision`` resolves to bf16) the peer is also timed under bf16 autocast (``peer_score_ips_bf16``). Appends the rows to
``benchmarks/results/speed.{csv,md}``; never edit those by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from twostage_ad.allocator import tune_malloc
from twostage_ad.config import Config
from twostage_ad.config_io import load_config
from twostage_ad.detector import apply_run_settings
from twostage_ad.device import resolve_precision
from twostage_ad.models.ganomaly2d import GANomaly2D, PatchDiscriminator
from twostage_ad.stages.attention import AttentionStage, build_attention_network, screening_batch, uses_reconstruction
from twostage_ad.stages.patch_scorer import PatchScorerStage

from _results import append_row, git_commit, timed_median


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Best float32 FLOP/s of an ``n×n @ n×n`` matmul on this machine (2·n³ FLOPs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def forward_flops(module: torch.nn.Module, x: torch.Tensor, forward=None) -> float:
    """FLOPs per image of one forward pass (``forward(module, x)``; default ``module(x)``)."""
    module.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x) if forward is None else forward(module, x)
    return counter.get_total_flops() / x.shape[0]


def _images(n: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    _, xx = np.mgrid[:size, :size]
    base = 128 + 40 * np.sin(xx / 3.0)[None, ..., None] + rng.normal(0, 8, (n, size, size, channels))
    return np.clip(base, 0, 255).astype(np.uint8)


REPO = Path(__file__).resolve().parent.parent


def peer_speed(peer_python: Path, sizes: list[int], n_images: int, batch_size: int, repeats: int,
               tuned_malloc: bool, bf16: bool = False) -> dict[int, dict[str, float]]:
    """anomalib GANomaly's scoring images/s (median of ``repeats`` passes) and GFLOPs per size,
    measured by its own interpreter with the same allocator setting as ours."""
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "speed.json"
        command = [str(peer_python), str(REPO / "benchmarks" / "peer_anomalib.py"), "speed", "--image-size", *map(str, sizes),
                   "--channels", "1", "--batch-size", str(batch_size), "--images", str(n_images), "--repeats", str(repeats), "--output", str(output),
                   *(["--tune-malloc"] if tuned_malloc else []), *(["--bf16"] if bf16 else [])]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"peer speed run failed:\n{done.stderr[-3000:]}")
        result = json.loads(output.read_text())
    rows = result["results"] if isinstance(result, dict) and "results" in result else result
    return {int(r["image_size"]): r for r in rows}


def _median_ips(score, n_images: int, repeats: int) -> float:
    """Median images/s of ``repeats`` timed calls of ``score()`` (each scores ``n_images``)."""
    return n_images / timed_median(score, repeats)[1]


def measure(size: int, n_images: int, config: Config, flag_rate: float, repeats: int) -> dict[str, float]:
    channels = 1
    images = _images(n_images, size, channels)
    c1, c2 = config.stage1, config.stage2
    bottleneck = min(c1.bottleneck_size, size // 16)
    # one pass over the images, whatever the recipe's step floor: training images/s = images / seconds
    # each network at the whole size (tile_size 0): what one image of that size costs without tiles
    c1 = type(c1)(**{**c1.__dict__, "epochs": 1, "min_steps": 0, "bottleneck_size": bottleneck, "tile_size": 0})
    c2 = type(c2)(**{**c2.__dict__, "epochs": 1, "min_steps": 0, "tile_size": 0})
    x = torch.zeros(1, channels, size, size)
    net1 = build_attention_network(c1, channels, size)
    flops1 = forward_flops(net1, x, lambda net, batch: screening_batch(net, batch, c1))  # what scoring runs
    flops2 = forward_flops(GANomaly2D(channels, width_divisor=c2.width_divisor), x)
    flops_d2 = forward_flops(PatchDiscriminator(channels, width_divisor=c2.width_divisor), x)

    stage1 = AttentionStage(config=c1, augment=config.augment, image_size=size, channels=channels, device="cpu")
    apply_run_settings(stage1, config.run)  # precision, layout, scoring batch as a run sets them
    stage1.fit(images, progress=False)
    train1 = n_images / stage1.train_seconds_
    stage1.score(images[:8], progress=False)  # warm-up
    maps1 = stage1.score(images, progress=False).anomaly_maps
    stage2 = PatchScorerStage(config=c2, image_size=size, channels=channels, device="cpu")
    apply_run_settings(stage2, config.run)
    stage2.fit(images, progress=False)
    train2 = n_images / stage2.train_seconds_
    guided = c2.guidance != "none"
    stage2.fit_normalisation(images[:8], stage1_maps=maps1[:8] if guided else None)
    stage2.score(images[:8], stage1_maps=maps1[:8] if guided else None, progress=False)  # warm-up

    def score2(count: int, maps: np.ndarray) -> None:
        stage2.score(images[:count], stage1_maps=maps[:count] if guided else None, progress=False)

    # each stage alone, then the two deployment paths end to end on the same images
    flagged = round(flag_rate * n_images)
    score_ips1 = _median_ips(lambda: stage1.score(images, progress=False), n_images, repeats)
    score_ips2 = _median_ips(lambda: score2(n_images, maps1), n_images, repeats)
    cascade = _median_ips(lambda: score2(flagged, stage1.score(images, progress=False).anomaly_maps), n_images, repeats)
    both = _median_ips(lambda: score2(n_images, stage1.score(images, progress=False).anomaly_maps), n_images, repeats)
    peak = matmul_peak()
    return {
        "size": size,
        "gflops_stage1": flops1 / 1e9,
        "gflops_stage2": flops2 / 1e9,
        "gflops_stage2_disc": flops_d2 / 1e9,
        "train_ips_stage1": train1,
        "train_ips_stage2": train2,
        "score_ips_stage1": score_ips1,
        "score_ips_stage2": score_ips2,
        "flag_rate": flag_rate,
        "score_ips_cascade": cascade,
        "score_ips_stage2_on_all": both,
        "matmul_peak_gflops": peak / 1e9,
        "score_share_of_peak_stage1": score_ips1 * flops1 / peak,
        "score_share_of_peak_stage2": score_ips2 * flops2 / peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "pipelines" / "mtd.yaml",
                        help="stage settings to time (data settings are ignored: images are synthetic, 1 channel)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, e.g. --set stage1.attention_max_tokens=256 (repeatable)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--images", type=int, default=64, help="images per measurement (training epoch and scoring)")
    parser.add_argument("--flag-rate", type=float, default=0.35,
                        help="share of images stage 1 flags on the cascade path (MTD's calibrated rate: 0.35)")
    parser.add_argument("--peer-python", type=Path, default=REPO / ".peer-venv" / "bin" / "python")
    parser.add_argument("--no-peer", action="store_true", help="skip anomalib's GANomaly")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per scoring measurement; rows give the median")
    parser.add_argument("--allocator", choices=("tuned", "system"), default="tuned",
                        help="tuned: glibc mallopt as the pipeline applies it (run.tune_malloc), for ours and the peer alike")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = args.allocator == "tuned" and tune_malloc()
    if not args.no_peer and not args.peer_python.is_file():
        parser.error(f"no peer interpreter at {args.peer_python}: run benchmarks/setup_peer_env.sh or pass --no-peer")
    config = load_config(args.config, args.overrides)
    peer = {} if args.no_peer else peer_speed(args.peer_python, args.sizes, args.images, config.run.score_batch_size,
                                                  args.repeats, tuned)
    # the peer as anomalib runs it is float32; its bf16-autocast speed too, for a like-for-like row
    # when our stage 1 scores in bf16
    ours_bf16 = resolve_precision(config.run.precision, torch.device("cpu"),
                                  bf16_allowed=not uses_reconstruction(config.stage1)) == "bf16"
    peer_bf16 = {} if args.no_peer or not ours_bf16 else peer_speed(
        args.peer_python, args.sizes, args.images, config.run.score_batch_size, args.repeats, tuned, bf16=True)
    torch.manual_seed(0)
    for size in args.sizes:
        ours = measure(size, args.images, config, args.flag_rate, args.repeats)
        theirs, theirs_bf16 = peer.get(size, {}), peer_bf16.get(size, {})
        row = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "commit": git_commit(),
            "machine": f"{platform.machine()} {os.cpu_count()} cpu, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "config": " ".join([args.config.name, *args.overrides]),
            "allocator": "tuned" if tuned else "system",
            "repeats": args.repeats,
            **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in ours.items()},
            "peer_gflops": round(theirs["gflops_per_image"], 3) if theirs else None,
            "peer_score_ips": round(theirs["images_per_s_median"], 3) if theirs else None,
            "cascade_vs_peer": round(ours["score_ips_cascade"] / theirs["images_per_s_median"], 3) if theirs else None,
            "peer_score_ips_bf16": round(theirs_bf16["images_per_s_median"], 3) if theirs_bf16 else None,
            "cascade_vs_peer_bf16": round(ours["score_ips_cascade"] / theirs_bf16["images_per_s_median"], 3) if theirs_bf16 else None,
            "note": args.note,
        }
        append_row("speed", row, "Speed benchmark runs (written by benchmarks/speed.py; do not edit)")
        print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
