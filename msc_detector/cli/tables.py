"""Write score rows as CSV, JSON Lines or Parquet, streamed, into place at the end.

The format follows the output's extension (``.csv``, ``.jsonl``, ``.parquet``). Rows
are appended a chunk at a time to a hidden file beside the output, which replaces the
output only once every row is written: an interrupted run leaves no truncated file
that looks complete. ``-`` writes CSV or JSON Lines to standard output as rows come.
Parquet needs pyarrow, which is optional (``pip install pyarrow``).
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from msc_detector.cli.errors import UserError
from msc_detector.cli.outputs import atomic_file, printable

__all__ = ["FORMATS", "TableWriter", "table_format"]

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
Row = Mapping[str, Any]


def table_format(output: str, requested: str | None = None) -> str:
    """Return the format to write ``output`` in: ``requested``, else by its extension.

    Raises
    ------
    UserError
        For an unknown extension, Parquet to standard output, or Parquet without pyarrow.
    """
    if requested is None:
        requested = "csv" if output == "-" else FORMATS.get(Path(output).suffix.lower())
        if requested is None:
            raise UserError(
                f"cannot tell the format of {output!r} from its extension; use .csv, .jsonl "
                "or .parquet, or --format"
            )
    if requested == "parquet":
        if output == "-":
            raise UserError("Parquet cannot be written to standard output; name a .parquet file")
        if importlib.util.find_spec("pyarrow") is None:
            raise UserError(
                "writing Parquet needs pyarrow, which is not installed: run "
                "'pip install pyarrow', or write .csv or .jsonl instead"
            )
    return requested


def _plain(value: Any) -> Any:
    """Return ``value`` as a JSON-ready Python scalar (NaN as ``None``).

    Text is made :func:`~msc_detector.cli.outputs.printable`: a file name that is not
    UTF-8, in any column, shows U+FFFD where it cannot be encoded.
    """
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str):
        return printable(value)
    return value


class TableWriter:
    """Stream rows with fixed columns into a table file.

    Use as a context manager: the output appears when the block ends without an error;
    on an error the partial file is removed (see :func:`~msc_detector.cli.outputs.atomic_file`).

    Parameters
    ----------
    output : str
        The file to write, or ``"-"`` for standard output.
    fmt : {"csv", "jsonl", "parquet"}
        From :func:`table_format`.
    columns : sequence of str
        Column names, in order; every row maps each of them to a value or ``None``.
    types : mapping of str to {"string", "float", "int"}, optional
        Parquet column types (default ``"string"``); CSV and JSON Lines ignore them.
    """

    def __init__(
        self,
        output: str,
        fmt: str,
        columns: Sequence[str],
        types: Mapping[str, str] | None = None,
    ) -> None:
        self.output = output
        self.fmt = fmt
        self.columns = list(columns)
        self.types = dict(types or {})
        self._stack = contextlib.ExitStack()
        self._handle: Any = None
        self._csv: Any = None
        self._parquet: Any = None

    def __enter__(self) -> TableWriter:
        if self.output == "-":
            self._handle = sys.stdout
        else:
            binary = self.fmt == "parquet"
            self._handle = self._stack.enter_context(atomic_file(self.output, binary))
        if self.fmt == "csv":
            self._csv = csv.writer(self._handle, lineterminator="\n")
            self._csv.writerow(self.columns)
        elif self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            kinds = {"string": pa.string(), "float": pa.float64(), "int": pa.int64()}
            self._schema = pa.schema(
                [(name, kinds[self.types.get(name, "string")]) for name in self.columns]
            )
            self._parquet = self._stack.enter_context(pq.ParquetWriter(self._handle, self._schema))
        return self

    def write(self, rows: Sequence[Row]) -> None:
        """Append ``rows`` (one chunk; Parquet writes it as one row group)."""
        if self.fmt == "parquet":
            if rows:
                import pyarrow as pa

                columns = {name: [_plain(row[name]) for row in rows] for name in self.columns}
                self._parquet.write_table(pa.table(columns, schema=self._schema))
            return
        for row in rows:
            if self.fmt == "csv":
                self._csv.writerow(_csv_cell(row[name]) for name in self.columns)
            else:
                record = {name: _plain(row[name]) for name in self.columns}
                self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()  # a reader of standard output sees each chunk as it comes

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stack.__exit__(kind, error, traceback)


def _csv_cell(value: Any) -> Any:
    value = _plain(value)
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back as the same float
    return value
