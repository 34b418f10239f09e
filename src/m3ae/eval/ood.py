"""Out-of-distribution detection as in the paper: features of an in-distribution classifier,
scored by Mahalanobis distance (class means + one shared covariance) and by max softmax; AUROC
of in- vs out-of-distribution scores (in = positive; higher score = more in-distribution)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .results import EvalResult
from .settings import EvalSettings


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """P(score_in > score_out) + 0.5 P(tie): the Mann-Whitney statistic from average ranks."""
    scores = torch.cat([in_scores.double().flatten(), out_scores.double().flatten()])
    n_in, n_out = in_scores.numel(), out_scores.numel()
    if n_in == 0 or n_out == 0:
        raise ValueError("AUROC needs at least one in- and one out-of-distribution score")
    order = scores.argsort()
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average the ranks of tied scores
    unique, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    rank_sum = ranks[:n_in].sum().item()
    return (rank_sum - n_in * (n_in + 1) / 2) / (n_in * n_out)


_SHRINKAGE = 1e-6  # ridge on the shared covariance, relative to its mean variance: keeps it invertible
_SCORE_CHUNK = 4096  # rows per (B, C, D) difference tensor: bounds memory, not results


@dataclass
class Mahalanobis:
    means: torch.Tensor  # (C, D)
    precision: torch.Tensor  # (D, D)

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> "Mahalanobis":
        x = features.double()
        num_classes = num_classes or int(labels.max()) + 1
        means = torch.stack([x[labels == c].mean(0) if (labels == c).any() else torch.zeros(x.shape[1],
                             dtype=x.dtype) for c in range(num_classes)])
        centred = x - means[labels]
        cov = centred.T @ centred / max(len(x), 1)
        cov = cov + _SHRINKAGE * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(x.shape[1], dtype=x.dtype)
        return cls(means, torch.linalg.pinv(cov, hermitian=True))

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Negative squared distance to the closest class mean (higher = more in-distribution)."""
        out = []
        for start in range(0, len(features), _SCORE_CHUNK):
            d = features[start: start + _SCORE_CHUNK].double()[:, None, :] - self.means[None]  # (B, C, D)
            dist = torch.einsum("bcd,de,bce->bc", d, self.precision, d)
            out.append(-dist.min(dim=1).values)
        return torch.cat(out).float() if out else torch.zeros(0)


def max_softmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().softmax(dim=-1).max(dim=-1).values


