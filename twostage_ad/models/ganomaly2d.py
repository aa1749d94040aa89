"""Stage-2 patch scorer: GANomaly2D, a GANomaly whose latent is a spatial map (docs/design.md §2).

GANomaly: Akçay et al., "GANomaly: Semi-Supervised Anomaly Detection via Adversarial Training",
ACCV 2018 — generator encoder G_E, decoder G_D, a second encoder E that re-encodes the
reconstruction, and the anomaly score ``|z − ẑ|``. GANomaly2D (SunnerLi/GANomaly2D) keeps z as a
``h×w`` map so the score localises: G_E / E follow the front of the CycleGAN generator (reflection
pad, 7×7 conv, ``n`` stride-2 3×3 convs with BatchNorm and ReLU), G_D mirrors it with transposed
convs and tanh, and D is the 70×70 PatchGAN of pix2pix (Isola et al., CVPR 2017).

Shapes for an input ``B×C×H×W`` (H, W multiples of ``2**n_down``; widths ``64/r … 1024/r``):
- ``z = G_E(x)``: ``B×(64·2**n_down/r)×H/2**n_down×W/2**n_down``
- ``x̂ = G_D(z)``: ``B×C×H×W`` in [-1, 1]; ``ẑ = E(x̂)``: same shape as ``z``
- score map: ``mean_c (z − ẑ)²``: ``B×1×H/2**n_down×W/2**n_down``
- ``D(x)``: patch logits ``B×1×h×w`` (use ``BCEWithLogitsLoss``)

Deviations from the public code: D returns logits (no sigmoid), D uses InstanceNorm instead of
BatchNorm (it sees real and fake in one concatenated forward; InstanceNorm keeps the two from
sharing statistics and is DDP-safe, docs/design.md §8), and the score map is returned raw — normalising
it is the stage's job, with statistics of validation normals, never of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from twostage_ad.models.blocks import AffineInstanceNorm2d, SingleChannelConv2d

__all__ = ["GANomaly2DOutput", "PatchEncoder", "PatchDecoder", "PatchDiscriminator", "GANomaly2D", "patch_widths"]


def patch_widths(width_divisor: int = 4, n_down: int = 4) -> list[int]:
    """Widths ``64/r, 128/r, …`` of the 7×7 stem and the ``n_down`` stride-2 convs."""
    if not isinstance(width_divisor, int) or width_divisor < 1 or 64 % width_divisor:
        raise ValueError(f"width_divisor must be a divisor of 64 (1, 2, 4, ..., 64), got {width_divisor!r}")
    if not isinstance(n_down, int) or not 1 <= n_down <= 6:
        raise ValueError(f"n_down must be an integer from 1 to 6, got {n_down!r}")
    return [64 * 2**i // width_divisor for i in range(n_down + 1)]


def _conv_bn_relu(conv: nn.Module, channels: int) -> list[nn.Module]:
    return [conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


class PatchEncoder(nn.Module):
    """Reflection pad, 7×7 conv, then stride-2 3×3 convs: ``B×C×H×W -> B×w_n×H/2^n×W/2^n``."""

    def __init__(self, in_channels: int, widths: list[int]):
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3)]
        layers += _conv_bn_relu(nn.Conv2d(in_channels, widths[0], kernel_size=7, bias=False), widths[0])
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += _conv_bn_relu(nn.Conv2d(w_in, w_out, kernel_size=3, stride=2, padding=1, bias=False), w_out)
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PatchDecoder(nn.Module):
    """Mirror of :class:`PatchEncoder`: transposed 3×3 convs up, reflection pad, 7×7 conv, tanh."""

    def __init__(self, out_channels: int, widths: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:0:-1], widths[-2::-1]):
            up = nn.ConvTranspose2d(w_in, w_out, kernel_size=3, stride=2, padding=1, output_padding=1, bias=False)
            layers += _conv_bn_relu(up, w_out)
        last = SingleChannelConv2d(widths[0], 7) if out_channels == 1 else nn.Conv2d(widths[0], out_channels, kernel_size=7)
        layers += [nn.ReflectionPad2d(3), last, nn.Tanh()]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


class PatchDiscriminator(nn.Module):
    """70×70 PatchGAN: 4×4 convs (64, 128, 256 stride 2; 512 stride 1; 1 stride 1) divided by ``r``.

    ``B×C×H×W -> B×1×(H/8−2)×(W/8−2)`` logits; needs H, W >= 32.
    """

    def __init__(self, in_channels: int, *, width_divisor: int = 4):
        super().__init__()
        w = patch_widths(width_divisor, 3)
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, w[0], kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            *self._block(w[0], w[1], stride=2),
            *self._block(w[1], w[2], stride=2),
            *self._block(w[2], w[3], stride=1),
            nn.Conv2d(w[3], 1, kernel_size=4, stride=1, padding=1),
        )

    @staticmethod
    def _block(w_in: int, w_out: int, *, stride: int) -> list[nn.Module]:
        return [
            nn.Conv2d(w_in, w_out, kernel_size=4, stride=stride, padding=1, bias=False),
            AffineInstanceNorm2d(w_out),
            nn.LeakyReLU(0.2, inplace=True),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < 32:
            raise ValueError(f"PatchDiscriminator needs inputs of at least 32×32, got {tuple(x.shape)}")
        return self.layers(x)


@dataclass
class GANomaly2DOutput:
    """What the generator returns for a batch ``B×C×H×W``."""

    reconstruction: torch.Tensor  # x̂, B×C×H×W in [-1, 1]
    latent: torch.Tensor  # z = G_E(x), B×w×h×w'
    latent_reconstructed: torch.Tensor  # ẑ = E(x̂), same shape as z

    @property
    def latent_map(self) -> torch.Tensor:
        """Raw anomaly score per latent cell, ``mean_c (z − ẑ)²``: ``B×1×h×w'``."""
        return (self.latent - self.latent_reconstructed).pow(2).mean(dim=1, keepdim=True)

    @property
    def score_map(self) -> torch.Tensor:
        """The network's anomaly map: GANomaly2D's is :attr:`latent_map`."""
        return self.latent_map


