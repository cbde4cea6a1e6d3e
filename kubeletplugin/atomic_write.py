# SPDX-License-Identifier: Apache-2.0
"""The one atomic file write helper: readers see the old file or the new one.

Used for CDI specs and the plugin's state file. Every durable call blocks on
fsync (milliseconds on a busy disk): async callers run it in a worker thread,
or on the event loop only where it is known to be quick (see
`driver.NxDriver._on_loop`).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Replace `path` with `data` atomically and durably.

    Writes a temporary file in the same directory (so the rename stays on one
    filesystem), fsyncs it, renames it over `path`, then fsyncs the directory
    so the rename itself survives a crash. The temporary name starts with a
    dot and ends in `.tmp`, so directory scanners that pick files by
    extension (CDI reads `*.json` and `*.yaml`) never see a half-written file.
    The directory must exist. `durable=False` keeps the atomic rename but
    skips both fsyncs: for files on tmpfs, or that are rebuilt after a power
    loss anyway.
    """
    directory = path.parent
    fd, tmp_name = _create_temporary(path)
    try:
        try:
            # mkstemp creates 0600; set the mode explicitly, whatever the umask.
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    if durable:
        fsync_directory(directory)


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new file `.<name>.<random>.tmp` next to `path`, opened for writing (mode 0600).

    What `tempfile.mkstemp` does, for half its cost (CDI specs are written on
    every prepare).
    """
    for _ in range(100):
        name = f"{path.parent}/.{path.name}.{os.urandom(6).hex()}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(name, flags, 0o600), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path))


def remove_durably(path: Path, *, durable: bool = True) -> bool:
    """Remove `path` and fsync its directory; False when it did not exist."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    if durable:
        fsync_directory(path.parent)
    return True


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries (creations, renames, removals) to disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
