"""CSV / TSV / JSONL manifests (image path + caption [+ label]) and plain text corpora."""
from __future__ import annotations

import csv
import io
import json
import os
import re

from .base import IndexedSource, Record, is_url, open_file, path_exists, pick_name, require_path
from .registry import SourceKind

IMAGE_COLUMNS = ("image", "filepath", "file", "path", "image_path", "img", "filename", "jpg")
CAPTION_COLUMNS = ("caption", "text", "title", "sentence", "txt")
LABEL_COLUMNS = ("label", "cls", "class", "target")


def read_rows(path: str) -> list[dict]:
    """Rows of a .csv/.tsv (header line) or .jsonl (one object per line) file."""
    with open_file(path, "rb") as f:
        # surrogateescape: a non-UTF-8 caption becomes a counted bad sample later, not a crash here.
        # utf-8-sig: drops the byte-order mark Excel's "CSV UTF-8" puts before the first column name.
        text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
        if path.endswith((".jsonl", ".json", ".jsonl.gz")):
            rows = []
            for i, line in enumerate(text):
                if line.strip():
                    if i == 0 and line.lstrip().startswith("["):  # a .json file holding one array
                        raise ValueError(f"{path}: a JSON array; manifests are JSON Lines, one object per line "
                                         "(convert with e.g. jq -c '.[]')")
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{i + 1}: not a JSON object ({err})") from None
                    except RecursionError:  # "[" * 10**5: the decoder's stack, not a traceback
                        raise ValueError(f"{path}:{i + 1}: JSON nested too deeply") from None
                    if not isinstance(row, dict):  # valid JSON, but no fields to read
                        raise ValueError(f"{path}:{i + 1}: not a JSON object (got {line.strip()[:60]!r})")
                    rows.append(row)
            return rows
        return csv_rows(text.read().splitlines(keepends=True), "\t" if path.endswith(".tsv") else ",", path)


BROKEN = "\0broken"  # the key a row that could not be parsed carries (with what was wrong)
MAX_ROW_LINES = 8  # a quoted caption spanning more lines is taken as an unterminated quote


def csv_rows(lines: list[str], delimiter: str, path: str) -> list[dict]:
    """Rows as dicts keyed by the header. A row that cannot be parsed (a field over the csv
    module's size limit, a stray or unclosed quote that would swallow the rows after it, more
    fields than columns) becomes {BROKEN: why}, one counted bad sample, and reading goes on at the
    line after its first."""
    if not lines:
        return []
    header = next(csv.reader(lines[:1], delimiter=delimiter), [])
    rows: list[dict] = []
    start = 1
    while start < len(lines):
        reader = csv.reader(lines[start:], delimiter=delimiter, strict=True)
        restart = None
        while restart is None:
            first = reader.line_num
            try:
                values = next(reader)
                if reader.line_num - first > MAX_ROW_LINES:
                    raise csv.Error("a quote is not closed")
            except StopIteration:
                break
            except csv.Error as err:
                rows.append({BROKEN: f"{path}:{start + first + 1}: {err}"})
                restart = start + first + 1
                continue
            if len(values) > len(header):  # zip would drop the extra fields: half a caption, silently
                rows.append({BROKEN: f"{path}:{start + first + 1}: {len(values)} fields for {len(header)} "
                                     f"columns (an unquoted {'comma' if delimiter == ',' else 'tab'} in a field?)"})
            elif values:
                rows.append(dict(zip(header, values + [None] * (len(header) - len(values)))))
        if restart is None:
            break
        start = restart
    return rows


def pick_column(columns, wanted: str | None, candidates, path: str, what: str, required: bool = True):
    return pick_name(sorted(columns), wanted, candidates, path, what, required)


