"""Sources: each turns one SpecItem into a `Source` of raw `Record`s (see base.py).
A source kind is its module plus one row of `BUILDERS` (and its name in spec.KINDS)."""
from __future__ import annotations

from typing import Callable

from ..spec import KINDS, SourceSpec, parse_spec
from .base import IndexedSource, Record, Source
from .folder import ImageFolder
from .hdf5 import HDF5Source, HDF5Table
from .manifest import ManifestSource, TextCorpus
from .wds import ShardWriter, WebDatasetSource, iter_tar, list_shards


def _manifest(item: SourceSpec, role: str) -> Source:
    o = item.options
    if role == "text":
        return TextCorpus(item.path, o.get("column") or o.get("caption"))
    return ManifestSource(item.path, o.get("image"), o.get("caption"), o.get("label"), o.get("root"), role=role)


def _folder(item: SourceSpec, role: str) -> Source:
    o = item.options
    captions = None if "captions" not in o else o["captions"].lower() in ("1", "true", "yes")
    return ImageFolder(item.path, role=role, captions=captions)


def _hdf5(item: SourceSpec, role: str) -> Source:
    o = item.options
    caption = o.get("caption") or o.get("column")
    if "table" in o:  # one compound dataset, fields named or found by name
        if "split" in o:
            raise ValueError(f"{item.path}: #split= is for the authors' layout; name a table with #table= alone")
        return HDF5Table(item.path, o["table"], role, o.get("image"), caption, o.get("label"), o.get("root"))
    if "root" in o:
        raise ValueError(f"{item.path}: #root= is for a table whose image field holds paths (#table=DSET)")
    return HDF5Source(item.path, o.get("split"), role, o.get("image"), caption, o.get("label"))


def _parquet(item: SourceSpec, role: str) -> Source:
    from .parquet import ParquetSource

    o = item.options
    return ParquetSource(item.path, o.get("image"), o.get("caption") or o.get("column"), o.get("label"),
                         o.get("root"), role=role)


def _hf(item: SourceSpec, role: str) -> Source:
    from .hf import open_hf

    o = item.options
    return open_hf(item.path, o.get("split"), o.get("image"), o.get("caption") or o.get("column"), o.get("label"),
                   role=role)


_COLUMNS = {"image", "caption", "label"}

# kind -> (options it takes, builder(item, role))
BUILDERS: dict[str, tuple[set[str], Callable[[SourceSpec, str], Source]]] = {
    "csv": (_COLUMNS | {"root"}, _manifest),
    "tsv": (_COLUMNS | {"root"}, _manifest),
    "jsonl": (_COLUMNS | {"root"}, _manifest),
    "text": ({"column"}, lambda item, role: TextCorpus(item.path, item.options.get("column"))),
    "folder": ({"captions"}, _folder),
    "hdf5": (_COLUMNS | {"split", "table", "root"}, _hdf5),
    "wds": (set(), lambda item, role: WebDatasetSource(item.path, role=role)),
    "parquet": (_COLUMNS | {"root"}, _parquet),
    "hf": (_COLUMNS | {"split"}, _hf),
}
assert set(BUILDERS) == set(KINDS), "every kind of spec.KINDS needs a builder here"


def build_source(item: SourceSpec, default_role: str = "paired") -> Source:
    """Open one source (`default_role` where the item names none). Errors here (missing path, empty
    glob, bad columns) stop a run before it starts."""
    if item.kind not in BUILDERS:
        raise ValueError(f"unknown source kind {item.kind!r}")
    options, builder = BUILDERS[item.kind]
    unknown = set(item.options) - options - ({"column"} if item.role == "text" else set())
    if unknown:
        raise ValueError(f"{item.kind}:{item.path}: unknown option(s) {sorted(unknown)} "
                         f"(known: {sorted(options)})")
    return builder(item, item.role or default_role)


def build_sources(spec: str) -> list[tuple[SourceSpec, Source]]:
    return [(item, build_source(item)) for item in parse_spec(spec)]


__all__ = ["IndexedSource", "Record", "Source", "ImageFolder", "HDF5Source", "HDF5Table", "ManifestSource",
           "TextCorpus", "WebDatasetSource", "ShardWriter", "iter_tar", "list_shards", "build_source", "build_sources",
           "SourceSpec", "parse_spec", "BUILDERS"]
