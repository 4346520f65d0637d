"""Ctrl-C that stops a command wherever it lands: exit status 130, one line, no output.

Python turns SIGINT into a ``KeyboardInterrupt`` raised in the main thread, in whatever
Python code runs next. Where that code cannot raise -- a hook that ``os.fork`` runs
(logging, filelock and others register them, and DataLoader forks its workers for every
chunk of images), a ``__del__``, a weakref callback -- Python prints the exception as
"Exception ignored in ..." and carries on, and the command ran to its end, wrote its
output and exited 0. So, while a command runs (:func:`handle_ctrl_c`), SIGINT also sets
a flag, and :func:`check` raises ``KeyboardInterrupt`` again where the command can stop:
between chunks of images, and before an output replaces a file. The exception Python
could not raise is not printed, nor what it leaves behind: an object it stopped half-way
through ``__init__`` (DataLoader's worker iterator, say) fails in its ``__del__``, and
that too is "Exception ignored". The command says ``interrupted`` once.

A terminal sends Ctrl-C to the whole process group, DataLoader workers included; a
process forked from the command ignores it (even in the instant after the fork), and
the command stops its workers as it unwinds.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

__all__ = ["check", "handle_ctrl_c"]

_pressed = threading.Event()
_owner = os.getpid()


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _owner:  # a forked worker: the command stops it
        return
    _pressed.set()
    raise KeyboardInterrupt


def _unraisable(previous: Any) -> Any:
    def hook(unraisable: Any) -> None:
        if not _pressed.is_set():  # after Ctrl-C: the interrupt or what it left half-built
            previous(unraisable)

    return hook


@contextlib.contextmanager
def handle_ctrl_c() -> Iterator[None]:
    """Handle SIGINT as the module docstring says, for the duration of the block.

    Only in the main thread, and only where SIGINT is handled from Python: a process
    started with SIGINT ignored (``nohup``, a background job) keeps ignoring it.
    """
    global _owner
    _pressed.clear()
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    _owner = os.getpid()
    signal.signal(signal.SIGINT, _on_sigint)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _unraisable(previous_hook)
    try:
        yield
    finally:
        if _pressed.is_set():  # finalise what the interrupt left half-built, quietly
            gc.collect()
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook


def check() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed since the command started."""
    if _pressed.is_set():
        raise KeyboardInterrupt
