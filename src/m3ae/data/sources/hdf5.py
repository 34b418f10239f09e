"""HDF5 files. The authors' layout is found by itself: `jpg` (encoded bytes) + `caption` (UTF-8
bytes) for pairs; `text` for text corpora; `train_jpg`/`train_labels` and `val_jpg`/`val_labels`
for classification. Any other layout: name the datasets with #image= / #caption= / #label=
(paths such as `train/images` work; images are encoded bytes, one per row).
The file is opened lazily in each worker (h5py handles do not survive a fork)."""
from __future__ import annotations

import os

import numpy as np

from ...optional import require
from .base import IndexedSource, Record, require_path


def as_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, np.ndarray):
        return value.tobytes()
    if isinstance(value, (np.void, np.bytes_)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


class HDF5Source(IndexedSource):
    kind = "hdf5"

    def __init__(self, path: str, split: str | None = None, role: str | None = None, image: str | None = None,
                 caption: str | None = None, label: str | None = None):
        h5py = require("h5py", "reading HDF5 files")

        self.name = path
        with h5py.File(require_path(path, "HDF5 file"), "r") as f:
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
                raise ValueError(f"{path}: no datasets of the M3AE layout (jpg/caption, text, "
                                 f"train_jpg/train_labels); found {sorted(keys)}; name yours with #image=NAME "
                                 f"#caption=NAME [#label=NAME]")
            for k in (self.image_key, self.caption_key, self.label_key):
                if k is not None and k not in keys:
                    raise ValueError(f"{path}: dataset {k!r} missing (found {sorted(keys)})")
            main = self.image_key or self.caption_key
            self.length = len(f[main])
            # A shorter caption or label list than the image list: the records past its end are
            # counted bad samples, not an IndexError that ends the run.
            self.sizes = {k: len(f[k]) for k in (self.caption_key, self.label_key) if k is not None}
        self.provides = frozenset({n for n, k in (("image", self.image_key), ("text", self.caption_key),
                                                  ("label", self.label_key)) if k})
        self._file, self._pid = None, None

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

    def record(self, index: int) -> Record:
        if self._file is None or self._pid != os.getpid():  # reopen after a fork
            import h5py

            self._file, self._pid = h5py.File(self.name, "r"), os.getpid()
        f = self._file
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
