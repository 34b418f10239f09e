"""Writing files so that a kill at any moment leaves the old file or the new one, never half of one;
a lock so that two runs never write one folder."""
from __future__ import annotations

import os
import secrets
import stat
import warnings
from pathlib import Path
from typing import Callable, Sequence


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """`write(tmp)` fills a temp file in the same folder, which is then renamed to `path`; on any
    failure the temp file is removed."""
    path = Path(path)
    tmp = _new_temp_file(path)
    mode = stat.S_IMODE(os.stat(tmp).st_mode)  # what open() gave it: 0666 less the umask
    try:
        write(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # a writer that replaced the file (safetensors: 0600)
            os.chmod(tmp, mode)
        fsync_file(tmp)  # the data on disk before the name: a power cut never leaves an empty file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale(directory: str | os.PathLike, names: Sequence[str]) -> list[str]:
    """Remove the files `names` from `directory` (those present), for a save that does not write
    them: a file left from an earlier save would describe another model. Only regular files and
    links (a link itself, never its target); a folder of that name is not ours and stays. Returns
    the names removed."""
    directory = Path(directory)
    removed = []
    for name in names:
        path = directory / name
        if not (path.is_symlink() or path.is_file()):
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:  # gone meanwhile: what was wanted
            continue
        removed.append(name)
    if removed:
        fsync_dir(directory)  # the removal durable before the new files are written
    return removed


def _new_temp_file(path: Path) -> str:
    """An empty, new file beside `path`. Created like open() creates files (mode 0666 less the umask),
    not mkstemp's 0600: renamed into place it is the checkpoint others on a shared disk must read."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return str(tmp)
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class FolderLock:
    """An exclusive lock on a run folder (flock on FOLDER/.lock) held while a run writes there, so a
    second run on the same folder is refused. The kernel releases it when the process dies, so a
    killed run never leaves a stale lock."""

    NAME = ".train.lock"  # not the study runner's .lock: flock conflicts even within one process

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / self.NAME
        self.fd: int | None = None

    def __enter__(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FolderBusyError(f"{self.path.parent} is in use by another run (pid {holder}); "
                                  "two runs writing one folder would overwrite each other") from None
        except OSError as err:  # a filesystem without locks (some network mounts): run unguarded
            os.close(fd)
            warnings.warn(f"cannot lock {self.path} ({err}); nothing stops a second run on this folder",
                          stacklevel=2)
            return self
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


class FolderBusyError(ValueError):
    """Another live process holds the folder's lock."""
