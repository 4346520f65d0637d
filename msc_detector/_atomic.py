"""Replace a file whole or not at all: the one way msc_detector writes a file in place.

Model files and the command line's tables and reports all go through
:func:`atomic_write`, so that they behave alike: an interrupted or failed write leaves
the old file (or none), a symbolic link keeps pointing at its target, and a replaced
file keeps its permissions.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "hidden_sibling", "write_target"]


def write_target(path: str | os.PathLike[str]) -> Path:
    """Return the file that writing ``path`` changes: a symbolic link's final target."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def hidden_sibling(target: Path, suffix: str) -> Path:
    """Return a new hidden name beside ``target``, ending with ``suffix``."""
    return target.parent / f".{target.name[:200]}.{os.urandom(6).hex()}{suffix}"


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], binary: bool = True, encoding: str = "utf-8"
) -> Iterator[IO[Any]]:
    """Yield a new file that replaces ``path`` when the block ends without an exception.

    * The data goes to a hidden file beside the file replaced, is flushed and fsync'ed,
      and is renamed over it; the folder is fsync'ed after the rename. Whatever stops
      the process, ``path`` holds the old file or the new one, never part of one (a
      ``kill -9`` can leave the hidden ``.NAME.RANDOM.tmp`` file behind).
    * A symbolic link is written through: its target is replaced and the link stays.
    * A replaced file keeps its permission bits; a new file gets ``0o666`` less the
      umask, as :func:`open` gives.
    * If the block raises (``KeyboardInterrupt`` included), the hidden file is removed
      and ``path`` is left as it was.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write.
    binary : bool, default=True
        Yield a binary file; else a text file in ``encoding`` that writes newlines as
        given (``newline=""``).
    encoding : str, default="utf-8"
        The text file's encoding.

    Raises
    ------
    OSError
        If the hidden file cannot be created or written, or the rename fails.
    """
    target = write_target(path)
    temp = hidden_sibling(target, ".tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(temp, flags, 0o666)  # 0o666: the umask applies, as with open()
    try:
        handle: IO[Any] = (
            os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding=encoding, newline="")
        )
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileNotFoundError):
            replaced = os.stat(target)
            if stat.S_ISREG(replaced.st_mode):
                os.chmod(temp, stat.S_IMODE(replaced.st_mode))
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_folder(target.parent)
