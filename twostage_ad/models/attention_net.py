"""Stage-1 attention network: a skip-CBAM encoder–decoder with SAGAN self-attention (docs/design.md §2).

After the seed "Skip-CBAM-SelfAttention-GANomaly", without its faults: any square power-of-two
size from 32 to 512 (the depth follows the size), mean-reduced losses live elsewhere, and the
attention head returns *logits* (use ``BCEWithLogitsLoss``; ``sigmoid`` gives A ∈ [0, 1], 1 =
looks normal).

Shapes for an input ``B×C×S×S`` with ``n = log2(S / bottleneck_size)`` down-steps:
- encoder features ``f_i``: ``B×w_i×S/2^(i+1)×S/2^(i+1)``; ``z = f_{n-1}`` is the latent map
- reconstruction ``x̂``: ``B×C×S×S`` (tanh), attention logits: ``B×1×S×S``
- second encoder ``ẑ = E(x̂)``: same shape as ``z``

Deviations from the seed: bilinear upsample + 3×3 conv instead of transposed convs; the raw input
is concatenated before the heads so thin defects keep full-resolution evidence; the discriminator
uses InstanceNorm (DDP-safe, see docs/design.md §8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from twostage_ad.models.blocks import CBAM, AffineInstanceNorm2d, DownBlock, SelfAttention2d, UpBlock

__all__ = ["kv_pool_for", "AttentionOutput", "Encoder", "AttentionDecoder", "BottleneckDecoder", "AttentionNet",
           "AttentionNetEnsemble", "ImageMapDiscriminator", "widths_for"]


def widths_for(image_size: int, bottleneck_size: int, base_width: int, max_width: int) -> list[int]:
    """Channel widths of the encoder levels, doubling from ``base_width`` and capped."""
    if image_size < 2 * bottleneck_size:
        raise ValueError(f"image_size ({image_size!r}) must be at least twice bottleneck_size ({bottleneck_size!r})")
    n_down = int(round(math.log2(image_size / bottleneck_size)))
    return [min(base_width * 2**i, max_width) for i in range(n_down)]


def _check_size(image_size: int) -> None:
    if not (isinstance(image_size, int) and 32 <= image_size <= 512 and image_size & (image_size - 1) == 0):
        raise ValueError(f"image_size must be a power of two from 32 to 512, got {image_size!r}")


@dataclass
class AttentionOutput:
    """What the network returns for a batch ``B×C×S×S``."""

    reconstruction: torch.Tensor | None  # B×C×S×S in [-1, 1]; None when not asked for
    attention_logits: torch.Tensor  # B×1×S×S; sigmoid -> A, 1 = normal
    latent: torch.Tensor  # z, B×w×b×b
    latent_reconstructed: torch.Tensor | None  # ẑ = E(x̂), B×w×b×b; None with x̂
    member_attention_logits: torch.Tensor | None = None  # M×B×1×S×S from an ensemble's members, else None
    repaired: torch.Tensor | None = None  # x̃, B×C×S×S in [-1, 1], from a repair network (RepairThenAttend), else None
    encoder_features: list[torch.Tensor] | None = None  # f_i, B×w_i×S/2^(i+1)×S/2^(i+1); an ensemble's first member's

    @property
    def attention(self) -> torch.Tensor:
        return torch.sigmoid(self.attention_logits)


class Encoder(nn.Module):
    """Strided 4×4 conv blocks down to the bottleneck; returns every level's features."""

    def __init__(self, in_channels: int, widths: list[int]):
        super().__init__()
        blocks, previous = [], in_channels
        for i, width in enumerate(widths):
            blocks.append(DownBlock(previous, width, norm=i > 0))
            previous = width
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features


