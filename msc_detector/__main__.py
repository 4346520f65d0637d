"""``python -m msc_detector``: the ``msc-detector`` command line."""

from __future__ import annotations

from msc_detector.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