def ood_histogram(path, scores: dict[str, tuple[torch.Tensor, torch.Tensor]], aurocs: dict[str, float],
                  labels=("in-distribution", "out-of-distribution")):
    """One panel per score: overlaid density histograms of in vs out scores, AUROC in the title."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(scores), 3.8), layout="constrained")
    axes = fig.subplots(1, len(scores), squeeze=False)[0]
    for ax, (name, (s_in, s_out)) in zip(axes, scores.items()):
        both = torch.cat([s_in, s_out])
        lo, hi = torch.quantile(both.float(), 0.005).item(), torch.quantile(both.float(), 0.995).item()
        bins = torch.linspace(lo, hi if hi > lo else lo + 1, 51).tolist()
        ax.hist(s_in.numpy(), bins=bins, density=True, alpha=0.6, label=labels[0])
        ax.hist(s_out.numpy(), bins=bins, density=True, alpha=0.6, label=labels[1])
        ax.set_title(f"{name} (AUROC {100 * aurocs[name]:.1f})")
        ax.set_xlabel("score (higher = more in-distribution)")
        ax.set_ylabel("density")
        ax.legend()
    fig.savefig(path, dpi=120)
    return path


def ood_scores(train_x: torch.Tensor, train_y: torch.Tensor, in_x: torch.Tensor, out_x: torch.Tensor,
               in_logits: torch.Tensor, out_logits: torch.Tensor, num_classes: int | None = None):
    """AUROCs {'mahalanobis', 'max_softmax'} and the score pairs behind them."""
    maha = Mahalanobis.fit(train_x, train_y, num_classes)
    scores = {"mahalanobis": (maha.score(in_x), maha.score(out_x)),
              "max_softmax": (max_softmax(in_logits), max_softmax(out_logits))}
    return {name: auroc(*pair) for name, pair in scores.items()}, scores


def parse_classes(text: str | None) -> list[int] | None:
    """'0-4' or '0,2,5-7' -> [0, 1, 2, 3, 4] etc.; None -> None (all classes)."""
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def select_classes(x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None, classes: Sequence[int],
                   remap: torch.Tensor | None = None):
    """Rows whose label is in `classes`; labels renumbered through `remap` when given."""
    mask = torch.isin(y, torch.tensor(classes))
    y = y[mask] if remap is None else remap[y[mask]]
    return x[mask], y, (logits[mask] if logits is not None else None)


@torch.no_grad()
def _classifier_outputs(model, ds, settings: EvalSettings, device):
    """(features, labels, logits) of a fine-tuned classifier over a labelled set."""
    xs, ls, ys = [], [], []
    from .labelled import kept_loader

    for image, label in kept_loader(ds, batch_size=settings.batch_size, num_workers=settings.num_workers):
        f = model.features(image.to(device)).float()
        xs.append(f.cpu())
        ls.append(model.head(f).float().cpu())
        ys.append(label)
    return torch.cat(xs), torch.cat(ys), torch.cat(ls)


def run_ood(settings: EvalSettings, in_train: str, in_test: str, out: str | Path, *, out_test: str | None = None,
            in_classes: str | Sequence[int] | None = None, out_classes: str | Sequence[int] | None = None,
            limit_train: int | None = None, limit_test: int | None = None) -> EvalResult:
    """OOD detection of a checkpoint in one call (`m3ae ood`): a fine-tuned classifier folder, or a
    pretrained encoder with a fast linear probe fitted on `in_train`; Mahalanobis and max-softmax
    AUROC of `in_test` vs `out_test` (default: `in_test`, split by `in_classes` / `out_classes`,
    e.g. "0-4"); the score histograms go to OUT/ood_hist.png."""
    from .fast_probe import fast_probe, fit_logistic
    from .finetune import Classifier, is_classifier_dir

    t0 = time.perf_counter()
    in_classes = parse_classes(in_classes) if isinstance(in_classes, str) else in_classes
    out_classes = parse_classes(out_classes) if isinstance(out_classes, str) else out_classes
    finetuned = is_classifier_dir(settings.checkpoint)
    if finetuned and in_classes is not None:
        raise ValueError("in-distribution classes need a pretrained encoder (a fine-tuned head has fixed classes)")
    with settings.applied():
        device = settings.torch_device()
        model = (Classifier.from_pretrained(settings.checkpoint).to(device).eval() if finetuned
                 else settings.load_encoder(device))

        def features(spec, split, limit, like=None):
            if not finetuned:
                x, y, _, ds = settings.features_with_set(model, spec, split, limit, device, like)
                return x, y, None, ds
            ds = settings.dataset(spec, split, model.config.image_size, False, limit, like=like)
            return (*_classifier_outputs(model, ds, settings, device), ds)

        train_x, train_y, train_l, train_set = features(in_train, "train", limit_train)
        # in_test's class names numbered as in_train's (out_test may hold classes in_train lacks)
        in_x, in_y, in_l, _ = features(in_test, "val", limit_test, like=train_set)
        if out_test in (None, in_test):  # one dataset split by classes: extract it once
            out_x, out_y, out_l = in_x, in_y, in_l
        else:
            out_x, out_y, out_l, _ = features(out_test, "val", limit_test)
        if in_classes is not None:  # keep in-classes and renumber them 0..k-1
            remap = torch.full((int(max(train_y.max(), in_y.max(), max(in_classes))) + 1,), -1, dtype=torch.long)
            remap[torch.tensor(in_classes)] = torch.arange(len(in_classes))
            train_x, train_y, train_l = select_classes(train_x, train_y, train_l, in_classes, remap)
            in_x, in_y, in_l = select_classes(in_x, in_y, in_l, in_classes, remap)
        if out_classes is not None:
            out_x, out_y, out_l = select_classes(out_x, out_y, out_l, out_classes)
        if not len(train_x) or not len(in_x) or not len(out_x):
            raise ValueError("an empty set after class selection; check the in- / out-of-distribution classes")
        classes = int(train_y.max()) + 1
        extra = {}
        with settings.loader_free():
            if finetuned:
                in_logits, out_logits = in_l, out_l
            else:  # an in-distribution linear classifier on the frozen features, for max softmax
                probe = fast_probe(train_x, train_y, in_x, in_y, classes)
                linear = fit_logistic(train_x, train_y, classes, probe["l2"])
                in_logits, out_logits = linear.logits(in_x), linear.logits(out_x)
                extra["in_probe_top1"] = probe["top1"]
            aurocs, scores = ood_scores(train_x, train_y, in_x, out_x, in_logits, out_logits, classes)
    Path(out).mkdir(parents=True, exist_ok=True)
    png = ood_histogram(Path(out) / "ood_hist.png", scores, aurocs)
    metrics = {"auroc_mahalanobis": 100 * aurocs["mahalanobis"], "auroc_max_softmax": 100 * aurocs["max_softmax"],
               **extra, "n_in": len(in_x), "n_out": len(out_x), "n_train": len(train_x)}
    return EvalResult("ood", metrics, {"classifier": "finetuned" if finetuned else "frozen encoder + fast probe",
                                       "histogram": str(png)}, time.perf_counter() - t0)
