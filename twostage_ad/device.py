"""Where and in what precision the networks run: device choice, native-bf16 detection, layout.

``run.precision: auto`` (the default) scores stage 1 in bf16 only where bf16 arithmetic is
native (a CUDA GPU with bf16, a CPU with ``avx512_bf16`` or AMX); elsewhere bf16 is emulated and
several times slower than float32, so ``auto`` means float32 there (docs/design.md §8).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

__all__ = ["PRECISIONS", "resolve_device", "has_fast_bf16", "resolve_precision", "memory_format_for"]

PRECISIONS = ("auto", "float32", "bf16")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; a requested but missing GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was requested but CUDA is not available; use device: auto or cpu")
    return device


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bf16 arithmetic is native here: a CUDA GPU with bf16 (not emulated), or a CPU with
    ``avx512_bf16`` or AMX (read from ``/proc/cpuinfo``; False where that cannot be read) whose
    kernels are not held to a lower ISA. Elsewhere bf16 autocast is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and not _kernels_capped_below_avx512()


def _kernels_capped_below_avx512() -> bool:
    """Whether the CPU kernels are held to an ISA without bf16 (``ATEN_CPU_CAPABILITY=avx2``,
    ``ONEDNN_MAX_CPU_ISA=AVX2``): bf16 is then emulated although the CPU has it."""
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    capped = bool(onednn) and onednn != "ALL" and not onednn.startswith(("AVX512", "AVX10", "AMX"))
    return capped or not torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def resolve_precision(precision: str, device: torch.device, *, bf16_allowed: bool = True) -> str:
    """``auto`` / ``float32`` / ``bf16`` -> the precision to score in: ``float32`` or ``bf16``.

    ``bf16_allowed``: False when the screening loss uses reconstruction or latent errors
    (differences that bf16 rounding distorts); ``auto`` then resolves to float32. An explicit
    ``bf16`` on hardware without native bf16 runs (emulated) with a warning.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_allowed and has_fast_bf16(device) else "float32"
    if precision == "bf16" and not has_fast_bf16(device):
        warnings.warn(f"precision is bf16, but {device} has no native bf16: scoring is emulated and slower than "
                      "float32 (use run.precision: auto)", RuntimeWarning, stacklevel=2)
    return precision


def memory_format_for(channels_last: bool) -> torch.memory_format:
    """``channels_last`` (NHWC): convolutions then run NHWC end to end (faster on CPUs and tensor cores)."""
    return torch.channels_last if channels_last else torch.contiguous_format
