"""Which precision a step runs in: the one rule for `precision=auto` and the one autocast builder.

auto = bf16 autocast on CUDA and on CPUs with native bf16 matrix instructions (AMX or AVX512-BF16,
where oneDNN's bf16 matmul is ~2x fp32: BENCHMARKS.md), fp32 elsewhere. Under autocast the matmuls
run in bf16 while softmax, normalisation statistics and the losses stay fp32 (torch's autocast
lists, and m3ae.linear_cross_entropy's fp32 softmax). On a CPU, a bf16 step's attention runs in fp32
(`attention_in_fp32`): torch's CPU bf16 attention kernels are slower than fp32 with a backward.
"""
from __future__ import annotations

import contextlib
from functools import lru_cache

import torch

PRECISIONS = ("auto", "fp32", "bf16")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX512-BF16 on this CPU, and a oneDNN build to use them."""
    if not torch.backends.mkldnn.is_available():
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:
        return False


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a step with this precision setting runs under bf16 autocast on this device."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on the device's type, or a no-op context."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def attention_in_fp32(q: torch.Tensor) -> bool:
    """bf16 attention inputs on a CPU with gradients wanted. There torch's bf16 attention, forward +
    backward, is 1.2-2.4x slower than fp32 at 2 threads (lengths 48-321, AVX512-BF16 and AMX CPUs;
    with 16 AMX threads bf16 wins only from ~200 tokens), and whole bf16 steps ran 1.17-1.41x faster
    with their attention in fp32 (`benchmarks/attention_precision.py`, BENCHMARKS.md). The matmuls
    around it stay bf16."""
    return q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.requires_grad and torch.is_grad_enabled()
