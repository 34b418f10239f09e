"""Parquet files: one file, a glob, a {..} pattern or a folder of them (img2dataset's `parquet`
output: `00000.parquet` with `jpg` bytes + `caption`/`txt`, failed downloads as null images).
Streamed one row group at a time (see table.py); only the columns used are read. Footers are read
up front, so a file that is not Parquet, or lacks a mapped column, stops the run before it starts.
"""
from __future__ import annotations

import glob
import os

from .base import is_url, open_file, require_path
from .table import OpenFiles, TableSource, import_pyarrow, log
from .wds import expand_braces
from .registry import SourceKind


def list_parquet(pattern: str) -> list[str]:
    files: list[str] = []
    for p in expand_braces(pattern):
        if is_url(p):
            files.append(p)
        elif any(ch in p for ch in "*?["):
            files += sorted(glob.glob(p))
        elif os.path.isdir(p):
            files += sorted(glob.glob(os.path.join(p, "**", "*.parquet"), recursive=True))
        else:
            files.append(require_path(p, "Parquet file"))
    if not files:
        raise FileNotFoundError(f"no Parquet files match {pattern!r}")
    return files


class ParquetSource(TableSource):
    kind = "parquet"
    unit_word = "row groups"

    def __init__(self, path: str, image: str | None = None, caption: str | None = None, label: str | None = None,
                 root: str | None = None, role: str = "paired", files: list[str] | None = None):
        super().__init__(role)
        pa = import_pyarrow()
        self.name = path
        self.files = files if files is not None else list_parquet(path)
        self.units, self.unit_rows = [], []
        first_dir = os.path.dirname(self.files[0])
        for index, file in enumerate(self.files):
            try:
                with open_file(file, "rb") as f:
                    meta = pa.parquet.ParquetFile(f).metadata
                    schema = meta.schema.to_arrow_schema()
            except (pa.ArrowException, OSError) as err:
                raise ValueError(f"{file}: not a readable Parquet file ({err})") from None
            if index == 0:  # relative image paths: beside the (first) Parquet file, or under #root=
                base = first_dir if root is None else root if os.path.isabs(root) or is_url(root) else \
                    os.path.join(first_dir, root)
                self._choose(schema, file, image, caption, label, base)
            missing = [c for c in self.columns if c not in schema.names]
            if missing:
                raise ValueError(f"{file}: no column(s) {missing} (columns: {schema.names})")
            for g in range(meta.num_row_groups):
                if meta.row_group(g).num_rows:
                    self.units.append((index, g))
                    self.unit_rows.append(meta.row_group(g).num_rows)
        if not self.units:
            raise ValueError(f"parquet:{path}: the files hold no rows")
        self._open = OpenFiles(close=_close_handle)  # (what to close, the reader) per file

    def unit_name(self, unit) -> str:
        return f"{os.path.basename(self.files[unit[0]])}:rg{unit[1]}"

    def read_batches(self, unit):
        index, group = unit
        reader = self._open.get(index, lambda: self._reader(self.files[index]))[1]
        return reader.iter_batches(self.batch_rows, row_groups=[group], columns=self.columns, use_threads=False)

    @staticmethod
    def _reader(path: str):
        """(what to close, the ParquetFile). Local files are memory-mapped: pages are read as rows
        are decoded (clean, reclaimable page cache), where a file object makes pyarrow hold the row
        group's column chunks in memory."""
        pa = import_pyarrow()
        if is_url(path):
            f = open_file(path, "rb")
            return f, pa.parquet.ParquetFile(f)
        pf = pa.parquet.ParquetFile(path, memory_map=True)
        return pf, pf


def _close_handle(entry) -> None:
    entry[0].close()


def _parquet(item, role: str, context) -> ParquetSource:
    from .hf import hub_hint

    o = item.options
    source = ParquetSource(item.path, o.get("image"), o.get("caption") or o.get("column"), o.get("label"),
                           o.get("root"), role=role)
    hint = hub_hint(item.path)
    if hint:  # read as plain Parquet, every file of every split is one set
        log.warning("parquet:%s reads all %d Parquet files together (every split); %s", item.path,
                    len(source.files), hint)
    return source


def _parquet_directory(path: str, names: list[str]) -> bool:
    # img2dataset's parquet output; its `files` output (with .parquet metadata beside) is a folder
    from .folder import is_img2dataset_files

    return any(n.endswith(".parquet") for n in names) and not is_img2dataset_files(path, names)


KINDS = (SourceKind("parquet", _parquet, frozenset({"image", "caption", "label", "root"}), aliases=("pq",),
                    suffixes=(".parquet",), claims_directory=_parquet_directory),)
