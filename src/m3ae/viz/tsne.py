"""2-D maps of exported features coloured by label: t-SNE (scikit-learn) or a PCA fallback.

Feature files: safetensors or .npz holding `features` (N, D) and `labels` (N,), the format
`m3ae embed` writes. Nothing is unpickled (npz is read with allow_pickle=False).
"""
from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..numpy_files import check_feature_arrays, check_numpy_file

log = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    features: np.ndarray  # (N, D) float
    labels: np.ndarray  # (N,) int or str
    source: str


def load_features(path: str | Path) -> FeatureSet:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file not found: {path}")
    if path.suffix not in (".safetensors", ".npz"):
        raise ValueError(f"{path}: expected a .safetensors or .npz feature file")
    if path.suffix == ".npz":
        check_numpy_file(path)
    try:
        data = _read_arrays(path)
    except ValueError as err:  # object arrays would need pickle: refuse
        raise ValueError(f"{path}: cannot read without pickle ({err}); store labels as numbers or "
                         "fixed-width strings") from err
    except (OSError, EOFError, zipfile.BadZipFile) as err:  # a cut download: was a traceback
        raise ValueError(f"{path}: not a readable feature file ({type(err).__name__}: {err})") from err
    except Exception as err:  # safetensors' own error type (SafetensorError) is no ValueError
        if type(err).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    for key in ("features", "labels"):
        if key not in data:
            raise ValueError(f"{path} has no '{key}' array (found {sorted(data)})")
    features, labels = data["features"], np.asarray(data["labels"])  # labels may be text here
    check_feature_arrays(path, features, labels)
    features = features.astype(np.float32)
    if len(features) < 3:
        raise ValueError(f"{path}: need at least 3 points, got {len(features)}")
    return FeatureSet(features, labels, str(path))


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def subsample(fs: FeatureSet, max_points: int | None, seed: int = 0) -> FeatureSet:
    if max_points is None or len(fs.features) <= max_points:
        return fs
    keep = np.sort(np.random.default_rng(seed).choice(len(fs.features), max_points, replace=False))
    return FeatureSet(fs.features[keep], fs.labels[keep], fs.source)


def pca_2d(features: np.ndarray) -> np.ndarray:
    x = features - features.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T if vt.shape[0] >= 2 else np.concatenate([x @ vt[:1].T, np.zeros((len(x), 1))], 1)


def embed_2d(features: np.ndarray, method: str = "auto", seed: int = 0,
             perplexity: float = 30.0) -> tuple[np.ndarray, str]:
    """(N, D) -> (N, 2) and the method actually used ('tsne' or 'pca')."""
    if method not in ("auto", "tsne", "pca"):
        raise ValueError(f"unknown method {method!r} (auto, tsne, pca)")
    # Standardise features so no single large dimension dominates either method.
    x = features.astype(np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    if method in ("auto", "tsne"):
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            if method == "tsne":
                raise ValueError("t-SNE needs scikit-learn (pip install 'm3ae[eval]'); or use --method pca") from None
        else:
            # Perplexity must stay below the number of points.
            perp = float(min(perplexity, max(2.0, (len(x) - 1) / 3)))
            if perp != perplexity:  # said, not silently changed
                log.warning("t-SNE perplexity %g lowered to %g: it must stay below a third of the %d points",
                            perplexity, perp, len(x))
            init = "pca" if x.shape[1] >= 2 else "random"
            return TSNE(2, perplexity=perp, init=init, random_state=seed).fit_transform(x), "tsne"
    return pca_2d(x), "pca"


def knn_accuracy(features: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-NN accuracy (cosine) in the original feature space: a number that says how
    well the classes separate, independent of the 2-D map's distortions."""
    x = features - features.mean(0, keepdims=True)  # centred: cosine then ignores a shared offset
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    k = min(k, len(x) - 1)
    nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    correct = 0
    for i, row in enumerate(nearest):
        values, counts = np.unique(labels[row], return_counts=True)
        correct += values[counts.argmax()] == labels[i]
    return correct / len(x)


def separation(features: np.ndarray, labels: np.ndarray, k: int = 5) -> str:
    """The panel title's k-NN accuracy, over the labelled points only: `m3ae embed` writes label -1
    for data without labels, and where all points share one label every neighbour agrees (100 %,
    which says nothing about the features)."""
    labelled = ~(labels < 0) if labels.dtype.kind in "iuf" else np.ones(len(labels), dtype=bool)
    if not labelled.any():
        return "unlabelled"
    if len(np.unique(labels[labelled])) < 2:
        return "one class"
    acc = knn_accuracy(features[labelled], np.array([str(v) for v in labels[labelled]]), k)
    share = "" if labelled.all() else f" of {int(labelled.sum())} labelled"
    return f"{k}-NN acc {acc:.1%}{share}"


def tsne_figure(sets: Sequence[tuple[str, FeatureSet]], out: str | Path, method: str = "auto", seed: int = 0,
                perplexity: float = 30.0, dpi: int = 100) -> Path:
    """One panel per feature set, side by side, points coloured by label (shared colours)."""
    from matplotlib.figure import Figure

    classes = sorted({str(v) for _, fs in sets for v in fs.labels})
    colours = _palette(len(classes))
    index = {c: i for i, c in enumerate(classes)}
    fig = Figure(figsize=(5.0 * len(sets) + (1.6 if len(classes) <= 20 else 0), 5.0), dpi=dpi)
    axes = fig.subplots(1, len(sets), squeeze=False)[0]
    for ax, (title, fs) in zip(axes, sets):
        xy, used = embed_2d(fs.features, method, seed, perplexity)
        labels = np.array([str(v) for v in fs.labels])
        ids = np.array([index[v] for v in labels])
        ax.scatter(xy[:, 0], xy[:, 1], c=colours[ids], s=9, linewidths=0)
        method_name = "t-SNE" if used == "tsne" else "PCA"
        ax.set_title(f"{title}\n{method_name}, N={len(labels)}, {separation(fs.features, fs.labels)}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classes) <= 20:  # beyond that a legend is noise
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", linestyle="", color=colours[i], label=c) for i, c in enumerate(classes)]
        fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False, title="label")
        fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
    else:
        fig.tight_layout()
    from . import save_figure

    return save_figure(fig, out)


def _palette(n: int) -> np.ndarray:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    if n <= 20:
        return np.array([cmap(i) for i in range(n)])
    return np.array([cmap(i / max(n - 1, 1)) for i in range(n)])
