"""`hf:DIR`: a Hugging Face dataset on disk, read with pyarrow alone (the `datasets` package is not
needed to read). DIR is what `Dataset.save_to_disk` wrote (`state.json` + `data-*.arrow`), what
`DatasetDict.save_to_disk` wrote (`dataset_dict.json` + one folder per split; #split=, default
train), or a folder of Parquet shards as the Hub stores them (`data/train-00000-of-00004.parquet`;
#split= keeps the files of that split). `Image` columns ({bytes, path} structs) and `ClassLabel`
integers are understood; #image= / #caption= / #label= name other columns.
"""
from __future__ import annotations

import glob
import json
import os
import re

from .base import is_url
from .parquet import ParquetSource
from .table import OpenFiles, TableSource, import_pyarrow
from .registry import SourceKind


def hub_hint(path: str) -> str | None:
    """What to say when `path`, read as something else, is laid out as a dataset on the Hub (a
    data/ folder of Parquet files, or a dataset card whose front matter has `configs:`): the
    hf: prefix reads it by split. None for anything else. Not guessed as hf: the kind of a
    folder of Parquet files stays what it was; the error or warning names the prefix instead."""
    from ..spec import escape

    if is_url(path) or not os.path.isdir(path):
        return None
    found = None
    if glob.glob(os.path.join(glob.escape(path), "data", "**", "*.parquet"), recursive=True):
        found = "a data/ folder of Parquet files"
    else:
        try:
            with open(os.path.join(path, "README.md"), encoding="utf-8", errors="replace") as f:
                card = f.read(1 << 16)
        except OSError:  # no card (or not a file): nothing to say
            card = ""
        if card.startswith("---") and re.search(r"^configs:", card.split("\n---", 1)[0], re.M):
            found = "a dataset card README.md with configs:"
    if found is None:
        return None
    return (f"{path} looks like a Hugging Face dataset as on the Hub ({found}): read it with "
            f"hf:{escape(path)} (#split=NAME for one split; train where there is one)")


def _read_listing(path: str, name: str, field: str, key: str | None = None) -> list[str]:
    """The names a `save_to_disk` listing (state.json's data files, dataset_dict.json's splits)
    gives, or ValueError naming the file. Each must be a plain name inside the folder: the
    `datasets` library writes no other, and a listing is data that must not point elsewhere."""
    file = os.path.join(path, name)
    try:
        with open(file, "rb") as f:
            data = json.loads(f.read(MAX_LISTING_BYTES + 1).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: JSONDecodeError
        raise ValueError(f"{file}: not a JSON listing ({type(err).__name__}: {err})") from None
    entries = data.get(field, []) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{file}: {field!r} must be a list")
    names = []
    for entry in entries:
        entry = entry.get(key) if key is not None and isinstance(entry, dict) else entry
        if not isinstance(entry, str) or entry in ("", ".", "..") or os.path.basename(entry) != entry \
                or "\0" in entry:
            raise ValueError(f"{file}: {field!r} holds {entry!r}, not a plain name in {path}")
        names.append(entry)
    return names


MAX_LISTING_BYTES = 16 << 20  # a listing of a few names; a larger file is not one (read no further)


def _split_dir(path: str, split: str | None) -> str:
    splits = _read_listing(path, "dataset_dict.json", "splits")
    chosen = split or ("train" if "train" in splits else splits[0] if splits else None)
    if chosen is None or chosen not in splits:
        raise ValueError(f"hf:{path}: no split {chosen!r} (splits: {splits})")
    return os.path.join(path, chosen)


def _split_files(path: str, split: str | None) -> list[str]:
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))

    def in_split(f: str, name: str) -> bool:
        parts = os.path.relpath(f, path).split(os.sep)
        return name in parts[:-1] or parts[-1].startswith((f"{name}-", f"{name}_", f"{name}."))

    wanted = split or ("train" if any(in_split(f, "train") for f in files) else None)
    if wanted is not None:
        files = [f for f in files if in_split(f, wanted)]
    if not files:
        raise FileNotFoundError(f"hf:{path}: no Parquet files{f' of split {wanted!r}' if wanted else ''}")
    return files


def open_hf(path: str, split: str | None = None, image: str | None = None, caption: str | None = None,
            label: str | None = None, role: str = "paired") -> TableSource:
    if is_url(path) or not os.path.isdir(path):
        raise FileNotFoundError(f"hf:{path} is not a folder; hf: reads datasets saved on disk (save a Hub "
                                f"dataset with datasets.load_dataset(...).save_to_disk(DIR) first)")
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        path = _split_dir(path, split)
    if os.path.exists(os.path.join(path, "state.json")):
        return ArrowSource(path, image, caption, label, role)
    source = ParquetSource(path, image, caption, label, role=role, files=_split_files(path, split))
    source.kind = "hf"
    return source


class ArrowSource(TableSource):
    """The Arrow stream files of `save_to_disk`, one record batch per unit (memory-mapped)."""

    kind = "hf"
    unit_word = "record batches"

    def __init__(self, path: str, image: str | None = None, caption: str | None = None, label: str | None = None,
                 role: str = "paired"):
        super().__init__(role)
        pa = import_pyarrow()
        self.name = path
        names = _read_listing(path, "state.json", "_data_files", "filename")
        if not names:
            raise ValueError(f"hf:{path}: state.json lists no data files")
        self.files = [os.path.join(path, n) for n in names]
        self.units, self.unit_rows = [], []
        for index, file in enumerate(self.files):
            try:
                reader = pa.ipc.open_stream(pa.memory_map(file))
                if index == 0:
                    self._choose(reader.schema, file, image, caption, label, path)
                missing = [c for c in self.columns if c not in reader.schema.names]
                if missing:
                    raise ValueError(f"{file}: no column(s) {missing} (columns: {reader.schema.names})")
                for b, batch in enumerate(reader):  # zero-copy: only the batch headers are read
                    if batch.num_rows:
                        self.units.append((index, b))
                        self.unit_rows.append(batch.num_rows)
            except (pa.ArrowException, OSError) as err:
                raise ValueError(f"{file}: not a readable Arrow stream file ({err})") from None
        if not self.units:
            raise ValueError(f"hf:{path}: the dataset has no rows")
        self._batches = OpenFiles()  # each file's record batches (memory-mapped, zero-copy)

    def unit_name(self, unit) -> str:
        return f"{os.path.basename(self.files[unit[0]])}:b{unit[1]}"

    def read_batches(self, unit):
        index, number = unit
        pa = import_pyarrow()
        batches = self._batches.get(
            index, lambda: pa.ipc.open_stream(pa.memory_map(self.files[index])).read_all().to_batches())
        batch = batches[number]
        step = self.batch_rows
        return (batch.slice(start, step) for start in range(0, batch.num_rows, step))  # zero-copy slices


def _hf(item, role: str, context):
    o = item.options
    return open_hf(item.path, o.get("split"), o.get("image"), o.get("caption") or o.get("column"), o.get("label"),
                   role=role)


KINDS = (SourceKind("hf", _hf, frozenset({"image", "caption", "label", "split"}), aliases=("huggingface",),
                    # a saved Hugging Face dataset (save_to_disk)
                    claims_directory=lambda path, names: "state.json" in names or "dataset_dict.json" in names),)
