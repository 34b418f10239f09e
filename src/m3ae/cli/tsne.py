"""`m3ae tsne`: 2-D maps of exported features, coloured by label, one or two models side by side."""
from __future__ import annotations

import argparse
from . import _checks as C


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tsne", help="t-SNE (or PCA) of exported features, coloured by label",
                       description="Feature files are .safetensors or .npz with 'features' (N, D) and "
                                   "'labels' (N,), as written by `m3ae embed`.")
    p.add_argument("--features", required=True, help="feature file of the first model")
    p.add_argument("--features2", default=None, help="feature file of a second model (drawn beside it)")
    p.add_argument("--labels", nargs="+", default=None, metavar="NAME", help="panel titles, e.g. M3AE MAE")
    p.add_argument("--out", required=True, type=C.figure_file, help="output image (.png, .jpg, .pdf, .svg)")
    p.add_argument("--method", choices=("auto", "tsne", "pca"), default="auto",
                   help="auto: t-SNE if scikit-learn is installed, else PCA")
    p.add_argument("--perplexity", type=C.number(0, above=True), default=30.0,
                   help="t-SNE perplexity (default %(default)s; at most (points - 1) / 3 is used)")
    p.add_argument("--max-points", type=C.integer(3), default=5000, help="random subsample above this")
    p.add_argument("--seed", type=C.seed, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..viz.tsne import load_features, subsample, tsne_figure

    files = [args.features] + ([args.features2] if args.features2 else [])
    titles = args.labels or [Path(f).stem for f in files]
    if len(titles) != len(files):
        raise ValueError(f"--labels gives {len(titles)} names for {len(files)} feature files")
    sets = [(t, subsample(load_features(f), args.max_points, args.seed)) for t, f in zip(titles, files)]
    path = tsne_figure(sets, args.out, args.method, args.seed, args.perplexity)
    print(f"wrote {path}")
    return 0
