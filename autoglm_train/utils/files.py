"""Files that are whole or absent: what a run, a sweep or a generator leaves for others to read.

A reader (a sweep summary, a resumed job, another rank) may look at any moment, and a job may be killed
at any moment (Slurm's time limit, a preemption, Ctrl-C): a file written in place can be seen, or left,
half-written. Writing beside it and renaming over it gives readers the old file or the new, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def atomic_write_with(path: str | Path, write_to: Callable[[Path], None]) -> None:
    """Replace ``path`` all at once by what ``write_to(tmp)`` writes to a temporary path in the same
    directory (a rename is atomic only within one file system): written, flushed to disk, renamed."""
    path = Path(path)
    with written_beside(path) as tmp:
        write_to(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    _fsync_directory(path.parent)


@contextlib.contextmanager
def written_beside(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the caller to write and rename over it; if anything fails it
    is removed, and an OS error (a full disk) becomes a ``DiskWriteError`` naming ``path``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        error = write_error(path, exc)
        if error is exc:
            raise
        raise error from exc


class DiskWriteError(OSError):
    """A file could not be written (a full disk, a quota, a read-only or vanished mount); the file it was
    to replace is as it was. The message names the path and the space left there."""

    def __str__(self) -> str:  # the message names the path already: not OSError's "[Errno 28] ...: 'path'"
        return str(self.strerror)


def free_space(path: str | Path) -> str:
    """``"1.2 GiB free of 50.0 GiB"`` on the file system holding ``path`` (its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return "free space unknown"
    return f"{usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB"


def write_error(path: Path, exc: BaseException) -> BaseException:
    """What a failed write raises: OS errors (errno set, also wrapped by torch's writers as a RuntimeError
    whose cause is one) become a ``DiskWriteError`` naming the path and the free space; anything else (a
    bug, Ctrl-C) passes unchanged."""
    if isinstance(exc, DiskWriteError):
        return exc
    cause = exc
    while cause is not None and not (isinstance(cause, OSError) and cause.errno):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        text = str(exc)
        if "file write failed" not in text and "No space left" not in text:
            return exc  # torch's zip writer says only this when the disk is full
        cause = OSError(errno.EIO, text)
    reason = os.strerror(cause.errno) if cause.errno else str(cause)
    hint = (
        " (the disk is full: free space or point paths.log_dir elsewhere)"
        if cause.errno
        in (
            errno.ENOSPC,
            errno.EDQUOT,
        )
        else ""
    )
    error = DiskWriteError(cause.errno, f"could not write {path}: {reason}{hint}; {free_space(path)}")
    error.filename = str(path)
    return error


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write_with(path, lambda tmp: _write_new_file(tmp, data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """``atomic_write_bytes`` of ``text`` in UTF-8, newlines as given."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, **dumps_kwargs) -> None:
    atomic_write_text(path, json.dumps(data, **dumps_kwargs) + "\n")


def _write_new_file(path: Path, data: bytes) -> None:
    # os.open with 0o666: the file gets the umask's permissions, as a plain write would (mkstemp's are 0600)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _fsync_file(path: Path) -> None:
    # without it a power loss after the rename can leave the new name pointing at empty blocks
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    # the rename itself is durable only once the directory is; some file systems refuse (best effort)
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
