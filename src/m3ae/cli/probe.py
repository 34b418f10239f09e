"""`m3ae probe`: the paper's linear probe, or `--fast` (cached features + logistic regression)."""
from __future__ import annotations

import argparse
import time

from . import _evalargs as E


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="linear probe of the frozen encoder",
                       description="Paper protocol (BatchNorm + Linear, LARS, warmup + cosine, augmentation) "
                                   "or --fast: features once, L2-swept logistic regression in seconds.")
    E.add_model_args(p)
    E.add_split_args(p)
    p.add_argument("--fast", action="store_true", help="fit on cached features instead of training a head")
    p.add_argument("--method", choices=("logistic", "ridge"), default="logistic", help="fast probe model")
    p.add_argument("--l2", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4, 1e-3, 1e-2],
                   help="fast probe: L2 values swept on a held-out 20%% of the training features")
    p.add_argument("--knn", action="store_true", help="fast probe: also report kNN accuracy")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    # paper protocol
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--warmup-epochs", type=int, default=10)
    p.add_argument("--probe-batch-size", type=int, default=2048, help="probe training batch (lr scales with it)")
    p.add_argument("--base-lr", type=float, default=0.1, help="lr = base x batch / 256")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", choices=("lars", "sgd"), default="lars")
    p.add_argument("--crop-scale", type=float, nargs=2, default=[0.2, 1.0], help="RandomResizedCrop area range")
    p.add_argument("--out", default=None, help="folder for the result JSON and the probe head (paper protocol)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..eval.results import summary_line, write_result

    t0 = time.perf_counter()
    from ..distributed import pick_device  # torch: imported when run, not for --help
    device = pick_device(args.device)
    from ..eval.features import is_feature_file
    need_model = not (args.fast and is_feature_file(args.train) and is_feature_file(args.val))
    model = E.load_encoder(args.checkpoint, device) if need_model else None
    extra = {}
    if args.fast:
        from ..eval.fast_probe import fast_probe
        from ..eval.knn import knn_accuracy
        train_x, train_y, _ = E.features_for(args, model, args.train, "train", args.limit_train, device)
        val_x, val_y, _ = E.features_for(args, model, args.val, "val", args.limit_val, device)
        classes = int(max(train_y.max(), val_y.max())) + 1
        t_fit = time.perf_counter()
        res = fast_probe(train_x, train_y, val_x, val_y, classes, args.method, args.l2, seed=args.seed)
        metrics = {"top1": res["top1"], "top5": res["top5"], "train_top1": res["train_top1"], "l2": res["l2"],
                   "fit_seconds": time.perf_counter() - t_fit, "n_train": len(train_y), "n_val": len(val_y)}
        extra["sweep"] = res["sweep"]
        if args.knn:
            knn = knn_accuracy(train_x, train_y, val_x, val_y, args.k, args.temperature, classes)
            metrics.update(knn_top1=knn["top1"], knn_top5=knn["top5"])
        command = "probe --fast"
    else:
        from ..eval.linear_probe import ProbeConfig, train_linear_probe
        train_set = E.dataset(args, args.train, "train", model.config.image_size, True, args.limit_train,
                              tuple(args.crop_scale))
        val_set = E.dataset(args, args.val, "val", model.config.image_size, False, args.limit_val)
        classes = max(train_set.num_classes, val_set.num_classes)
        config = ProbeConfig(epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                             batch_size=args.probe_batch_size, base_lr=args.base_lr,
                             weight_decay=args.weight_decay, optimizer=args.optimizer, pool=args.pool,
                             num_workers=args.num_workers, device=str(device), seed=args.seed)
        res = train_linear_probe(model, train_set, val_set, classes, config, progress=not args.quiet)
        metrics = {"top1": res["top1"], "top5": res["top5"], "best_top1": res["best_top1"],
                   "n_train": len(train_set), "n_val": len(val_set)}
        extra["history"] = res["history"]
        if args.out:
            from pathlib import Path

            from safetensors.torch import save_file

            from ..files import atomic_write
            Path(args.out).mkdir(parents=True, exist_ok=True)
            state = {k: v.contiguous().cpu() for k, v in res["head"].state_dict().items()}
            atomic_write(Path(args.out) / "probe_head.safetensors", lambda p: save_file(state, p))
        command = "probe"
    seconds = time.perf_counter() - t0
    path = write_result(E.result_path(args, "probe-fast" if args.fast else "probe", args.out), command,
                        checkpoint=args.checkpoint, data=E.data_record(args), settings=E.settings_record(args),
                        metrics=metrics, seconds=seconds, extra=extra)
    print(summary_line(command, metrics, seconds) + f" (result {path})")
    return 0
