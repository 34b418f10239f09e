"""bf16 autocast against fp32 for the same training step, steps interleaved in one process.

    PYTHONPATH=src python benchmarks/bf16_vs_fp32.py [--preset base] [--batch 16] [--rounds 8]
        [--max-caption 32] [--bf32] [--profile] [model.KEY=VALUE ...]

Separate `m3ae bench train --precision` runs drift with the VM (the fp32 base step wandered between
8.3 and 10.8 s from one run to the next, BENCHMARKS.md): here one bf16 and one fp32 step alternate,
on two models with the same weights and the same batches, after a warm-up round per batch, and the
ratio of each round and of the medians is printed, beside the ratio of the two precisions' square
matmul rates (2048^3, the best case): the step can beat that only where its other operators gain
more from bf16 than its matmuls do. `--bf32` adds a third model stepped in the same rounds with
precision bf32 (fp32 with oneDNN's bf16-input matmuls; AMX CPUs only, fp32 elsewhere). `--profile`
then profiles two more steps of each and splits their operator time into matmuls (the part
precision can speed up) and the rest.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from m3ae import M3AE
from m3ae.host_allocator import keep_freed_memory
from m3ae.perf import device_name, measure_matmul_tflops
from m3ae.threads import choose_threads
from m3ae.train.bench import BenchOptions, _Step, bench_model_config, synthetic_batches

from profile_step import profile_interleaved  # this folder's profiler


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="base")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=8, help="timed steps of each precision")
    p.add_argument("--max-caption", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--bf32", action="store_true", help="also time precision bf32 in the same rounds")
    p.add_argument("--profile", action="store_true")
    p.add_argument("model", nargs="*", metavar="model.KEY=VALUE")
    args = p.parse_args()

    threads = choose_threads(args.threads)
    torch.set_num_threads(threads.threads)
    cfg = bench_model_config(args.preset, args.model)
    opts = BenchOptions(cfg, batch=args.batch, max_caption=args.max_caption, pool=4)
    batches = synthetic_batches(cfg, opts)
    torch.manual_seed(0)
    models = {"bf16": M3AE(cfg)}
    models["fp32"] = M3AE(cfg)
    models["fp32"].load_state_dict(models["bf16"].state_dict())
    if args.bf32:
        models["bf32"] = M3AE(cfg)
        models["bf32"].load_state_dict(models["bf16"].state_dict())
    device = torch.device("cpu")
    steps = {name: _Step(model, device, name, False, False) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    faults: dict[str, list[int]] = {name: [] for name in steps}
    with keep_freed_memory("auto", device.type) as allocator:
        print(f"device {device_name(device)}, threads {threads}, host allocator: {allocator}; preset "
              f"{args.preset} {' '.join(args.model)}, batch {args.batch}, captions <= {args.max_caption}; "
              f"{len(batches)} warm-up + {args.rounds} timed rounds, interleaved", file=sys.stderr)
        for i in range(len(batches) + args.rounds):  # the first pass over the batches warms up every shape
            for name, step in steps.items():
                f0, t0 = _minor_faults(), time.perf_counter()
                step(batches[i % len(batches)])
                if i >= len(batches):
                    times[name].append(time.perf_counter() - t0)
                    faults[name].append(_minor_faults() - f0)
            if i >= len(batches):
                each = ", ".join(f"{name} {t[-1] * 1e3:.0f} ms" for name, t in times.items())
                gains = ", ".join(f"{name} {times['fp32'][-1] / t[-1]:.2f}x" for name, t in times.items()
                                  if name != "fp32")
                print(f"round {i - len(batches) + 1}: {each}; {gains} (page faults "
                      f"{', '.join(str(f[-1]) for f in faults.values())})", flush=True)
        peak = {name: measure_matmul_tflops(device, dtype, size=2048, seconds=2.0)
                for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
        print(f"square matmul (2048^3): bf16 {peak['bf16']:.3f} TFLOP/s, fp32 {peak['fp32']:.3f}; "
              f"{peak['bf16'] / peak['fp32']:.2f}x")
        med = {name: statistics.median(t) for name, t in times.items()}
        rounds = [a / b for a, b in zip(times["fp32"], times["bf16"])]
        print(f"median step: bf16 {med['bf16'] * 1e3:.0f} ms, fp32 {med['fp32'] * 1e3:.0f} ms; bf16 speed-up "
              f"{med['fp32'] / med['bf16']:.2f}x (rounds {min(rounds):.2f}-{max(rounds):.2f}x, median "
              f"{statistics.median(rounds):.2f}x)")
        if "bf32" in med:
            rounds32 = [a / b for a, b in zip(times["fp32"], times["bf32"])]
            print(f"median step: bf32 {med['bf32'] * 1e3:.0f} ms; bf32 speed-up {med['fp32'] / med['bf32']:.2f}x "
                  f"(rounds {min(rounds32):.2f}-{max(rounds32):.2f}x, median {statistics.median(rounds32):.2f}x)")
        if args.profile:
            split = profile_interleaved({name: (step, batches) for name, step in steps.items()}, steps=2)
            (m16, t16), (m32, t32) = split["bf16"], split["fp32"]
            print(f"matmuls {m32 / m16:.2f}x faster in bf16, the rest {(t32 - m32) / (t16 - m16):.2f}x; "
                  f"operator time {t32 / t16:.2f}x")
    return 0


def _minor_faults() -> int:
    """Minor page faults of this process so far (a step that faults re-touches freed memory)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


if __name__ == "__main__":
    sys.exit(main())
