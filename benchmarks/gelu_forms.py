"""The GELU's tanh form against its exact (erf) form in bf16, forward and forward + backward, at the
MLP shapes of the paper's base model (what `m3ae.layers.gelu` chose between for bf16 inputs).

    PYTHONPATH=src python benchmarks/gelu_forms.py [--batch 16] [--repeats 25] [--threads N]

Also prints how far each form's bf16 output is from the tanh form in fp64 over every finite bf16
value in [-20, 20], and on how many of those values the two forms' bf16 outputs differ.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

from m3ae.perf import device_name
from m3ae.threads import choose_threads

# (rows per sample, width) of the base model's MLP hidden activations at 256 px:
# encoder 64 visible patches + cls + ~8 text tokens; decoder 256 patches + cls + 32 text slots.
SHAPES = {"encoder 73 x 3072": (73, 3072), "decoder 289 x 2048": (289, 2048)}


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _forward_backward(x: torch.Tensor, form: str, grad: torch.Tensor) -> None:
    F.gelu(x, approximate=form).backward(grad)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    threads = choose_threads(args.threads)
    torch.set_num_threads(threads.threads)
    device = torch.device("cpu")
    print(f"device {device_name(device)}, threads {threads}, batch {args.batch}, bf16, median of {args.repeats}")
    print("| shape | tanh fwd | erf fwd | ratio | tanh fwd+bwd | erf fwd+bwd | ratio |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for name, (rows, width) in SHAPES.items():
        x = torch.randn(args.batch * rows, width, generator=g).bfloat16().requires_grad_()
        grad = torch.ones_like(x)
        ms = {}
        for form in ("tanh", "none", "tanh", "none"):  # twice each, interleaved; the second counts
            with torch.no_grad():
                ms[form, "fwd"] = _time(partial(F.gelu, x, approximate=form), args.repeats)
            ms[form, "both"] = _time(partial(_forward_backward, x, form, grad), args.repeats)
        print(f"| {name} | {ms['tanh', 'fwd']:.2f} ms | {ms['none', 'fwd']:.2f} ms | "
              f"{ms['tanh', 'fwd'] / ms['none', 'fwd']:.2f}x | {ms['tanh', 'both']:.2f} ms | "
              f"{ms['none', 'both']:.2f} ms | {ms['tanh', 'both'] / ms['none', 'both']:.2f}x |")
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    xb = bits[torch.isfinite(bits) & (bits.float().abs() <= 20)]
    want = F.gelu(xb.double(), approximate="tanh")
    tanh, erf = F.gelu(xb, approximate="tanh"), F.gelu(xb)
    print(f"{xb.numel()} bf16 values: max |output - tanh form in fp64|: tanh form "
          f"{(tanh.double() - want).abs().max():.2e}, "
          f"erf form {(erf.double() - want).abs().max():.2e}; outputs differ on {(tanh != erf).double().mean():.2%}; "
          f"max |tanh - erf| in fp64 {(want - F.gelu(xb.double())).abs().max():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
