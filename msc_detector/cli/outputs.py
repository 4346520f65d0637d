r"""Output files: checked before the work starts, and written whole or not at all.

And the text that goes in them. A file name is bytes on Linux; one that is not valid
UTF-8 (a Latin-1 ``café.png`` is ``b"caf\xe9.png"``) reaches Python with each stray
byte as a lone surrogate (``"caf\udce9.png"``), which no UTF-8 file can hold.
:func:`printable` shows each such byte as U+FFFD, the replacement character;
:func:`quote_path` keeps a form that leads back to the file.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import quote_from_bytes

from msc_detector._atomic import atomic_write, hidden_sibling, write_target
from msc_detector.cli import interrupts
from msc_detector.cli.errors import UserError

__all__ = ["atomic_file", "check_writable", "printable", "quote_path"]

_SURROGATE = re.compile("[\ud800-\udfff]")


def printable(text: str) -> str:
    """Return ``text`` with each lone surrogate (a byte of a name that is not UTF-8) as U+FFFD.

    Text without one comes back unchanged.
    """
    return _SURROGATE.sub("\ufffd", text)


def quote_path(path: str) -> str:
    """Return the bytes of the file name ``path``, percent-encoded as in a URL.

    ``os.fsdecode(urllib.parse.unquote_to_bytes(quoted))`` gives back a name that opens
    the file, whatever its bytes. Letters, digits, ``/`` and ``_.-~`` stay as they are;
    every other byte is ``%XX`` (UTF-8 ``é`` is ``%C3%A9``, Latin-1 ``é`` is ``%E9``).
    """
    return quote_from_bytes(os.fsencode(path), safe="/")


def check_writable(output: str) -> None:
    """Raise :class:`UserError` now, not after an hour of work, if ``output`` cannot be written.

    It must not be a folder, its folder must exist, and a file must be creatable there
    (tried, then removed: permissions, a read-only disk). For a symbolic link, "there"
    is its target's folder: outputs are written through links.
    """
    target = write_target(output)
    if target.is_dir():
        raise UserError(f"the output {output!r} is a folder; name a file")
    if not target.parent.is_dir():
        raise UserError(
            f"cannot write {output!r}: the folder {str(target.parent)!r} does not exist"
        )
    probe = hidden_sibling(target, ".probe")
    try:
        probe.open("xb").close()
    except OSError as exc:
        raise UserError(f"cannot write {output!r}: {exc.strerror or exc}") from exc
    with contextlib.suppress(OSError):
        probe.unlink()


@contextlib.contextmanager
def atomic_file(output: str, binary: bool = False) -> Iterator[IO[Any]]:
    """Open a file that replaces ``output`` when the block succeeds, as model files are written.

    See :func:`msc_detector._atomic.atomic_write`: the data goes to a hidden file beside
    the file replaced, is fsync'ed and renamed over it; a symbolic link is written
    through (its target is replaced); a replaced file keeps its permissions. If the
    block raises, or Ctrl-C was pressed (:func:`msc_detector.cli.interrupts.check`),
    ``output`` is left as it was, so an interrupted run never leaves a truncated file
    that looks complete. A text file is UTF-8, newlines as written.

    Raises
    ------
    UserError
        If the file cannot be created.
    """
    check_writable(output)
    stack = contextlib.ExitStack()
    try:  # only opening is turned into a UserError, not what the block raises
        handle = stack.enter_context(atomic_write(output, binary))
    except OSError as exc:
        raise UserError(f"cannot write {output!r}: {exc.strerror or exc}") from exc
    with stack:
        yield handle
        interrupts.check()  # after Ctrl-C, even one Python could not raise: no output
