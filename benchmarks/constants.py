"""Library constants that a benchmark run may set, to measure a default before changing it."""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Sequence
from typing import Any


def set_constants(items: Sequence[str]) -> dict[str, Any]:
    """Set each ``package.module.NAME=VALUE`` (a JSON value); return them by dotted name.

    Only a module-level constant that the library reads when it runs (not one copied
    into another module by ``from ... import``) changes its behaviour this way.
    """
    applied: dict[str, Any] = {}
    for item in items:
        dotted, sep, text = item.partition("=")
        module_name, _, name = dotted.rpartition(".")
        if not (sep and module_name):
            raise SystemExit(f"--constant takes package.module.NAME=VALUE; got {item!r}")
        module = importlib.import_module(module_name)
        if not hasattr(module, name):
            raise SystemExit(f"{module_name} has no constant {name!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--constant {dotted}: {text!r} is not a JSON value ({exc})") from exc
        setattr(module, name, value)
        applied[dotted] = getattr(module, name)
    return applied


def add_constant_option(parser: argparse.ArgumentParser, recorded: str) -> None:
    """Add ``--constant MODULE.NAME=VALUE`` (repeatable); ``recorded`` says where it is kept."""
    parser.add_argument(
        "--constant",
        action="append",
        default=[],
        metavar="MODULE.NAME=VALUE",
        help=f"set a library constant for this run ({recorded}), e.g. "
        "msc_detector.coreset.PROJECTION_DIM=64; repeat for more",
    )
