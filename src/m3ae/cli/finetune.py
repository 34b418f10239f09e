"""`m3ae finetune`: end-to-end fine-tuning into a classifier folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import _evalargs as E
from . import _checks as C

_RENAME = {"batch_size": "ft_batch_size"}  # --batch-size is the feature-extraction batch


def register(sub: argparse._SubParsersAction) -> None:
    from ..eval.recipes import FinetuneConfig

    p = E.eval_parser(sub, "finetune", help="fine-tune the encoder as a classifier",
                       description="Layer-wise lr decay, drop path, mixup/cutmix, label smoothing, "
                                   "warmup + cosine (paper recipe defaults; override for small runs).")
    p.add_argument("--out", required=True, type=C.output_folder,
                   help="classifier folder (config.json, model.safetensors, result.json)")
    E.add_fields(p, FinetuneConfig, rename=_RENAME)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..eval.finetune import FinetuneConfig, run_finetune

    result = run_finetune(E.settings(args), args.train, args.val, args.out, E.from_args(FinetuneConfig, args, _RENAME),
                          limit_train=args.limit_train, limit_val=args.limit_val)
    return E.finish(args, result, Path(args.out) / "result.json", note=f" -> {args.out}")
