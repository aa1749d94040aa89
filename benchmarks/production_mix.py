"""Throughput of the deployment path at a production mix: mostly good parts, a few bad ones.

    python benchmarks/production_mix.py RUN_DIR [--images 400] [--normal-share 0.95] [--seed 0]
        [--repeats 3] [--peer-python /path/to/peer/python | --no-peer] [--note "..."]

A finished run's test split is resampled (with replacement, seeded) into ``--images`` images of
which ``--normal-share`` are normal, and the run's own test split is timed as it is beside it.
For each mix, timed on the same decoded images in one process (median of ``--repeats`` passes
after a warm-up pass):

- ``cascade``: :meth:`TwoStageDetector.score` as ``predict`` runs it, stage 1 on every image and
  stage 2 only on those stage 1 flags (the deployment path);
- ``all_stages``: stage 2 on every image (what a single expensive scorer would cost);
- ``peer``: anomalib's GANomaly forward pass at the same image size and batch size, timed by
  ``benchmarks/peer_anomalib.py speed`` in its own interpreter within the same run.

Decoding is timed once and reported apart (it is the same for all three). The flagged share,
cascade recall and false-positive rate on each mix are printed beside the speed, so that a fast
cascade cannot hide a screen that lets everything through or nothing. Appends rows to
``benchmarks/results/production_mix.{csv,md}``; never edit those by hand.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch
from speed import REPO, peer_speed

from twostage_ad.allocator import tune_malloc
from twostage_ad.data.images import decode_records
from twostage_ad.data.records import load_records, split_records
from twostage_ad.detector import TwoStageDetector
from twostage_ad.runs import load_run_config

from _results import append_row, git_commit, timed_median


def production_mix(labels: np.ndarray, n_images: int, normal_share: float, seed: int = 0) -> np.ndarray:
    """Indices into ``labels`` (0 normal, 1 anomalous) drawn with replacement so that exactly
    ``round(n_images · normal_share)`` of them are normal; shuffled, reproducible by ``seed``."""
    labels = np.asarray(labels)
    if not 0.0 < normal_share < 1.0:
        raise ValueError(f"normal_share must be in (0, 1), got {normal_share!r}")
    if n_images < 2:
        raise ValueError(f"n_images must be >= 2, got {n_images!r}")
    normals, anomalies = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    if len(normals) == 0 or len(anomalies) == 0:
        raise ValueError(f"a mix needs normal and anomalous images, got {len(normals)} normal and {len(anomalies)} anomalous")
    n_normal = int(round(n_images * normal_share))
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.choice(normals, n_normal), rng.choice(anomalies, n_images - n_normal)])
    return rng.permutation(chosen)


def time_mix(detector: TwoStageDetector, images: np.ndarray, labels: np.ndarray, repeats: int, batch_size: int) -> dict:
    """Median images/s of the cascade and of stage 2 on every image, plus the cascade's decisions."""
    def cascade():
        return detector.score(images, all_stages=False, batch_size=batch_size, progress=False)

    def all_stages():
        return detector.score(images, all_stages=True, batch_size=batch_size, progress=False)

    cascade()  # warm-up: kernels, allocator, first-call costs
    scored, cascade_s = timed_median(cascade, repeats)
    _, all_s = timed_median(all_stages, repeats)
    decision, flagged = scored.decided.decision, scored.decided.flagged
    anomalous = labels == 1
    return {
        "flagged_share": float(flagged.mean()),
        "cascade_recall": float(decision[anomalous].mean()),
        "cascade_fpr": float(decision[~anomalous].mean()),
        "cascade_ips": len(images) / cascade_s,
        "all_stages_ips": len(images) / all_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--images", type=int, default=400, help="images in the production mix (default 400)")
    parser.add_argument("--normal-share", type=float, default=0.95, help="share of normal images in the mix (default 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per path; the median is reported (default 3)")
    parser.add_argument("--peer-python", type=Path, default=REPO / ".peer-venv" / "bin" / "python")
    parser.add_argument("--no-peer", action="store_true", help="skip anomalib's GANomaly")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.no_peer and not args.peer_python.is_file():
        parser.error(f"no peer interpreter at {args.peer_python}: run benchmarks/setup_peer_env.sh or pass --no-peer")

    config = load_run_config(args.run_dir)
    tuned = config.run.tune_malloc and tune_malloc()  # as predict applies it; the peer gets the same setting
    detector = TwoStageDetector.from_run(args.run_dir, device="cpu")
    batch_size = config.run.score_batch_size
    test_records = split_records(load_records(config.data, seed=config.run.seed))["test"]
    start = time.perf_counter()
    test = decode_records(test_records, detector.image_size, detector.channels, config.data.invert_masks, progress=False,
                          bit_depth=detector.bit_depth)
    decode_ips = len(test.records) / (time.perf_counter() - start)
    labels = np.array([r.label for r in test.records])
    chosen = production_mix(labels, args.images, args.normal_share, seed=args.seed)
    mixes = {"test split": np.arange(len(labels)), f"{args.normal_share:.0%} normal": chosen}

    peer = {}
    if not args.no_peer:  # the same image count as the larger mix, same batch size and allocator setting as ours
        peer = peer_speed(args.peer_python, [detector.image_size], max(len(m) for m in mixes.values()), batch_size,
                          args.repeats, tuned)[detector.image_size]
    started = time.strftime("%Y-%m-%d %H:%M")
    for mix_name, indices in mixes.items():
        measured = time_mix(detector, test.images[indices], labels[indices], args.repeats, batch_size)
        peer_ips = peer.get("images_per_s_median")
        row = {
            "date": started, "commit": git_commit(), "run": str(args.run_dir), "mix": mix_name,
            "images": len(indices), "normal_share": float((labels[indices] == 0).mean()),
            "image_size": detector.image_size, "stage2_image_size": detector.stage2.image_size,
            "threads": torch.get_num_threads(), "decode_ips": decode_ips, **measured,
            "peer_ips": peer_ips,
            "cascade_vs_all_stages": measured["cascade_ips"] / measured["all_stages_ips"],
            "cascade_vs_peer": measured["cascade_ips"] / peer_ips if peer_ips else None,
            "note": args.note,
        }
        table = append_row("production_mix", row, "Deployment-path throughput at a production mix (benchmarks/production_mix.py)")
        print(table.tail(1).T.to_string(header=False))


if __name__ == "__main__":
    main()
