"""Labelled image sets for evaluation, read with the data pipeline's sources and transforms.

Specs (a train and a validation spec are given separately; `split` picks the part of formats that
hold both):
  * CIFAR-10/100 python batches: `cifar:DIR` or a DIR holding data_batch_* / test_batch (CIFAR-10)
    or train / test (CIFAR-100), or one batch file. split train -> training batches, else test.
    Read with the project's safe unpickler; anything but arrays and plain containers is refused.
  * anything m3ae.data's SPEC syntax names (one item; see m3ae.data.spec) whose records carry labels:
    class folders DIR/<class>/<image>; WebDataset shards (brace-expanded or globbed) with
    {key}.<image> + {key}.cls; the authors' HDF5 layout {split}_jpg + {split}_labels (split train
    or val, unless the item sets #split=); CSV/TSV/JSONL manifests with a label column (integers or
    class names, numbered in sorted order) and an optional caption column; HDF5 tables
    (#table=DSET, with an integer label field).
Class names (class folders, manifests) are numbered in each set; the validation set is then
renumbered by the training set's names (`LabelledImages.number_like`), so a class it lacks shifts
nothing. A validation class the training set lacks is an error naming it (no head trained on that
set can predict it; leaving its images out would change what the metric measures unseen), as are
class names on one side and bare integers on the other.
Parquet files and Hugging Face datasets on disk (parquet:/hf:) with a label column are read whole
into memory (encoded bytes). `unlabelled=True` (m3ae embed) also takes sets without labels: every
label is then -1.
Images are decoded and transformed by m3ae.data.images (TrainTransform / EvalTransform). Bad images
are skipped, counted (BadCounter) and logged; a missing path is an error.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..data.bad import BadCounter, BadSample, DataQualityError
from ..data.images import EvalTransform, TrainTransform
from ..data.sources import IndexedSource, ManifestSource, Record, WebDatasetSource, build_source
from ..data.sources.base import MAX_LABEL
from ..data.sources.wds import expand_braces, iter_tar
from ..data.spec import parse_item
from ..interop.safe_pickle import UnsafePickleError, find_opaque, safe_load

__all__ = ["LabelledImages", "KeptItems", "CaptionedItems", "collate_kept", "kept_batches", "kept_loader",
           "labelled_dataset", "load_cifar_batch", "read_cifar", "EvalTransform",
           "TrainTransform", "expand_braces"]

log = logging.getLogger(__name__)

_CIFAR_TRAIN = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")


# -- the dataset -------------------------------------------------------------------------------
class LabelledImages(torch.utils.data.Dataset):
    """Items are (normalised image (3, S, S), label). `keys[i]` names item i.

    `load(i)` returns what the transform decodes (encoded bytes, a local path or a PIL image) or
    raises BadSample. Bad items are found lazily. The evaluations read through `KeptItems` /
    `kept_loader`, which leave them out (keys, labels and captions of the rest stay aligned) and
    count them in `counter` in the main process. Indexing the set itself (`ds[i]`) replaces a bad
    item by the next usable one instead, counted per process (DataLoader workers each keep one).
    Manifest sets also carry `captions` (one per item; the attribute is absent elsewhere).
    """

    captions: list  # as the manifest holds them (str, or undecoded bytes)

    def __init__(self, load: Callable[[int], object], labels: Sequence[int], keys: Sequence[str],
                 transform: Callable, description: str, classes: Sequence[str] | None = None):
        self._load, self.labels, self.keys = load, list(map(int, labels)), list(map(str, keys))
        for label, key in zip(self.labels, self.keys):
            if not -1 <= label <= MAX_LABEL:  # -1: unlabelled (embed); 10^12 classes: a memory bomb
                raise ValueError(f"{description}: item {key} has label {label if abs(label) < 10**20 else '(huge)'}"
                                 f", not a class index 0..{MAX_LABEL}")
        self.transform, self.description = transform, description
        self.classes = list(classes) if classes is not None else None
        self._bad: set[int] = set()
        self.counter = BadCounter()

    @property
    def skipped(self) -> int:
        return self.counter.total_bad

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else (max(self.labels) + 1 if self.labels else 0)

    def __getitem__(self, index: int):
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            if i in self._bad:
                continue
            try:
                image = self.transform(self._load(i), key=self.keys[i])
            except BadSample as err:
                self._bad.add(i)
                self.skip(self.keys[i], err)
                self.counter.check()  # past max_bad_fraction: DataQualityError ends the command
                continue
            self.counter.good += 1
            return image, self.labels[i]
        raise RuntimeError(f"{self.description}: no usable image at all ({dict(self.counter.bad)})")

    def skip(self, key: str, err: BadSample) -> None:
        self.counter.record_bad(err.reason, key, err.detail, log_it=False)  # logged below, with the source
        log.warning("%s: skipping %r (%s); %d skipped so far in this process", self.description, key, err,
                    self.skipped)

    def number_like(self, train: "LabelledImages") -> None:
        """Renumber this (validation) set's labels by the training set's class names, in place.
        Each set numbers its own names in sorted order, so without this a class missing here would
        shift every label after it. Unknown names, or names against bare integers: ValueError."""
        if train.classes is None and self.classes is None:  # integer labels on both sides: as given
            return
        if train.classes is None or self.classes is None:
            named, plain = (train, self) if self.classes is None else (self, train)
            raise ValueError(f"{named.description} names its classes but {plain.description} has integer "
                             f"labels; give class names (or integers) on both sides")
        index = {name: i for i, name in enumerate(train.classes)}
        unknown = sorted(set(self.classes) - set(index))
        if unknown:
            raise ValueError(f"{self.description}: class(es) {unknown} are not in the training set "
                             f"{train.description} (its classes: {train.classes})")
        mine = self.classes
        self.labels = [label if label < 0 else index[mine[label]] for label in self.labels]
        self.classes = list(train.classes)

    def subset(self, limit: int | None, seed: int = 0) -> "LabelledImages":
        """A fixed random subset of `limit` items (shards are often class-sorted); None: all."""
        from .settings import check_limit

        check_limit(limit)
        if limit is None or limit >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        picked = sorted(torch.randperm(len(self), generator=g)[:limit].tolist())
        load = self._load
        out = LabelledImages(lambda i: load(picked[i]), [self.labels[i] for i in picked],
                             [self.keys[i] for i in picked], self.transform,
                             f"{self.description} (subset {limit})", self.classes)
        if hasattr(self, "captions"):
            out.captions = [self.captions[i] for i in picked]
        return out


class KeptItems(torch.utils.data.Dataset):
    """The evaluation view of a LabelledImages: item i is {"index": i, "image", "label"}, or
    {"bad": (i, key, reason, detail)} when it cannot be used. Nothing is counted here (maybe in a
    loader worker): `kept_batches` counts, in the main process. Batch with `collate_kept`."""

    def __init__(self, ds: LabelledImages):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        ds = self.ds
        try:
            image = ds.transform(ds._load(i), key=ds.keys[i])
        except BadSample as err:
            return {"bad": (i, ds.keys[i], err.reason, err.detail)}
        return {"index": i, "image": image, "label": ds.labels[i]}


class CaptionedItems(KeptItems):
    """KeptItems of a manifest set whose items carry their caption's token ids (the image too for
    "joint" inputs; `m3ae embed`). A row whose image is unusable is left out for text inputs too:
    the image, text and joint exports of one manifest hold the same rows."""

    def __init__(self, ds: LabelledImages, tokenizer, text_length: int, inputs: str):
        super().__init__(ds)
        self.tokenizer, self.text_length, self.inputs = tokenizer, text_length, inputs

    def __getitem__(self, i: int) -> dict:
        from ..data.pipeline import decode_caption

        item = super().__getitem__(i)
        if "bad" not in item:  # this row's own caption, never a replacement's
            try:  # pretraining's rule: a caption that is not UTF-8 text, or is empty, is a bad sample
                caption = decode_caption(self.ds.captions[i])
                if not caption:
                    raise BadSample("empty", "empty caption")
            except BadSample as err:
                return {"bad": (i, self.ds.keys[i], err.reason, err.detail)}
            item["text"] = self.tokenizer.encode(caption, add_special_tokens=False).ids[: self.text_length]
            if self.inputs != "joint":
                del item["image"]
        return item


def collate_kept(items: list[dict]) -> dict:
    """The usable items stacked ("index", "label", "image" when they carry one), the others listed
    under "bad" for `kept_batches`."""
    good = [it for it in items if "bad" not in it]
    out = {"index": torch.tensor([it["index"] for it in good], dtype=torch.long),
           "label": torch.tensor([it["label"] for it in good], dtype=torch.long),
           "bad": [it["bad"] for it in items if "bad" in it]}
    if good and "image" in good[0]:
        out["image"] = torch.stack([it["image"] for it in good])
    return out


def kept_batches(loader, ds: LabelledImages) -> Iterator[dict]:
    """The batches of a loader over KeptItems(ds) with usable items, bad ones left out. Each bad
    item is counted (once, however many epochs read it) and logged in `ds.counter` here, in the
    main process, where `check` stops the command past max_bad_fraction with a one-line
    DataQualityError - as the pretraining loader does; raised in a worker, it would come wrapped
    in the worker's traceback. A set without one usable item is a DataQualityError too."""
    kept = 0
    for batch in loader:
        for i, key, reason, detail in batch.pop("bad"):
            if i not in ds._bad:
                ds._bad.add(i)
                ds.skip(key, BadSample(reason, detail))
        ds.counter.good += len(batch["index"])
        ds.counter.check()
        if len(batch["index"]):
            kept += len(batch["index"])
            yield batch
    if not kept and len(ds):
        raise DataQualityError(f"{ds.description}: no usable image at all ({dict(ds.counter.bad)}; "
                               f"example keys: {ds.counter.examples})")


