"""Run under torchrun by tests/test_distributed.py: one epoch of each stage, weights saved by rank 0.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUT.pt``;
without torchrun it trains single-process (the reference).
"""

import sys

import numpy as np
import torch

from twostage_ad.config import AugmentConfig, Stage1Config, Stage2Config
from twostage_ad.distributed import init_distributed
from twostage_ad.stages.attention import AttentionStage
from twostage_ad.stages.patch_scorer import PatchScorerStage


def train(context) -> dict:
    images = (np.random.default_rng(0).random((16, 32, 32, 1)) * 255).astype(np.uint8)
    stage1 = AttentionStage(Stage1Config(epochs=1, batch_size=16, base_width=8, max_width=32), AugmentConfig(probability=0.5),
                            image_size=32, channels=1, device="cpu")
    stage1.fit(images, progress=False, context=context)
    stage2 = PatchScorerStage(Stage2Config(epochs=1, batch_size=16, width_divisor=16, guidance="none"), image_size=32,
                              channels=1, device="cpu")
    stage2.fit(images, progress=False, context=context)
    return {
        "stage1": stage1.model_.state_dict(), "stage1_d": stage1.discriminator_.state_dict(),
        "stage2": stage2.model_.state_dict(), "stage2_d": stage2.discriminator_.state_dict(),
        "history": {"stage1": stage1.history_, "stage2": stage2.history_},
        "batchnorm": sorted({type(m).__name__ for m in stage2.model_.modules() if "BatchNorm" in type(m).__name__}),
    }


if __name__ == "__main__":
    context, _ = init_distributed(torch.device("cpu"))
    result = train(context)
    if context.is_main:
        result["world_size"] = context.world_size
        torch.save(result, sys.argv[1])
