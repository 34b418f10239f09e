"""Arrow tables as a stream of records: what Parquet files and Hugging Face datasets saved on disk
have in common. A table is read one *unit* at a time (a Parquet row group, an Arrow record batch),
never whole; units play the part shards play for tar streams (see wds.py): each (rank, worker)
share takes every `parts`-th unit of an endless sequence of per-epoch unit permutations, and the
position (unit slot, rows read in it) resumes exactly. Within a unit, rows are converted
`BATCH_ROWS` at a time (a row group may hold a million images).

Columns: the image is encoded bytes (binary), a path or URL (string, relative to `root`), or a
Hugging Face `Image` struct {bytes, path}; the caption a string or binary column; the label an
integer column. Each is found by name (see the candidate lists) or named with #image= / #caption= /
#label=. A unit that cannot be read becomes one `bad_table` skip per row it holds.
"""
from __future__ import annotations

import abc
import logging
import os
from typing import Any, Callable, Hashable, Iterator, Sequence

import numpy as np

from ...optional import require
from .base import Record, Source, is_url, pick_name, shuffled_blocks

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes", "image_path", "filepath", "path",
                 "file", "filename")
CAPTION_COLUMNS = ("caption", "txt", "text", "title", "sentence", "alt")
LABEL_COLUMNS = ("label", "labels", "cls", "class", "target")

log = logging.getLogger("m3ae.data")

BATCH_ROWS = 64  # rows decoded into records at a time (64 photos: a few MB)

def import_pyarrow():
    """pyarrow (with its parquet module loaded), or an error that says how to install it."""
    require("pyarrow.parquet", "reading Parquet and Hugging Face datasets")
    import pyarrow

    return pyarrow


def find_column(schema, wanted: str | None, candidates: Sequence[str], where: str, what: str,
                required: bool) -> str | None:
    return pick_name(schema.names, wanted, candidates, where, what, required)


def _image_value(value, root: str):
    """bytes as they are; a path joined to `root` unless absolute or a URL; HF structs unpacked."""
    if isinstance(value, dict):  # datasets.Image: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        if not value:
            return None
        return value if os.path.isabs(value) or is_url(value) else os.path.join(root, value)
    return value


class OpenFiles:
    """At most `size` opened files (or what was read from them) per process. Handles do not cross
    a fork or a pickle, so the cache starts empty in each worker; when full, the oldest entry is
    dropped (and closed): a share reads its units one after another, so few are ever reused."""

    def __init__(self, size: int = 8, close: Callable[[Any], None] | None = None):
        self.size, self.close = size, close
        self._items: dict[Hashable, Any] = {}
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"size": self.size, "close": self.close, "_items": {}, "_pid": None}

    def get(self, key: Hashable, opener: Callable[[], Any]) -> Any:
        if self._pid != os.getpid():
            self._items, self._pid = {}, os.getpid()
        if key not in self._items:
            if len(self._items) >= self.size:
                oldest = self._items.pop(next(iter(self._items)))
                if self.close is not None:
                    self.close(oldest)
            self._items[key] = opener()
        return self._items[key]


