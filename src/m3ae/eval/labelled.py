"""Labelled image sets for evaluation: compact readers and our minimal transforms.

STOPGAP: the lead will switch these readers and transforms to the data pipeline's (m3ae.data
sources + transforms) once that branch is merged. Everything evaluation reads goes through
`labelled_dataset`, so that swap touches this module only.

Specs (a train and a validation spec are given separately; `split` picks the part of formats that
hold both):
  * CIFAR-10/100 python batches: `cifar:DIR` or a DIR holding data_batch_* / test_batch (CIFAR-10)
    or train / test (CIFAR-100), or one batch file. split train -> training batches, else test.
    Read with a restricted unpickler that can rebuild numpy arrays and nothing else.
  * class folders: DIR/<class>/<image>; classes numbered in sorted order.
  * WebDataset shards: *.tar / *.tar.gz / *.tgz paths, brace-expanded ({0..4}, {a,b}) or globbed,
    with {key}.jpg|jpeg|png|webp + {key}.cls members.
  * the authors' HDF5 layout: FILE.h5|.hdf5 with {split}_jpg (encoded images) + {split}_labels.
  * a CSV manifest (`image,label[,caption]`) with paths relative to the CSV.
Undecodable images are skipped, counted and logged; a missing path is an error.
"""
from __future__ import annotations

import csv
import glob
import io
import math
import os
import pickle
import re
import sys
import tarfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..data.normalization import normalize

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_CIFAR_TRAIN = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")