class KeptLoader:
    """(images, labels) batches of a LabelledImages' usable items (see `kept_batches`), for the
    training and validation loops of the trained heads; len() is the DataLoader's."""

    def __init__(self, ds: LabelledImages, **loader_kwargs):
        self.ds = ds
        self.loader = torch.utils.data.DataLoader(KeptItems(ds), collate_fn=collate_kept, **loader_kwargs)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self) -> LabelledImages:  # as DataLoader names it
        return self.ds

    def __iter__(self):
        for batch in kept_batches(self.loader, self.ds):
            yield batch["image"], batch["label"]


def kept_loader(ds, **loader_kwargs):
    """A KeptLoader for a LabelledImages, a plain DataLoader for any other dataset."""
    if isinstance(ds, LabelledImages):
        return KeptLoader(ds, **loader_kwargs)
    return torch.utils.data.DataLoader(ds, **loader_kwargs)


def labelled_dataset(spec: str, split: str, image_size: int, train_transform: bool = False,
                     stats="cc12m", *, crop_scale=(0.2, 1.0), crop_pct: float = 1.0,
                     limit: int | None = None, seed: int = 0, square: str = "crop",
                     pad_value: int = 255, unlabelled: bool = False) -> LabelledImages:
    """The one entry point: a spec (see the module doc) -> Dataset of (normalised image, label).
    Training: RandomResizedCrop of area `crop_scale` + flip; else the shorter side resized to
    image_size / crop_pct and centre-cropped. `square="pad"`: photos padded to a square first."""
    transform = (TrainTransform(image_size, tuple(crop_scale), stats=stats, square=square, pad_value=pad_value)
                 if train_transform else
                 EvalTransform(image_size, int(round(image_size / crop_pct)), stats=stats, square=square,
                               pad_value=pad_value))
    return _read(spec, split, transform, unlabelled).subset(limit, seed)