class GANomaly2D(nn.Module):
    """Generator of GANomaly2D: ``x -> (x̂, z, ẑ)``; the discriminator is a separate module.

    Args:
        in_channels: 1 (grey) or 3 (colour).
        width_divisor: ``r``; the widths are ``64/r … 64·2**n_down/r`` (GANomaly2D: r = 1).
        n_down: stride-2 convs in each encoder; H and W must be multiples of ``2**n_down``.
    """

    def __init__(self, in_channels: int = 1, *, width_divisor: int = 4, n_down: int = 4):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
        widths = patch_widths(width_divisor, n_down)
        self.in_channels = in_channels
        self.n_down = n_down
        self.encoder = PatchEncoder(in_channels, widths)
        self.decoder = PatchDecoder(in_channels, widths)
        self.latent_encoder = PatchEncoder(in_channels, widths)

    @property
    def cell_size(self) -> int:
        """Image pixels per latent cell along each side."""
        return 2**self.n_down

    @property
    def latent_cell_size(self) -> int:
        """Image pixels per latent cell (here also the score map's cell)."""
        return self.cell_size

    def forward(self, x: torch.Tensor) -> GANomaly2DOutput:
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-2] % self.cell_size or x.shape[-1] % self.cell_size:
            raise ValueError(
                f"expected input B×{self.in_channels}×H×W with H and W multiples of {self.cell_size}, got {tuple(x.shape)}"
            )
        z = self.encoder(x)
        reconstruction = self.decoder(z)
        return GANomaly2DOutput(reconstruction=reconstruction, latent=z, latent_reconstructed=self.latent_encoder(reconstruction))
