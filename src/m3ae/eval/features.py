"""Frozen-encoder features: pooling, batched extraction, and the feature file format.

File format (read by `m3ae tsne` and the fast probe): `features` (N, D) float32, `labels` (N,)
int64, and the sample keys - in .npz as a string array `keys`, in .safetensors as metadata JSON
(`keys`, plus any extra metadata). A .npy file holds `features` only, with `labels` and `keys`
beside it (FILE.labels.npy, FILE.keys.json).
"""
from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..data.sources.base import MAX_LABEL
from ..files import atomic_write
from ..numpy_files import check_feature_arrays, check_numpy_file
from ..precision import autocast as precision_autocast
from ..threads import ThreadChoice, ThreadTuner

POOLS = ("cls", "mean")
# Batches per window of the thread trial (m3ae.threads.ThreadTuner) during an extraction: after 2
# batches of start-up, 4 at cores - workers, then 4 with every core.
TUNE_SKIP, TUNE_WINDOW = 2, 4

log = logging.getLogger(__name__)


def pool_tokens(tokens: torch.Tensor, pool: str, num_image_tokens: int,
                text_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1 + N + L, D) encoder output -> (B, D).

    "cls": the [CLS] token. "mean": the mean of the image tokens (or of the non-padding text
    tokens when there is no image).
    """
    if pool == "cls":
        return tokens[:, 0]
    if pool != "mean":
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if num_image_tokens > 0:
        return tokens[:, 1: 1 + num_image_tokens].mean(dim=1)
    text = tokens[:, 1:]
    if text_padding_mask is None:
        return text.mean(dim=1)
    keep = (~text_padding_mask.bool()).unsqueeze(-1).to(text.dtype)
    return (text * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def num_image_tokens(model, image: torch.Tensor | None) -> int:
    """Image tokens in the encoder output for this input (any image size the model accepts)."""
    if image is None:
        return 0
    rows, cols = model.patch_grid(image)
    return rows * cols


@torch.no_grad()
def encode_pooled(model, image: torch.Tensor | None, pool: str = "cls", text: torch.Tensor | None = None,
                  text_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pooled features of one batch: no masking, deterministic (model in eval mode)."""
    tokens = model.encode(image, text, text_padding_mask)
    n_image = num_image_tokens(model, image)
    return pool_tokens(tokens, pool, n_image, text_padding_mask).float()


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    import sys
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit="batch", dynamic_ncols=True, file=sys.stderr)


@torch.no_grad()
def extract_features(model, dataset, pool: str = "cls", batch_size: int = 256, device: str | torch.device = "cpu",
                     num_workers: int = 0, progress: bool = False, desc: str = "features",
                     collate=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) float32 and labels (N,) int64 of a Dataset of (image, label), in order.

    A dataset may instead yield dicts {image?, text?, text_padding_mask?, label} (text / joint
    inputs; pass a `collate` that builds such a dict per batch).
    """
    feats, labels = extract_pooled_features(model, dataset, (pool,), batch_size, device, num_workers, progress,
                                            desc, collate)
    return feats[pool], labels


@torch.no_grad()
def extract_pooled_features(model, dataset, pools: Sequence[str] = POOLS, batch_size: int = 256,
                            device: str | torch.device = "cpu", num_workers: int = 0, progress: bool = False,
                            desc: str = "features", collate=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """As extract_features, for several poolings from one encoder pass: ({pool: (N, D)}, labels)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=collate)
    feats, labels, _ = _encode_batches(model, loader, len(loader), pools, device, progress, desc)
    return feats, labels


