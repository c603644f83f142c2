"""Writing outputs safely: atomic replacement, early writability checks, folder locks.

Every file the tool writes goes through :func:`atomic_write`: the bytes land in a
temporary file beside the target, are flushed to disk, and only then renamed over it, so
an interrupted or failed command leaves each output either complete or absent. Outputs
are checked with :func:`check_writable` before any work starts, so a typo in ``--out``
costs a second, not an hour of inversion.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from sparseinv.errors import UsageError, first_line


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write instead of ``path``; renamed over it only if the block succeeds.

    For writers that want a file name (``safetensors.save_file``, ``torch.save``). The
    temporary file is removed when the block fails or is interrupted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # Some writers (safetensors) create their file 0600; outputs follow the umask like any other file.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2) + "\n")


def atomic_save(path: str | os.PathLike, save: Callable[[str], None]) -> Path:
    """Run ``save(temporary_file_name)`` and rename the result over ``path``."""
    with atomic_path(path) as tmp:
        save(str(tmp))
    return Path(path)


def check_writable(path: str | os.PathLike, flag: str = "--out", folder: bool = False) -> None:
    """Refuse an output that cannot be written, before any work starts.

    Args:
        path: The file (or, with ``folder``, the folder) the command will write.
        flag: The option that named it, for the message.
        folder: ``path`` is a folder to create or reuse, not a file.

    Raises:
        UsageError: ``path`` is of the wrong kind, or its folder cannot be created or written.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UsageError(f"{flag} '{path}' exists and is not a folder.")
    if not folder and path.is_dir():
        raise UsageError(f"{flag} '{path}' is a folder, not a file.")
    # The nearest existing ancestor decides whether the missing folders can be made.
    parent = path if folder else path.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} '{path}' cannot be created: '{existing}' is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} '{path}' cannot be written: no permission to write in '{existing}'.")
    if not folder and path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} '{path}' cannot be written: the file is read-only.")
    _probe(parent, path, flag)


def _probe(folder: Path, path: Path, flag: str) -> None:
    """Make ``folder`` (and the missing ones above it) and a file in it, then remove what was made.

    Permission bits do not tell everything (a read-only or virtual file system, root's
    rights, a full disk): trying is the only check that answers for every reason.
    """
    made = []
    try:
        missing = []
        for candidate in (folder, *folder.parents):
            if candidate.exists():
                break
            missing.append(candidate)
        for candidate in reversed(missing):
            candidate.mkdir()
            made.append(candidate)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".sparseinv-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise UsageError(f"{flag} '{path}' cannot be written ({first_line(err)}).") from None
    finally:
        for candidate in reversed(made):
            with contextlib.suppress(OSError):
                candidate.rmdir()


class FolderLock:
    """An exclusive, advisory lock on a folder, held while one process writes into it.

    A second process that asks for the same folder is refused at once instead of
    writing beside the first. The lock dies with its process, so a killed run leaves
    nothing to clean up.
    """

    def __init__(self, folder: str | os.PathLike, flag: str = "--out") -> None:
        self.folder, self.flag = Path(folder), flag
        self._file = None

    def acquire(self) -> "FolderLock":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            file = open(self.folder / ".lock", "a")
        except OSError as err:
            raise UsageError(f"{self.flag} '{self.folder}' cannot be written ({first_line(err)}).") from None
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            raise UsageError(f"{self.flag} '{self.folder}' is being written by another sparseinv process; wait for it or choose another folder.") from None
        self._file = file
        return self

    @classmethod
    def refuse_if_held(cls, folder: str | os.PathLike, flag: str = "--out") -> None:
        """Refuse now if another process holds ``folder``'s lock (before minutes of model loading).

        Only a folder sparseinv has locked before is probed; nothing is created. The real
        lock is still taken when writing starts.
        """
        if (Path(folder) / ".lock").is_file():
            cls(folder, flag).acquire().release()

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
