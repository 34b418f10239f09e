"""`m3ae knn`: weighted kNN (cosine, k=20, T=0.07) on frozen-encoder features."""
from __future__ import annotations

import argparse

from . import _evalargs as E
from . import _checks as C


def register(sub: argparse._SubParsersAction) -> None:
    p = E.eval_parser(sub, "knn", help="kNN classification on frozen features")
    p.add_argument("--k", type=C.positive, default=20, help="neighbours (default %(default)s)")
    p.add_argument("--temperature", type=C.number(0, above=True), default=0.07,
                   help="softmax temperature of the neighbour weights (default %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..eval.knn import run_knn

    result = run_knn(E.settings(args), args.train, args.val, k=args.k, temperature=args.temperature,
                     limit_train=args.limit_train, limit_val=args.limit_val)
    return E.finish(args, result, E.timestamped("knn"))
