"""Where a CPU training step's time goes, timed at the dispatcher: wall time per operator (and per
matmul shape) for one or two precisions of the same step, side by side.

    PYTHONPATH=src python benchmarks/op_times.py [--precision bf16 fp32] [--preset base] [--batch 16]
        [--max-caption 32] [--steps 2] [--top 25] [model.KEY=VALUE ...]
    PYTHONPATH=src python benchmarks/op_times.py --mae --batch 32      # the MAE-mode CPU config

torch.profiler inflates copies and small operators (BENCHMARKS.md); here a TorchDispatchMode times
each operator call with perf_counter, which costs a few microseconds per call and nothing inside
the kernels. Custom operators (m3ae::explicit_attention and its backward) count as one operator
each. The trainer's kept host memory is held throughout, as `m3ae pretrain` holds it. With two
precisions it prints each matmul shape's time in both and their ratio, then the ratio of the
matmuls, of the attention and of the rest: what bounds the step's speed-up.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from m3ae import M3AE, M3AEConfig
from m3ae.host_allocator import keep_freed_memory
from m3ae.perf import device_name
from m3ae.threads import choose_threads
from m3ae.train.bench import BenchOptions, _Step, bench_model_config, synthetic_batches

MATMULS = ("mm", "addmm", "bmm", "baddbmm")
ATTENTION = ("explicit_attention", "explicit_attention_backward", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_flash_attention_for_cpu_backward")


def _layout(t: torch.Tensor) -> str:
    """A matrix operand's shape, with T when BLAS reads it transposed (column-major)."""
    transposed = t.ndim == 2 and t.stride(0) == 1 and t.shape[1] > 1
    return "x".join(map(str, t.shape)) + ("T" if transposed else "")


class OpTimer(TorchDispatchMode):
    """Wall seconds and calls per operator (matmuls per operand shape) while active."""

    def __init__(self):
        super().__init__()
        self.seconds: Counter = Counter()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        name = func.__name__.split(".")[0]
        if name in MATMULS:
            name += " " + ", ".join(_layout(a) for a in args if isinstance(a, torch.Tensor) and a.ndim >= 2)
        self.seconds[name] += elapsed
        self.calls[name] += 1
        return out


def _kind(op: str) -> str:
    name = op.split(" ")[0]
    return "matmul" if name in MATMULS else "attention" if name in ATTENTION else "rest"


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def warm_up(step, batches, max_steps: int = 8, settled_faults: int = 1000) -> int:
    """Steps until one touches (almost) no new pages, at least one pass over the batches: the kept
    heap takes 3-4 base steps to reach its peak, and until then freshly faulted pages are timed as
    part of whichever operator touches them first (a 93 ms `add_` that takes 4 ms once warm)."""
    for i in range(max_steps):
        before = _minor_faults()
        step(batches[i % len(batches)])
        if i + 1 >= len(batches) and _minor_faults() - before < settled_faults:
            return i + 1
    return max_steps


