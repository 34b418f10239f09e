"""CPU attention in bf16 vs fp32: forward and forward+backward of F.scaled_dot_product_attention at
the model's shapes, to see whether bf16 attention pays on this CPU (it does not on every CPU:
BENCHMARKS.md) - the measurement behind m3ae.precision.cpu_bf16_attention_pays.

    python benchmarks/attention_precision.py [--threads N] [--lengths 48 96 197] [--batch 16]

The last columns time the two forms a CPU bf16 training step chooses between, on bf16 inputs: fp32
fused attention with its casts, and m3ae.cpu_attention's explicit form (bf16 matmuls, fp32 softmax).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from m3ae.cpu_attention import explicit_attention


def timed(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def measure(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Seconds per forward (no grad) and per forward + backward."""
    def forward() -> None:
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)

    def train() -> None:
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    return timed(forward, repeats), timed(train, repeats)


def measure_step_paths(batch: int, heads: int, length: int, head_dim: int, repeats: int) -> tuple[float, float]:
    """Seconds per forward + backward of the two ways a CPU bf16 training step can run its attention
    on bf16 q, k, v: cast to fp32 for the fused kernel and back, or m3ae.cpu_attention's explicit form."""
    q, k, v = (torch.randn(batch, heads, length, head_dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(batch, heads, length, head_dim, dtype=torch.bfloat16)

    def fused_fp32() -> None:
        F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(torch.bfloat16).backward(grad)

    def explicit() -> None:
        explicit_attention(q, k, v, None, head_dim**-0.5).backward(grad)

    return timed(fused_fp32, repeats), timed(explicit, repeats)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--lengths", type=int, nargs="+", default=[48, 96, 197])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads; batch {args.batch}, {args.heads} heads x {args.head_dim}")
    print("| length | fp32 fwd ms | bf16 fwd ms | fp32 fwd+bwd ms | bf16 fwd+bwd ms | bf16/fp32 fwd+bwd time "
          "| bf16 step, fp32 fused + casts fwd+bwd ms | bf16 step, explicit fwd+bwd ms | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for length in args.lengths:
        row = []
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(args.batch, args.heads, length, args.head_dim, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            row.append(measure(q, k, v, args.repeats))
        (f32, t32), (f16, t16) = row
        fused, explicit = measure_step_paths(args.batch, args.heads, length, args.head_dim, args.repeats)
        print(f"| {length} | {f32 * 1e3:.2f} | {f16 * 1e3:.2f} | {t32 * 1e3:.2f} | {t16 * 1e3:.2f} | {t16 / t32:.2f} "
              f"| {fused * 1e3:.2f} | {explicit * 1e3:.2f} | {fused / explicit:.2f} |")


if __name__ == "__main__":
    main()