# -- transforms --------------------------------------------------------------------------------
class TrainTransform:
    """RandomResizedCrop (area `scale`, aspect 3/4-4/3, bicubic) + horizontal flip, then normalise."""

    def __init__(self, size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), stats="cc12m"):
        self.size, self.scale, self.ratio, self.stats = size, tuple(scale), tuple(ratio), stats

    def _box(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * float(torch.empty(1).uniform_(*self.scale))
            aspect = math.exp(float(torch.empty(1).uniform_(*log_ratio)))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                x = int(torch.randint(0, width - w + 1, ()))
                y = int(torch.randint(0, height - h + 1, ()))
                return x, y, w, h
        side = min(width, height)  # fallback: the central square
        return (width - side) // 2, (height - side) // 2, side, side

    def __call__(self, image: Image.Image) -> torch.Tensor:
        x, y, w, h = self._box(*image.size)
        image = image.resize((self.size, self.size), Image.BICUBIC, box=(x, y, x + w, y + h))
        if bool(torch.rand(()) < 0.5):
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return normalize(to_tensor(image), self.stats)


class EvalTransform:
    """Resize the shorter side to size / crop_pct (bicubic), centre-crop size x size, normalise."""

    def __init__(self, size: int, crop_pct: float = 1.0, stats="cc12m"):
        self.size, self.crop_pct, self.stats = size, crop_pct, stats

    def __call__(self, image: Image.Image) -> torch.Tensor:
        short = int(round(self.size / self.crop_pct))
        w, h = image.size
        scale = short / min(w, h)
        nw, nh = max(short, round(w * scale)), max(short, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        return normalize(to_tensor(image), self.stats)


def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


# -- the dataset -------------------------------------------------------------------------------
class LabelledImages(torch.utils.data.Dataset):
    """Items are (normalised image (3, S, S), label). `keys[i]` names item i.

    `load(i)` returns a PIL image or raw encoded bytes. Undecodable items are found lazily; rather
    than failing the batch, they are replaced by the next decodable item and counted in `skipped`.
    """

    def __init__(self, load: Callable[[int], object], labels: Sequence[int], keys: Sequence[str],
                 transform: Callable, description: str, classes: Sequence[str] | None = None):
        self._load, self.labels, self.keys = load, list(map(int, labels)), list(map(str, keys))
        self.transform, self.description = transform, description
        self.classes = list(classes) if classes is not None else None
        self._bad: set[int] = set()  # per process (DataLoader workers each keep their own)

    @property
    def skipped(self) -> int:
        return len(self._bad)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else (max(self.labels) + 1 if self.labels else 0)

    def image(self, index: int) -> Image.Image:
        raw = self._load(index)
        if isinstance(raw, Image.Image):
            return raw
        with Image.open(io.BytesIO(bytes(raw))) as im:
            return im.convert("RGB")

    def __getitem__(self, index: int):
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            if i in self._bad:
                continue
            try:
                image = self.image(i)
            except Exception as err:  # noqa: BLE001 - any decoder failure: skip, count, log
                self._bad.add(i)
                print(f"{self.description}: skipping undecodable image {self.keys[i]!r} ({err}); "
                      f"{self.skipped} skipped so far in this process", file=sys.stderr)
                continue
            return self.transform(image), self.labels[i]
        raise RuntimeError(f"{self.description}: no decodable image at all")

    def subset(self, limit: int | None, seed: int = 0) -> "LabelledImages":
        """A fixed random subset of `limit` items (shards are often class-sorted)."""
        if not limit or limit >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        picked = sorted(torch.randperm(len(self), generator=g)[:limit].tolist())
        load = self._load
        out = LabelledImages(lambda i: load(picked[i]), [self.labels[i] for i in picked],
                             [self.keys[i] for i in picked], self.transform,
                             f"{self.description} (subset {limit})", self.classes)
        return out


def labelled_dataset(spec: str, split: str, image_size: int, train_transform: bool = False,
                     stats="cc12m", *, crop_scale=(0.2, 1.0), crop_pct: float = 1.0,
                     limit: int | None = None, seed: int = 0) -> LabelledImages:
    """The one entry point: a spec (see the module doc) -> Dataset of (normalised image, label)."""
    transform = (TrainTransform(image_size, crop_scale, stats=stats) if train_transform
                 else EvalTransform(image_size, crop_pct, stats=stats))
    return _read(spec, split, transform).subset(limit, seed)


def _read(spec: str, split: str, transform) -> LabelledImages:
    train = split == "train"
    if spec.startswith("cifar:"):
        return read_cifar(spec[len("cifar:"):], train, transform)
    if re.search(r"\.(tar|tar\.gz|tgz)(\}|$)", spec) or (("{" in spec or "*" in spec) and ".tar" in spec):
        return read_shards(spec, transform)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"labelled data not found: {spec}")
    if path.suffix in (".h5", ".hdf5"):
        return read_hdf5(path, split, transform)
    if path.suffix == ".csv":
        return read_manifest(path, transform)
    if path.is_dir() and (any((path / n).is_file() for n in (*_CIFAR_TRAIN, "test_batch", "train", "test"))):
        return read_cifar(str(path), train, transform)
    if path.is_file() and path.name.startswith(("data_batch", "test_batch")):
        return read_cifar(str(path), train, transform)
    if path.is_dir():
        return read_class_folders(path, transform)
    raise ValueError(f"cannot tell the format of {spec!r}; see m3ae.eval.labelled for the specs")


# -- CIFAR python batches (restricted unpickling) ----------------------------------------------
class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays (and plain containers); refuses every other global, so a crafted
    pickle cannot call arbitrary functions."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            import numpy  # noqa: F401 - resolve from numpy itself
            return getattr(sys.modules["numpy"] if module == "numpy" else _multiarray(), name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch: only numpy "
                                     "arrays are allowed")


def _multiarray():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


def load_cifar_batch(path: str | os.PathLike) -> dict:
    with open(path, "rb") as f:
        return _ArrayOnlyUnpickler(f, encoding="bytes").load()


def read_cifar(spec: str, train: bool, transform) -> LabelledImages:
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"CIFAR data not found: {spec}")
    if path.is_file():
        files = [path]
    elif (path / "train").is_file() or (path / "test").is_file():  # CIFAR-100
        files = [path / ("train" if train else "test")]
    else:
        files = [path / n for n in _CIFAR_TRAIN] if train else [path / "test_batch"]
    arrays, labels = [], []
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"CIFAR batch not found: {file}")
        batch = load_cifar_batch(file)
        if not isinstance(batch, dict) or b"data" not in batch:
            raise ValueError(f"{file} is not a CIFAR python batch (no b'data')")
        label_key = next((k for k in (b"labels", b"fine_labels") if k in batch), None)
        if label_key is None:
            raise ValueError(f"{file} has no b'labels' / b'fine_labels'")
        arrays.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(int(v) for v in batch[label_key])
    data = np.concatenate(arrays).transpose(0, 2, 3, 1)  # N, H, W, C
    if len(data) != len(labels):
        raise ValueError(f"{spec}: {len(data)} images but {len(labels)} labels")
    return LabelledImages(lambda i: Image.fromarray(data[i]), labels, [f"{i:06d}" for i in range(len(labels))],
                          transform, f"CIFAR {spec} ({'train' if train else 'test'})")


