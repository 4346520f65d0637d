"""The ``msc-detector`` command line (also ``python -m msc_detector``).

``fit`` a detector on folders of normal images, ``score`` new images into a CSV, JSON
Lines or Parquet table, make a self-contained HTML ``report``, and ``inspect`` a model
file. Modules, one job each:

* :mod:`~msc_detector.cli.app`: the parser, output conventions and error handling;
* :mod:`~msc_detector.cli.commands`: the four commands;
* :mod:`~msc_detector.cli.inputs`: folders, globs and list files -> image paths; labels;
* :mod:`msc_detector.files` (the library's): chunked scoring with per-file errors;
* :mod:`~msc_detector.cli.tables`: CSV, JSON Lines and Parquet writers;
* :mod:`~msc_detector.cli.outputs`: output files checked up front and written whole;
* :mod:`~msc_detector.cli.interrupts`: Ctrl-C that stops a command wherever it lands;
* :mod:`~msc_detector.cli.report`, :mod:`~msc_detector.cli.evaluation`,
  :mod:`~msc_detector.cli.svg`, :mod:`~msc_detector.cli.thumbnails`: the HTML report.

torch is imported only by the commands that load or fit a model.
"""

from __future__ import annotations

from msc_detector.cli.app import main

__all__ = ["main"]
