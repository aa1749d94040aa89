"""Run under torchrun by tests/test_distributed.py; without torchrun it is the 1-process reference.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUT.pt

Trains each stage for 2 epochs of 2 steps with plain SGD in place of Adam (Adam's first steps
are ≈ lr·sign(g) and would hide a gradient off by a constant factor), and runs one global-batch
BatchNorm forward and backward on a fixed batch; rank 0 saves everything.
"""

import sys

import numpy as np
import torch

from twostage_ad.config import AugmentConfig, Stage1Config, Stage2Config
from twostage_ad.distributed import GlobalBatchNorm2d, init_distributed, shutdown_distributed
from twostage_ad.stages.attention import AttentionStage
from twostage_ad.stages.patch_scorer import PatchScorerStage


def sgd(params, lr, betas=None, weight_decay=0.0):  # noqa: ARG001 - Adam's signature
    return torch.optim.SGD(params, lr=lr * 20, weight_decay=weight_decay)


def train(context) -> dict:
    images = (np.random.default_rng(0).random((16, 32, 32, 1)) * 255).astype(np.uint8)
    torch.optim.Adam = sgd  # the stages look Adam up when they build their optimisers
    # every stage-1 objective on (the digits demo's): the masked means and feature matching run under DDP
    objectives = {"w_con": 1.0, "w_enc": 1.0, "w_adv": 0.1, "w_rep": 1.0, "screen_con": 1.0, "screen_enc": 1.0}
    stage1 = AttentionStage(config=Stage1Config(min_steps=0, epochs=2, batch_size=8, base_width=8, max_width=32, **objectives),
                            augment=AugmentConfig(probability=0.5),
                            image_size=32, channels=1, device="cpu")
    stage1.fit(images, progress=False, context=context)
    stage2 = PatchScorerStage(Stage2Config(epochs=2, min_steps=0, batch_size=8, width_divisor=16, guidance="none"), image_size=32,
                              channels=1, device="cpu")
    stage2.fit(images, progress=False, context=context)
    return {
        "stage1": stage1.model_.state_dict(), "stage1_d": stage1.discriminator_.state_dict(),
        "stage2": stage2.model_.state_dict(), "stage2_d": stage2.discriminator_.state_dict(),
        "history": {"stage1": stage1.history_, "stage2": stage2.history_},
        "batchnorm": sorted({type(m).__name__ for m in stage2.model_.modules() if "BatchNorm" in type(m).__name__}),
    }


def batchnorm(context) -> dict:
    """Global-batch BatchNorm on this rank's half of a fixed batch: output, input gradient, buffers."""
    x = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(1)) * 2 + 3
    weight = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    part = slice(context.rank * 8 // context.world_size, (context.rank + 1) * 8 // context.world_size)
    norm = GlobalBatchNorm2d(3) if context.enabled else torch.nn.BatchNorm2d(3)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5, generator=torch.Generator().manual_seed(3))
    mine = x[part].clone().requires_grad_(True)
    out = norm(mine)
    (out * weight[part]).sum().backward()
    return {"out": torch.from_numpy(context.gather(out.detach().numpy())), "grad": torch.from_numpy(context.gather(mine.grad.numpy())),
            "weight_grad": norm.weight.grad.clone() if not context.enabled else context.sum(norm.weight.grad),
            "running_mean": norm.running_mean.clone(), "running_var": norm.running_var.clone()}


if __name__ == "__main__":
    context, _ = init_distributed(torch.device("cpu"))
    result = {"batchnorm_check": batchnorm(context), **train(context)}
    if context.is_main:
        result["world_size"] = context.world_size
        torch.save(result, sys.argv[1])
    shutdown_distributed(barrier=True)  # every rank arrives here together
