"""Where a benchmark's results go: ``<name>.json`` and its table, ``<name>.md``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: The folder of the committed results.
RESULTS = Path(__file__).resolve().parent / "results"


def write_results(path: Path, result: dict[str, Any], table: str | None = None) -> None:
    """Write ``result`` to ``path`` (JSON) and ``table`` beside it as ``.md``.

    The JSON is replaced atomically, so a run stopped while writing leaves the
    previous results, which the resumable benchmarks read back.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result, indent=2))
    os.replace(partial, path)
    if table is not None:
        path.with_suffix(".md").write_text(table)
