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
A ",", "#" or "@" that is part of a path or an option value is written with a backslash before it
("\\,", "\\#", "\\@"): data/a\\,b/ is the folder "a,b". Backslashes are otherwise kept as they are
(C:\\data\\x, \\\\server\\share), except in a run of them just before one of those characters or at the
end of a path or value: there each pair is one backslash, and an odd one left escapes the character
(as Windows reads backslashes before a quote): C:\\data\\\\,x.csv is the folder "C:\\data\\" and x.csv.
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
    # The path ended at an unescaped "#" or "@": a missing path then says how to write one.
    cut: bool = field(default=False, compare=False, repr=False)

    def __str__(self) -> str:
        opts = "".join(f"#{escape(k)}={escape(v)}" for k, v in self.options.items())
        return f"{self.role + '=' if self.role else ''}{self.kind}:{escape(self.path)}{opts}@{self.weight:g}"


# The characters that separate a spec's parts; a backslash before one makes it part of the path or
# value. Every split below goes through `_unescaped`, and every path and option value through
# `unescape`: the one place the escape is known. Only backslashes that touch a separator (or end a
# part, which a separator may follow) are read as escapes, so Windows paths (C:\data, UNC
# \\server\share) mean what they meant before escapes existed.
SEPARATORS = ",#@"
# a separator or the end of the text, with the run of backslashes before it
_RUN = re.compile(r"(\\*)([" + re.escape(SEPARATORS) + r"]|\Z)")


def escape(text: str) -> str:
    """`text` as it is written in a spec (a path or value holding ",", "#" or "@", or ending in "\\")."""
    return _RUN.sub(lambda m: m.group(1) * 2 + ("\\" + m.group(2) if m.group(2) else ""), text)


