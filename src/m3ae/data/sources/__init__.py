"""Sources: each turns one SpecItem into a `Source` of raw `Record`s (see base.py).
A source kind is its module, with a `KINDS` tuple, named in `registry.MODULES`."""
from __future__ import annotations

from ..spec import ESCAPE_HINT, SourceSpec, parse_spec
from .base import IndexedSource, Record, Source
from .folder import ImageFolder
from .hdf5 import HDF5Source, HDF5Table
from .manifest import ManifestSource, TextCorpus
from .registry import RunContext, SourceKind, find_kind, source_kinds
from .wds import ShardWriter, WebDatasetSource, iter_tar, list_shards


def build_source(item: SourceSpec, default_role: str = "paired", context: RunContext | None = None) -> Source:
    """Open one source (`default_role` where the item names none). Errors here (missing path, empty
    glob, bad columns) stop a run before it starts. `context`: the run's seed and image size, for
    sources that make their data."""
    kind = find_kind(item.kind)
    if kind is None:
        raise ValueError(f"unknown source kind {item.kind!r}")
    unknown = set(item.options) - kind.options - ({"column"} if item.role == "text" else set())
    if unknown:
        raise ValueError(f"{item.kind}:{item.path}: unknown option(s) {sorted(unknown)} "
                         f"(known: {sorted(kind.options)})"
                         # a bare "#VALUE" is often the rest of a path cut at its own "#"
                         + (f"; {ESCAPE_HINT}" if "column" in unknown else ""))
    try:
        return kind.build(item, item.role or default_role, context or RunContext())
    except FileNotFoundError as err:
        if item.cut and ESCAPE_HINT not in str(err):
            raise FileNotFoundError(f"{err}; {ESCAPE_HINT}") from None
        raise


def build_sources(spec: str, context: RunContext | None = None, default_role: str = "paired"
                  ) -> list[tuple[SourceSpec, Source]]:
    return [(item, build_source(item, default_role, context)) for item in parse_spec(spec)]


def label_space_conflicts(sources: list[Source], few: int = 4) -> list[str]:
    """Why labels of these sources, taken as one label space (a mixture's batches, the .cls of
    `data shard`), would not mean the same classes: one line per source that differs from the
    first labelled one, naming both and a few differing class names. Class names are numbered in
    sorted order within each source (class folders, manifests), so two sources agree only with the
    same names; integer labels are not checked against each other (nothing tells what they mean)."""
    def names(values: list[str]) -> str:
        shown = ", ".join(repr(v) for v in values[:few])
        return shown + (f" and {len(values) - few} more" if len(values) > few else "") if values else "none"

    labelled = [s for s in sources if "label" in s.provides]
    if len(labelled) < 2:
        return []
    lines: list[str] = []
    first = labelled[0]
    mine = getattr(first, "classes", None) or None
    for other in labelled[1:]:
        theirs = getattr(other, "classes", None) or None
        if mine is None and theirs is None or mine == theirs:
            continue
        if mine is None or theirs is None:
            named, classes, plain = (first, mine, other) if mine else (other, theirs, first)
            lines.append(f"{named.describe()} names its classes ({names(list(classes or []))}) but {plain.describe()} "
                         f"has integer labels: label i of one is not class i of the other")
        else:
            lines.append(f"{first.describe()} and {other.describe()} name different classes (only in the first: "
                         f"{names(sorted(set(mine) - set(theirs)))}; only in the second: "
                         f"{names(sorted(set(theirs) - set(mine)))}): a label number means another class in each")
    return lines


def spec_tokenizer(spec: str):
    """The vocabulary a spec's sources bring along (the synthetic shapes' word list) when every item's
    kind has one, else None (also for a spec that cannot be parsed here)."""
    try:
        found = [find_kind(item.kind) for item in parse_spec(spec)]
    except (OSError, ValueError):
        return None
    kinds = [k for k in found if k is not None]
    if kinds and len(kinds) == len(found) and len({k.tokenizer for k in kinds}) == 1 \
            and kinds[0].tokenizer is not None:
        return kinds[0].tokenizer()
    return None


__all__ = ["IndexedSource", "Record", "Source", "ImageFolder", "HDF5Source", "HDF5Table", "ManifestSource",
           "TextCorpus", "WebDatasetSource", "ShardWriter", "iter_tar", "list_shards", "build_source", "build_sources",
           "SourceSpec", "parse_spec", "RunContext", "SourceKind", "source_kinds", "spec_tokenizer",
           "label_space_conflicts"]
