"""Sources: each turns one SpecItem into a `Source` of raw `Record`s (see base.py)."""
from __future__ import annotations

from ..spec import SourceSpec, parse_spec
from .base import IndexedSource, Record, Source
from .folder import ImageFolder
from .hdf5 import HDF5Source
from .manifest import ManifestSource, TextCorpus
from .wds import ShardWriter, WebDatasetSource, iter_tar, list_shards

_OPTIONS = {"csv": {"image", "caption", "label", "root"}, "tsv": {"image", "caption", "label", "root"},
            "jsonl": {"image", "caption", "label", "root"}, "text": {"column"}, "hdf5": {"split"},
            "folder": {"captions"}, "wds": set()}


def build_source(item: SourceSpec, default_role: str = "paired") -> Source:
    """Open one source (`default_role` where the item names none). Errors here (missing path, empty
    glob, bad columns) stop a run before it starts."""
    unknown = set(item.options) - _OPTIONS[item.kind] - ({"column"} if item.role == "text" else set())
    if unknown:
        raise ValueError(f"{item.kind}:{item.path}: unknown option(s) {sorted(unknown)} "
                         f"(known: {sorted(_OPTIONS[item.kind])})")
    o = item.options
    role = item.role or default_role
    if item.kind in ("csv", "tsv", "jsonl"):
        if role == "text":
            return TextCorpus(item.path, o.get("column") or o.get("caption"))
        return ManifestSource(item.path, o.get("image"), o.get("caption"), o.get("label"), o.get("root"),
                              role=role)
    if item.kind == "text":
        return TextCorpus(item.path, o.get("column"))
    if item.kind == "folder":
        captions = None if "captions" not in o else o["captions"].lower() in ("1", "true", "yes")
        return ImageFolder(item.path, role=role, captions=captions)
    if item.kind == "hdf5":
        return HDF5Source(item.path, o.get("split"), role)
    if item.kind == "wds":
        return WebDatasetSource(item.path, role=role)
    raise ValueError(f"unknown source kind {item.kind!r}")


def build_sources(spec: str) -> list[tuple[SourceSpec, Source]]:
    return [(item, build_source(item)) for item in parse_spec(spec)]


__all__ = ["IndexedSource", "Record", "Source", "ImageFolder", "HDF5Source", "ManifestSource", "TextCorpus",
           "WebDatasetSource", "ShardWriter", "iter_tar", "list_shards", "build_source", "build_sources",
           "SourceSpec", "parse_spec"]
