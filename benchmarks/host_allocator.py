"""What keeping freed memory (m3ae.host_allocator) buys on this CPU: large-tensor operations and the
training step, with glibc's default ("system") and with "keep", each in a fresh process.

    python benchmarks/host_allocator.py [--steps 12] [--precision bf16] [--rounds 2] [model.KEY=VALUE ...]

Per setting: the time of a 94 MB zero-filled allocation (a 30522 x 768 embedding gradient), a 62 MB
clone and a bf16 cast of a 30522 x 512 weight; then the step of `m3ae bench train --preset base`
with the overrides (default: base width, 4 blocks, 128 px, text 32): median step time, minor page
faults per step and resident memory over the second half of the steps, and the peak.
Settings alternate over --rounds, so a drifting VM shows up in both.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

DEFAULT_MODEL = ["model.depth=4", "model.image_size=128", "model.patch_size=16", "model.text_length=32"]


def _child(setting: str, steps: int, precision: str, overrides: list[str]) -> dict:
    import resource

    import torch

    from m3ae import M3AE
    from m3ae.host_allocator import keep_freed_memory, resident_bytes
    from m3ae.train.bench import BenchOptions, _Step, bench_model_config, synthetic_batches

    def timed(fn, n=10) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n * 1e3

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def rss_mib() -> float:
        return (resident_bytes() or 0) / 2**20

    out: dict = {"setting": setting}
    with keep_freed_memory(setting, "cpu") as choice:
        out["choice"] = str(choice)
        weight = torch.randn(30522, 512)
        out["zeros_94MB_ms"] = timed(lambda: torch.zeros(30522, 768))
        out["clone_62MB_ms"] = timed(lambda: weight.clone())
        out["to_bf16_ms"] = timed(lambda: weight.to(torch.bfloat16))
        config = bench_model_config("base", overrides)
        batches = synthetic_batches(config, BenchOptions(config, batch=16, max_caption=config.text_length))
        torch.manual_seed(0)
        step = _Step(M3AE(config), torch.device("cpu"), precision, False, False)
        times, page_faults, rss = [], [], []
        for i in range(steps):
            f0, t0 = faults(), time.perf_counter()
            step(batches[i % len(batches)])
            times.append(time.perf_counter() - t0)
            page_faults.append(faults() - f0)
            rss.append(rss_mib())
        half = steps // 2
        out.update(step_ms=statistics.median(times[half:]) * 1e3, faults_per_step=statistics.median(page_faults[half:]),
                   rss_mib=max(rss[half:]), peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="model.KEY=VALUE")
    args = p.parse_args()
    overrides = args.overrides or DEFAULT_MODEL
    if args.child:
        print(json.dumps(_child(args.child, args.steps, args.precision, overrides)))
        return 0
    from m3ae.perf import device_name

    import torch
    print(f"{device_name(torch.device('cpu'))}, torch {torch.__version__}, {args.precision}, "
          f"base {' '.join(overrides)}, batch 16")
    print("| round | setting | zeros 94 MB | clone 62 MB | cast to bf16 | step | page faults / step | "
          "RSS (2nd half) | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in range(1, args.rounds + 1):
        for setting in ("system", "keep"):
            cmd = [sys.executable, __file__, "--child", setting, "--steps", str(args.steps),
                   "--precision", args.precision, *overrides]
            res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            print(f"| {r} | {setting} | {res['zeros_94MB_ms']:.1f} ms | {res['clone_62MB_ms']:.1f} ms | "
                  f"{res['to_bf16_ms']:.1f} ms | {res['step_ms']:.0f} ms | {res['faults_per_step']:.0f} | "
                  f"{res['rss_mib']:.0f} MiB | {res['peak_rss_mib']:.0f} MiB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
