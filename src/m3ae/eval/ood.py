"""Out-of-distribution detection as in the paper: features of an in-distribution classifier,
scored by Mahalanobis distance (class means + one shared covariance) and by max softmax; AUROC
of in- vs out-of-distribution scores (in = positive; higher score = more in-distribution)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


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


@dataclass
class Mahalanobis:
    means: torch.Tensor  # (C, D)
    precision: torch.Tensor  # (D, D)

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None,
            shrinkage: float = 1e-6) -> "Mahalanobis":
        x = features.double()
        num_classes = num_classes or int(labels.max()) + 1
        means = torch.stack([x[labels == c].mean(0) if (labels == c).any() else torch.zeros(x.shape[1],
                             dtype=x.dtype) for c in range(num_classes)])
        centred = x - means[labels]
        cov = centred.T @ centred / max(len(x), 1)
        cov = cov + shrinkage * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(x.shape[1], dtype=x.dtype)
        return cls(means, torch.linalg.pinv(cov, hermitian=True))

    def score(self, features: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Negative squared distance to the closest class mean (higher = more in-distribution)."""
        out = []
        for start in range(0, len(features), chunk):
            d = features[start: start + chunk].double()[:, None, :] - self.means[None]  # (B, C, D)
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
