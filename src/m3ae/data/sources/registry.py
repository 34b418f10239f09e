"""Source kinds. Each source module declares its kinds in a module-level `KINDS` tuple; `MODULES`
names the modules. A new kind is one file plus its name here: spec parsing (kind names, aliases,
guessing the kind from a path) and `build_source` read everything else from the `SourceKind`.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ..spec import SourceSpec
    from .base import Source

# Directories are offered to kinds in this order; a kind claims the paths its module knows.
MODULES = (".synthetic", ".wds", ".manifest", ".hdf5", ".hf", ".parquet", ".folder")  # "." : of this package


@dataclass(frozen=True)
class RunContext:
    """What a run tells its sources. Sources that read files ignore it; a source that makes its
    data (the synthetic shapes) takes its defaults from it."""

    seed: int = 0
    image_size: int = 64
    demo_samples: int = 8192


@dataclass(frozen=True)
class SourceKind:
    name: str
    build: Callable[["SourceSpec", str, RunContext], "Source"]  # (item, role, context) -> source
    options: frozenset[str] = frozenset()  # the #NAME=VALUE options it takes
    aliases: tuple[str, ...] = ()  # other names accepted before ":" in a spec
    suffixes: tuple[str, ...] = ()  # lower-case file name endings that mean this kind
    claims_path: Callable[[str], bool] | None = None  # a path this kind knows by its form ({..}, "demo")
    claims_directory: Callable[[str, list[str]], bool] | None = None  # (directory, its visible entries)
    tokenizer: Callable[[], Any] | None = None  # the kind's own vocabulary, used when the run names none


def source_kinds() -> dict[str, SourceKind]:
    """Every kind by name (and alias), in `MODULES` order."""
    return _kinds(MODULES)


@functools.cache
def _kinds(modules: tuple[str, ...]) -> dict[str, SourceKind]:
    kinds: dict[str, SourceKind] = {}
    for module in modules:
        for kind in importlib.import_module(module, __package__).KINDS:
            for name in (kind.name, *kind.aliases):
                if name in kinds:
                    raise ValueError(f"source kind {name!r} is declared twice ({module})")
                kinds[name] = kind
    return kinds


def kind_names() -> list[str]:
    """The kinds' own names (no aliases), for messages."""
    return list(dict.fromkeys(k.name for k in source_kinds().values()))


def find_kind(name: str) -> SourceKind | None:
    return source_kinds().get(name)


def unique_kinds() -> list[SourceKind]:
    return list({k.name: k for k in source_kinds().values()}.values())
