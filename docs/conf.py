"""Sphinx configuration for the msc-detector documentation.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Document the working tree even when the package is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msc_detector

project = "msc-detector"
author = "msc-detector developers"
copyright = "msc-detector developers"
release = msc_detector.__version__
version = ".".join(release.split(".")[:2])

# No intersphinx: the docs build runs offline, and intersphinx would fetch the
# inventories of other projects over the network.
extensions = [
    "sphinx.ext.autodoc",
    "numpydoc",
]

# autodoc
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # types are in the numpydoc sections
autoclass_content = "class"

# numpydoc: list the methods through autodoc's :members:, not numpydoc's own tables.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False

root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_title = f"msc-detector {release}"
html_static_path: list[str] = []