class TableSource(Source):
    """Subclasses fill `units` (any picklable ids) and `unit_rows`, call `_choose`, and read with
    `read_batches`."""

    exact = False  # a stream: resume re-reads the unit it stopped in (exact with the same ranks x workers)
    units: list = []  # only units with rows (an endless stream of empty units would never yield)
    unit_rows: list[int] = []
    unit_word = "units"
    batch_rows = BATCH_ROWS

    def __init__(self, role: str = "paired", shuffle_block: int = 0):
        self.role = role
        # Rows of a unit are yielded in a seeded random order within blocks of this many (0 or 1: as
        # stored); set from data.shuffle_buffer, as for tar shards.
        self.shuffle_block = int(shuffle_block)

    @abc.abstractmethod
    def read_batches(self, unit) -> Iterator:
        """The unit's rows, in order, as pyarrow RecordBatches of at most `batch_rows` rows holding
        at least `self.columns` (each table format says how)."""

    def unit_name(self, unit) -> str:
        return str(unit)

    def _choose(self, schema, where: str, image: str | None, caption: str | None, label: str | None,
                root: str) -> None:
        pa = import_pyarrow()
        self.root = root
        self.image_col = None if self.role == "text" else find_column(
            schema, image, IMAGE_COLUMNS, where, "image", required=True)
        self.caption_col = None if self.role == "image" else find_column(
            schema, caption, CAPTION_COLUMNS, where, "caption", required=self.role in ("paired", "text"))
        self.label_col = find_column(schema, label, LABEL_COLUMNS, where, "label", required=False)
        if self.image_col is not None:
            t = schema.field(self.image_col).type
            ok = (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t)
                  or pa.types.is_large_string(t) or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0))
            if not ok:
                raise ValueError(f"{where}: image column {self.image_col!r} is {t}; expected encoded bytes, "
                                 f"a path/URL string or an Image struct {{bytes, path}}")
        if self.caption_col is not None:
            t = schema.field(self.caption_col).type
            if not any(f(t) for f in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                      pa.types.is_large_binary)):
                raise ValueError(f"{where}: caption column {self.caption_col!r} is {t}, not text; name a text "
                                 f"column with #caption=COLUMN")
        if self.label_col is not None and not pa.types.is_integer(schema.field(self.label_col).type):
            if label is not None:
                raise ValueError(f"{where}: label column {label!r} is {schema.field(label).type}, not integers")
            # A column merely called "class" or "target" that holds something else: not taken as labels,
            # and said, since class names in it would otherwise vanish without a word.
            log.warning("%s: column %r holds %s, not integer labels: read without labels (name an integer "
                        "column with #label=)", where, self.label_col, schema.field(self.label_col).type)
            self.label_col = None
        self.columns = [c for c in (self.image_col, self.caption_col, self.label_col) if c is not None]
        self.provides = frozenset({n for n, c in (("image", self.image_col), ("text", self.caption_col),
                                                  ("label", self.label_col)) if c is not None})

    def __len__(self) -> int:
        return int(sum(self.unit_rows))

    def describe(self) -> str:
        return (f"{self.kind}:{self.name} ({len(self)} rows in {len(self.units)} {self.unit_word}; "
                f"columns {', '.join(self.columns)})")

    def unit_records(self, unit, number: int) -> Iterator[Record]:
        """The records of one unit, in order; rows that cannot be read are `bad_table` records."""
        pa = import_pyarrow()
        prefix = self.unit_name(unit)
        done = 0
        try:
            for batch in self.read_batches(unit):
                cols = {c: batch.column(c).to_pylist() for c in self.columns}
                for i in range(batch.num_rows):
                    label = cols[self.label_col][i] if self.label_col else None
                    yield Record(
                        key=f"{prefix}#{done}",
                        image=_image_value(cols[self.image_col][i], self.root) if self.image_col else None,
                        caption=cols[self.caption_col][i] if self.caption_col else None,
                        label=None if label is None else int(label))
                    done += 1
        except (pa.ArrowException, OSError, ValueError) as err:  # corrupt pages, a truncated file
            rows = self.unit_rows[number]
            log.warning("skipping rows %d-%d of %s: cannot read them (%s: %s)", done, rows - 1, prefix,
                        type(err).__name__, str(err)[:200])
            for i in range(done, rows):
                yield Record(key=f"{prefix}#{i}", missing="bad_table")

    def unit_order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch, 0x7AB1E]).permutation(len(self.units))

    def iterate(self, part, parts, seed, state=None, epochs=None) -> Iterator:
        slot, skip = (0, 0) if state is None else (int(state[0]), int(state[1]))
        n = len(self.units)
        while True:
            epoch, within = divmod(slot * parts + part, n)
            if epochs is not None and epoch >= epochs:
                return
            number = int(self.unit_order(seed, epoch)[within])
            records = shuffled_blocks(self.unit_records(self.units[number], number), self.shuffle_block,
                                      (seed, epoch, within))
            for done, record in enumerate(records, start=1):
                if done > skip:
                    yield (slot, done), record
            slot, skip = slot + 1, 0
