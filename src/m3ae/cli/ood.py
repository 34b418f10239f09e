"""`m3ae ood`: out-of-distribution detection (Mahalanobis and max-softmax AUROC) + histogram PNG."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import _evalargs as E
from . import _checks as C


def register(sub: argparse._SubParsersAction) -> None:
    p = E.eval_parser(sub, "ood", splits=False, help="OOD detection AUROC (paper: CIFAR-100 in, CIFAR-10 out)",
                       description="In-distribution classifier features: a fine-tuned classifier folder "
                                   "(m3ae finetune), or a pretrained encoder plus a fast linear probe fitted "
                                   "on --in-train. Scores: Mahalanobis (class means + shared covariance) "
                                   "and max softmax.")
    p.add_argument("--in-train", required=True, help="in-distribution training data (class means, covariance, probe)")
    p.add_argument("--in-test", required=True, help="in-distribution test data")
    p.add_argument("--out-test", default=None, help="out-of-distribution test data (default: --in-test, "
                   "with --in-classes / --out-classes splitting one dataset)")
    p.add_argument("--in-classes", default=None, help="e.g. 0-4: keep these classes as in-distribution")
    p.add_argument("--out-classes", default=None, help="e.g. 5-9: these classes of --out-test are OOD")
    p.add_argument("--limit-train", type=C.positive, default=None,
                   help="a fixed random subset of this many --in-train items")
    p.add_argument("--limit-test", type=C.positive, default=None,
                   help="a fixed random subset of this many test items")
    p.add_argument("--out", required=True, type=C.output_folder, help="folder for ood.json and ood_hist.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..eval.ood import run_ood

    result = run_ood(E.settings(args), args.in_train, args.in_test, args.out, out_test=args.out_test,
                     in_classes=args.in_classes, out_classes=args.out_classes, limit_train=args.limit_train,
                     limit_test=args.limit_test)
    return E.finish(args, result, Path(args.out) / "ood.json", note=f" (figure {result.extra['histogram']})")
