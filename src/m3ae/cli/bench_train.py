"""`m3ae bench train`: time the training step (fast vs reference-equivalent) on synthetic data."""
from __future__ import annotations

import argparse
import json

SHAPE_FLAGS = ["image_size", "patch_size", "text_length", "vocab_size", "emb_dim", "depth", "num_heads",
               "dec_emb_dim", "dec_depth", "dec_num_heads", "output_head_depth"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="time the training step",
                       description="Median step time, samples/s, data-wait share, analytic model FLOPs, "
                                   "TFLOP/s, MFU and peak memory of the training step, beside a "
                                   "reference-equivalent step (fp32, full-length text, heads everywhere, "
                                   "batch-shared masks) run in the same process.")
    p.add_argument("--preset", default="tiny", help="model size preset (nano, tiny, small, base, ...)")
    for name in SHAPE_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"model {name}")
    p.add_argument("--mask-ratio", type=float, default=None, help="image and text mask ratio")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--min-caption", type=int, default=8, help="shortest synthetic caption (tokens)")
    p.add_argument("--max-caption", type=int, default=None, help="longest caption (default text length)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the fast step's model")
    p.add_argument("--static-shapes", default=None, action=argparse.BooleanOptionalAction,
                   help="texts padded to text_length, fixed visible text slots (default: with --compile)")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default auto: usable cores; OMP_NUM_THREADS wins over auto)")
    p.add_argument("--background-load", type=int, default=0, metavar="N",
                   help="run N busy processes during the measurement (a shared machine, repeatable)")
    p.add_argument("--no-reference", action="store_true", help="skip the reference-equivalent step")
    p.add_argument("--reference-fused-adamw", action="store_true",
                   help="give the reference step the fused AdamW too (default: torch's default AdamW)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (overrides the table)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import M3AEConfig
    from ..threads import torch_threads
    from ..train.bench import BenchOptions, format_report, run_train_bench

    shape = {k: getattr(args, k) for k in SHAPE_FLAGS if getattr(args, k) is not None}
    if args.mask_ratio is not None:
        shape.update(image_mask_ratio=args.mask_ratio, text_mask_ratio=args.mask_ratio)
    if args.grad_checkpointing:
        shape["grad_checkpointing"] = True
    config = M3AEConfig.from_preset(args.preset, **shape)
    opts = BenchOptions(config, batch=args.batch, steps=args.steps, warmup=args.warmup,
                        min_caption=args.min_caption, max_caption=args.max_caption, device=args.device,
                        precision=args.precision, compile=args.compile, static_shapes=args.static_shapes,
                        reference=not args.no_reference, reference_fused_adamw=args.reference_fused_adamw,
                        peak_tflops=args.peak_tflops, background_load=args.background_load)
    with torch_threads(args.threads) as threads:
        result = run_train_bench(opts)
    result["threads_reason"] = str(threads)
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
