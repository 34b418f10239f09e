"""Writing files so that a kill at any moment leaves the old file or the new one, never half of one;
a lock so that two runs never write one folder."""
from __future__ import annotations

import os
import re
import secrets
import stat
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

# A temp file (.NAME.<12 hex>.tmp) is abandoned, and removed by the next write of NAME in its folder,
# only when BOTH hold:
# - it was last modified more than STALE_TEMP_AGE seconds ago. A live writer modifies its temp file
#   all the while it writes (a checkpoint's hundreds of MB included); ten minutes, not one, leaves
#   room for a stalled disk and for clock skew between hosts sharing one (mtime is the server's).
# - no process holds a lock on it: a writer holds an flock on its temp file from creating it to
#   renaming it (taken again when its writer replaced the file, as safetensors does), which covers
#   a live writer that wrote nothing for a while (suspended, slow fsync). The kernel drops the lock
#   when the writer dies, so a killed writer's file is free. Where files cannot be locked (no
#   fcntl, some network mounts) the age alone decides.
# Two processes saving into one folder thus never delete each other's live temp files; only files
# named exactly as atomic_write names them for the names being written are considered, never a
# folder or a link.
STALE_TEMP_AGE = 600.0
_TEMP_HEX = 12  # secrets.token_hex(6)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """`write(tmp)` fills a temp file in the same folder, which is then renamed to `path`; on any
    failure the temp file is removed. Temp files for `path` that killed writers left are removed
    first (remove_stale_temps)."""
    path = Path(path)
    remove_stale_temps(path.parent, [path.name])
    tmp, guard = _new_temp_file(path)
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # what open() gave it: 0666 less the umask
        write(tmp)
        if guard is not None and os.stat(tmp).st_ino != os.fstat(guard).st_ino:
            new = _locked_fd(tmp)  # a writer that replaced the file: lock the new one
            os.close(guard)
            guard = new
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # a writer that replaced the file (safetensors: 0600)
            os.chmod(tmp, mode)
        fsync_file(tmp)  # the data on disk before the name: a power cut never leaves an empty file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        if guard is not None:  # closed after the rename: the temp name is never unlocked while written
            os.close(guard)


def remove_stale_temps(directory: str | os.PathLike, names: Sequence[str],
                       older_than: float = STALE_TEMP_AGE) -> list[str]:
    """Remove the temp files atomic_write made for `names` in `directory` that their writer left
    (killed between creating and renaming them): exactly `.NAME.<12 hex>.tmp`, regular files only,
    last modified more than `older_than` seconds ago and locked by no one (see STALE_TEMP_AGE for
    why both). Returns the names removed."""
    patterns = [re.compile(re.escape(f".{name}.") + f"[0-9a-f]{{{_TEMP_HEX}}}" + re.escape(".tmp"))
                for name in names]
    cutoff = time.time() - older_than
    removed = []
    try:
        entries = list(os.scandir(str(directory)))
    except OSError:  # no folder yet (or unreadable): nothing of ours to remove
        return []
    for entry in entries:
        if any(p.fullmatch(entry.name) for p in patterns) and _remove_if_abandoned(entry.path, cutoff):
            removed.append(entry.name)
    return sorted(removed)


def require_new_folder(directory: str | os.PathLike, writes: Sequence[str], what: str) -> None:
    """Refuse `directory` unless it is absent or empty: a command that writes a whole model there must
    not pair its files with another's. Abandoned temp files of the `writes` names (a write into it
    that was killed, see remove_stale_temps) are removed first, so such a folder is empty again."""
    path = Path(directory)
    if path.is_dir():
        remove_stale_temps(path, writes)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{path} exists and is not an empty folder: {what} into a new folder")


def _remove_if_abandoned(path: str, cutoff: float) -> bool:
    try:
        before = os.lstat(path)
        if not stat.S_ISREG(before.st_mode) or before.st_mtime > cutoff:
            return False
        fd = _open_for_lock(path, getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:  # gone meanwhile (renamed into place, or removed by another save), unreadable
        return False
    try:
        held = os.fstat(fd)
        if (held.st_ino, held.st_dev) != (before.st_ino, before.st_dev) or held.st_mtime > cutoff:
            return False
        if not _try_lock(fd):  # a live writer holds it
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    """An exclusive flock on `fd`, without waiting: False when another holds one; True when taken or
    when locks are not available here (the age alone then decides)."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a filesystem without locks
        return True
    return True


def _locked_fd(path: str | os.PathLike) -> int | None:
    """An open descriptor of `path` holding an flock on it (released by closing it); None where
    there are no flocks (not POSIX: an open file could not be renamed there)."""
    try:
        import fcntl  # noqa: F401
    except ImportError:
        return None
    fd = _open_for_lock(path)
    _try_lock(fd)  # a filesystem without locks: held in vain, the age alone protects
    return fd


def _open_for_lock(path: str | os.PathLike, flags: int = 0) -> int:
    """Open for writing where allowed (NFS emulates flock with byte-range locks, which an exclusive
    lock needs a writable descriptor for), else for reading; nothing is written."""
    try:
        return os.open(path, os.O_RDWR | flags)
    except PermissionError:
        return os.open(path, os.O_RDONLY | flags)


def remove_stale(directory: str | os.PathLike, names: Sequence[str]) -> list[str]:
    """Remove the files `names` from `directory` (those present), for a save that does not write
    them: a file left from an earlier save would describe another model. Only regular files and
    links (a link itself, never its target); a folder of that name is not ours and stays. Returns
    the names removed."""
    directory = Path(directory)
    remove_stale_temps(directory, names)  # their abandoned temp files too
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


def _new_temp_file(path: Path) -> tuple[str, int | None]:
    """An empty, new file beside `path`, and a descriptor holding an flock on it (_locked_fd), so
    that no other save takes it for abandoned. Created like open() creates files (mode 0666 less
    the umask), not mkstemp's 0600: renamed into place it is the checkpoint others on a shared disk
    must read."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(_TEMP_HEX // 2)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        try:
            return str(tmp), _locked_fd(tmp)
        except BaseException:
            os.unlink(tmp)
            raise
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