def _is_cifar(path: Path) -> bool:
    if path.is_dir():
        return any((path / n).is_file() for n in (*_CIFAR_TRAIN, "test_batch", "train", "test"))
    return path.is_file() and path.name.startswith(("data_batch", "test_batch"))


def _read(spec: str, split: str, transform, unlabelled: bool = False) -> LabelledImages:
    train = split == "train"
    if spec.startswith("cifar:"):
        return read_cifar(spec[len("cifar:"):], train, transform)
    if _is_cifar(Path(spec)):
        return read_cifar(spec, train, transform)
    try:
        item = parse_item(spec)  # kind from the path; missing paths and empty globs raise here
        role = "labelled"
        if item.kind == "hdf5" and "table" in item.options:
            # A table is one set (no train/val split to pick), read for its images and labels: the
            # "image" role asks for no caption field (evaluation reads captions from manifests only).
            role = "image"
        elif item.kind == "hdf5":  # the authors' layout: {split}_jpg / {split}_labels
            item.options.setdefault("split", "train" if train else "val")
        source = build_source(item, default_role=role)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"labelled data not found: {err}") from None
    if "label" not in source.provides and not unlabelled:
        raise ValueError(f"{spec}: {item.kind} data without labels (class folders, .cls members, "
                         f"{{split}}_labels or a label column are needed)")
    if isinstance(source, WebDatasetSource):
        return _from_shards(source, transform, unlabelled)
    if not isinstance(source, IndexedSource):
        return _from_stream(source, transform, unlabelled)
    return _from_indexed(source, transform, unlabelled)