@torch.no_grad()
def extract_kept_features(model, dataset, pool: str = "cls", batch_size: int = 256,
                          device: str | torch.device = "cpu", num_workers: int = 0, progress: bool = False,
                          desc: str = "features", collate=None, threads: ThreadChoice | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As extract_features, with unusable items left out rather than replaced by the next usable one
    (that kept a bad item's key with another image's features): (features, labels, index), index
    the positions of the items kept, for their keys and captions. `dataset`: a LabelledImages, or a
    KeptItems view of one (with a `collate` building on collate_kept). Skips are counted in the
    set's counter, in this process (m3ae.eval.labelled.kept_batches).

    `threads`: the automatic thread choice the caller runs under (cores - workers); on a CPU with
    workers, every core is tried over the first batches and kept if it pays, as in training
    (m3ae.threads.ThreadTuner). Light images leave the workers' cores idle."""
    from .labelled import KeptItems, collate_kept, kept_batches

    view = dataset if isinstance(dataset, KeptItems) else KeptItems(dataset)
    loader = torch.utils.data.DataLoader(view, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate or collate_kept)
    tuner = None
    if threads is not None and threads.auto and num_workers > 0 and torch.device(device).type == "cpu":
        tuner = ThreadTuner.for_run(threads, 0, skip=TUNE_SKIP, measure=TUNE_WINDOW)
    feats, labels, index = _encode_batches(model, kept_batches(loader, view.ds), len(loader), (pool,), device,
                                           progress, desc, tuner)
    return feats[pool], labels, index


def _encode_batches(model, batches: Iterable, total: int, pools: Sequence[str], device: str | torch.device,
                    progress: bool, desc: str, tuner: ThreadTuner | None = None
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """({pool: (N, D)}, labels, the batches' "index" values (empty when they carry none)). A `tuner`
    sets torch's thread count between batches; the count is restored at the end."""
    device = torch.device(device)
    start_threads = torch.get_num_threads()
    was_training = model.training
    model.eval()
    feats: dict[str, list[torch.Tensor]] = {p: [] for p in pools}
    labels, index = [], []
    autocast = precision_autocast(device, device.type == "cuda")  # CPU features stay fp32
    try:
        for batch in _progress(batches, total, desc, progress):
            if isinstance(batch, dict):
                image, text, pad = (batch.get(k) for k in ("image", "text", "text_padding_mask"))
                label = batch["label"]
                if "index" in batch:
                    index.append(batch["index"])
            else:
                (image, label), text, pad = batch, None, None
            def move(t):
                return t.to(device, non_blocking=True) if t is not None else None
            with autocast:
                image, text, pad = move(image), move(text), move(pad)
                tokens = model.encode(image, text, pad)
                n_image = num_image_tokens(model, image)
                for p in pools:
                    feats[p].append(pool_tokens(tokens, p, n_image, pad).float().cpu())
            labels.append(torch.as_tensor(label, dtype=torch.long))
            if tuner is not None:
                tuner.add_batch(len(labels[-1]), None)
                count = tuner.after_step(len(labels))
                if count is not None:
                    torch.set_num_threads(count)
                    log.info("%s: %s (auto threads)", desc, tuner.note)
                    tuner = None if tuner.done else tuner
    finally:
        model.train(was_training)
        if torch.get_num_threads() != start_threads:  # a tuner changed it
            torch.set_num_threads(start_threads)
    dim = model.config.emb_dim
    return ({p: torch.cat(v) if v else torch.zeros(0, dim) for p, v in feats.items()},
            torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
            torch.cat(index) if index else torch.zeros(0, dtype=torch.long))


# -- files ---------------------------------------------------------------------------------------
def _with_open(path: str, write) -> None:
    with open(path, "wb") as f:
        write(f)


def save_features(path: str | Path, features: torch.Tensor, labels: torch.Tensor,
                  keys: list[str] | None = None, metadata: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    feats = features.detach().float().contiguous().cpu()
    labs = labels.detach().long().contiguous().cpu()
    keys = list(keys) if keys is not None else [str(i) for i in range(len(labs))]
    if len(keys) != len(labs) or feats.shape[0] != len(labs):
        raise ValueError(f"{feats.shape[0]} features, {len(labs)} labels and {len(keys)} keys differ")
    suffix = path.suffix.lower()
    # Each file appears whole or not at all (m3ae.files.atomic_write); numpy writes to open files so
    # it adds no suffix of its own to the temp name.
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        meta = {"keys": json.dumps(keys), "metadata": json.dumps(metadata or {})}
        atomic_write(path, lambda p: save_file({"features": feats, "labels": labs}, p, metadata=meta))
    elif suffix == ".npz":
        arrays: dict[str, Any] = dict(features=feats.numpy(), labels=labs.numpy(), keys=np.array(keys, dtype=str),
                      metadata=np.array(json.dumps(metadata or {})))
        atomic_write(path, lambda p: _with_open(p, lambda f: np.savez(f, **arrays)))
    elif suffix == ".npy":
        atomic_write(path, lambda p: _with_open(p, lambda f: np.save(f, feats.numpy())))
        atomic_write(path.with_suffix(".labels.npy"), lambda p: _with_open(p, lambda f: np.save(f, labs.numpy())))
        atomic_write(path.with_suffix(".keys.json"), lambda p: Path(p).write_text(json.dumps(keys)))
    else:
        raise ValueError(f"feature file must end in .safetensors, .npz or .npy, got {path.name}")
    return path


def load_features(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(features float32, labels int64, keys) from a file written by `save_features`. Anything else
    (object arrays, missing or mis-shaped arrays, text, NaN, labels no class index could be, keys
    that do not match) is a ValueError naming the file; nothing is unpickled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".npz", ".npy"):
        raise ValueError(f"feature file must end in .safetensors, .npz or .npy, got {path.name}")
    if suffix != ".safetensors":  # (safetensors headers are checked by the library itself)
        check_numpy_file(path)
        labels_file = path.with_suffix(".labels.npy")
        if suffix == ".npy" and labels_file.is_file():
            check_numpy_file(labels_file)
    try:
        feats, labs, keys = _read_feature_arrays(path, suffix)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable feature file ({type(err).__name__}: {err})") from err
    except Exception as err:  # safetensors' own error type (SafetensorError) is no ValueError
        if type(err).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{path}: not a readable feature file ({err})") from err
    return _checked_features(path, feats, labs, keys)


def _read_feature_arrays(path: Path, suffix: str) -> tuple[np.ndarray, np.ndarray, Any]:
    if suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="np") as f:
            names = set(f.keys())
            for name in ("features", "labels"):
                if name not in names:
                    raise KeyError(f"no '{name}' tensor (found {sorted(names)})")
            feats, labs = f.get_tensor("features"), f.get_tensor("labels")
            meta = f.metadata() or {}
        keys = json.loads(meta["keys"]) if "keys" in meta else None
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            for name in ("features", "labels"):
                if name not in z.files:
                    raise KeyError(f"no '{name}' array (found {sorted(z.files)})")
            feats, labs = z["features"], z["labels"]
            keys = z["keys"] if "keys" in z.files else None
            if keys is not None and (keys.ndim != 1 or keys.dtype.kind not in "US"):
                raise ValueError(f"'keys' must be a 1-D string array, got {keys.dtype} {keys.shape}")
            keys = None if keys is None else [str(k) for k in keys]
    else:
        feats = np.load(path, allow_pickle=False)
        labs = np.load(path.with_suffix(".labels.npy"), allow_pickle=False)
        keys_file = path.with_suffix(".keys.json")
        keys = json.loads(keys_file.read_text()) if keys_file.is_file() else None
    return feats, labs, keys


def _checked_features(path: Path, feats: np.ndarray, labs: np.ndarray,
                      keys: Any) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: {what}")

    check_feature_arrays(path, feats, labs)
    if labs.dtype.kind not in "iub" and not (labs.dtype.kind == "f" and np.all(np.mod(labs, 1) == 0)):
        raise bad(f"'labels' must be integer class indices, got {labs.dtype}")  # 0.5 would round silently
    if len(labs) and (labs.min() < -1 or labs.max() > MAX_LABEL):  # -1: unlabelled (m3ae embed)
        raise bad(f"labels must be class indices in [-1, {MAX_LABEL}], got {labs.min()} .. {labs.max()}")
    if keys is None:
        keys = [str(i) for i in range(len(labs))]
    elif not isinstance(keys, list) or len(keys) != len(labs) or not all(isinstance(k, str) for k in keys):
        raise bad(f"'keys' must be {len(labs)} strings, one a row, got "
                  f"{len(keys) if isinstance(keys, list) else type(keys).__name__}")
    return (torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)),
            torch.from_numpy(labs.astype(np.int64)), keys)


def is_feature_file(spec: str) -> bool:
    return Path(spec).suffix.lower() in (".safetensors", ".npz", ".npy")
