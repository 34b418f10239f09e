"""`m3ae probe`: the paper's linear probe, or `--fast` (cached features + logistic regression)."""
from __future__ import annotations

import argparse

from . import _evalargs as E
from . import _checks as C

_RENAME = {"batch_size": "probe_batch_size"}  # --batch-size is the feature-extraction batch


def register(sub: argparse._SubParsersAction) -> None:
    from ..eval.recipes import ProbeConfig

    p = E.eval_parser(sub, "probe", help="linear probe of the frozen encoder",
                       description="Paper protocol (BatchNorm + Linear, LARS, warmup + cosine, augmentation) "
                                   "or --fast: features once, L2-swept logistic regression in seconds.")
    p.add_argument("--fast", action="store_true", help="fit on cached features instead of training a head")
    p.add_argument("--method", choices=("logistic", "ridge"), default="logistic", help="fast probe model")
    p.add_argument("--l2", type=C.number(0), nargs="+", default=[1e-6, 1e-5, 1e-4, 1e-3, 1e-2],
                   help="fast probe: L2 values swept on a held-out 20%% of the training features")
    p.add_argument("--folds", type=C.positive, default=1,
                   help="fast probe: pick L2 by k-fold cross-validation (k >= 2) instead of one 20%% hold-out")
    p.add_argument("--knn", action="store_true", help="fast probe: also report kNN accuracy")
    p.add_argument("--k", type=C.positive, default=20, help="kNN neighbours (default %(default)s)")
    p.add_argument("--temperature", type=C.number(0, above=True), default=0.07,
                   help="kNN temperature (default %(default)s)")
    E.add_fields(p, ProbeConfig, rename=_RENAME)  # the paper protocol's recipe
    p.add_argument("--out", type=C.output_folder, default=None,
                   help="folder for the result JSON and the probe head (paper protocol)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    limits = dict(limit_train=args.limit_train, limit_val=args.limit_val)
    if args.fast:
        from ..eval.fast_probe import run_fast_probe

        result = run_fast_probe(E.settings(args), args.train, args.val, method=args.method, l2_grid=args.l2,
                                folds=args.folds, knn=args.knn, k=args.k, temperature=args.temperature, **limits)
    else:
        from ..eval.linear_probe import ProbeConfig, run_linear_probe

        result = run_linear_probe(E.settings(args), args.train, args.val, E.from_args(ProbeConfig, args, _RENAME),
                                  out=args.out, **limits)
    return E.finish(args, result, E.timestamped("probe-fast" if args.fast else "probe", args.out))