def _image_of(record: Record):
    if record.missing:
        raise BadSample(record.missing, record.key)
    if record.image is None:
        raise BadSample("missing_image", record.key)
    return record.image


def _from_indexed(source: IndexedSource, transform, unlabelled: bool = False) -> LabelledImages:
    labels, keys = source.labels(), source.keys()
    if unlabelled:
        labels = [-1 if label is None else label for label in labels]
    keep = [i for i, label in enumerate(labels) if label is not None]
    if not keep:
        raise ValueError(f"{source.describe()}: no labelled records")
    ds = LabelledImages(lambda i: _image_of(source.record(keep[i])), [lb for lb in labels if lb is not None],
                        [keys[i] for i in keep], transform, source.describe(), getattr(source, "classes", None))
    if isinstance(source, ManifestSource):  # text / joint inputs (m3ae embed) read the captions
        ds.captions = [source.items[i][1] for i in keep]  # as read: CaptionedItems checks each
    return ds


def _from_shards(source: WebDatasetSource, transform, keep_unlabelled: bool = False) -> LabelledImages:
    """Every record with an image and a .cls label, held in memory (compressed bytes)."""
    records: list[Record] = []
    labels: list[int] = []
    bad: list[tuple[str, str]] = []  # (key, reason)
    unlabelled = 0
    for shard in source.shards:
        for record in iter_tar(shard):
            if record.bad_label and not keep_unlabelled:
                bad.append((record.key, "bad_text"))  # an unreadable .cls: counted, not taken as unlabelled
                continue
            if keep_unlabelled and record.label is None:
                record.label = -1
            if record.missing:
                bad.append((record.key, record.missing))
            elif record.label is None:
                unlabelled += 1
            else:
                records.append(record)
                labels.append(record.label)
    if unlabelled:
        log.warning("%s: ignored %d samples without a .cls label", source.name, unlabelled)
    if not records:
        raise ValueError(f"{source.name}: no samples with a .cls label")
    ds = LabelledImages(lambda i: _image_of(records[i]), labels, [r.key for r in records], transform,
                        source.describe())
    for key, reason in bad:  # truncated shards, unreadable .cls: counted now, never indexed
        ds.skip(key, BadSample(reason))
    return ds


def _from_stream(source, transform, unlabelled: bool = False) -> LabelledImages:
    """Streamed tables (parquet:, hf:): one pass, records held in memory (encoded bytes)."""
    records, bad = [], []
    for _, record in source.iterate(0, 1, seed=0, epochs=1):
        if unlabelled and record.label is None:
            record.label = -1
        if record.missing:
            bad.append(record)
        elif record.label is not None:
            records.append(record)
    if not records:
        raise ValueError(f"{source.describe()}: no labelled records")
    ds = LabelledImages(lambda i: _image_of(records[i]), [r.label for r in records],
                        [r.key for r in records], transform, source.describe())
    for record in bad:
        ds.skip(record.key, BadSample(record.missing))
    return ds


# -- CIFAR python batches (the data pipeline has no reader for them) ---------------------------
def load_cifar_batch(path: str | os.PathLike) -> dict:
    """One batch, unpickled without running anything; refuses any global but numpy's array builders."""
    batch = safe_load(path, encoding="bytes")
    for opaque in find_opaque(batch, None):
        raise UnsafePickleError(f"refusing to load {opaque.name} from a CIFAR batch: only numpy arrays "
                                "and plain containers are allowed")
    return batch


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
    arrays: list[np.ndarray] = []
    labels: list[int] = []
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
