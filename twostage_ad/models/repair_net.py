"""Reconstruct-then-attend: a repair network whose output the attention network sees beside the image.

After DRAEM (Zavrtanik, Kristan and Skočaj, "DRAEM — A discriminatively trained reconstruction
embedding for surface anomaly detection", ICCV 2021): a reconstructive subnetwork learns to
repair synthetic defects (L2 + SSIM against the clean image), and the discriminative network
segments the defect from the image *and* its repair, so it compares what is there with what
should be there instead of judging appearance alone (their ablation on MVTec AD: 98.0 image /
97.3 pixel AUROC with the reconstruction as input, 93.9 / 92.7 for the segmenter alone).

Deviations: the repair network is our skip-free encoder–decoder (strided 4×4 convs down to
``image_size / 16``, bilinear upsample + 3×3 conv up, InstanceNorm, widths doubling from
``base_width`` to ``max_width``) rather than DRAEM's wide VGG-style one; the discriminative
network is the skip-CBAM self-attention :class:`~twostage_ad.models.attention_net.AttentionNet`
with the repair as a ``condition`` input. Shapes: ``x`` ``B×C×S×S`` -> ``x̃`` ``B×C×S×S`` (tanh).
"""

from __future__ import annotations

import torch
from torch import nn

from twostage_ad.models.attention_net import AttentionNet, AttentionOutput, BottleneckDecoder, Encoder, widths_for

__all__ = ["REPAIR_DOWNSAMPLING", "RepairNet", "RepairThenAttend"]

REPAIR_DOWNSAMPLING = 16  # the repair bottleneck is image_size / 16 (DRAEM's: 256 px -> 16×16)


class RepairNet(nn.Module):
    """``B×C×S×S -> B×C×S×S``: encode to an ``S/16`` map without skips, decode, tanh.

    Without skips, a defect cannot be copied through; the decoder must paint what the bottleneck
    says belongs there.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 128, *, base_width: int = 16, max_width: int = 128):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
        if not (isinstance(image_size, int) and image_size >= 32 and image_size & (image_size - 1) == 0):
            raise ValueError(f"image_size must be a power of two >= 32, got {image_size!r}")
        widths = widths_for(image_size, image_size // REPAIR_DOWNSAMPLING, base_width, max_width)
        self.in_channels, self.image_size = in_channels, image_size
        self.encoder = Encoder(in_channels, widths)
        self.decoder = BottleneckDecoder(widths)
        self.head = nn.Sequential(nn.Conv2d(self.decoder.out_channels, in_channels, kernel_size=3, padding=1), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)[-1]))


class RepairThenAttend(nn.Module):
    """``x -> x̃ = R(x)``, then the attention network on ``x ⊕ x̃``.

    ``detach_repair``: stop the attention loss's gradient at ``x̃`` (the repair network then
    learns from its own L2 + SSIM loss alone); DRAEM lets it flow (``False``).
    """

    def __init__(self, repair: RepairNet, attend: AttentionNet, *, detach_repair: bool = False):
        super().__init__()
        if attend.condition_channels != repair.in_channels or attend.in_channels != repair.in_channels:
            raise ValueError(f"the attention network must see the image and its repair: {repair.in_channels} channel(s) each, "
                             f"got in_channels {attend.in_channels!r}, condition_channels {attend.condition_channels!r}")
        if attend.image_size != repair.image_size:
            raise ValueError(f"image sizes differ: repair {repair.image_size!r}, attention {attend.image_size!r}")
        self.repair, self.attend, self.detach_repair = repair, attend, detach_repair
        self.in_channels, self.image_size = attend.in_channels, attend.image_size

    def forward(self, x: torch.Tensor, *, reconstruct: bool = False) -> AttentionOutput:
        repaired = self.repair(x)
        condition = repaired.detach() if self.detach_repair else repaired
        out = self.attend(x, reconstruct=reconstruct, condition=condition)
        out.repaired = repaired
        return out

    def reconstruction_modules(self) -> list[nn.Module]:
        """The attention network's x̂ / ẑ modules (not the repair network, which always trains)."""
        return self.attend.reconstruction_modules()
