"""Which precision a step runs in: the one rule for `precision=auto` and the one autocast builder.

auto = bf16 autocast on CUDA and on CPUs with native bf16 matrix instructions (AMX or AVX512-BF16,
where oneDNN's bf16 matmul is ~2x fp32: BENCHMARKS.md), fp32 elsewhere. Under autocast the matmuls
run in bf16 while softmax, normalisation statistics and the losses stay fp32 (torch's autocast
lists, and m3ae.linear_cross_entropy's fp32 softmax). On a CPU, torch's bf16 attention kernels are
slower than fp32 with a backward, so a bf16 training step's attention takes m3ae.cpu_attention's
explicit form (bf16 GEMMs, fp32 softmax math) or the fused kernel in fp32 (`attention_in_fp32`).
On bf16 activations the MLP's tanh GELU is computed in its erf form (m3ae.layers.gelu: the same
function to within bf16 rounding, and 2-3x cheaper on CPU).

bf32 (CPU only, opt-in) keeps weights, activations and every output in fp32 and lets oneDNN round
the inputs of fp32 matmuls to bf16 inside the kernel (fp32 accumulation, fp32 result): the CPU's
TF32. There are no cast passes and no bf16 activations, so it is at least as exact as bf16 autocast's
matmuls. oneDNN applies it only where it has such kernels (AMX; PyTorch's own measurements on
Sapphire Rapids: 1.4-4x fp32 matmuls); elsewhere, e.g. AVX512-BF16 without AMX, the step is fp32.
"""
from __future__ import annotations

import contextlib
from functools import lru_cache

import torch

PRECISIONS = ("auto", "fp32", "bf16", "bf32")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX512-BF16 on this CPU, and a oneDNN build to use them."""
    return _cpu_has("_is_amx_tile_supported", "_is_avx512_bf16_supported")


@lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    """AMX tiles on this CPU, and a oneDNN build to use them (where bf32 takes effect)."""
    return _cpu_has("_is_amx_tile_supported")


def _cpu_has(*checks: str) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    found = [getattr(torch.cpu, name, None) for name in checks]
    try:
        return any(check() for check in found if check is not None)
    except RuntimeError:
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """The mode a step with this precision setting runs in on this device: fp32, bf16 (autocast) or
    bf32 (fp32 with bf16-input matmuls, CPU only)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf32" and device.type != "cpu":
        raise ValueError(f"precision bf32 is a CPU mode (oneDNN's bf16 matmul math); on {device.type} use bf16")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()) else "fp32"


def slow_precision_warning(mode: str, device: torch.device) -> str | None:
    """Why a resolved mode (`resolve_precision`) will run slowly on this device, or None. `auto` never
    picks these; they come from an explicit setting on a CPU that lacks the instructions."""
    if device.type != "cpu":
        return None
    if mode == "bf16" and not cpu_has_native_bf16():
        # Measured on a 2-vCPU AVX2-only EPYC (2026-12-02): square matmuls 0.3-1.3 bf16 vs 68-131
        # GFLOP/s fp32, the demo model's step 12x slower than fp32 (BENCHMARKS.md).
        return ("precision bf16: this CPU has neither AMX nor AVX512-BF16, so oneDNN's bf16 matmuls fall back "
                "to slow generic code (square matmuls 50-400x, the demo's step 12x slower than fp32 on an "
                "AVX2 EPYC; BENCHMARKS.md); use precision=auto, which picks fp32 here")
    if mode == "bf32" and not cpu_has_amx():
        return ("precision bf32: this CPU has no AMX, so oneDNN runs these matmuls in fp32, and for small ones "
                "slower than fp32's default BLAS (BENCHMARKS.md); use fp32 or bf16")
    return None


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a step with this precision setting runs under bf16 autocast on this device."""
    return resolve_precision(precision, device) == "bf16"


class Bf32Matmuls:
    """fp32 matmuls computed by oneDNN from bf16-rounded inputs while the block runs (forward and
    backward both: the setting is read when each matmul runs), the previous setting restored after.
    Re-entrant and reusable, like the autocast context a step holds."""

    def __init__(self) -> None:
        self._saved: list[str] = []

    def __enter__(self) -> "Bf32Matmuls":
        self._saved.append(_fp32_matmul_precision())
        _set_fp32_matmul_precision("bf16")
        return self

    def __exit__(self, *exc) -> None:
        _set_fp32_matmul_precision(self._saved.pop())


def _fp32_matmul_precision() -> str:
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if matmul is not None and hasattr(matmul, "fp32_precision"):  # newer torch's per-backend setting
        return matmul.fp32_precision
    return torch.get_float32_matmul_precision()  # older torch: "medium" is bf32 for oneDNN


def _set_fp32_matmul_precision(value: str) -> None:
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if matmul is not None and hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = value
    else:
        torch.set_float32_matmul_precision({"bf16": "medium"}.get(value, value))


def step_context(device: torch.device, mode: str):
    """The context a training step's forward and backward run in, for a resolved mode
    (`resolve_precision`): bf16 autocast, bf32 matmuls, or nothing for fp32."""
    if mode == "bf32":
        return Bf32Matmuls()
    return autocast(device, mode == "bf16")


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
