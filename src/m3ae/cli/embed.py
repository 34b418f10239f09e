"""`m3ae embed`: export frozen-encoder features (+ labels, keys) to .safetensors / .npz / .npy."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import _evalargs as E
from . import _checks as C


def register(sub: argparse._SubParsersAction) -> None:
    p = E.eval_parser(sub, "embed", splits=False, help="export encoder features of an image set (labelled or not)",
                       description="Write features (N, D) float32, labels (N,) int64 and keys. Data without "
                                   "labels (a folder of photos, a manifest without a label column, shards "
                                   "without .cls) gets label -1 everywhere.")
    p.add_argument("--data", required=True, help="data spec, labelled or not (see m3ae.eval.labelled)")
    p.add_argument("--split", choices=("train", "val"), default="val",
                   help="which part of CIFAR / HDF5 data (default %(default)s)")
    p.add_argument("--out", required=True, type=C.output_file, help="FILE.safetensors | FILE.npz | FILE.npy")
    p.add_argument("--inputs", choices=("image", "text", "joint"), default="image",
                   help="text / joint need a CSV manifest with a caption column")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json / vocab.txt for text / joint inputs (default: the checkpoint's)")
    p.add_argument("--limit", type=C.positive, default=None, help="a fixed random subset of this many items")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..eval.embed import run_embed

    result = run_embed(E.settings(args), args.data, args.out, split=args.split, inputs=args.inputs,
                       tokenizer=args.tokenizer, limit=args.limit)
    return E.finish(args, result, E.timestamped("embed", str(Path(args.out).parent)), note=f" -> {args.out}")
