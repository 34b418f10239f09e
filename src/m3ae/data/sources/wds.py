"""WebDataset tar shards (img2dataset layout): members `key.jpg|jpeg|png|webp` + `key.txt` or a
`caption` field in `key.json`, `key.cls` for labels; plain .tar or gzip-compressed .tar.gz.

Read with the standard library's streaming tarfile (no pickle decoders). Each (rank, worker)
share takes every `parts`-th shard of an endless sequence of per-epoch shard permutations, so
shares are disjoint within an epoch and no share ever runs dry. Position = (shard slot, records
read in it): resume re-opens that shard and skips the records already used.
"""
from __future__ import annotations

import glob
import io
import itertools
import json
import os
import re
import tarfile
from typing import Iterator
from zlib import error as zlib_error

import numpy as np

from .base import MAX_LABEL, Record, Source, is_url, open_file, shuffled_blocks
from .registry import SourceKind

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_MEMBER_BYTES = 256 << 20  # defaults of data.max_member_bytes / data.max_shard_bytes
MAX_SHARD_BYTES = 64 << 30
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a/{000..012}.tar` (zero-padded ranges) and `{a,b}` alternatives, nested left to right."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [p for o in options for p in expand_braces(head + o + tail)]


def list_shards(pattern: str) -> list[str]:
    """Expand braces, then globs for local paths; every local shard must exist."""
    shards: list[str] = []
    for p in expand_braces(pattern):
        if is_url(p):
            shards.append(p)
        elif any(ch in p for ch in "*?["):
            found = sorted(glob.glob(p))
            if not found:
                raise FileNotFoundError(f"no shards match {p!r}")
            shards += found
        elif os.path.isdir(p):
            found = sorted(f for f in glob.glob(os.path.join(p, "*")) if f.endswith((".tar", ".tar.gz", ".tgz")))
            if not found:
                raise FileNotFoundError(f"no .tar/.tar.gz shards in directory {p}")
            shards += found
        elif not os.path.exists(p):
            raise FileNotFoundError(f"shard does not exist: {p}")
        else:
            shards.append(p)
    if not shards:
        raise FileNotFoundError(f"no shards match {pattern!r}")
    return shards


def split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the file name."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(directory, stem) if directory else stem), ext.lower()


def group_to_record(key: str, files: dict[str, bytes], shard: str) -> Record:
    image = next((files[e] for e in IMAGE_EXTS if e in files), None)
    caption = files.get("txt")
    label = None
    meta = None
    if "json" in files:
        try:
            meta = json.loads(files["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # "[" * 10**5 overflows the stack
            meta = None
    if caption is None and isinstance(meta, dict) and isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    bad_label = None
    if "cls" in files:
        try:
            label = int(files["cls"].decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError):  # pretraining does not need it; evaluation counts it
            bad_label = f".cls {files['cls'][:20]!r} is not an integer"
        else:
            if not 0 <= label <= MAX_LABEL:  # 10^12 allocated 10^12 classes in knn / probe
                bad_label, label = f".cls {label if abs(label) < 10**20 else '(huge)'} is not a class index " \
                                   f"0..{MAX_LABEL}", None
    return Record(key=f"{os.path.basename(shard)}/{key}", image=image, caption=caption, label=label,
                  bad_label=bad_label, meta=meta if isinstance(meta, dict) else None)


# Extended headers (pax, GNU long names) are read whole into memory by tarfile, and each one reads
# the next header recursively: real ones are a few hundred bytes, one or two in a row. Larger or
# longer chains are a corrupt or hostile shard (a gzip bomb's "name" of gigabytes; a RecursionError).
MAX_EXTENDED_HEADER_BYTES = 1 << 20
MAX_EXTENDED_HEADERS = 16
_EXTENDED_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                   tarfile.SOLARIS_XHDTYPE)


class _StrictTarInfo(tarfile.TarInfo):
    """Stream-mode tarfile takes a header it cannot parse (or a partial one) past the first for the
    end of the archive: the rest of the shard would vanish without a trace. Make it an error. Also
    bounds extended headers (see MAX_EXTENDED_HEADER_BYTES)."""

    @classmethod
    def fromtarfile(cls, tar):
        depth = getattr(tar, "_m3ae_header_depth", 0)  # extended headers read before this one
        if depth > MAX_EXTENDED_HEADERS:
            raise tarfile.ReadError(f"more than {MAX_EXTENDED_HEADERS} extended headers in a row at byte "
                                    f"{tar.offset}")
        tar._m3ae_header_depth = depth + 1
        try:
            return super().fromtarfile(tar)
        # (Not in tarfile's __all__ nor its type stubs, but there since Python 3.2.)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as err:  # type: ignore[attr-defined]
            # Not a HeaderError: TarFile.next re-raises it instead of stopping quietly.
            where = f"bad tar header at byte {tar.offset}" if tar.offset else "not a tar archive"
            raise tarfile.ReadError(f"{where}: {err}") from None
        finally:
            tar._m3ae_header_depth = depth

    def _proc_member(self, tar):
        if self.type in _EXTENDED_TYPES and self.size > MAX_EXTENDED_HEADER_BYTES:
            raise tarfile.ReadError(f"an extended header of {self.size} bytes at byte {self.offset} "
                                    f"(> {MAX_EXTENDED_HEADER_BYTES})")
        return super()._proc_member(tar)  # type: ignore[misc]


# Tar writers pad an archive to a whole record (tarfile and GNU tar: 10 KiB; a larger blocking
# factor more): that much padding is read even when the members used up the whole shard budget.
END_PADDING_ALLOWANCE = 1 << 20


def _check_end(tar: tarfile.TarFile, budget: int) -> None:
    """After the end-of-archive block only zero padding may follow; anything else means a header in
    the middle was zeroed and the members after it would be lost unnoticed. At most `budget` bytes
    of padding are read (what is left of the shard budget plus END_PADDING_ALLOWANCE: gzip makes
    gigabytes of zeros cheap)."""
    assert tar.fileobj is not None
    while chunk := tar.fileobj.read(1 << 16):
        if chunk.strip(b"\0"):
            raise tarfile.ReadError(f"data after an end-of-archive block at byte {tar.offset}")
        budget -= len(chunk)
        if budget < 0:
            raise tarfile.ReadError("more padding after the end-of-archive block than the shard byte budget")


def iter_tar(shard: str, max_member_bytes: int = MAX_MEMBER_BYTES,
             max_shard_bytes: int = MAX_SHARD_BYTES) -> Iterator[Record]:
    """Records of one shard, in order. A truncated or corrupt shard yields a record marked
    `truncated_tar` (its key names the shard, the member it broke in and why), then stops. A group
    with a member over `max_member_bytes` is yielded as `too_large` without reading it (memory stays
    bounded whatever a header claims); past `max_shard_bytes` of members (a gzip bomb) the group
    being read is `too_large` and the shard ends."""
    current: str | None = None
    files: dict[str, bytes] = {}
    oversize, total = False, 0

    def group(key: str) -> Record:
        if oversize:
            return Record(key=f"{os.path.basename(shard)}/{key}", missing="too_large")
        return group_to_record(key, files, shard)

    try:
        with open_file(shard, "rb") as raw:
            with tarfile.open(fileobj=raw, mode="r|*", tarinfo=_StrictTarInfo) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = split_name(member.name)
                    if key != current:
                        if current is not None:
                            yield group(current)
                        current, files, oversize = key, {}, False
                    total += member.size
                    if total > max_shard_bytes:
                        oversize = True
                        break
                    if member.size > max_member_bytes:
                        oversize = True  # the stream skips its data on the next member
                        continue
                    f = tar.extractfile(member)
                    data = f.read() if f is not None else b""
                    if len(data) != member.size:
                        raise EOFError("short member")
                    files[ext] = data
                else:
                    _check_end(tar, max(max_shard_bytes - total, 0) + END_PADDING_ALLOWANCE)
    except (tarfile.TarError, EOFError, OSError, zlib_error) as err:
        # The group being read is lost; the complete groups before it were already yielded.
        where = f"{os.path.basename(shard)}/{current}" if current is not None else shard
        yield Record(key=f"{where} ({type(err).__name__}: {err})", missing="truncated_tar")
        return
    if current is not None:
        yield group(current)


PEEK_SHARDS, PEEK_RECORDS = 4, 16  # what peek_modalities reads at most: records from each of the first shards


def peek_modalities(shards: list[str]) -> set[str]:
    """Which of "text" / "label" the shards hold, as far as one can tell without reading them all:
    present in any of the first PEEK_RECORDS records of any of the first PEEK_SHARDS shards. One
    record without its .txt (or a truncated first shard) must not drop the captions of the whole
    set; records that lack what the set provides are then counted skips."""
    found: set[str] = set()
    for shard in shards[:PEEK_SHARDS]:
        for record in itertools.islice(iter_tar(shard), PEEK_RECORDS):
            if record.caption is not None:
                found.add("text")
            if record.label is not None:
                found.add("label")
            if len(found) == 2:  # the usual case: the first record has everything
                return found
    return found


class WebDatasetSource(Source):
    kind = "wds"
    exact = False

    def __init__(self, pattern: str, role: str = "paired", shuffle_block: int = 0):
        self.name = pattern
        self.shards = list_shards(pattern)
        self.role = role
        # Records of a shard are yielded in a seeded random order within consecutive blocks of this
        # many (0 or 1: as stored). Shards are often sorted (by product id, by class): without it, a
        # batch is a run of near-identical samples. Fixed blocks keep the position resumable exactly.
        self.shuffle_block = int(shuffle_block)
        self.max_member_bytes, self.max_shard_bytes = MAX_MEMBER_BYTES, MAX_SHARD_BYTES  # see iter_tar
        found = peek_modalities(self.shards)
        if role == "image":
            found.discard("text")
        self.provides = frozenset({"image"} | found)

    def describe(self) -> str:
        return f"wds:{self.name} ({len(self.shards)} shards)"

    def shard_order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(len(self.shards))

    def iterate(self, part, parts, seed, state=None, epochs=None):
        slot, skip = (0, 0) if state is None else (int(state[0]), int(state[1]))
        n = len(self.shards)
        while True:
            pos = slot * parts + part
            epoch, within = divmod(pos, n)
            if epochs is not None and epoch >= epochs:
                return
            shard = self.shards[int(self.shard_order(seed, epoch)[within])]
            done = 0
            records = iter_tar(shard, self.max_member_bytes, self.max_shard_bytes)
            for record in shuffled_blocks(records, self.shuffle_block, (seed, epoch, within)):
                done += 1
                if done <= skip:
                    continue
                if self.role == "image":
                    record.caption = None
                yield (slot, done), record
            slot, skip = slot + 1, 0


class ShardWriter:
    """Writes `pattern % index` tar shards of at most `max_count` samples each.
    A sample is a dict of key plus extension -> bytes/str/int (e.g. jpg, txt, cls, json)."""

    def __init__(self, pattern: str, max_count: int = 1000):
        if "%" not in pattern:
            raise ValueError("the shard pattern needs a %d-style index, e.g. out/shard-%05d.tar")
        self.pattern = pattern
        self.max_count = max_count
        self.index = -1
        self.count = 0
        self.tar: tarfile.TarFile | None = None
        self.written: list[str] = []

    def _next(self) -> tarfile.TarFile:
        self.close()
        self.index += 1
        path = self.pattern % self.index
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.tar = tarfile.open(path, "w:gz" if path.endswith((".gz", ".tgz")) else "w")
        self.written.append(path)
        self.count = 0
        return self.tar

    def write(self, sample: dict) -> None:
        tar = self.tar
        if tar is None or self.count >= self.max_count:
            tar = self._next()
        key = sample["__key__"]
        for ext, value in sample.items():
            if ext == "__key__":
                continue
            if isinstance(value, str):
                value = value.encode("utf-8")
            elif isinstance(value, int):
                value = str(value).encode()
            elif isinstance(value, dict):
                value = json.dumps(value).encode("utf-8")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(value)
            info.mtime = 0  # reproducible shards
            tar.addfile(info, io.BytesIO(value))
        self.count += 1

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
KINDS = (SourceKind("wds", lambda item, role, context: WebDatasetSource(item.path, role=role),
                    aliases=("tar", "webdataset"), suffixes=TAR_SUFFIXES,
                    claims_path=lambda path: "{" in path,  # a {000..099} shard pattern
                    # img2dataset's webdataset output: tar shards, whatever .parquet/.json sit beside them
                    claims_directory=lambda path, names: any(n.endswith(TAR_SUFFIXES) for n in names)),)
