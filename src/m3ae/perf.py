"""Performance accounting: analytic model FLOPs, device peaks, a measured matmul peak.

FLOPs are counted analytically from the shapes a step actually runs (as nanoGPT / PaLM count MFU):
only matrix multiplies, 2 FLOPs per multiply-add; norms, softmax, GELU, the optimiser are ignored.
For one sample (B = 1), with D / Dd the encoder / decoder widths, h = mlp_ratio, P = p*p*C,
V = vocab:

    block(T, D)   = 2*T*D*(3D + D + 2hD)      qkv, output projection, MLP
                  + 4*T*T*D                   attention scores and weighted sum (all heads)
    block(T, D, Q)= 2*T*D*2D + 2*Q*D*(D + D + 2hD) + 4*Q*T*D
                                              a block whose outputs are needed at Q rows only:
                                              keys/values for all T, the rest for Q
    forward       = 2*Ki*P*D                  image embedding of the Ki kept patches (text: a lookup)
                  + depth * block(Te, D)      Te = 1 + Ki + Kt encoder tokens (kept text Kt)
                  + 2*Te*D*Dd                 decoder input projection
                  + (dec_depth-1) * block(Td, Dd) + block(Td, Dd, Qd)
                                              Td = 1 + N + L decoder tokens (all slots), Qd rows
                                              read by the heads (the fast step: hidden slots)
                  + head(Mi, P) + head(Mt, V) Mi / Mt rows the image / text heads run on
    head(M, O)    = 2*M*Dd*(depth_h*Dd + O)   optional MLP head layers, then the output Linear
    train step    = 3 * forward               backward ~ 2x forward (the usual convention)

The fast step's rows are Mi = hidden patches, Mt = hidden real tokens, Qd = hidden patches + hidden
text slots; the reference-style step runs the heads on every slot (Mi = N, Mt = L, Qd = Td).
`tests/test_bench.py` checks this formula against torch.utils.flop_counter on a tiny model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .config import M3AEConfig


@dataclass
class StepShape:
    """Per-sample token counts of one step (averages over a batch may be fractional)."""

    kept_patches: float  # Ki (0: no image)
    text_length: float  # L, padded length the decoder runs over (0: no text)
    kept_text: float  # Kt
    image_rows: float  # Mi
    text_rows: float  # Mt
    has_image: bool = True
    decoder_rows: float | None = None  # Qd, outputs of the last decoder block in use (None: all)


def block_flops(tokens: float, dim: int, mlp_ratio: float, queries: float | None = None) -> float:
    hidden = int(dim * mlp_ratio)
    q = tokens if queries is None else queries
    return 2 * tokens * dim * 2 * dim + 2 * q * dim * (2 * dim + 2 * hidden) + 4 * q * tokens * dim


def forward_flops(c: M3AEConfig, s: StepShape) -> float:
    """Forward matmul FLOPs for one sample (formula in the module docstring)."""
    d, dd = c.emb_dim, c.dec_emb_dim
    enc_tokens = 1 + s.kept_patches + s.kept_text
    dec_tokens = 1 + (c.num_patches if s.has_image else 0) + s.text_length
    flops = 2 * s.kept_patches * c.patch_dim * d
    flops += c.depth * block_flops(enc_tokens, d, c.mlp_ratio)
    flops += 2 * enc_tokens * d * dd
    if c.dec_depth:
        flops += (c.dec_depth - 1) * block_flops(dec_tokens, dd, c.mlp_ratio)
        flops += block_flops(dec_tokens, dd, c.mlp_ratio, s.decoder_rows)
    head = c.output_head_depth * dd
    flops += 2 * s.image_rows * dd * (head + c.patch_dim)
    flops += 2 * s.text_rows * dd * (head + c.vocab_size)
    return flops


def train_flops(c: M3AEConfig, s: StepShape) -> float:
    return 3 * forward_flops(c, s)


def part_shape(part, c: M3AEConfig, full: bool = False) -> StepShape:
    """The per-sample shape of one batch part (`m3ae.data.collate.BatchPart`: its samples share
    shapes). `full`: as the reference-style step runs it (heads and last block on every slot)."""
    m = part.masks
    patches = c.num_patches if part.image is not None else 0
    kept_patches = m.image_keep if patches else 0
    length = part.text.shape[1] if part.text is not None else 0
    kept_text = m.text_keep if length else 0
    hidden_real = (m.text_targets.numel() / part.size if m.text_targets is not None else length - kept_text
                   ) if length else 0
    return StepShape(kept_patches=kept_patches, text_length=length, kept_text=kept_text,
                     image_rows=patches if full else patches - kept_patches,
                     text_rows=length if full else hidden_real, has_image=bool(patches),
                     decoder_rows=None if full else patches - kept_patches + length - kept_text)


def batch_train_flops(batch, c: M3AEConfig, full: bool = False) -> float:
    """Training FLOPs of one (micro-)batch (`m3ae.data.collate.Batch`), part by part. Host-side
    shapes only: no device sync."""
    return sum(train_flops(c, part_shape(p, c, full)) * p.size for p in batch.parts)


# Dense peak TFLOP/s (no sparsity) by substring of torch.cuda.get_device_name(), from the vendors'
# data sheets: bf16 tensor cores and plain fp32. Order matters (first match wins).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp32": 30.3}),
    ("RTX 4090", {"bf16": 165.2, "fp32": 82.6}),
    ("A10", {"bf16": 125.0, "fp32": 31.2}),
]


# The CPU features that decide matmul speed, named in every benchmark line (machines change).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def device_name(device: torch.device) -> str:
    """GPU name, or CPU model with thread count and its matmul-relevant flags (from /proc/cpuinfo)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, flags = "cpu", set[str]()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "cpu":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    named = " ".join(f for f in CPU_FLAGS if f in flags) or "flags unknown"
    if flags and "amx_bf16" not in flags:
        named += ", no AMX"
    return f"{model} ({torch.get_num_threads()} threads; {named})"


def table_peak(name: str, dtype: str) -> float | None:
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks.get(dtype)
    return None


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None,
                          seconds: float = 0.5) -> float:
    """Achieved TFLOP/s of a square matmul: what this device delivers on the best-case kernel."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    synchronize(device)
    start = time.perf_counter()
    a @ b
    synchronize(device)
    # A kernel that takes seconds per call (bf16 on a CPU without native bf16: ~2 s at 1024) is timed
    # once after its warm-up call; a fast one gets a second warm-up and at least three timed calls.
    slow = time.perf_counter() - start >= seconds
    if not slow:
        a @ b
        synchronize(device)
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and (slow or reps >= 3):
            return 2 * size**3 * reps / elapsed / 1e12


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (timing only; a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
