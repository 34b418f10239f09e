"""Where the training step's time goes: torch.profiler over a few of the trainer's steps, the top
operators (CPU) or kernels (CUDA) by self time, and the share of matmul and attention work.

    python benchmarks/profile_step.py [--steps 5] [--precision fp32|bf16]          # CPU, MAE mode
    python benchmarks/profile_step.py --device cuda --preset base --batch 256 --image-size 256
    python benchmarks/profile_step.py --preset base --batch 16 --precision bf16 model.depth=4 \
        model.image_size=128 model.text_length=32        # BENCHMARKS.md's CPU bf16 row

Without --preset: the MAE-mode shapes of benchmarks/mae_vs_hf.py (192 x 6 encoder, 128 x 2 decoder,
64 px, patch 8, batch 32). With --preset: that M3AE preset (text on) at --image-size.
"""
from __future__ import annotations

import argparse
import sys

import torch

from m3ae.host_allocator import SETTINGS, keep_freed_memory

# Kernel / operator names that count as matrix or attention work (CPU operators and CUDA kernels).
MATMUL_CPU = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::linear", "aten::matmul")
MATMUL_CUDA = ("gemm", "sm90_xmma", "cutlass", "flash", "fmha", "attention", "nvjet", "wgmma")


def profile_interleaved(runs: dict, steps: int = 5, top: int = 6) -> dict[str, tuple[float, float]]:
    """Where each run's CPU step time goes. `runs`: name -> (step callable, batches). Steps are
    profiled one at a time, interleaved across the runs as the benchmarks time them, so a drifting
    machine shows in all of them alike. Prints each run's operator self time per step, split into
    matmul / attention operators and the rest, with its top operators; returns name -> (matmul ms,
    total ms) per step. (The profiler itself slows copies: BENCHMARKS.md.)"""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    per_op: dict[str, Counter] = {name: Counter() for name in runs}
    for i in range(steps):
        for name, (step, batches) in runs.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(batches[i % len(batches)])
            for e in prof.key_averages():
                per_op[name][e.key] += e.self_cpu_time_total / 1e3 / steps
    split = {}
    for name, ops in per_op.items():
        total = sum(ops.values())
        matmul = sum(ms for key, ms in ops.items() if key in MATMUL_CPU)
        names = ", ".join(f"{key.removeprefix('aten::')} {ms:.1f}" for key, ms in ops.most_common(top))
        print(f"profile {name:16s} {total:6.1f} ms/step: matmul + attention {matmul:6.1f} ms, "
              f"rest {total - matmul:6.1f} ms; {names}")
        split[name] = (matmul, total)
    return split


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "bf32"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default=None, help="an M3AE preset (default: the small MAE-mode shapes)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-caption", type=int, default=None,
                   help="with --preset: captions of 1..N tokens (default: the preset's text_length), as "
                        "`m3ae bench train --max-caption`; compiled steps pad every caption to N")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--host-allocator", default="auto", choices=SETTINGS,
                   help="m3ae.host_allocator, as the trainer applies it (auto: keep on CPU)")
    p.add_argument("--by-shape", action="store_true", help="split each operator by its input shapes")
    p.add_argument("overrides", nargs="*", metavar="model.KEY=VALUE", help="with --preset: model settings")
    args = p.parse_args()
    with keep_freed_memory(args.host_allocator, torch.device(args.device).type) as allocator:
        print(f"host allocator: {allocator}")
        return _profile(args)


def _profile(args: argparse.Namespace) -> int:
    from torch.profiler import ProfilerActivity, profile

    from m3ae import M3AE, M3AEConfig
    from m3ae.train.bench import BenchOptions, _Step, bench_model_config, synthetic_batches

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.preset:
        cfg = bench_model_config(args.preset, [f"model.image_size={args.image_size}", *args.overrides])
    else:
        cfg = M3AEConfig(image_size=64, patch_size=8, emb_dim=192, depth=6, num_heads=3, dec_emb_dim=128,
                         dec_depth=2, dec_num_heads=4, vocab_size=0)
    opts = BenchOptions(cfg, batch=args.batch, compile=args.compile, max_caption=args.max_caption)
    batches = synthetic_batches(cfg, opts)
    if device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    torch.manual_seed(0)
    step = _Step(M3AE(cfg).to(device), device, args.precision, False, args.compile)
    for b in batches[:3]:
        step(b.to(device, non_blocking=True))
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=args.by_shape) as prof:
        for i in range(args.steps):
            step(batches[i % len(batches)].to(device, non_blocking=True))
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.key_averages(group_by_input_shape=args.by_shape)
    if cuda:
        # Kernels only: operators also carry the device time of the kernels they launch.
        from torch.autograd import DeviceType
        timed = [(e.key, getattr(e, "self_device_time_total", 0), e.count) for e in events
                 if getattr(e, "device_type", None) == DeviceType.CUDA]
        matmul = lambda key: any(k in key.lower() for k in MATMUL_CUDA)  # noqa: E731
        unit = "GPU"
    else:
        timed = [(f"{e.key} {e.input_shapes}" if args.by_shape else e.key, e.self_cpu_time_total, e.count)
                 for e in events]
        matmul = lambda key: key.split(" ")[0] in MATMUL_CPU  # noqa: E731
        unit = "CPU"
    total = sum(t for _, t, _ in timed)
    print(f"{cfg.emb_dim} x {cfg.depth} encoder, batch {args.batch}, {args.precision}, compile {args.compile}, "
          f"{device}: {args.steps} steps, {total / 1e3 / args.steps:.1f} ms self {unit} time per step"
          + ("" if cuda else f", {torch.get_num_threads()} threads"))
    share = sum(t for k, t, _ in timed if matmul(k)) / total
    print(f"matmul + attention: {100 * share:.0f}% of self {unit} time")
    for key, t, count in sorted(timed, key=lambda r: -r[1])[: args.top]:
        print(f"{key[:130]:130s} {100 * t / total:5.1f}%  calls/step {count / args.steps:6.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
