"""One version: the installed metadata is read from ``msc_detector/_version.py``."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest

import msc_detector


def test_installed_metadata_has_the_package_version() -> None:
    assert version("msc-detector") == msc_detector.__version__


def test_pyproject_reads_the_version_from_the_package() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    config = tomllib.loads(pyproject.read_text())
    assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
    source = config["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert source == "msc_detector._version.__version__"