def kv_pool_for(side: int, kv_max_tokens: int | None) -> int:
    """The smallest power-of-two pooling that leaves at most ``kv_max_tokens`` keys at a ``side×side`` level."""
    pool = 1
    if kv_max_tokens is None:
        return pool
    if kv_max_tokens < 1:
        raise ValueError(f"attention_kv_max_tokens must be >= 1 or None, got {kv_max_tokens!r}")
    while (side // pool) ** 2 > kv_max_tokens and side // pool > 1:
        pool *= 2
    return pool


class AttentionDecoder(nn.Module):
    """Up blocks that concatenate CBAM-refined skips, self-attention where ``H·W`` is small.

    ``attention_kv_max_tokens``: at levels with more positions than this, keys and values are
    max-pooled down to at most this many (None: never). ``final_up``: ``"upsample_conv"`` (upsample
    to full resolution, then conv) or ``"conv_upsample"`` (conv at half resolution, then upsample).
    """

    def __init__(
        self,
        in_channels: int,
        widths: list[int],
        image_size: int,
        attention_max_tokens: int,
        *,
        attention_kv_max_tokens: int | None = None,
        final_up: str = "upsample_conv",
    ):
        super().__init__()
        if final_up not in ("upsample_conv", "conv_upsample"):
            raise ValueError(f"final_up must be 'upsample_conv' or 'conv_upsample', got {final_up!r}")
        n = len(widths)
        self.skip_gates = nn.ModuleList([CBAM(w) for w in widths[:-1]])
        ups, attentions = [], []
        previous = widths[-1]
        for level in range(n - 2, -1, -1):  # decode to the resolution of encoder level `level`
            ups.append(UpBlock(previous, widths[level]))
            side = image_size // 2 ** (level + 1)
            concat = 2 * widths[level]
            attentions.append(
                SelfAttention2d(concat, kv_pool=kv_pool_for(side, attention_kv_max_tokens))
                if side * side <= attention_max_tokens else nn.Identity()
            )
            previous = concat
        self.ups = nn.ModuleList(ups)
        self.attentions = nn.ModuleList(attentions)
        self.final_up = UpBlock(previous, widths[0], conv_first=final_up == "conv_upsample")
        self.fuse = nn.Sequential(
            nn.Conv2d(widths[0] + in_channels, widths[0], kernel_size=3, padding=1, bias=False),
            AffineInstanceNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        self.out_channels = widths[0]

    def forward(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        h = features[-1]
        n = len(features)
        for step, (up, attention) in enumerate(zip(self.ups, self.attentions)):
            level = n - 2 - step
            h = torch.cat([up(h), self.skip_gates[level](features[level])], dim=1)
            h = attention(h)
        h = self.final_up(h)
        return self.fuse(torch.cat([h, x.to(h.dtype)], dim=1))  # under autocast h is bf16: no float32 round trip


class BottleneckDecoder(nn.Module):
    """Plain up blocks from the latent map to full resolution, no skips (GANomaly-style x̂ path).

    Without skips, x̂ must pass through ``z``, so its error measures how well the image fits the
    learned normal appearance (semantic anomalies), and it leaves the skip decoder to the
    attention head.
    """

    def __init__(self, widths: list[int]):
        super().__init__()
        blocks, previous = [], widths[-1]
        for width in reversed(widths[:-1]):
            blocks.append(UpBlock(previous, width))
            previous = width
        blocks.append(UpBlock(previous, widths[0]))
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = widths[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)


class AttentionNet(nn.Module):
    """Stage-1 generator: ``x -> (x̂, attention logits, z, ẑ)``.

    Args:
        in_channels: image channels (1 or 3).
        image_size: square side, a power of two from 32 to 512.
        base_width / max_width: encoder widths double from ``base_width`` up to ``max_width``.
        bottleneck_size: spatial side of the latent map ``z``.
        attention_max_tokens: self-attention at decoder levels with ``H·W <=`` this.
        attention_kv_max_tokens: keys and values max-pooled to at most this many positions
            (BigGAN-style; None = every position, plain SAGAN).
        final_up: order of the last up-step, ``"upsample_conv"`` or ``"conv_upsample"`` (its conv
            at half resolution: a quarter of the full-resolution multiply-adds).
        separate_reconstruction: decode x̂ from ``z`` alone with its own decoder instead of
            sharing the skip decoder with the attention head.
        condition_channels: channels of a second input seen beside the image (e.g. its repaired
            copy, :class:`~twostage_ad.models.repair_net.RepairThenAttend`); 0 = the image alone.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 32,
        *,
        base_width: int = 16,
        max_width: int = 128,
        bottleneck_size: int = 4,
        attention_max_tokens: int = 1024,
        attention_kv_max_tokens: int | None = None,
        final_up: str = "upsample_conv",
        separate_reconstruction: bool = False,
        condition_channels: int = 0,
    ):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
        if not (isinstance(condition_channels, int) and condition_channels >= 0):
            raise ValueError(f"condition_channels must be an integer >= 0, got {condition_channels!r}")
        _check_size(image_size)
        widths = widths_for(image_size, bottleneck_size, base_width, max_width)
        if len(widths) < 2:
            raise ValueError(f"image_size {image_size!r} with bottleneck_size {bottleneck_size!r} leaves no skip levels")
        self.image_size = image_size
        self.in_channels = in_channels
        self.condition_channels = condition_channels
        self.encoder = Encoder(in_channels + condition_channels, widths)
        self.decoder = AttentionDecoder(in_channels + condition_channels, widths, image_size, attention_max_tokens,
                                        attention_kv_max_tokens=attention_kv_max_tokens, final_up=final_up)
        head = self.decoder.out_channels
        self.reconstruction_decoder = BottleneckDecoder(widths) if separate_reconstruction else None
        self.reconstruction_head = nn.Sequential(nn.Conv2d(head, in_channels, kernel_size=3, padding=1), nn.Tanh())
        self.attention_head = nn.Conv2d(head, 1, kernel_size=3, padding=1)
        self.latent_encoder = Encoder(in_channels, widths)

    def forward(self, x: torch.Tensor, *, reconstruct: bool = True, condition: torch.Tensor | None = None) -> AttentionOutput:
        """``reconstruct=False`` skips x̂ and ẑ (their decoder and second encoder, about half the
        compute) when nothing uses them; ``reconstruction`` and ``latent_reconstructed`` are then None.
        ``condition``: ``B×condition_channels×S×S``, concatenated to ``x`` before the encoder and the heads."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected input B×{self.in_channels}×{self.image_size}×{self.image_size}, got {tuple(x.shape)}"
            )
        if (condition is None) != (self.condition_channels == 0) or (
                condition is not None and tuple(condition.shape) != (x.shape[0], self.condition_channels, *x.shape[-2:])):
            raise ValueError(f"expected a condition B×{self.condition_channels}×{self.image_size}×{self.image_size} "
                             f"(none when condition_channels is 0), got {None if condition is None else tuple(condition.shape)}")
        seen = x if condition is None else torch.cat([x, condition.to(x.dtype)], dim=1)
        features = self.encoder(seen)
        h = self.decoder(seen, features)
        reconstruction = latent_reconstructed = None
        if reconstruct:
            h_rec = h if self.reconstruction_decoder is None else self.reconstruction_decoder(features[-1])
            reconstruction = self.reconstruction_head(h_rec)
            latent_reconstructed = self.latent_encoder(reconstruction)[-1]
        return AttentionOutput(
            reconstruction=reconstruction,
            attention_logits=self.attention_head(h),
            latent=features[-1],
            latent_reconstructed=latent_reconstructed,
            encoder_features=features,
        )

    def reconstruction_modules(self) -> list[nn.Module]:
        """The modules only x̂ and ẑ need (frozen when training never uses them)."""
        return [m for m in (self.reconstruction_decoder, self.reconstruction_head, self.latent_encoder) if m is not None]


class AttentionNetEnsemble(nn.Module):
    """Attention networks with their own initial weights; the attention logits are averaged.

    A deep ensemble (Lakshminarayanan et al., "Simple and Scalable Predictive Uncertainty
    Estimation using Deep Ensembles", NeurIPS 2017). Deviation: the members train side by side on
    the same batches and synthetic defects (each on its own loss), so they differ by their initial
    weights alone. ``B×C×S×S -> AttentionOutput`` with the mean logits ``B×1×S×S``, the members'
    ``M×B×1×S×S``, the members' latents concatenated along channels and the first member's encoder
    features; no x̂ (attention only).
    """

    def __init__(self, members: list[AttentionNet]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)!r}")
        shapes = {(m.in_channels, m.image_size) for m in members}
        if len(shapes) != 1:
            raise ValueError(f"ensemble members must share channels and image size, got {sorted(shapes)!r}")
        self.members = nn.ModuleList(members)
        self.in_channels, self.image_size = shapes.pop()

    def forward(self, x: torch.Tensor, *, reconstruct: bool = False) -> AttentionOutput:
        if reconstruct:
            raise ValueError("an AttentionNetEnsemble has no reconstruction (it trains the attention head only)")
        outputs = [member(x, reconstruct=False) for member in self.members]
        logits = torch.stack([o.attention_logits for o in outputs])  # M×B×1×S×S
        return AttentionOutput(
            reconstruction=None,
            attention_logits=logits.float().mean(dim=0),  # one rounding less under bf16 autocast
            latent=torch.cat([o.latent for o in outputs], dim=1),
            latent_reconstructed=None,
            member_attention_logits=logits,
            encoder_features=outputs[0].encoder_features,  # the first member's (feature normality needs one encoder)
        )

    def reconstruction_modules(self) -> list[nn.Module]:
        return [module for member in self.members for module in member.reconstruction_modules()]


class ImageMapDiscriminator(nn.Module):
    """Discriminator on image ⊕ attention map: ``B×(C+1)×S×S -> (patch logits, features)``.

    Features (the last hidden layer) serve the generator's feature-matching loss.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 32, *, base_width: int = 16, max_width: int = 128, depth: int = 4):
        super().__init__()
        _check_size(image_size)
        depth = min(depth, int(math.log2(image_size)) - 2)
        widths = [min(base_width * 2**i, max_width) for i in range(depth)]
        self.features = Encoder(in_channels + 1, widths)
        self.classifier = nn.Conv2d(widths[-1], 1, kernel_size=3, padding=1)

    def forward(self, image: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(torch.cat([image, attention], dim=1))[-1]
        return self.classifier(features), features
