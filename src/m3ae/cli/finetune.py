"""`m3ae finetune`: end-to-end fine-tuning into a classifier folder."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import _evalargs as E


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune the encoder as a classifier",
                       description="Layer-wise lr decay, drop path, mixup/cutmix, label smoothing, "
                                   "warmup + cosine (paper recipe defaults; override for small runs).")
    E.add_model_args(p)
    E.add_split_args(p)
    p.add_argument("--out", required=True, help="classifier folder (config.json, model.safetensors, result.json)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--warmup-epochs", type=int, default=5)
    p.add_argument("--ft-batch-size", type=int, default=1024, help="training batch (lr scales with it)")
    p.add_argument("--base-lr", type=float, default=1e-3, help="lr = base x batch / 256")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--layer-decay", type=float, default=0.75)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--clip-grad", type=float, default=None)
    p.add_argument("--crop-scale", type=float, nargs=2, default=[0.08, 1.0], help="RandomResizedCrop area range")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..eval.finetune import FinetuneConfig, finetune, load_for_finetune
    from ..eval.results import summary_line, write_result

    t0 = time.perf_counter()
    from ..distributed import pick_device  # torch: imported when run, not for --help
    device = pick_device(args.device)
    encoder = load_for_finetune(args.checkpoint, args.drop_path)
    size = encoder.config.image_size
    train_set = E.dataset(args, args.train, "train", size, True, args.limit_train, tuple(args.crop_scale))
    val_set = E.dataset(args, args.val, "val", size, False, args.limit_val)
    classes = max(train_set.num_classes, val_set.num_classes)
    config = FinetuneConfig(epochs=args.epochs, warmup_epochs=args.warmup_epochs, batch_size=args.ft_batch_size,
                            base_lr=args.base_lr, weight_decay=args.weight_decay, layer_decay=args.layer_decay,
                            drop_path=args.drop_path, mixup=args.mixup, cutmix=args.cutmix,
                            smoothing=args.smoothing, clip_grad=args.clip_grad, pool=args.pool,
                            num_workers=args.num_workers, device=str(device), seed=args.seed)
    model, res = finetune(encoder, train_set, val_set, classes, config, progress=not args.quiet)
    model.save_pretrained(args.out)
    metrics = {k: res[k] for k in ("top1", "top5", "best_top1", "top1_before")}
    metrics.update(n_train=len(train_set), n_val=len(val_set))
    seconds = time.perf_counter() - t0
    path = write_result(Path(args.result) if args.result else Path(args.out) / "result.json", "finetune",
                        checkpoint=args.checkpoint, data=E.data_record(args), settings=E.settings_record(args),
                        metrics=metrics, seconds=seconds, extra={"history": res["history"], "classifier": args.out})
    print(summary_line("finetune", metrics, seconds) + f" -> {args.out} (result {path})")
    return 0
