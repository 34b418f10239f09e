"""Representation quality during pretraining: fast probe + kNN on a small labelled set."""
from __future__ import annotations

import torch

from .fast_probe import fast_probe
from .features import extract_kept_features
from .knn import knn_accuracy


def probe_metrics(model, train_set, val_set, *, pool: str = "cls", batch_size: int = 256,
                  device: str | torch.device = "cpu", l2_grid=(1e-4, 1e-3, 1e-2),
                  num_classes: int | None = None) -> dict[str, float]:
    """{'probe_top1', 'knn_top1'} (%) of the frozen encoder; leaves the model's train/eval mode as it was."""
    train_x, train_y, _ = extract_kept_features(model, train_set, pool, batch_size, device)
    val_x, val_y, _ = extract_kept_features(model, val_set, pool, batch_size, device)
    num_classes = num_classes or int(max(train_y.max(), val_y.max())) + 1
    probe = fast_probe(train_x, train_y, val_x, val_y, num_classes, l2_grid=l2_grid, max_iter=100)
    knn = knn_accuracy(train_x, train_y, val_x, val_y, num_classes=num_classes)
    return {"probe_top1": probe["top1"], "knn_top1": knn["top1"]}


def monitor_sets(train_spec: str, val_spec: str, image_size: int, stats="cc12m", limit: int | None = None,
                 square: str = "crop", pad_value: int = 255):
    """The (train, val) labelled sets for `probe_metrics`, evaluation transforms on both: the run's
    image rule (normalisation, square padding), as its checkpoints' preprocessing records it."""
    from .labelled import labelled_dataset

    train, val = (labelled_dataset(spec, split, image_size, False, stats, limit=limit, square=square,
                                   pad_value=pad_value) for spec, split in ((train_spec, "train"), (val_spec, "val")))
    val.number_like(train)  # a class missing from val must not shift its labels
    return train, val
