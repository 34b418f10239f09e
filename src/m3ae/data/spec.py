"""The data SPEC: what `m3ae pretrain --data SPEC` reads.

    SPEC  := ITEM ("," ITEM)*
    ITEM  := [ROLE "="] [KIND ":"] PATH ("#" OPTION)* ["@" WEIGHT]
    ROLE  := paired | image | text       what the source contributes (default: all it has)
    KIND  := a registered source kind (sources/registry.py): csv | tsv | jsonl | wds | hdf5 | folder
             | text | parquet | hf | synthetic            (default: from the path)
    OPTION:= NAME "=" VALUE | VALUE     (a bare VALUE is the text column for text corpora)

Kind from the path (each kind declares what it recognises): `demo` -> the synthetic shapes,
.csv/.tsv/.jsonl manifests, .tar/.tar.gz/.tgz or a {..} pattern -> wds,
.h5/.hdf5 -> hdf5, .txt -> text, .parquet -> parquet. A directory: wds if it holds tar shards
(img2dataset's webdataset output, whatever .parquet/.json files sit beside them), hf if it is a
saved Hugging Face dataset (state.json / dataset_dict.json), parquet if it holds .parquet files
(img2dataset's parquet output), else folder (img2dataset's files output: numbered image folders
beside NNNNN_stats.json, read unlabelled).
Examples:
    data/captions.csv#root=images
    wds:shards/{00000..00099}.tar
    paired=cc12m/{000..127}.tar@0.7,text=corpus.txt@0.3
    paired=captions.csv,image=folder:unlabelled/@0.5,text=text:all.csv#caption@0.2
Weights are relative (default 1 each). Commas inside {...} belong to the pattern.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

ROLES = ("paired", "image", "text")


@dataclass
class SourceSpec:
    kind: str
    path: str
    role: str | None = None
    weight: float = 1.0
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        opts = "".join(f"#{k}={v}" for k, v in self.options.items())
        return f"{self.role + '=' if self.role else ''}{self.kind}:{self.path}{opts}@{self.weight:g}"


def split_items(spec: str) -> list[str]:
    """Split on commas that are not inside {...}."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in spec:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [i.strip() for i in items if i.strip()]


def detect_kind(path: str) -> str:
    from .sources.registry import kind_names, unique_kinds

    kinds = unique_kinds()
    # A file suffix first: "part-{00000..00031}.parquet" is Parquet files, not tar shards.
    p = path.lower()
    endings = [(len(s), kind.name) for kind in kinds for s in kind.suffixes if p.endswith(s)]
    if endings:
        return max(endings)[1]
    for kind in kinds:
        if kind.claims_path is not None and kind.claims_path(path):
            return kind.name
    if any(ch in path for ch in "*?[") and "://" not in path:
        import glob

        found = sorted(glob.glob(path))
        if not found:
            raise FileNotFoundError(f"no files match {path!r}")
        return detect_kind(found[0])
    if os.path.isdir(path):
        names = [n for n in os.listdir(path) if not n.startswith(".")]
        for kind in kinds:
            if kind.claims_directory is not None and kind.claims_directory(path, names):
                return kind.name
    if not os.path.exists(path) and "://" not in path:
        raise FileNotFoundError(f"data path does not exist: {path}")
    raise ValueError(f"cannot tell the kind of {path!r}; prefix it, e.g. csv:{path} (kinds: {', '.join(kind_names())})")


def parse_item(item: str) -> SourceSpec:
    weight = 1.0
    m = re.search(r"@([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)$", item)
    if m:
        weight = float(m.group(1))
        item = item[: m.start()]
    elif re.search(r"@\s*[-+.\w]*\s*$", item) and not os.path.exists(item.split("#")[0]):
        # "x.jsonl@-1", "x.jsonl@abc": meant as a weight, not part of the path
        raise ValueError(f"the weight after '@' in {item!r} must be a positive number (e.g. @0.5)")
    role = None
    m = re.match(r"(\w+)=", item)
    if m and m.group(1) in ROLES:
        role, item = m.group(1), item[m.end():]
    kind = None
    m = re.match(r"(\w+):(?!//)", item)
    if m:
        from .sources.registry import find_kind, kind_names

        found = find_kind(m.group(1))
        if found is None:
            raise ValueError(f"unknown source kind {m.group(1)!r} in {item!r} (kinds: {', '.join(kind_names())})")
        kind, item = found.name, item[m.end():]
    path, *opts = item.split("#")
    options = {}
    for o in opts:
        k, eq, v = o.partition("=")
        options[k if eq else "column"] = v if eq else k
    if not path:
        raise ValueError(f"empty path in data spec item {item!r}")
    path = os.path.expanduser(path)
    if weight <= 0:
        raise ValueError(f"weight of {path} must be > 0")
    return SourceSpec(kind or detect_kind(path), path, role, weight, options)


def parse_spec(spec: str) -> list[SourceSpec]:
    items = split_items(spec)
    if not items:
        raise ValueError("empty data spec")
    return [parse_item(i) for i in items]
