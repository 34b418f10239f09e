"""Where the MAE-mode step's time goes: torch.profiler over a few fast steps (fp32 and bf16), the
top operators by self CPU time, and the share of matmul-like operators.

    python benchmarks/profile_mae_step.py [--steps 5] [--precision fp32|bf16]
Same shapes as benchmarks/mae_vs_hf.py (192 x 6 encoder, 128 x 2 decoder, 64 px, patch 8, batch 32).
"""
from __future__ import annotations

import argparse
import sys

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from m3ae import M3AE, M3AEConfig
    from m3ae.train.bench import BenchOptions, _Step, synthetic_batches

    cfg = M3AEConfig(image_size=64, patch_size=8, emb_dim=192, depth=6, num_heads=3, dec_emb_dim=128,
                     dec_depth=2, dec_num_heads=4, vocab_size=0)
    batches = synthetic_batches(cfg, BenchOptions(cfg, batch=32))
    torch.manual_seed(0)
    step = _Step(M3AE(cfg), torch.device("cpu"), args.precision == "bf16", False, False)
    for b in batches[:3]:
        step(b)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(args.steps):
            step(batches[i % len(batches)])
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{args.steps} steps, {total / 1e3 / args.steps:.1f} ms self CPU per step, {torch.get_num_threads()} threads")
    matmul = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::linear", "aten::matmul")
    share = sum(e.self_cpu_time_total for e in events if e.key in matmul) / total
    print(f"matmul + attention kernels: {100 * share:.0f}% of self CPU time")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"{e.key[:60]:60s} {100 * e.self_cpu_time_total / total:5.1f}%  calls/step {e.count / args.steps:6.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
