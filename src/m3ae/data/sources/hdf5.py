"""HDF5 files. The authors' layout is found by itself: `jpg` (encoded bytes) + `caption` (UTF-8
bytes) for pairs; `text` for text corpora; `train_jpg`/`train_labels` and `val_jpg`/`val_labels`
for classification. Any other layout: name the datasets with #image= / #caption= / #label=
(paths such as `train/images` work; images are encoded bytes, one per row). A table - one
compound dataset whose named fields hold each row's image, caption and label - is read with
#table=DSET, its fields found by name or named with #image= / #caption= / #label= (HDF5Table).
The file is opened lazily in each worker (h5py handles do not survive a fork)."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ...optional import require
from .base import IndexedSource, Record, is_url, pick_name, require_path
from .registry import SourceKind
from .table import CAPTION_COLUMNS, IMAGE_COLUMNS, LABEL_COLUMNS


def as_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, np.ndarray):
        return value.tobytes()
    if isinstance(value, np.void):  # np.bytes_ is a bytes, handled above
        return value.tobytes()
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


def open_hdf5(h5py, path: str):
    """The file opened for reading, or a clear error naming it (h5py's own says only what broke)."""
    require_path(path, "HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file ({err})") from None


class HDF5Source(IndexedSource):
    kind = "hdf5"

    def __init__(self, path: str, split: str | None = None, role: str | None = None, image: str | None = None,
                 caption: str | None = None, label: str | None = None):
        h5py = require("h5py", "reading HDF5 files")

        self.name = path
        with open_hdf5(h5py, path) as f:
            keys = set(f.keys())
            if image or caption or label:
                keys = {k for k in (image, caption, label) if k and k in f} | keys
                self.image_key = image if role != "text" else None
                self.caption_key = caption if role != "image" else None
                self.label_key = label
                if self.image_key is None and self.caption_key is None:
                    raise ValueError(f"{path}: name the image and/or caption dataset (#image=NAME, #caption=NAME)")
            elif split or ("jpg" not in keys and "text" not in keys and "train_jpg" in keys):
                split = split or "train"
                self.image_key, self.caption_key, self.label_key = f"{split}_jpg", None, f"{split}_labels"
            elif "jpg" in keys and role != "text":
                self.image_key, self.label_key = "jpg", None
                self.caption_key = "caption" if "caption" in keys and role != "image" else None
            elif "text" in keys or ("caption" in keys and role == "text"):
                self.image_key, self.label_key = None, None
                self.caption_key = "text" if "text" in keys else "caption"
            else:
                tables = compound_datasets(f)
                hint = f"; or read a table with #table=NAME (tables here: {tables})" if tables else ""
                raise ValueError(f"{path}: no datasets of the M3AE layout (jpg/caption, text, "
                                 f"train_jpg/train_labels); found {sorted(keys)}; name yours with #image=NAME "
                                 f"#caption=NAME [#label=NAME]{hint}")
            for k in (self.image_key, self.caption_key, self.label_key):
                if k is not None and k not in keys:
                    raise ValueError(f"{path}: dataset {k!r} missing (found {sorted(keys)})")
                if k is not None and isinstance(f[k], h5py.Dataset) and f[k].dtype.names:
                    raise ValueError(f"{path}: {k!r} is a table (fields {list(f[k].dtype.names)}); read it "
                                     f"with #table={k} [#image=FIELD #caption=FIELD #label=FIELD]")
            main = self.image_key or self.caption_key
            self.length = len(f[main])
            # A shorter caption or label list than the image list: the records past its end are
            # counted bad samples, not an IndexError that ends the run.
            self.sizes = {k: len(f[k]) for k in (self.caption_key, self.label_key) if k is not None}
        self.provides = frozenset({n for n, k in (("image", self.image_key), ("text", self.caption_key),
                                                  ("label", self.label_key)) if k})
        self._file: Any = None  # an h5py.File, opened lazily per process
        self._pid: int | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def __len__(self) -> int:
        return self.length

    def labels(self) -> list[int | None]:
        if self.label_key is None:
            return [None] * self.length
        import h5py

        with h5py.File(self.name, "r") as f:
            return np.asarray(f[self.label_key][:]).astype(np.int64).reshape(-1).tolist()

    def keys(self) -> list[str]:
        return [f"{self.image_key or self.caption_key}[{i}]" for i in range(self.length)]

    def handle(self):
        if self._file is None or self._pid != os.getpid():  # reopen after a fork
            import h5py

            self._file, self._pid = h5py.File(self.name, "r"), os.getpid()
        return self._file

    def record(self, index: int) -> Record:
        f = self.handle()
        key = f"{self.image_key or self.caption_key}[{index}]"
        sizes = getattr(self, "sizes", {})
        if any(index >= n for n in sizes.values()):
            short = [k for k, n in sizes.items() if index >= n]
            return Record(key=f"{key} (no {short[0]}: it has {sizes[short[0]]} entries)",
                          missing="missing_caption" if short[0] == self.caption_key else "bad_text")
        caption = f[self.caption_key][index] if self.caption_key else None
        if isinstance(caption, (np.number, int, float)):  # not text: bytes() would give NUL bytes
            return Record(key=key, missing="bad_text")
        return Record(
            key=key,
            image=as_bytes(f[self.image_key][index]) if self.image_key else None,
            caption=as_bytes(caption) if caption is not None else None,
            label=int(f[self.label_key][index]) if self.label_key else None,
        )


def compound_datasets(f) -> list[str]:
    """Paths of the file's tables (1-D compound datasets), for error messages."""
    import h5py

    found: list[str] = []
    f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) and obj.dtype.names
                 and obj.ndim == 1 else None)
    return found


