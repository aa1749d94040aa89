"""Both stages' training losses as pure functions (docs/design.md §2); the loop is in ``training.py``.

All are mean-reduced, with logits (no Sigmoid + BCELoss). Under ``torchrun`` a mean over a subset of rows divides the local sum by the
*global* row count and multiplies by the world size, so that DDP's average of the ranks'
gradients is the gradient of the global mean.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim

__all__ = ["attention_bce", "discriminator_loss", "feature_matching", "generator_loss", "masked_mean", "repair_losses"]


def discriminator_loss(logits: torch.Tensor) -> torch.Tensor:
    """Both stages' discriminator: BCE-with-logits of a concatenated forward (one forward is DDP-safe):
    rows ``[:B]`` real (target 1), ``[B:]`` fake (target 0)."""
    real, fake = logits.chunk(2)
    target = torch.cat([torch.ones_like(real), torch.zeros_like(fake)])
    return F.binary_cross_entropy_with_logits(logits, target)


# -- stage 1 ---------------------------------------------------------------------------------------


def repair_losses(repaired: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DRAEM's reconstruction loss in two terms, both mean-reduced over ``B×C×S×S`` images in [-1, 1]:
    ``(L2(x̃, x), 1 − SSIM(x̃, x))`` (SSIM with an 11×11 Gaussian window, σ 1.5, range 2)."""
    return F.mse_loss(repaired, clean), 1.0 - ssim(repaired, clean, data_range=2.0, size_average=True)


def masked_mean(values: torch.Tensor, rows: torch.Tensor, count: float | None = None, scale: float = 1.0) -> torch.Tensor:
    """Mean of per-row ``values`` (``B``) over the selected ``rows`` (bool ``B``); 0 (with a graph) when none is.

    ``count``: the number of selected rows over all ranks (default: here); the local sum is
    divided by it and multiplied by ``scale`` (the world size).
    """
    count = float(rows.sum()) if count is None else count
    if count == 0:
        return values.sum() * 0.0
    return values[rows].sum() * (scale / count)


def attention_bce(logits: torch.Tensor, mask: torch.Tensor, balanced: bool = True) -> torch.Tensor:
    """Per-row (``B``) BCE-with-logits of ``B×1×H×W`` attention logits against the mask (1 normal, 0 defect).

    ``balanced`` (what training uses): the mean over defect pixels and the mean over normal pixels
    count half each, so a defect covering 1 % of the image is not drowned by the 99 % that is
    normal (a deviation from a plain mean, in the spirit of DRAEM's focal loss; the plain mean
    calls everything normal, docs/experiments.md). Rows without defect pixels get the plain mean.
    """
    per_pixel = F.binary_cross_entropy_with_logits(logits, mask, reduction="none").flatten(1)
    if not balanced:
        return per_pixel.mean(dim=1)
    defect = (mask.flatten(1) < 0.5).float()
    n_defect = defect.sum(dim=1)
    n_normal = defect.shape[1] - n_defect
    defect_mean = (per_pixel * defect).sum(dim=1) / n_defect.clamp(min=1)
    normal_mean = (per_pixel * (1 - defect)).sum(dim=1) / n_normal.clamp(min=1)
    return torch.where(n_defect > 0, 0.5 * (defect_mean + normal_mean), per_pixel.mean(dim=1))


def feature_matching(fake_mean: torch.Tensor, real_mean: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial term: L2 between the discriminator's mean features of fakes and reals."""
    return F.mse_loss(fake_mean, real_mean)



# -- stage 2 ---------------------------------------------------------------------------------------
def generator_loss(
    x: torch.Tensor,
    reconstruction: torch.Tensor,
    latent: torch.Tensor,
    latent_reconstructed: torch.Tensor,
    fake_logits: torch.Tensor | None,
    config: Any,
) -> dict[str, torch.Tensor]:
    """GANomaly's generator loss terms and their weighted ``total``: ``w_adv·BCE(D(x̂), 1) +
    w_con·L1(x̂, x) + w_enc·L2(z, ẑ)`` (``config``: a :class:`~twostage_ad.config.Stage2Config`)."""
    terms = {
        "recon": F.l1_loss(reconstruction, x),
        "latent": F.mse_loss(latent_reconstructed, latent),
    }
    total = config.w_con * terms["recon"] + config.w_enc * terms["latent"]
    if fake_logits is not None:
        terms["adversarial"] = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
        total = total + config.w_adv * terms["adversarial"]
    terms["total"] = total
    return terms
