"""Output files: checked before the work starts, and written whole or not at all."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from msc_detector.cli.errors import UserError

__all__ = ["atomic_file", "check_writable"]


def _hidden_sibling(target: Path, suffix: str) -> Path:
    return target.parent / f".{target.name[:200]}.{os.urandom(6).hex()}{suffix}"


def check_writable(output: str) -> None:
    """Raise :class:`UserError` now, not after an hour of work, if ``output`` cannot be written.

    It must not be a folder, its folder must exist, and a file must be creatable there
    (tried, then removed: permissions, a read-only disk).
    """
    target = Path(output)
    if target.is_dir():
        raise UserError(f"the output {output!r} is a folder; name a file")
    if not target.parent.is_dir():
        raise UserError(
            f"cannot write {output!r}: the folder {str(target.parent)!r} does not exist"
        )
    probe = _hidden_sibling(target, ".probe")
    try:
        probe.open("xb").close()
    except OSError as exc:
        raise UserError(f"cannot write {output!r}: {exc.strerror or exc}") from exc
    with contextlib.suppress(OSError):
        probe.unlink()


@contextlib.contextmanager
def atomic_file(output: str, binary: bool = False) -> Iterator[IO[Any]]:
    """Open a hidden file beside ``output`` that replaces ``output`` when the block succeeds.

    If the block raises, the hidden file is removed and ``output`` is left as it was, so
    an interrupted run never leaves a truncated file that looks complete.

    Raises
    ------
    UserError
        If the file cannot be created.
    """
    check_writable(output)
    temp = _hidden_sibling(Path(output), ".tmp")
    try:
        handle = temp.open("xb") if binary else temp.open("x", encoding="utf-8", newline="")
    except OSError as exc:
        raise UserError(f"cannot write {output!r}: {exc.strerror or exc}") from exc
    try:
        with handle:
            yield handle
        os.replace(temp, output)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
