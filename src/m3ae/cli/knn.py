"""`m3ae knn`: weighted kNN (cosine, k=20, T=0.07) on frozen-encoder features."""
from __future__ import annotations

import argparse
import time

from . import _evalargs as E


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("knn", help="kNN classification on frozen features")
    E.add_model_args(p)
    E.add_split_args(p)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..eval.features import is_feature_file
    from ..eval.knn import knn_accuracy
    from ..eval.results import summary_line, write_result

    t0 = time.perf_counter()
    from ..distributed import pick_device  # torch: imported when run, not for --help
    device = pick_device(args.device)
    need_model = not (is_feature_file(args.train) and is_feature_file(args.val))
    model = E.load_encoder(args.checkpoint, device) if need_model else None
    train_x, train_y, _ = E.features_for(args, model, args.train, "train", args.limit_train, device)
    val_x, val_y, _ = E.features_for(args, model, args.val, "val", args.limit_val, device)
    metrics = {**knn_accuracy(train_x, train_y, val_x, val_y, args.k, args.temperature),
               "n_train": len(train_y), "n_val": len(val_y)}
    seconds = time.perf_counter() - t0
    path = write_result(E.result_path(args, "knn"), "knn", checkpoint=args.checkpoint, data=E.data_record(args),
                        settings=E.settings_record(args), metrics=metrics, seconds=seconds)
    print(summary_line("knn", metrics, seconds) + f" (result {path})")
    return 0
