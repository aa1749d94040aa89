"""Stage 2's defect head: a small U-Net that segments defects from a tile beside its GANomaly2D reconstruction.

After DRAEM's discriminative subnetwork (Zavrtanik, Kristan and Skočaj, "DRAEM — A discriminatively
trained reconstruction embedding for surface anomaly detection", ICCV 2021): the segmenter sees the
image *and* a reconstruction trained to repair synthetic defects, so it compares what is there with
what should be there (their ablation on MVTec AD: 98.0 image AUROC with the reconstruction as
input, 93.9 for the segmenter alone). Here the reconstruction comes from GANomaly2D's generator
(docs/design.md §2, stage 2), trained on defective tiles to reproduce the clean ones.

Deviations from DRAEM: a strided stem down to 4×4-pixel cells, then a U-Net of 3×3
conv–BatchNorm–ReLU pairs (widths from ``4b``, DRAEM: six full-resolution levels from 64), bilinear
upsampling; one defect logit per cell instead of a two-class softmax per pixel (the cell is a
defect if any of its pixels is); the reconstruction's gradient is stopped at the head's input, so
the generator learns from GANomaly's own losses only (DRAEM trains both from one loss).

Shapes: ``x``, ``x̂`` ``B×C×H×W`` (H, W multiples of 16) -> logits ``B×1×H/4×W/4``; the score map
of :class:`HeadedOutput` is ``softplus(logit)`` per cell: non-negative, so stage 1's guidance can
weigh it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from twostage_ad.models.ganomaly2d import GANomaly2D, GANomaly2DOutput

__all__ = ["HEAD_CELL", "DefectHead", "GANomaly2DWithHead", "HeadedOutput"]

HEAD_CELL = 4  # pixels per side of one score-map cell: 4× finer than the latent difference's 16


def _conv_bn_relu(in_channels: int, out_channels: int, *, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class DoubleConv(nn.Sequential):
    """Two 3×3 conv–BatchNorm–ReLU layers: ``B×Cin×H×W -> B×Cout×H×W``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(*_conv_bn_relu(in_channels, out_channels), *_conv_bn_relu(out_channels, out_channels))


class DefectHead(nn.Module):
    """Segmenter on ``x ⊕ x̂``: ``(B×C×H×W, B×C×H×W) -> defect logits B×1×H/4×W/4`` (higher = more anomalous).

    A full-resolution 3×3 stem and two stride-2 3×3 convs (widths ``b, 2b, 4b``) bring the pair
    to the score map's ``4 × 4``-pixel cells, where a U-Net of ``depth`` max-pool levels (widths
    ``4b, 8b, …``) works: every pixel is seen, but the costly layers run at a sixteenth of the
    pixels (a full-resolution U-Net of the same widths cost about five times as much).

    Args:
        in_channels: channels of the image (and of its reconstruction): 1 or 3.
        base_width: ``b``, the stem's width.
        depth: U-Net levels below the cell grid; H and W multiples of ``4·2**depth``.
    """

    def __init__(self, in_channels: int = 1, *, base_width: int = 8, depth: int = 2):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
        if not isinstance(base_width, int) or base_width < 1:
            raise ValueError(f"base_width must be a positive integer, got {base_width!r}")
        if not isinstance(depth, int) or not 1 <= depth <= 4:
            raise ValueError(f"depth must be an integer from 1 to 4, got {depth!r}")
        b = base_width
        self.in_channels, self.depth = in_channels, depth
        self.stem = nn.Sequential(*_conv_bn_relu(2 * in_channels, b), *_conv_bn_relu(b, 2 * b, stride=2),
                                  *_conv_bn_relu(2 * b, 4 * b, stride=2))
        widths = [4 * b * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([DoubleConv(widths[0], widths[0])]
                                  + [DoubleConv(w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:])])
        self.up = nn.ModuleList([DoubleConv(w_in + w_out, w_out) for w_in, w_out in zip(widths[:0:-1], widths[-2::-1])])
        self.out = nn.Conv2d(widths[0], 1, kernel_size=1)

    @property
    def multiple(self) -> int:
        """What H and W must be multiples of."""
        return HEAD_CELL * 2**self.depth

    def forward(self, x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        if x.shape != reconstruction.shape or x.ndim != 4 or x.shape[1] != self.in_channels \
                or x.shape[-2] % self.multiple or x.shape[-1] % self.multiple:
            raise ValueError(f"expected image and reconstruction both B×{self.in_channels}×H×W with H and W multiples of "
                             f"{self.multiple}, got {tuple(x.shape)} and {tuple(reconstruction.shape)}")
        h = self.stem(torch.cat([x, reconstruction], dim=1))
        skips = []
        for i, block in enumerate(self.down):
            h = block(h if i == 0 else F.max_pool2d(h, 2))
            skips.append(h)
        for block, skip in zip(self.up, skips[-2::-1]):
            h = block(torch.cat([F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False), skip], dim=1))
        return self.out(h)


@dataclass
class HeadedOutput(GANomaly2DOutput):
    """GANomaly2D's outputs plus the head's ``B×1×H/4×W/4`` defect logits; its score map is the head's."""

    defect_logits: torch.Tensor | None = None

    @property
    def score_map(self) -> torch.Tensor:
        """``softplus(logit) = −log P(normal)`` per cell: ``B×1×H/4×W/4``, non-negative."""
        return F.softplus(self.defect_logits.float())


class GANomaly2DWithHead(nn.Module):
    """GANomaly2D's generator and a :class:`DefectHead` that sees each input beside its reconstruction.

    ``x -> (x̂, z, ẑ) = G(x)``, then ``head(x, stop_gradient(x̂))``. ``cell_size`` is the score
    map's cell (:data:`HEAD_CELL` px); inputs must still be multiples of the generator's 16.
    """

    def __init__(self, in_channels: int = 1, *, width_divisor: int = 4, n_down: int = 4, head_width: int = 8):
        super().__init__()
        if n_down < 3:
            raise ValueError(f"n_down must be at least 3 beside the defect head (inputs multiples of 8·2), got {n_down!r}")
        self.generator = GANomaly2D(in_channels, width_divisor=width_divisor, n_down=n_down)
        self.head = DefectHead(in_channels, base_width=head_width, depth=n_down - 2)
        self.in_channels = in_channels

    @property
    def cell_size(self) -> int:
        """Image pixels per score-map cell along each side."""
        return HEAD_CELL

    @property
    def latent_cell_size(self) -> int:
        """Image pixels per cell of the generator's latent difference (:attr:`HeadedOutput.latent_map`)."""
        return self.generator.cell_size

    def forward(self, x: torch.Tensor) -> HeadedOutput:
        out = self.generator(x)
        logits = self.head(x, out.reconstruction.detach())
        return HeadedOutput(reconstruction=out.reconstruction, latent=out.latent,
                            latent_reconstructed=out.latent_reconstructed, defect_logits=logits)
