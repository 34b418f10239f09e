"""`m3ae bench train`: time the training step (fast vs reference-equivalent) on synthetic data."""
from __future__ import annotations

import argparse
import json
import sys

from ..host_allocator import SETTINGS as HOST_ALLOCATOR_SETTINGS
from . import _checks as C

# The model flags of earlier releases, kept one release as hidden aliases of `model.KEY=VALUE`.
DEPRECATED_FLAGS = ["image_size", "patch_size", "text_length", "vocab_size", "emb_dim", "depth", "num_heads",
                    "dec_emb_dim", "dec_depth", "dec_num_heads", "output_head_depth", "mask_ratio"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="time the training step",
                       description="Median step time, samples/s, data-wait share, analytic model FLOPs, "
                                   "TFLOP/s, MFU and peak memory of the training step, beside a "
                                   "reference-equivalent step (fp32, full-length text, heads everywhere, "
                                   "batch-shared masks) run in the same process. The model: --preset, then "
                                   "model.KEY=VALUE settings as `m3ae pretrain` takes them (e.g. model.depth=6 "
                                   "model.image_size=64 model.grad_checkpointing=true; `m3ae pretrain --help` "
                                   "lists them).")
    p.add_argument("--preset", default="tiny", help="model size preset (nano, tiny, small, base, ...)")
    p.add_argument("--batch", type=C.positive, default=32, help="samples per step (default %(default)s)")
    p.add_argument("--steps", type=C.positive, default=20, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=C.non_negative, default=5, help="untimed steps first (default %(default)s)")
    p.add_argument("--min-caption", type=C.positive, default=8, help="shortest synthetic caption (tokens)")
    p.add_argument("--max-caption", type=C.positive, default=None, help="longest caption (default text length)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "bf32"],
                   help="auto (bf16 autocast on CUDA and native-bf16 CPUs), fp32, bf16, or bf32 (CPU: fp32 "
                        "with oneDNN's bf16-input matmuls, effective on AMX)")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast step's model")
    p.add_argument("--static-shapes", default=None, action=argparse.BooleanOptionalAction,
                   help="texts padded to text_length, fixed visible text slots (default: with --compile)")
    p.add_argument("--threads", type=C.positive, default=None,
                   help="torch CPU threads (default auto: usable cores; OMP_NUM_THREADS wins over auto)")
    p.add_argument("--host-allocator", default="auto", choices=HOST_ALLOCATOR_SETTINGS,
                   help="keep large freed blocks for reuse (auto: on CPU runs, as the trainer does; "
                        "m3ae.host_allocator) or leave glibc's default")
    p.add_argument("--background-load", type=C.non_negative, default=0, metavar="N",
                   help="run N busy processes during the measurement (a shared machine, repeatable)")
    p.add_argument("--image-dtype", default="uint8", choices=["uint8", "float32"],
                   help="images as the trainer's loader ships them (uint8, normalised on the device; default) "
                        "or normalised float32 from the host (4x the bytes to copy)")
    p.add_argument("--no-reference", action="store_true", help="skip the reference-equivalent step")
    p.add_argument("--reference-fused-adamw", action="store_true",
                   help="give the reference step the fused AdamW too (default: torch's default AdamW)")
    p.add_argument("--peak-tflops", type=C.number(0, above=True), default=None,
                   help="device peak for MFU (overrides the table)")
    p.add_argument("--json", type=C.output_file, default=None, help="also write the results to this JSON file")
    for name in DEPRECATED_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), dest="deprecated_" + name, default=None, help=argparse.SUPPRESS)
    p.add_argument("--grad-checkpointing", dest="deprecated_grad_checkpointing", action="store_const",
                   const="true", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="model.KEY=VALUE", help="model settings (after the options)")
    p.set_defaults(func=run)


def deprecated_overrides(args: argparse.Namespace) -> list[str]:
    """The old model flags given, as the `model.KEY=VALUE` settings they stand for (with a warning)."""
    out = []
    for name in [*DEPRECATED_FLAGS, "grad_checkpointing"]:
        value = getattr(args, "deprecated_" + name)
        if value is None:
            continue
        keys = ["image_mask_ratio", "text_mask_ratio"] if name == "mask_ratio" else [name]
        new = [f"model.{key}={value}" for key in keys]
        print(f"m3ae bench train: --{name.replace('_', '-')} is deprecated and goes in the next release; "
              f"use {' '.join(new)}", file=sys.stderr)
        out += new
    return out


def run(args: argparse.Namespace) -> int:
    from ..distributed import pick_device
    from ..host_allocator import keep_freed_memory
    from ..threads import torch_threads
    from ..train.bench import BenchOptions, bench_model_config, format_report, run_train_bench

    config = bench_model_config(args.preset, [*deprecated_overrides(args), *args.overrides])
    opts = BenchOptions(config, batch=args.batch, steps=args.steps, warmup=args.warmup,
                        min_caption=args.min_caption, max_caption=args.max_caption, device=args.device,
                        precision=args.precision, compile=args.compile, static_shapes=args.static_shapes,
                        reference=not args.no_reference, reference_fused_adamw=args.reference_fused_adamw,
                        peak_tflops=args.peak_tflops, background_load=args.background_load,
                        image_dtype=args.image_dtype)
    device_type = pick_device(args.device).type
    with torch_threads(args.threads) as threads, keep_freed_memory(args.host_allocator, device_type) as alloc:
        result = run_train_bench(opts)
    result["threads_reason"] = str(threads)
    result["host_allocator"] = str(alloc)
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
