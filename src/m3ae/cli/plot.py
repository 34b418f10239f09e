"""`m3ae plot`: loss curves (total, image, text, lr) of one or more runs on shared axes."""
from __future__ import annotations

import argparse
from . import _checks as C


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="loss curves of one or more runs (metrics.jsonl)")
    p.add_argument("metrics", nargs="+", help="metrics.jsonl files or run folders")
    p.add_argument("--out", required=True, type=C.figure_file, help="output image (.png, .jpg, .pdf, .svg)")
    p.add_argument("--labels", nargs="+", default=None, metavar="NAME", help="one name per run")
    p.add_argument("--smooth", type=C.number(0, 1, below=True), default=0.0, help="EMA weight in [0, 1) (0: raw)")
    p.add_argument("--accuracy", action="store_true", help="also plot masked-word accuracy")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..viz.curves import PANELS, plot_curves

    keys = PANELS + ((("text_accuracy", "masked-word accuracy"),) if args.accuracy else ())
    path = plot_curves(args.metrics, args.out, args.labels, smooth=args.smooth, keys=keys)
    print(f"wrote {path}")
    return 0