def time_ops(step, batches, steps: int) -> tuple[OpTimer, float]:
    """Operator times over `steps` steps (after warming up, `warm_up`), and the median wall time of
    as many plain steps (no timer), which the timer's per-call cost does not touch."""
    warm_up(step, batches)
    timer = OpTimer()
    with timer:
        for i in range(steps):
            step(batches[i % len(batches)])
    plain = []
    for i in range(steps):
        start = time.perf_counter()
        step(batches[i % len(batches)])
        plain.append(time.perf_counter() - start)
    return timer, sorted(plain)[len(plain) // 2]


def split(timer: OpTimer, steps: int) -> dict[str, float]:
    """Milliseconds per step in matmuls, attention and the rest, and operator calls per step."""
    out = {f"{kind}_ms": 0.0 for kind in ("matmul", "attention", "rest")}
    for op, seconds in timer.seconds.items():
        out[f"{_kind(op)}_ms"] += seconds / steps * 1e3
    out["calls"] = sum(timer.calls.values()) / steps
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["fp32", "bf16", "bf32"])
    p.add_argument("--preset", default="base")
    p.add_argument("--mae", action="store_true",
                   help="the MAE-mode CPU config of benchmarks/mae_vs_hf.py instead of --preset")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-caption", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="timed steps per precision")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write each precision's split and the ratios here")
    p.add_argument("model", nargs="*", metavar="model.KEY=VALUE")
    args = p.parse_args()

    threads = choose_threads(args.threads)
    torch.set_num_threads(threads.threads)
    if args.mae:
        cfg = M3AEConfig(image_size=64, patch_size=8, emb_dim=192, depth=6, num_heads=3, dec_emb_dim=128,
                         dec_depth=2, dec_num_heads=4, vocab_size=0)
    else:
        cfg = bench_model_config(args.preset, args.model or ["model.image_size=256"])
    opts = BenchOptions(cfg, batch=args.batch, max_caption=args.max_caption, pool=2)
    batches = synthetic_batches(cfg, opts)
    device = torch.device("cpu")
    print(f"device {device_name(device)}, threads {threads}; "
          f"{'MAE CPU config' if args.mae else args.preset + ' ' + ' '.join(args.model)}, batch {args.batch}; "
          f"{args.steps} timed steps per precision", file=sys.stderr)
    torch.manual_seed(0)
    first = M3AE(cfg)
    results: dict[str, tuple[OpTimer, float]] = {}
    with keep_freed_memory("auto", device.type) as allocator:
        print(f"host allocator: {allocator}", file=sys.stderr)
        for precision in args.precision:
            model = M3AE(cfg)
            model.load_state_dict(first.state_dict())
            results[precision] = time_ops(_Step(model, device, precision, False, False), batches, args.steps)
    n = args.steps
    report: dict = {"device": device_name(device), "threads": str(threads), "batch": args.batch,
                    "model": "MAE CPU config" if args.mae else " ".join([args.preset, *args.model]),
                    "precisions": {}, "ratios": {}}
    for precision, (timer, plain) in results.items():
        parts = report["precisions"][precision] = {"plain_step_ms": plain * 1e3, **split(timer, n)}
        total = parts["matmul_ms"] + parts["attention_ms"] + parts["rest_ms"]
        print(f"\n{precision}: plain step {plain * 1e3:.0f} ms; operators {total:.0f} ms ({parts['calls']:.0f} "
              f"calls): matmuls {parts['matmul_ms']:.0f}, attention {parts['attention_ms']:.0f}, "
              f"rest {parts['rest_ms']:.0f} ms")
        merged, calls = Counter(), Counter()
        for op, s in timer.seconds.items():
            key = op if _kind(op) != "matmul" else op.split(" ")[0] + " (all shapes)"
            merged[key] += s / n * 1e3
            calls[key] += timer.calls[op] / n
        for op, ms in merged.most_common(args.top):
            print(f"  {op:58s} {ms:8.1f} ms {calls[op]:6.0f} calls")
    if len(results) == 2:
        (a, (ta, _)), (b, (tb, _)) = results.items()
        print(f"\nmatmul shapes, ms per step: {a} | {b} | {b}/{a}")
        shapes = sorted({op for op in (*ta.seconds, *tb.seconds) if _kind(op) == "matmul"},
                        key=lambda op: -tb.seconds.get(op, 0))
        for op in shapes[: args.top]:
            x, y = ta.seconds.get(op, 0) / n * 1e3, tb.seconds.get(op, 0) / n * 1e3
            print(f"  {op:58s} {x:8.1f} {y:8.1f} {y / x if x else float('nan'):6.2f}x")
        pa, pb = report["precisions"][a], report["precisions"][b]
        for key in ("matmul_ms", "attention_ms", "rest_ms", "plain_step_ms"):
            ratio = pb[key] / pa[key] if pa[key] else float("nan")
            report["ratios"][key.removesuffix("_ms")] = ratio
            print(f"{key.removesuffix('_ms'):10s} {pa[key]:8.0f} {pb[key]:8.0f} ms  {b}/{a} {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
