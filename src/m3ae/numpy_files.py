"""Reading .npy and .npz files that someone else wrote (feature files, JAX checkpoints): numpy
allocates whatever an array's header declares before it reads the data, so the headers are checked
first (`check_numpy_file`); the arrays of a feature file then meet one set of rules, whichever
command reads them (`check_feature_arrays`). Kept free of torch: t-SNE and the JAX reader use it
without loading torch."""
from __future__ import annotations

import math
import os
import zipfile
import zlib
from pathlib import Path

from .config import physical_memory


def check_numpy_file(path: str | os.PathLike, memory_bytes: int | None = None) -> None:
    """Refuse a .npy or .npz file (ValueError naming it and the array) whose arrays' headers declare
    more bytes than the file holds for them, or more than this machine's memory. numpy allocates
    what a header declares before it reads the data: a 1 KB compressed .npz of zeros, or a .npy
    whose header lies, would otherwise take the machine's memory (or fail only after trying)."""
    import numpy as np

    path = Path(path)
    limit = physical_memory() if memory_bytes is None else memory_bytes

    def check(name: str | None, stream, stored: int) -> None:
        where = f"{path}: {name}" if name else str(path)
        try:
            version = np.lib.format.read_magic(stream)
            if version not in ((1, 0), (2, 0)):  # 3.0: only for non-Latin-1 field names, never an array here
                raise ValueError(f"format version {version[0]}.{version[1]} is not read here")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _fortran, dtype = read_header(stream)  # the header only, nothing allocated
        except ValueError as err:
            raise ValueError(f"{where}: not a numpy array ({err})") from None
        declared = math.prod(shape) * dtype.itemsize
        data = stored - stream.tell()
        if not dtype.hasobject and declared > data:  # object arrays: numpy refuses them itself
            raise ValueError(f"{where}: its header declares {shape} {dtype} ({declared:,} bytes), "
                             f"the file holds {max(data, 0):,}")
        if limit is not None and declared > limit:
            raise ValueError(f"{where}: {shape} {dtype} would take {declared / 2**30:.1f} GiB, more than "
                             f"this machine's memory ({limit / 2**30:.1f} GiB)")

    with open(path, "rb") as stream:
        is_zip = stream.read(4) == b"PK\x03\x04"
    if is_zip or path.suffix.lower() == ".npz":
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError):  # cut or corrupt: the reader says so, as for any zip
            return
        with archive:
            for info in archive.infolist():
                if info.filename.endswith(".npy"):
                    try:
                        with archive.open(info) as member:
                            check(info.filename, member, info.file_size)  # the uncompressed size
                    except (zipfile.BadZipFile, EOFError, OSError, zlib.error):  # a corrupt member: as above
                        return
    else:
        with open(path, "rb") as stream:
            check(None, stream, os.fstat(stream.fileno()).st_size)


def check_feature_arrays(path: str | os.PathLike, features, labels) -> None:
    """The rules every reader of a feature file (`m3ae embed`'s output) applies, as a ValueError
    naming the file: real (N, D >= 1) features with finite rows, and (N,) labels. Text or complex
    features fail (or lose their imaginary part) deep in numpy, unnamed; NaN scores a meaningless
    accuracy, or fails an SVD with "did not converge"."""
    import numpy as np

    if not isinstance(features, np.ndarray) or features.dtype.kind not in "fiub" or features.ndim != 2 \
            or features.shape[1] < 1:
        raise ValueError(f"{path}: 'features' must be a real (N, D) array with D >= 1, got "
                         f"{getattr(features, 'dtype', type(features).__name__)} {getattr(features, 'shape', '')}")
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or len(labels) != len(features):
        raise ValueError(f"{path}: 'labels' must be (N,) = ({len(features)},), got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {getattr(labels, 'shape', '')}")
    if features.dtype.kind == "f":
        finite = np.isfinite(features).all(axis=1)
        if not finite.all():
            raise ValueError(f"{path}: {int((~finite).sum())} of {len(features)} feature rows hold NaN or inf "
                             f"(first: row {int(np.argmin(finite))})")
