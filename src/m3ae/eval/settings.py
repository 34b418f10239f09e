"""What every evaluation shares, defined once: where it computes (`Runtime`), the checkpoint and how
its images are read (`EvalSettings`); and the inputs they make: the encoder, labelled sets prepared
with the checkpoint's own preprocessing, features. The `m3ae` evaluation commands build their
options from these fields (cli/_evalargs.py), so a setting added here is a command-line option too
(the trained heads' recipes: eval/recipes.py). Importing this module does not import torch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

from ..config import MAX_BATCH_SIZE, MAX_SEED

AUTO_THREADS = "auto"


@dataclass
class Runtime:
    """Where and how an evaluation computes (the probe and fine-tuning training loops take it too)."""
    pool: str = "cls"  # [CLS] token or mean of image tokens (cls | mean)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 2  # data-loader worker processes
    seed: int = 0  # seeds the data subsets, head initialisation and shuffling

    def __post_init__(self) -> None:
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be cls or mean, got {self.pool!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")

    def loaders(self, train_set, val_set, batch_size: int, drop_last: bool = False):
        """Shuffled training batches and ordered validation batches, on this runtime's workers;
        unusable images of labelled sets are left out and counted (m3ae.eval.labelled.kept_loader)."""
        from .labelled import kept_loader

        train = kept_loader(train_set, batch_size=batch_size, shuffle=True, num_workers=self.num_workers,
                            drop_last=drop_last, persistent_workers=self.num_workers > 0)
        return train, kept_loader(val_set, batch_size=batch_size, shuffle=False, num_workers=self.num_workers)


@dataclass(kw_only=True)
class EvalSettings(Runtime):
    """A checkpoint and how its images are read and encoded: the settings of every evaluation."""
    checkpoint: str  # model folder (config.json + model.safetensors) or hub id
    batch_size: int = 256  # batch size for feature extraction
    # torch CPU threads: auto (the commands' default) = usable cores - num_workers (at least 1) while
    # loader workers run, with every core tried over a feature extraction's first batches and kept
    # if faster, and every usable core while no workers run (probe fits, kNN); OMP_NUM_THREADS wins
    # over auto; N = N throughout; None (the library's default) = as the process has them
    threads: int | str | None = None
    # Image preparation: None (the default) takes the checkpoint's own (preprocessor_config.json), as
    # m3ae.load does (`preprocessing`). Each field's comment is its option's help, so each says so.

    # pixel statistics: cc12m | imagenet | m1,m2,m3/s1,s2,s3 (default: the checkpoint's)
    normalization: str | None = None
    # eval transform: resize the shorter side to size/crop_pct, centre-crop (1.0: the whole shorter
    # side; default: the checkpoint's)
    crop_pct: float | None = None
    # non-square photos: crop as they are, or pad to a square first (crop | pad; default: the checkpoint's)
    square: str | None = None
    pad_value: int | None = None  # grey level of the padding (default: the checkpoint's)
    # stop when more than this share of images is unusable (after 200); each is skipped, counted and logged
    max_bad_fraction: float = 0.05
    quiet: bool = False  # no progress bars or per-epoch lines
    # what the C allocator does with freed memory during the evaluation (m3ae.host_allocator): auto =
    # keep it on a CPU (large batches' buffers are not faulted in again each batch), keep, system
    host_allocator: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.square not in (None, "crop", "pad"):
            raise ValueError(f"square must be crop or pad, got {self.square!r}")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be in 1..{MAX_BATCH_SIZE}, got {self.batch_size}")
        if not (self.threads is None or self.threads == AUTO_THREADS
                or (type(self.threads) is int and self.threads >= 1)):
            raise ValueError(f"threads must be an integer >= 1, {AUTO_THREADS!r} or unset, got {self.threads!r}")
        from ..host_allocator import SETTINGS as ALLOCATOR_SETTINGS

        if self.host_allocator not in ALLOCATOR_SETTINGS:
            raise ValueError(f"host_allocator must be one of {', '.join(ALLOCATOR_SETTINGS)}, "
                             f"got {self.host_allocator!r}")
        if not 0 <= self.max_bad_fraction <= 1:  # also refuses nan, which would compare false and never stop
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")

    def preprocessing(self, image_size: int):
        """The checkpoint's preprocessing, with the settings given here in its place."""
        from ..data.normalization import resolve_stats
        from ..hub import resolve_checkpoint
        from ..pretrained import checkpoint_preprocessing

        pre = checkpoint_preprocessing(resolve_checkpoint(self.checkpoint), image_size)
        if self.normalization is not None:
            mean, std = resolve_stats(self.normalization)
            pre = replace(pre, mean=mean, std=std)
        given = {k: getattr(self, k) for k in ("crop_pct", "square", "pad_value") if getattr(self, k) is not None}
        return replace(pre, image_size=image_size, **given)

    def torch_device(self):
        from ..distributed import pick_device

        return pick_device(self.device)

    @contextlib.contextmanager
    def applied(self):
        """An evaluation's block: under `threads` and `host_allocator`, both as before afterwards."""
        from ..host_allocator import keep_freed_memory

        with self.threads_applied(), keep_freed_memory(self.host_allocator, self.torch_device().type):
            yield

    def threads_applied(self):
        """A block under `threads` (when set; auto: as while loader workers run), torch's thread count
        restored after it."""
        from ..threads import torch_threads

        if self.threads is None:
            return contextlib.nullcontext()
        if self.threads == AUTO_THREADS:
            return torch_threads(None, self.num_workers)
        return torch_threads(int(self.threads))

    def extraction_threads(self):
        """The automatic thread choice for a feature extraction beside loader workers (tuned during
        it: m3ae.eval.features), or None when the count is given or there are no workers."""
        from ..threads import choose_threads

        if self.threads != AUTO_THREADS or self.num_workers == 0:
            return None
        choice = choose_threads(None, self.num_workers)
        return choice if choice.auto else None

    def loader_free(self):
        """A block inside `applied` in which no loader workers run (a fit on features): with
        auto threads, every usable core for it, since the workers' cores are idle then."""
        from ..threads import torch_threads

        if self.threads == AUTO_THREADS and self.num_workers > 0:
            return torch_threads(None)
        return contextlib.nullcontext()

    def load_encoder(self, device=None):
        """The checkpoint's M3AE in eval mode on `device` (default: this device)."""
        from ..model import M3AE

        model = M3AE.from_pretrained(self.checkpoint)
        return model.to(device if device is not None else self.torch_device()).eval()

    def dataset(self, spec: str, split: str, image_size: int, train_transform: bool = False,
                limit: int | None = None, crop_scale=(0.2, 1.0), unlabelled: bool = False, like=None):
        """A labelled set (m3ae.eval.labelled) read with the checkpoint's preprocessing; `like`: the
        training set whose class names number this one's labels (LabelledImages.number_like)."""
        from .labelled import labelled_dataset

        pre = self.preprocessing(image_size)
        ds = labelled_dataset(spec, split, image_size, train_transform, pre.stats,
                              crop_scale=crop_scale, crop_pct=pre.crop_pct, limit=limit, seed=self.seed,
                              square=pre.square, pad_value=pre.pad_value, unlabelled=unlabelled)
        ds.counter.max_bad_fraction = self.max_bad_fraction
        if like is not None:
            ds.number_like(like)
        return ds

    def features(self, model, spec: str, split: str, limit: int | None = None, device=None):
        """(features, labels, keys) of a data spec, or straight from a feature file (`model` unused).
        Unusable images are left out: the keys name the rows kept."""
        return self.features_with_set(model, spec, split, limit, device)[:3]

    def features_with_set(self, model, spec: str, split: str, limit: int | None = None, device=None, like=None):
        """As `features`, plus the labelled set read (None for a feature file)."""
        from .features import extract_kept_features, is_feature_file, load_features

        check_limit(limit)
        if is_feature_file(spec):
            feats, labels, keys = load_features(spec)
            if limit and limit < len(labels):
                import torch

                g = torch.Generator().manual_seed(self.seed)
                pick = torch.randperm(len(labels), generator=g)[:limit].sort().values
                feats, labels, keys = feats[pick], labels[pick], [keys[i] for i in pick.tolist()]
            return feats, labels, keys, None
        ds = self.dataset(spec, split, model.config.image_size, False, limit, like=like)
        feats, labels, kept = extract_kept_features(model, ds, self.pool, self.batch_size,
                                                    device if device is not None else self.torch_device(),
                                                    self.num_workers, progress=not self.quiet,
                                                    desc=f"features {split}", threads=self.extraction_threads())
        return feats, labels, [ds.keys[i] for i in kept.tolist()], ds

    def train_val_sets(self, train: str, val: str, image_size: int, crop_scale=(0.2, 1.0),
                       limit_train: int | None = None, limit_val: int | None = None):
        """(training set with augmentation, validation set, classes) for a trained head; the
        validation labels numbered by the training set's class names."""
        train_set = self.dataset(train, "train", image_size, True, limit_train, tuple(crop_scale))
        val_set = self.dataset(val, "val", image_size, False, limit_val, like=train_set)
        return train_set, val_set, max(train_set.num_classes, val_set.num_classes)

    def train_val_features(self, train: str, val: str, limit_train: int | None = None,
                           limit_val: int | None = None):
        """(train_x, train_y, val_x, val_y); the encoder is loaded only when a spec is not a feature file.
        Validation labels are numbered by the training set's class names (a feature file has none)."""
        from .features import is_feature_file

        model = None if is_feature_file(train) and is_feature_file(val) else self.load_encoder()
        train_x, train_y, _, train_set = self.features_with_set(model, train, "train", limit_train)
        val_x, val_y, _, _ = self.features_with_set(model, val, "val", limit_val, like=train_set)
        return train_x, train_y, val_x, val_y


def check_limit(limit: int | None) -> None:
    """A subset size: None (all) or >= 1. Zero used to mean "all" and a negative one dropped that
    many items (a slice), both silently."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all), got {limit}")