class ManifestSource(IndexedSource):
    """Image paths relative to the manifest (or to #root=DIR), captions, optional labels.
    role 'image' drops the captions (unpaired images from a paired manifest); role 'labelled' (evaluation
    sets) keeps them where the manifest has a caption column but does not require one."""

    kind = "csv"

    def __init__(self, path: str, image: str | None = None, caption: str | None = None,
                 label: str | None = None, root: str | None = None, role: str = "paired"):
        self.name = path
        rows = read_rows(require_path(path, "manifest"))
        if not rows:
            raise ValueError(f"manifest {path} has no rows")
        columns = set().union(*(r for r in rows if BROKEN not in r))
        icol = pick_column(columns, image, IMAGE_COLUMNS, path, "image")
        ccol = None if role == "image" else pick_column(columns, caption, CAPTION_COLUMNS, path, "caption",
                                                        required=role == "paired")
        lcol = pick_column(columns, label, LABEL_COLUMNS, path, "label", required=False)
        self.root = self._find_root(path, root, str(next(r for r in rows if BROKEN not in r)[icol]))
        labels, self.classes = self._labels([r.get(lcol) for r in rows] if lcol else [None] * len(rows))
        # Rows that could not be parsed stay as counted bad samples (their key says where and why).
        self.broken = {i for i, r in enumerate(rows) if BROKEN in r}
        self.items = [(r[BROKEN] if BROKEN in r else str(r[icol]), None if ccol is None else r.get(ccol), label)
                      for r, label in zip(rows, labels)]
        self.provides = frozenset({"image"} | ({"text"} if ccol else set()) | ({"label"} if lcol else set()))

    @staticmethod
    def _find_root(path: str, root: str | None, first: str) -> str:
        base = os.path.dirname(path)
        if root is not None:
            return require_path(root if os.path.isabs(root) or is_url(root) else os.path.join(base, root),
                                "image root")
        if os.path.isabs(first) or is_url(first):
            return base
        # Common layouts: images beside the manifest, or in an images/ folder next to it.
        for candidate in (base, os.path.join(base, "images")):
            if path_exists(os.path.join(candidate, first)):
                return candidate
        raise FileNotFoundError(f"{path}: the first image {first!r} is neither beside the manifest nor in "
                                f"images/; give the folder with #root=DIR")

    @staticmethod
    def _labels(raw: list) -> tuple[list[int | None], list[str] | None]:
        """Integer labels as they are; class names (any non-integer label) numbered in sorted order,
        the names kept in `classes`. Empty cells are unlabelled."""
        present = [str(v).strip() for v in raw if v not in (None, "")]
        if all(re.fullmatch(r"-?\d+", v) for v in present):
            return [None if v in (None, "") else int(v) for v in raw], None
        classes = sorted(set(present))
        index = {name: i for i, name in enumerate(classes)}
        return [None if v in (None, "") else index[str(v).strip()] for v in raw], classes

    def __len__(self) -> int:
        return len(self.items)

    def labels(self) -> list[int | None]:
        return [label for _, _, label in self.items]

    def keys(self) -> list[str]:
        return [image for image, _, _ in self.items]

    def record(self, index: int) -> Record:
        image, caption, label = self.items[index]
        if index in self.broken:
            return Record(key=image, missing="bad_text")
        full = image if os.path.isabs(image) or "://" in image else os.path.join(self.root, image)
        return Record(key=image, image=full, caption=caption, label=label)


class TextCorpus(IndexedSource):
    """Unpaired text: a .txt file (one text per line) or one column of a CSV/JSONL file."""

    kind = "text"
    provides = frozenset({"text"})

    def __init__(self, path: str, column: str | None = None):
        self.name = path
        require_path(path, "text corpus")
        if path.endswith((".csv", ".tsv", ".jsonl", ".json")):
            rows = read_rows(path)
            if not rows:
                raise ValueError(f"text corpus {path} is empty")
            col = pick_column(set().union(*(r for r in rows if BROKEN not in r)), column, CAPTION_COLUMNS, path,
                              "caption")
            self.texts = [r.get(col) for r in rows]
        else:
            with open_file(path, "rb") as f:
                # Keep bytes: a line that is not UTF-8 is a counted bad sample, not a crash.
                self.texts = [line.rstrip(b"\r\n") for line in f if line.strip()]
        if not self.texts:
            raise ValueError(f"text corpus {path} is empty")

    def __len__(self) -> int:
        return len(self.texts)

    def record(self, index: int) -> Record:
        return Record(key=f"{os.path.basename(self.name)}:{index + 1}", caption=self.texts[index])


def _manifest(item, role: str, context) -> IndexedSource:
    o = item.options
    if role == "text":
        return TextCorpus(item.path, o.get("column") or o.get("caption"))
    return ManifestSource(item.path, o.get("image"), o.get("caption"), o.get("label"), o.get("root"), role=role)


_COLUMNS = frozenset({"image", "caption", "label", "root"})
KINDS = (
    SourceKind("csv", _manifest, _COLUMNS, suffixes=(".csv",)),
    SourceKind("tsv", _manifest, _COLUMNS, suffixes=(".tsv",)),
    SourceKind("jsonl", _manifest, _COLUMNS, aliases=("json",), suffixes=(".jsonl", ".json")),
    SourceKind("text", lambda item, role, context: TextCorpus(item.path, item.options.get("column")),
               frozenset({"column"}), suffixes=(".txt",)),
)