def unescape(text: str) -> str:
    """A path or option value as written (`escape`) -> as meant."""
    def one(m: re.Match) -> str:
        run, after = len(m.group(1)), m.group(2)
        # before a separator an odd backslash escaped it; at the end it escapes nothing and stays
        return "\\" * (run // 2) + (after or "\\" * (run % 2))
    return _RUN.sub(one, text)


def _unescaped(text: str, char: str, braces: bool = False) -> list[int]:
    """The positions of `char` in `text` that are not escaped (nor inside {...} with `braces`)."""
    found: list[int] = []
    depth, i = 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            end = i
            while end < len(text) and text[end] == "\\":
                end += 1
            escapes = (end - i) % 2 and end < len(text) and text[end] in SEPARATORS
            i = end + 1 if escapes else end  # an escaped separator is skipped with its run
            continue
        if braces:
            depth += (ch == "{") - (ch == "}")
        if ch == char and not (braces and depth > 0):
            found.append(i)
        i += 1
    return found


def _cut(text: str, positions: list[int]) -> list[str]:
    bounds = [-1, *positions, len(text)]
    return [text[a + 1:b] for a, b in zip(bounds, bounds[1:])]


def split_items(spec: str) -> list[str]:
    """Split on commas that are neither escaped nor inside {...}; the items keep their escapes."""
    return [i.strip() for i in _cut(spec, _unescaped(spec, ",", braces=True)) if i.strip()]


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


ESCAPE_HINT = ("a ',', '#' or '@' that is part of a path is written '\\,', '\\#' or '\\@' (a '\\' "
               "just before one of them, or ending the path, is written '\\\\')")


def parse_item(item: str) -> SourceSpec:
    weight = 1.0
    text = item
    at = _unescaped(text, "@")
    tail = text[at[-1] + 1:] if at else None
    if tail is not None and re.fullmatch(r"[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?", tail):
        weight = float(tail)
        text = text[: at[-1]]
    elif tail is not None and re.fullmatch(r"\s*[-+.\w]*\s*", tail) \
            and not os.path.exists(unescape(_cut(text, _unescaped(text, "#"))[0])):
        # "x.jsonl@-1", "x.jsonl@abc": meant as a weight, not part of the path
        raise ValueError(f"the weight after '@' in {item!r} must be a positive number (e.g. @0.5); "
                         f"{ESCAPE_HINT}")
    role = None
    m = re.match(r"(\w+)=", text)
    if m and m.group(1) in ROLES:
        role, text = m.group(1), text[m.end():]
    kind = None
    m = re.match(r"(\w+):(?!//)", text)
    if m:
        from .sources.registry import find_kind, kind_names

        found = find_kind(m.group(1))
        if found is None:
            raise ValueError(f"unknown source kind {m.group(1)!r} in {text!r} (kinds: {', '.join(kind_names())})")
        kind, text = found.name, text[m.end():]
    raw_path, *opts = _cut(text, _unescaped(text, "#"))
    options = {}
    for o in opts:
        k, eq, v = o.partition("=")
        options[unescape(k) if eq else "column"] = unescape(v if eq else k)
    path = unescape(raw_path)
    if not path:
        raise ValueError(f"empty path in data spec item {text!r}")
    path = os.path.expanduser(path)
    if weight <= 0:
        raise ValueError(f"weight of {path} must be > 0")
    cut = bool(opts or at)  # the path may have been cut at a "#" or "@" that belongs to it
    if kind is None:
        try:
            kind = detect_kind(path)
        except FileNotFoundError as err:
            if cut:
                raise FileNotFoundError(f"{err}; {ESCAPE_HINT}") from None
            raise
    return SourceSpec(kind, path, role, weight, options, cut)


def parse_spec(spec: str) -> list[SourceSpec]:
    items = split_items(spec)
    if not items:
        raise ValueError("empty data spec")
    try:
        return [parse_item(i) for i in items]
    except FileNotFoundError as err:
        if len(items) > 1 and ESCAPE_HINT not in str(err):  # a path may have been cut at a "," of its own
            raise FileNotFoundError(f"{err}; {ESCAPE_HINT}") from None
        raise


# Kinds whose PATH is a name, not a local file: kept as written by same_files_spec.
_NAMED_KINDS = ("hf", "synthetic")


def same_files_path(pattern: str) -> str:
    """A file, folder or shard pattern ({00..03} braces, globs) written so that it names the same
    files whoever spells it and from whatever directory: its directory part, where that folder
    exists, as an absolute real path (symbolic links resolved); the rest (braces, globs, the file
    name) as given. URLs ("://"), bare names (no folder part, no such file: "demo", a hub name) and
    paths whose folder does not exist are kept as written. For comparing settings, not for reading."""
    if not pattern or "://" in pattern:
        return pattern
    path = os.path.expanduser(pattern)
    special = min((path.index(c) for c in "{*?[" if c in path), default=None)
    if special is None:
        if os.path.exists(path):
            return os.path.realpath(path)
        head, tail = os.path.split(path)
        if not head:
            return pattern
    else:
        cut = path.rfind("/", 0, special)
        head, tail = (path[:cut] or "/", path[cut + 1:]) if cut >= 0 else (".", path)
    if not os.path.isdir(head):
        return pattern
    return os.path.join(os.path.realpath(head), tail)


def same_files_spec(spec: str) -> str:
    """A data SPEC with every item's local path written by same_files_path (roles, kinds, options
    and weights as written; items of the hf and synthetic kinds, whose path is a name, and URLs
    untouched). Textual: it reads no data and raises nothing for a missing file."""
    from .sources.registry import find_kind

    items = []
    for item in split_items(spec):
        text, weight = item, ""
        at = _unescaped(text, "@")
        if at and re.fullmatch(r"[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?", text[at[-1] + 1:]):
            text, weight = text[:at[-1]], text[at[-1]:]
        role = ""
        m = re.match(r"(\w+)=", text)
        if m and m.group(1) in ROLES:
            role, text = text[:m.end()], text[m.end():]
        kind = ""
        m = re.match(r"(\w+):(?!//)", text)
        if m:
            found = find_kind(m.group(1))
            if found is None or found.name in _NAMED_KINDS:
                items.append(item)
                continue
            kind, text = text[:m.end()], text[m.end():]
        raw_path, *options = _cut(text, _unescaped(text, "#"))
        path = escape(same_files_path(unescape(raw_path)))
        items.append(role + kind + path + "".join("#" + o for o in options) + weight)
    return ",".join(items)
