"""The source interface. A source produces `Record`s: raw, undecoded (image bytes or path,
caption text or bytes, label). Decoding, augmentation and tokenisation happen later, in workers.

Indexed sources (manifests, folders, HDF5, text files) have a length and random access, so a
position in the run maps to a record exactly. Stream sources (tar shards) can only be iterated;
`iterate` gives each (rank, worker) part a disjoint share and reports a resumable position.
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np


# Labels are class indices: the kNN scores and probe heads allocate one column per class, so one
# hostile label (10^12) would be a memory bomb. ImageNet-21k has 21,841 classes.
MAX_LABEL = 2**20 - 1


@dataclass
class Record:
    key: str
    image: Any = None  # encoded bytes, a local path or URL; or a rendered float (3, H, W) tensor (synthetic)
    caption: str | bytes | None = None  # bytes are decoded (and checked) in the worker
    label: int | None = None
    missing: str | None = None  # a BadSample reason found while reading (e.g. a truncated tar)
    bad_label: str | None = None  # why the label could not be read: the record is bad only where labels are used
    meta: dict | None = None  # a WebDataset sample's parsed {key}.json, when it has one


def pick_name(names, wanted: str | None, candidates, where: str, what: str, required: bool = True,
              noun: str = "column") -> str | None:
    """Which column (or field) holds `what`: the one named by the user, else the first of
    `candidates` present (case-insensitive), else None, or an error naming `where` and what is there."""
    names = list(names)
    if wanted:
        if wanted not in names:
            raise ValueError(f"{where}: no {noun} {wanted!r} ({noun}s: {names})")
        return wanted
    lower = {n.lower(): n for n in names}
    for c in candidates:
        if c in lower:
            return lower[c]
    if required:
        raise ValueError(f"{where}: no {what} {noun}; name one with #{what}={noun.upper()} ({noun}s: {names})")
    return None


def shuffled_blocks(records: Iterator[Record], block_size: int, key: tuple[int, ...]) -> Iterator[Record]:
    """`records` in a seeded random order within consecutive blocks of `block_size` (fixed blocks:
    a position in the stream stays exact for resume). The order depends only on `key` and the
    block's number."""
    if block_size <= 1:
        yield from records
        return
    block: list[Record] = []
    number = 0
    for record in records:
        block.append(record)
        if len(block) == block_size:
            yield from _permuted(block, key, number)
            block, number = [], number + 1
    yield from _permuted(block, key, number)


def _permuted(block: list[Record], key: tuple[int, ...], number: int) -> Iterator[Record]:
    for i in np.random.default_rng([*key, number, 0x53485546]).permutation(len(block)):
        yield block[int(i)]


def is_url(path: str) -> bool:
    return "://" in path


class MissingBackend(ValueError):
    """A URL whose fsspec filesystem needs a package that is not installed (s3fs, gcsfs, aiohttp):
    a setup error for the whole run, never one bad sample."""


def url_filesystem(path: str):
    """(fsspec filesystem, path within it) for a URL; MissingBackend naming what to install."""
    from ...optional import require

    require("fsspec", "reading URLs")  # missing: an error naming the extra that brings it
    import fsspec

    try:
        return fsspec.core.url_to_fs(path)
    except ImportError as err:
        protocol = path.split("://", 1)[0]
        raise MissingBackend(f"{path}: reading {protocol}:// needs a package fsspec asks for: {err}") from None


def open_file(path: str, mode: str = "rb"):
    """Local files with open(); anything with a protocol (s3://, gs://, https://) through fsspec."""
    if is_url(path):
        fs, inner = url_filesystem(path)
        return fs.open(inner, mode)
    return open(path, mode)


def path_exists(path: str) -> bool:
    """os.path.exists for local paths; the filesystem's own check (fsspec) for URLs."""
    if is_url(path):
        fs, inner = url_filesystem(path)
        return fs.exists(inner)
    return os.path.exists(path)


def require_path(path: str, what: str = "path") -> str:
    if not is_url(path) and not os.path.exists(path):
        raise FileNotFoundError(f"{what} does not exist: {path}")
    return path


class Source(abc.ABC):
    name: str = ""
    kind: str = ""
    exact: bool = True  # indexed sources resume exactly
    provides: frozenset = frozenset()  # subset of {"image", "text", "label"}

    def describe(self) -> str:
        return f"{self.kind}:{self.name}"

    @abc.abstractmethod
    def iterate(self, part: int, parts: int, seed: int, state: Any = None, epochs: int | None = None
                ) -> Iterator[tuple[Any, Record]]:
        """Yield (position after this record, record) for share `part` of `parts`, endlessly
        (or for `epochs` passes). `state` is a position yielded earlier: resume after it."""


class IndexedSource(Source):
    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def record(self, index: int) -> Record: ...

    def labels(self) -> list[int | None]:
        """Every record's label, in order (evaluation needs them up front). Sources override this
        (and `keys`) where they can be read without the images."""
        return [self.record(i).label for i in range(len(self))]

    def keys(self) -> list[str]:
        """Every record's key, in order, likewise."""
        return [self.record(i).key for i in range(len(self))]

    def permutation(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(self))

    def iterate(self, part, parts, seed, state=None, epochs=None):
        # Share `part` takes every `parts`-th position of the endless sequence of per-epoch
        # permutations; the position is a count, so resume is exact.
        n = len(self)
        count = int(state or 0)
        perm_epoch, perm = -1, np.empty(0, dtype=np.int64)  # replaced before first use (epoch >= 0)
        while True:
            pos = count * parts + part
            epoch, within = divmod(pos, n)
            if epochs is not None and epoch >= epochs:
                return
            if epoch != perm_epoch:
                perm_epoch, perm = epoch, self.permutation(seed, epoch)
            count += 1
            yield count, self.safe_record(int(perm[within]))

    def safe_record(self, index: int) -> Record:
        from ..bad import BadSample

        try:
            return self.record(index)
        except BadSample as err:
            return Record(key=f"{self.name}#{index}", missing=err.reason)