def field_kind(dtype: np.dtype) -> str:
    """What a compound field holds: 'text' (vlen or fixed strings), 'bytes' (variable-length uint8,
    opaque, or a 1-D uint8 array), 'int', 'array' (a fixed-shape array, e.g. raw pixels) or 'other'."""
    import h5py

    if h5py.check_string_dtype(dtype) is not None:
        return "text"
    base = h5py.check_vlen_dtype(dtype)
    if base is not None:
        return "bytes" if base.kind in "iu" and base.itemsize == 1 else "other"
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return "bytes" if len(shape) == 1 and base.kind in "iu" and base.itemsize == 1 else "array"
    if dtype.kind == "V" and not dtype.names:
        return "bytes"
    return "int" if dtype.kind in "iu" else "other"


def pick_field(fields: dict[str, str], wanted: str | None, candidates, where: str, what: str,
               required: bool) -> str | None:
    return pick_name(fields, wanted, candidates, where, what, required, noun="field")


class HDF5Table(HDF5Source):
    """One compound dataset (`#table=DSET`), a row per sample. The image field holds encoded bytes
    (variable-length uint8, opaque, a 1-D uint8 array, or a fixed-length byte string) or a path
    (a string; relative paths are beside the file or under #root=); the caption a string or UTF-8
    bytes; the label an integer. Fields are found by name as Parquet columns are (jpg/image/path...,
    caption/txt/text/title..., label/cls/class...) or named with #image= / #caption= / #label=.
    Only the fields used are read; a row whose chunk cannot be read is a `bad_table` skip."""

    def __init__(self, path: str, table: str, role: str | None = None, image: str | None = None,
                 caption: str | None = None, label: str | None = None, root: str | None = None):
        h5py = require("h5py", "reading HDF5 files")

        self.name, self.table = path, table
        where = f"{path}#table={table}"
        with open_hdf5(h5py, path) as f:
            ds = f.get(table)
            if not isinstance(ds, h5py.Dataset) or not ds.dtype.names or ds.ndim != 1:
                what = ("no such dataset" if ds is None else "a group" if isinstance(ds, h5py.Group)
                        else f"a {ds.ndim}-D dataset" if ds.dtype.names else f"not a table (dtype {ds.dtype})")
                raise ValueError(f"{path}: {table!r} is {what}; a table is a 1-D compound dataset "
                                 f"(tables here: {compound_datasets(f) or 'none'})")
            types = {n: ds.dtype.fields[n][0] for n in ds.dtype.names}
            kinds = {n: field_kind(t) for n, t in types.items()}
            self.length = len(ds)
        role = role or "paired"
        self.image_key = None if role == "text" else pick_field(kinds, image, IMAGE_COLUMNS, where, "image",
                                                                required=True)
        # As for manifests: a caption field is required for paired data only (a labelled set may have none).
        self.caption_key = None if role == "image" else pick_field(kinds, caption, CAPTION_COLUMNS, where,
                                                                   "caption", required=role in ("paired", "text"))
        self.label_key = pick_field(kinds, label, LABEL_COLUMNS, where, "label", required=False)
        if self.image_key and kinds[self.image_key] not in ("bytes", "text"):
            raw = " (raw pixel arrays are not read: store encoded JPEG/PNG bytes)" \
                if kinds[self.image_key] == "array" else ""
            raise ValueError(f"{where}: image field {self.image_key!r} is {types[self.image_key]}; expected "
                             f"encoded bytes (variable-length uint8 or opaque) or a path string{raw}")
        if self.caption_key and kinds[self.caption_key] not in ("text", "bytes"):
            raise ValueError(f"{where}: caption field {self.caption_key!r} is {types[self.caption_key]}, not "
                             f"text; name a text field with #caption=FIELD")
        if self.label_key and kinds[self.label_key] != "int":
            if label is not None:
                raise ValueError(f"{where}: label field {label!r} is {types[label]}, not integers")
            self.label_key = None  # a field merely called "class" or "target" that holds something else
        self.image_is_text = bool(self.image_key) and kinds[self.image_key] == "text"
        base = os.path.dirname(path)  # relative image paths: beside the file, or under #root=
        self.root = base if root is None else root if os.path.isabs(root) or is_url(root) else os.path.join(base, root)
        self.fields = [k for k in (self.image_key, self.caption_key, self.label_key) if k]
        self.provides = frozenset({n for n, k in (("image", self.image_key), ("text", self.caption_key),
                                                  ("label", self.label_key)) if k})
        self._file, self._pid = None, None
        self._rows: tuple[Any, Any] | None = None  # (file, its table's field view)

    def __getstate__(self):
        state = super().__getstate__()
        state["_rows"] = None
        return state

    def describe(self) -> str:
        named = ", ".join(f"{n}={k}" for n, k in (("image", self.image_key), ("caption", self.caption_key),
                                                 ("label", self.label_key)) if k)
        return f"{self.kind}:{self.name}#table={self.table} ({self.length} rows; fields {named})"

    def labels(self) -> list[int | None]:
        if self.label_key is None:
            return [None] * self.length
        import h5py

        with h5py.File(self.name, "r") as f:
            return np.asarray(f[self.table].fields(self.label_key)[:]).astype(np.int64).reshape(-1).tolist()

    def keys(self) -> list[str]:
        return [f"{self.table}[{i}]" for i in range(self.length)]

    def record(self, index: int) -> Record:
        key = f"{self.table}[{index}]"
        f = self.handle()
        if self._rows is None or self._rows[0] is not f:
            self._rows = (f, f[self.table].fields(self.fields))
        try:
            row = self._rows[1][index]
        except OSError as err:  # a chunk that cannot be read or decompressed: this row, not the run
            return Record(key=f"{key} ({err})", missing="bad_table")
        return Record(
            key=key,
            image=self.image_value(row[self.image_key]) if self.image_key else None,
            caption=as_bytes(row[self.caption_key]) if self.caption_key else None,
            label=int(row[self.label_key]) if self.label_key else None,
        )

    def image_value(self, value) -> bytes | str | None:
        data = as_bytes(value)
        if not self.image_is_text:
            return data
        try:  # a string field holds a path; a fixed-length one may hold encoded bytes (not UTF-8)
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return data
        if not text or "\0" in text:
            return data or None
        return text if os.path.isabs(text) or is_url(text) else os.path.join(self.root, text)


def _hdf5(item, role: str, context) -> HDF5Source:
    o = item.options
    caption = o.get("caption") or o.get("column")
    if "table" in o:  # one compound dataset, fields named or found by name
        if "split" in o:
            raise ValueError(f"{item.path}: #split= is for the authors' layout; name a table with #table= alone")
        return HDF5Table(item.path, o["table"], role, o.get("image"), caption, o.get("label"), o.get("root"))
    if "root" in o:
        raise ValueError(f"{item.path}: #root= is for a table whose image field holds paths (#table=DSET)")
    return HDF5Source(item.path, o.get("split"), role, o.get("image"), caption, o.get("label"))


KINDS = (SourceKind("hdf5", _hdf5, frozenset({"image", "caption", "label", "split", "table", "root"}),
                    aliases=("h5",), suffixes=(".h5", ".hdf5")),)
