"""Building blocks: conv blocks, CBAM and SAGAN self-attention. Pure ``nn.Module``s.

CBAM: Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018 — channel attention
(shared MLP over average- and max-pooled features) then spatial attention (7×7 conv over channel
average and max). SAGAN: Zhang et al., "Self-Attention Generative Adversarial Networks", ICML 2019
— query/key width C/8, output ``γ·attention + x`` with γ initialised to 0, so the block starts as
the identity; logits unscaled as in SAGAN. Computed as two explicit batched matmuls: the query/key
width (C/8) differs from the value width (C), so ``scaled_dot_product_attention`` has no fused
kernel for it on CPU and its fallback spent a third of its time on masking checks an unmasked
attention never needs (profiled at 32×32 on 2 cores; ``benchmarks/README.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AffineInstanceNorm2d", "SingleChannelConv2d", "DownBlock", "UpBlock", "ChannelAttention", "SpatialAttention", "CBAM", "SelfAttention2d"]


class AffineInstanceNorm2d(nn.GroupNorm):
    """Instance normalisation with a per-channel affine, ``nn.InstanceNorm2d(c, affine=True)``,
    computed as ``nn.GroupNorm`` with one channel per group (Wu & He, "Group Normalization", ECCV
    2018: GroupNorm with one channel a group is InstanceNorm).

    The same maths and the same parameters and state-dict keys (``weight``, ``bias``), so
    checkpoints of either load into the other; values equal up to float reassociation. On CPUs
    with channels-last activations ``InstanceNorm2d`` runs as a ``1×(B·C)×H×W`` batch norm, which
    copies each activation into and out of the contiguous layout; ``GroupNorm``'s kernel takes
    the layout as it is: float32 stage-1 scoring 1.17–1.30× and a stage-1 training step 1.06–1.12×
    as fast on 2 cores. In bf16 (autocast) the group-norm kernel was the slower one (0.94×), so
    half-precision inputs take the instance-norm path (``benchmarks/norm_layers.py`` measures both).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        if not (isinstance(num_features, int) and num_features >= 1):
            raise ValueError(f"num_features must be an integer >= 1, got {num_features!r}")
        super().__init__(num_features, num_features, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16):
            return F.instance_norm(x, weight=self.weight, bias=self.bias, use_input_stats=True, eps=self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class SingleChannelConv2d(nn.Conv2d):
    """``nn.Conv2d`` to one output channel, on CPUs computed as a depthwise conv plus a channel sum.

    The same convolution (same parameters and state-dict keys, values equal up to float
    reassociation), but oneDNN's kernel for a single output channel is as slow as for sixteen:
    GANomaly2D's last 7×7 conv, 16 -> 1 channels at 128×128, took 52 ms per batch of 64 on 2 cores,
    the depthwise form 7.6 ms (docs/experiments.md, speed). The intermediate holds one map
    per input channel (``B×Cin×H×W``). Elsewhere (CUDA) the plain convolution runs, as measured
    nowhere else; a traced or exported graph keeps the form of the device it was traced on.
    Half-precision inputs (autocast) are summed in float32 and rounded once, as conv kernels do.
    """

    def __init__(self, in_channels: int, kernel_size: int, **kwargs: object):
        super().__init__(in_channels, 1, kernel_size, **kwargs)  # type: ignore[arg-type]
        if self.padding_mode != "zeros":  # (groups > 1 cannot give one output channel)
            raise ValueError(f"SingleChannelConv2d supports zero padding only; got padding_mode={self.padding_mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        depthwise = self.weight.reshape(self.in_channels, 1, *self.kernel_size)  # 1×Cin×kh×kw -> Cin×1×kh×kw
        per_channel = F.conv2d(x, depthwise, None, self.stride, self.padding, self.dilation, groups=self.in_channels)
        half = per_channel.dtype in (torch.float16, torch.bfloat16)
        out = per_channel.sum(dim=1, keepdim=True, dtype=torch.float32 if half else None)
        if self.bias is not None:
            out = out + self.bias.view(1, 1, 1, 1).to(out.dtype)
        return out.to(per_channel.dtype)


class DownBlock(nn.Module):
    """4×4 stride-2 conv, optional InstanceNorm, LeakyReLU(0.2): ``B×Cin×H×W -> B×Cout×H/2×W/2``."""

    def __init__(self, in_channels: int, out_channels: int, *, norm: bool = True, slope: float = 0.2):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1, bias=not norm)
        self.norm = AffineInstanceNorm2d(out_channels) if norm else nn.Identity()
        self.act = nn.LeakyReLU(slope, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class UpBlock(nn.Module):
    """Bilinear ×2 upsampling then 3×3 conv, InstanceNorm, ReLU: ``B×Cin×H×W -> B×Cout×2H×2W``.

    ``conv_first``: conv, norm and ReLU at the input resolution, then the upsampling — a quarter
    of the multiply-adds, for the last, full-resolution step where they cost most.

    Upsample-then-conv instead of a transposed conv avoids checkerboard artefacts in the maps.
    On the CPU the upsampling runs on a channels-last copy of its input: the same values, but
    PyTorch's CPU kernel for contiguous (NCHW) tensors is several times slower than its NHWC one
    (bf16 most of all; 20 ms vs 3.6 ms for 32×32×64×64 on 2 cores); the conv takes either layout.
    """

    def __init__(self, in_channels: int, out_channels: int, *, conv_first: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm = AffineInstanceNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)
        self.conv_first = conv_first

    @staticmethod
    def _upsample(x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":  # measured on CPUs only; elsewhere the input's own layout
            x = x.contiguous(memory_format=torch.channels_last)
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_first:
            return self._upsample(self.act(self.norm(self.conv(x))))
        return self.act(self.norm(self.conv(self._upsample(x))))


class ChannelAttention(nn.Module):
    """CBAM channel gate: ``sigmoid(MLP(avgpool) + MLP(maxpool))``, per-channel weights."""

    def __init__(self, channels: int, *, reduction: int = 16, min_hidden: int = 4):
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels!r}")
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction!r}")
        hidden = max(channels // reduction, min_hidden)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.fc2(self.act(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        mx = self.fc2(self.act(self.fc1(x.amax(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """CBAM spatial gate: ``sigmoid(conv7x7([mean_c, max_c]))``, one weight per pixel."""

    def __init__(self, *, kernel_size: int = 7):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size!r}")
        self.conv = nn.Conv2d(2, 1, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Channel then spatial attention (CBAM, ECCV 2018): ``B×C×H×W -> B×C×H×W``."""

    def __init__(self, channels: int, *, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction=reduction)
        self.spatial = SpatialAttention(kernel_size=kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


class SelfAttention2d(nn.Module):
    """SAGAN self-attention over all ``H·W`` positions: ``B×C×H×W -> B×C×H×W``.

    Memory and time grow as ``(H·W)²``; callers use it only at small resolutions.
    ``kv_pool``: keys and values are max-pooled ``kv_pool × kv_pool`` first, so every position
    attends to ``H·W / kv_pool²`` pooled ones (as BigGAN does with 2×2: Brock et al., "Large Scale
    GAN Training for High Fidelity Natural Image Synthesis", ICLR 2019); 1 = plain SAGAN.
    """

    def __init__(self, channels: int, *, key_ratio: int = 8, kv_pool: int = 1):
        super().__init__()
        if channels < key_ratio:
            raise ValueError(f"channels ({channels!r}) must be >= key_ratio ({key_ratio!r})")
        if not (isinstance(kv_pool, int) and kv_pool >= 1 and kv_pool & (kv_pool - 1) == 0):
            raise ValueError(f"kv_pool must be a power of two >= 1, got {kv_pool!r}")
        self.kv_pool = kv_pool
        key_channels = channels // key_ratio
        self.query = nn.Conv2d(channels, key_channels, kernel_size=1)
        self.key = nn.Conv2d(channels, key_channels, kernel_size=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2)  # B×Ck×N
        k, v = self.key(x), self.value(x)
        if self.kv_pool > 1:
            k, v = F.max_pool2d(k, self.kv_pool), F.max_pool2d(v, self.kv_pool)
        k = k.flatten(2)  # B×Ck×M, M = N / kv_pool²
        v = v.flatten(2)  # B×C×M
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)  # B×N×M, row i: where position i looks
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)  # out[:, :, i] = Σ_j weights[i, j]·v[:, :, j]
        return x + self.gamma.to(out.dtype) * out  # stays in x's dtype under autocast (gamma is float32)
