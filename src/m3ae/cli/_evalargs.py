"""Arguments and helpers shared by the evaluation commands."""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="model folder (config.json + model.safetensors) or hub id")
    p.add_argument("--pool", choices=("cls", "mean"), default="cls", help="[CLS] token or mean of image tokens")
    p.add_argument("--batch-size", type=int, default=256, help="batch size for feature extraction")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default auto: usable cores - --num-workers, at least 1; "
                        "OMP_NUM_THREADS wins over auto)")
    p.set_defaults(thread_policy=True)  # cli.main applies m3ae.threads around the command
    # Defaults (None): the checkpoint's own preprocessing (preprocessor_config.json), as m3ae.load uses.
    p.add_argument("--normalization", default=None,
                   help="pixel statistics: cc12m | imagenet | m1,m2,m3/s1,s2,s3 (default: the checkpoint's)")
    p.add_argument("--crop-pct", type=float, default=None,
                   help="eval transform: resize shorter side to size/crop_pct, centre-crop "
                        "(default: the checkpoint's, 1.0 = whole shorter side; ImageNet: 0.875)")
    p.add_argument("--square", choices=("crop", "pad"), default=None,
                   help="non-square photos: crop as they are, or pad to a square first (default: the checkpoint's)")
    p.add_argument("--pad-value", type=int, default=None, help="grey level of the padding (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-bad-fraction", type=float, default=0.05,
                   help="stop when more than this share of images is unusable (after 200); each is skipped, "
                        "counted and logged")
    p.add_argument("--result", default=None, help="JSON result file (default: next to --out or ./results)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, help="labelled training data spec (or a feature file for fast/kNN)")
    p.add_argument("--val", required=True, help="labelled validation data spec (or a feature file)")
    p.add_argument("--limit-train", type=int, default=None, help="a fixed random subset of this many training items")
    p.add_argument("--limit-val", type=int, default=None)


def load_encoder(checkpoint: str, device, **overrides):
    from ..model import M3AE
    model = M3AE.from_pretrained(checkpoint, **overrides)
    return model.to(device).eval()


def preprocessing(args, image_size: int):
    """The checkpoint's preprocessing, with the options given on the command line in its place."""
    from dataclasses import replace

    from ..data.normalization import resolve_stats
    from ..hub import resolve_checkpoint
    from ..pretrained import checkpoint_preprocessing

    pre = checkpoint_preprocessing(resolve_checkpoint(args.checkpoint), image_size)
    if args.normalization is not None:
        mean, std = resolve_stats(args.normalization)
        pre = replace(pre, mean=mean, std=std)
    given = {k: getattr(args, k) for k in ("crop_pct", "square", "pad_value") if getattr(args, k) is not None}
    return replace(pre, image_size=image_size, **given)


def dataset(args, spec: str, split: str, image_size: int, train_transform: bool = False, limit=None,
            crop_scale=(0.2, 1.0), unlabelled: bool = False):
    from ..eval.labelled import labelled_dataset
    pre = preprocessing(args, image_size)
    ds = labelled_dataset(spec, split, image_size, train_transform, pre.stats,
                          crop_scale=crop_scale, crop_pct=pre.crop_pct, limit=limit, seed=args.seed,
                          square=pre.square, pad_value=pre.pad_value, unlabelled=unlabelled)
    ds.counter.max_bad_fraction = getattr(args, "max_bad_fraction", ds.counter.max_bad_fraction)
    return ds


def features_for(args, model, spec: str, split: str, limit, device):
    """(features, labels, keys) of a data spec, or straight from a feature file."""
    from ..eval.features import extract_features, is_feature_file, load_features
    if is_feature_file(spec):
        feats, labels, keys = load_features(spec)
        if limit and limit < len(labels):
            import torch
            pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))[:limit].sort().values
            feats, labels, keys = feats[pick], labels[pick], [keys[i] for i in pick.tolist()]
        return feats, labels, keys
    ds = dataset(args, spec, split, model.config.image_size, False, limit)
    feats, labels = extract_features(model, ds, args.pool, args.batch_size, device, args.num_workers,
                                     progress=not args.quiet, desc=f"features {split}")
    return feats, labels, ds.keys


def result_path(args, command: str, default_dir: str | None = None) -> Path:
    if args.result:
        return Path(args.result)
    base = Path(default_dir) if default_dir else Path("results")
    return base / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def data_record(args) -> dict:
    return {k: getattr(args, k) for k in ("train", "val", "data", "limit_train", "limit_val", "limit",
                                          "in_train", "in_test", "out_test", "in_classes", "out_classes")
            if hasattr(args, k)}


def settings_record(args, skip=("func", "command", "checkpoint", "result")) -> dict:
    data = data_record(args)
    return {k: v for k, v in vars(args).items() if k not in skip and k not in data}
