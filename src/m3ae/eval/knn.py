"""Weighted k-nearest-neighbour classification on cosine similarity (the InstDisc/DINO protocol)."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .results import EvalResult
from .settings import EvalSettings

_QUERY_CHUNK = 1024  # test rows per similarity matrix: bounds memory, not results


@torch.no_grad()
def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """Class scores (M, C): the k most cosine-similar training features vote with exp(sim / T)."""
    train = F.normalize(train_x.float(), dim=1)
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test_x.shape[0], _QUERY_CHUNK):
        query = F.normalize(test_x[start: start + _QUERY_CHUNK].float(), dim=1)
        sims, idx = (query @ train.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_y[idx].long(), weights)
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """{'top1': %, 'top5': %}; top-k with k >= classes is 100 by definition and still reported."""
    result = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        hit = (scores.topk(kk, dim=1).indices == labels.view(-1, 1)).any(dim=1)
        # hits / n in Python floats: a float32 mean turns 30 of 100 into 30.000001192092896
        result[f"top{k}"] = 100.0 * int(hit.sum()) / len(labels) if len(labels) else float("nan")
    return result


def check_labelled_features(train_x, train_y, val_x, val_y, num_classes: int | None) -> int:
    """The class count, after refusing what would fail deep in torch: empty sets, mismatched
    lengths, labels below 0 (`m3ae embed` writes -1 for unlabelled data) or past `num_classes`."""
    for name, x, y in (("training", train_x, train_y), ("validation", val_x, val_y)):
        if len(x) == 0 or len(x) != len(y):
            raise ValueError(f"the {name} set has {len(x)} features and {len(y)} labels; need as many, at least one")
        if int(y.min()) < 0:
            raise ValueError(f"the {name} set has label {int(y.min())}: unlabelled features (m3ae embed writes -1 "
                             "for data without labels) cannot be scored")
    largest = int(max(train_y.max(), val_y.max()))
    if num_classes is not None and largest >= num_classes:
        raise ValueError(f"label {largest} is out of range for num_classes={num_classes}")
    return num_classes or largest + 1


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None) -> dict[str, float]:
    num_classes = check_labelled_features(train_x, train_y, test_x, test_y, num_classes)
    scores = knn_scores(train_x, train_y, test_x, num_classes, k, temperature)
    return topk_accuracy(scores, test_y)


def run_knn(settings: EvalSettings, train: str, val: str, *, k: int = 20, temperature: float = 0.07,
            limit_train: int | None = None, limit_val: int | None = None) -> EvalResult:
    """kNN accuracy of a checkpoint's features (or of two feature files), in one call (`m3ae knn`)."""
    t0 = time.perf_counter()
    with settings.applied():
        train_x, train_y, val_x, val_y = settings.train_val_features(train, val, limit_train, limit_val)
        with settings.loader_free():
            metrics = {**knn_accuracy(train_x, train_y, val_x, val_y, k, temperature),
                       "n_train": len(train_y), "n_val": len(val_y)}
    return EvalResult("knn", metrics, seconds=time.perf_counter() - t0)