# -- class folders -----------------------------------------------------------------------------
def read_class_folders(root: Path, transform) -> LabelledImages:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders")
    files, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).rglob("*")):
            if file.suffix.lower() in IMAGE_EXTS and file.is_file():
                files.append(file)
                labels.append(label)
    if not files:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTS)}) under its class folders")
    keys = [str(f.relative_to(root)) for f in files]
    return LabelledImages(lambda i: files[i].read_bytes(), labels, keys, transform,
                          f"class folders {root}", classes)


# -- WebDataset shards -------------------------------------------------------------------------
def expand_braces(pattern: str) -> list[str]:
    """`a-{000..003}.tar` and `{x,y}` expansion (zero padding kept), nested left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.group(1), r.group(2)
        width = len(lo) if lo.startswith("0") else 0
        options = [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [p for o in options for p in expand_braces(head + o + tail)]


def shard_paths(spec: str) -> list[str]:
    paths = []
    for part in spec.split("::"):
        for pattern in expand_braces(part):
            if any(c in pattern for c in "*?["):
                found = sorted(glob.glob(pattern))
                if not found:
                    raise FileNotFoundError(f"no shards match {pattern}")
                paths.extend(found)
            elif not os.path.isfile(pattern):
                raise FileNotFoundError(f"shard not found: {pattern}")
            else:
                paths.append(pattern)
    return paths


def read_shards(spec: str, transform) -> LabelledImages:
    """Reads every {key}.<image ext> + {key}.cls pair into memory (compressed bytes)."""
    images, labels, keys, unlabelled = [], [], [], 0
    for path in shard_paths(spec):
        found: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                key, dot, ext = base.partition(".")
                ext = ext.lower()
                if ext in ("cls", *(e[1:] for e in IMAGE_EXTS)):
                    entry = found.setdefault(os.path.join(os.path.dirname(member.name), key), {})
                    entry[ext] = tar.extractfile(member).read()
        for key, entry in found.items():
            image = next((entry[e[1:]] for e in IMAGE_EXTS if e[1:] in entry), None)
            if image is None or "cls" not in entry:
                unlabelled += 1
                continue
            images.append(image)
            labels.append(int(entry["cls"].decode().strip()))
            keys.append(key)
    if unlabelled:
        print(f"{spec}: ignored {unlabelled} samples without both an image and a .cls", file=sys.stderr)
    if not images:
        raise ValueError(f"{spec}: no samples with an image and a .cls label")
    return LabelledImages(images.__getitem__, labels, keys, transform, f"shards {spec}")


# -- the authors' HDF5 layout ------------------------------------------------------------------
def read_hdf5(path: Path, split: str, transform) -> LabelledImages:
    import h5py

    name = "train" if split == "train" else "val"
    with h5py.File(path, "r") as f:
        for key in (f"{name}_jpg", f"{name}_labels"):
            if key not in f:
                raise ValueError(f"{path} has no {key!r} (has {sorted(f.keys())})")
        labels = np.asarray(f[f"{name}_labels"][:]).astype(np.int64).reshape(-1).tolist()
    file: list = []  # opened lazily, once per process (h5py handles do not survive fork)

    def load(i: int):
        if not file or file[0][0] != os.getpid():
            file[:] = [(os.getpid(), h5py.File(path, "r"))]
        item = file[0][1][f"{name}_jpg"][i]
        return item.tobytes() if isinstance(item, np.ndarray) else bytes(item)

    return LabelledImages(load, labels, [f"{name}/{i}" for i in range(len(labels))], transform,
                          f"HDF5 {path} ({name})")


# -- CSV manifest ------------------------------------------------------------------------------
def read_manifest(path: Path, transform) -> LabelledImages:
    """`image,label[,caption]` rows; image paths relative to the CSV. Labels: ints or class names."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "image" not in rows[0]:
        raise ValueError(f"{path} needs an 'image' column")
    raw = [r.get("label", "") or "" for r in rows]
    if all(v.lstrip("-").isdigit() for v in raw):
        labels, classes = [int(v) for v in raw], None
    else:
        classes = sorted(set(raw))
        labels = [classes.index(v) for v in raw]
    files = [path.parent / r["image"] for r in rows]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} images missing, e.g. {missing[:3]}")
    ds = LabelledImages(lambda i: files[i].read_bytes(), labels, [r["image"] for r in rows], transform,
                        f"manifest {path}", classes)
    ds.captions = [r.get("caption", "") or "" for r in rows]
    return ds

