"""Fast linear probe on cached features: L2-regularised multinomial logistic regression (full-batch
L-BFGS), the L2 strength picked on a held-out part of the training features (one 20 % hold-out, or
k-fold cross-validation); or closed-form ridge regression onto one-hot targets. Seconds on CPU for
tens of thousands of features.

Two things made the fashion study's probe numbers move with the features' last bits (up to 1.2
points): L-BFGS cut off at max_iter far from the optimum (its top-1 then depends on the path; 100
plain iterations on random-init fashion features scored 1.7 points under the optimum), and one
hold-out of ~2k samples picking between L2 values that score within its standard error. The
preconditioned solver (the default) gets near the optimum in ~50 iterations; k-fold selection
(`folds`) averages every training sample's hold-out score. `benchmarks/probe_stability.py` measures
both."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .knn import check_labelled_features, knn_accuracy, topk_accuracy
from .results import EvalResult
from .settings import EvalSettings

DEFAULT_L2 = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
HOLDOUT = 0.2  # share of the training features the L2 sweep holds out


@dataclass
class LinearModel:
    weight: torch.Tensor  # (D, C), on standardised features
    bias: torch.Tensor  # (C,)
    mean: torch.Tensor  # (D,) standardisation fitted on the training features
    std: torch.Tensor
    iterations: int = 0  # L-BFGS iterations the fit took (0: closed form)
    converged: bool = True  # False: stopped at max_iter, short of the tolerances (logistic)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.std) @ self.weight + self.bias

    def objective(self, x: torch.Tensor, y: torch.Tensor, l2: float) -> float:
        """What fit_logistic minimises, in float64: mean cross-entropy + l2 * ||W||^2 / 2."""
        z = (x.double() - self.mean.double()) / self.std.double()
        w = self.weight.double()
        with torch.no_grad():
            return float(F.cross_entropy(z @ w + self.bias.double(), y.long()) + 0.5 * l2 * (w * w).sum())


def _standardiser(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)


def _preconditioner(z: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """P = (C + e I)^-1/2 and its inverse, C the standardised features' second moment.

    The objective's curvature is about c C + l2 I, c the softmax's (~0.1). C's eigenvalues span
    ~1e-12 to ~70 on real features, and plain L-BFGS crawls along its flat directions; P evens them
    out. e = max(10 l2, 1e-3), i.e. about l2 / c, keeps the directions where only the penalty curves
    the objective from being stretched past the others (with e = l2 a strong L2 converged slower
    than without P)."""
    lam, u = torch.linalg.eigh(z.T @ z / len(z))
    scale = lam.clamp_min(0) + max(10.0 * l2, 1e-3)
    return (u * scale.rsqrt()) @ u.T, (u * scale.sqrt()) @ u.T


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int = 200,
                 stats: tuple[torch.Tensor, torch.Tensor] | None = None, init: LinearModel | None = None,
                 precondition: bool = True) -> LinearModel:
    """Minimise mean cross-entropy + l2 * ||W||^2 / 2 with L-BFGS (strong-Wolfe line search), from
    zero or from `init`'s weights (a warm start along an L2 path: the same optimum, fewer steps).

    With `precondition` (the default) L-BFGS runs on V with W = P V (`_preconditioner`): the same
    objective and optimum; on fashion features 50 iterations got the loss the plain solver had after
    ~200 and the top-1 it had after ~400 (RESULTS.md, "How steady is the fast probe"). Without it,
    the plain solver of the fashion study's evaluations."""
    x = x.double()
    mean, std = stats if stats is not None else _standardiser(x)
    z = (x - mean.double()) / std.double()
    p, p_inv = _preconditioner(z, l2) if precondition else (None, None)
    inputs = z @ p if p is not None else z
    if init is None:
        v = torch.zeros(z.shape[1], num_classes, dtype=torch.float64, device=z.device)
        b = torch.zeros(num_classes, dtype=torch.float64, device=z.device)
    else:
        v = init.weight.double().clone() if p_inv is None else p_inv @ init.weight.double()
        b = init.bias.double().clone()
    v.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([v, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")
    y = y.long()

    def weight() -> torch.Tensor:
        return v if p is None else p @ v

    def closure():
        opt.zero_grad()
        w = weight()
        loss = F.cross_entropy(inputs @ v + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    state = opt.state[v]  # L-BFGS keeps its counters on the first parameter
    iterations, evals = int(state["n_iter"]), int(state["func_evals"])
    # It also stops when the line searches have spent max_eval (1.25 x max_iter) evaluations: a budget
    # stop like max_iter, not convergence.
    converged = iterations < max_iter and evals < opt.defaults["max_eval"]
    with torch.no_grad():
        w = weight().detach()
    return LinearModel(w.float(), b.detach().float(), mean.float(), std.float(), iterations, converged)


def fit_ridge(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
              stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> LinearModel:
    """Closed form: W = (Z'Z + n l2 I)^-1 Z'(Y - mean Y) on standardised Z, one-hot Y."""
    x = x.double()
    mean, std = stats if stats is not None else _standardiser(x)
    z = (x - mean.double()) / std.double()
    target = F.one_hot(y.long(), num_classes).double()
    t_mean = target.mean(0)
    gram = z.T @ z + z.shape[0] * l2 * torch.eye(z.shape[1], dtype=torch.float64, device=z.device)
    w = torch.linalg.solve(gram, z.T @ (target - t_mean))
    return LinearModel(w.float(), t_mean.float(), mean.float(), std.float())


def _holdout_top1(fit, train_x, train_y, grid: list[float], folds: int, seed: int,
                  warm_start: bool) -> dict[float, float]:
    """Each L2's top-1 (%) on held-out training features: one HOLDOUT share (folds=1), or the mean over
    `folds` folds, each sample held out once. With `warm_start` each fold walks the grid from the
    strongest L2 down, starting from the last solution."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_y), generator=g)
    if folds == 1:
        n_hold = max(1, int(round(HOLDOUT * len(order))))
        parts = [order[:n_hold]]
    else:
        parts = list(torch.tensor_split(order, folds))
    hits = dict.fromkeys(grid, 0)
    held = 0
    for hold in parts:
        keep = torch.ones(len(order), dtype=torch.bool)
        keep[hold] = False
        fit_idx = order[keep[order]]  # the rest, in the shuffled order
        model = None
        for l2 in sorted(grid, reverse=True) if warm_start else grid:
            model = fit(train_x[fit_idx], train_y[fit_idx], l2, model if warm_start else None)
            top = model.logits(train_x[hold]).topk(1, dim=1).indices.view(-1)  # topk_accuracy's rule
            hits[l2] += int((top == train_y[hold]).sum())
        held += len(hold)
    return {l2: 100.0 * h / held for l2, h in hits.items()}


def fast_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
               num_classes: int | None = None, method: str = "logistic", l2_grid=DEFAULT_L2,
               seed: int = 0, max_iter: int = 200, folds: int = 1, precondition: bool = True) -> dict:
    """Pick L2 on held-out training features (folds=1: one HOLDOUT share, fits from zero; folds=k >= 2:
    k-fold cross-validation, warm-started along the grid), refit on all of them with the best value
    (ties: the stronger), report top-1/top-5 (%) on the validation features. `precondition`: see
    fit_logistic."""
    if method not in ("logistic", "ridge"):
        raise ValueError(f"method must be 'logistic' or 'ridge', got {method!r}")
    if type(folds) is not int or folds < 1:
        raise ValueError(f"folds must be an integer >= 1, got {folds!r}")
    num_classes = check_labelled_features(train_x, train_y, val_x, val_y, num_classes)
    if not list(l2_grid):
        raise ValueError("l2_grid is empty: give at least one L2 strength")
    if folds > len(train_y):
        raise ValueError(f"folds={folds} but only {len(train_y)} training features")

    def fit(x, y, l2, init=None):
        if method == "logistic":
            return fit_logistic(x, y, num_classes, l2, max_iter, init=init, precondition=precondition)
        return fit_ridge(x, y, num_classes, l2)

    grid = list(l2_grid)
    sweep = {}
    if len(grid) > 1:
        sweep = _holdout_top1(fit, train_x, train_y, grid, folds, seed, warm_start=folds > 1 and method == "logistic")
        best = max(grid, key=lambda v: (sweep[v], v))  # ties: the stronger regularisation
    else:
        best = grid[0]
    model = fit(train_x, train_y, best)
    train_top1 = topk_accuracy(model.logits(train_x), train_y, ks=(1,))["top1"]
    return {**topk_accuracy(model.logits(val_x), val_y), "train_top1": train_top1, "l2": best,
            "method": method, "folds": folds, "iterations": model.iterations, "converged": model.converged,
            "sweep": {str(k): v for k, v in sweep.items()}}


def run_fast_probe(settings: EvalSettings, train: str, val: str, *, method: str = "logistic",
                   l2_grid=DEFAULT_L2, knn: bool = False, k: int = 20, temperature: float = 0.07,
                   limit_train: int | None = None, limit_val: int | None = None, folds: int = 1) -> EvalResult:
    """The fast probe of a checkpoint's features (or of two feature files), with kNN beside it when
    `knn`, in one call (`m3ae probe --fast`)."""
    t0 = time.perf_counter()
    with settings.applied():
        train_x, train_y, val_x, val_y = settings.train_val_features(train, val, limit_train, limit_val)
        classes = int(max(train_y.max(), val_y.max())) + 1
        with settings.loader_free():
            t_fit = time.perf_counter()
            res = fast_probe(train_x, train_y, val_x, val_y, classes, method, l2_grid, seed=settings.seed,
                             folds=folds)
            metrics = {"top1": res["top1"], "top5": res["top5"], "train_top1": res["train_top1"], "l2": res["l2"],
                       "folds": folds, "iterations": res["iterations"], "converged": res["converged"],
                       "fit_seconds": time.perf_counter() - t_fit, "n_train": len(train_y), "n_val": len(val_y)}
            if knn:
                scores = knn_accuracy(train_x, train_y, val_x, val_y, k, temperature, classes)
                metrics.update(knn_top1=scores["top1"], knn_top5=scores["top5"])
    return EvalResult("probe --fast", metrics, {"sweep": res["sweep"]}, time.perf_counter() - t0)
