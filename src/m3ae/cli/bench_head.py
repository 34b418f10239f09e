"""`m3ae bench head`: the text head + cross-entropy, fused (`m3ae.linear_cross_entropy`) against
`F.linear` + `F.cross_entropy`: time per forward + backward and peak memory at a given row count.

On CPU each variant runs in a fresh process, because the process peak RSS is the only peak-memory
reading there and it never goes down; on CUDA both run here, with the allocator's peak counter
reset in between. Memory is reported above what the inputs and weights already hold.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from . import _checks as C

VARIANTS = ("unfused", "fused")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("head", help="text head + loss: fused vs unfused, time and peak memory")
    p.add_argument("--rows", type=C.positive, default=4096, help="hidden tokens the head runs on (M)")
    p.add_argument("--dim", type=C.positive, default=512, help="decoder width (D)")
    p.add_argument("--vocab", type=C.positive, default=30522, help="vocabulary (V)")
    p.add_argument("--steps", type=C.positive, default=5, help="timed forward+backward passes (after 1 warm-up)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32")
    p.add_argument("--chunk-rows", type=C.positive, default=None, help="fused chunk size (default: by device)")
    p.add_argument("--json", type=C.output_file, default=None, help="also write the results to this JSON file")
    p.add_argument("--only", choices=VARIANTS, default=None, help=argparse.SUPPRESS)  # one variant, JSON out
    p.set_defaults(func=run)


def measure(variant: str, args: argparse.Namespace) -> dict:
    import resource

    import torch
    import torch.nn.functional as F

    from ..distributed import pick_device
    from ..linear_cross_entropy import linear_cross_entropy
    from ..perf import device_name, synchronize
    from ..precision import autocast as precision_autocast, uses_bf16

    device = pick_device(args.device)
    bf16 = uses_bf16(args.precision, device)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.rows, args.dim, generator=g).to(device).requires_grad_()
    head = torch.nn.Linear(args.dim, args.vocab).to(device)
    targets = torch.randint(0, args.vocab, (args.rows,), generator=g).to(device)
    weight = torch.full((args.rows,), 1.0 / args.rows, device=device)
    autocast = precision_autocast(device, bf16)

    def step() -> None:
        with autocast:
            if variant == "fused":
                loss = linear_cross_entropy(hidden, head.weight, head.bias, targets, weight, args.chunk_rows)[0]
            else:
                logits = head(hidden)
                loss = (F.cross_entropy(logits.float(), targets, reduction="none") * weight).sum()
        loss.backward()
        hidden.grad = None
        head.zero_grad(set_to_none=True)

    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _reset_peak_rss() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        step()
        synchronize(device)
        if i:  # the first pass warms up
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else _peak_rss() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": variant, "step_s": statistics.median(times), "extra_memory_bytes": peak - base,
            "device": device_name(device), "precision": "bf16" if bf16 else "fp32",
            "threads": torch.get_num_threads()}


def _peak_rss() -> int | None:
    """The process's peak resident set (VmHWM), in bytes; None where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> int | None:
    """Reset the peak to the current resident set (Linux >= 4.0: clear_refs 5), so a peak reached
    while importing libraries is not mistaken for the step's; returns the new peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _peak_rss()


def _in_fresh_process(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "m3ae", "bench", "head", "--only", variant, "--rows", str(args.rows),
           "--dim", str(args.dim), "--vocab", str(args.vocab), "--steps", str(args.steps),
           "--device", args.device, "--precision", args.precision]
    if args.chunk_rows:
        cmd += ["--chunk-rows", str(args.chunk_rows)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:  # e.g. out of memory: say which run and why, as a clean error
        raise ValueError(f"the {variant} run failed:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
    if args.only:
        print(json.dumps(measure(args.only, args)))
        return 0
    from ..distributed import pick_device

    cpu = pick_device(args.device).type == "cpu"
    results = {v: (_in_fresh_process(v, args) if cpu else measure(v, args)) for v in VARIANTS}
    fused, unfused = results["fused"], results["unfused"]
    gib = 2**30
    print(f"text head + loss, {args.rows} rows x {args.dim} -> {args.vocab} "
          f"({fused['precision']}, {fused['device']}, {fused['threads']} threads)")
    print(f"{'variant':10s} {'step (median of ' + str(args.steps) + ')':>22s} {'peak memory above inputs':>26s}")
    for v in VARIANTS:
        r = results[v]
        print(f"{v:10s} {r['step_s'] * 1e3:19.1f} ms {r['extra_memory_bytes'] / gib:22.3f} GiB")
    memory_ratio = unfused["extra_memory_bytes"] / max(fused["extra_memory_bytes"], 1)
    memory = f"{memory_ratio:.1f}x lower" if memory_ratio >= 1 else f"{1 / memory_ratio:.1f}x higher"
    print(f"fused vs unfused: speed-up {unfused['step_s'] / fused['step_s']:.2f}x, memory {memory} "
          f"(ratios unfused / fused)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
