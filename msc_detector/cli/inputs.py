"""What the user names on the command line -> lists of image files, and their labels.

An image argument is one of:

* a folder: every image file below it, recursively, in sorted order; hidden files and
  folders (names starting with ``.``) are skipped. Symbolic links are followed, after
  the rest: each folder is searched once and each image listed once (under its own
  name where it has one), so links back up and loops add nothing;
* a glob pattern (``"parts/*.png"``, ``"scans/**/*.tif"``; quote it so the shell leaves
  it alone): the matching image files, and the image files below matching folders;
* a ``.txt`` file: one path per line (blank lines and lines starting with ``#`` are
  skipped);
* a ``.csv`` file: the column named ``path`` (or ``file``, ``filename``, ``image``), or
  the first column of a file without a header;
* any other file: that image file.

Relative paths inside a list file are taken relative to the list file's folder. A file
that appears twice is kept once, at its first place. Nothing here reads pixels or
imports torch: errors in the arguments show at once.
"""

from __future__ import annotations

import collections
import csv
import glob
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from msc_detector.cli.errors import UserError

__all__ = ["IMAGE_EXTENSIONS", "Labels", "expand_images", "folder_labels", "read_labels"]

#: File extensions (lower case) taken as images when a folder or glob is expanded.
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif", ".tif", ".tiff", ".webp"}
    | {".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k", ".qoi"}
)
LIST_EXTENSIONS = frozenset({".txt", ".csv"})
_PATH_COLUMNS = ("path", "file", "filename", "image", "image_path")
_LABEL_COLUMNS = ("label", "labels", "class", "target", "y")
_NORMAL = frozenset({"normal", "good", "ok", "inlier", "0"})
_ANOMALY = frozenset({"anomaly", "anomalous", "bad", "defect", "defective", "outlier", "1"})
_GLOB_CHARS = frozenset("*?[")

#: Labels by :func:`path_key`: ``True`` for an anomaly, ``False`` for a normal image.
Labels = dict[str, bool]


def path_key(path: str | os.PathLike[str]) -> str:
    """Return the key under which two spellings of one file compare equal."""
    return os.path.normcase(os.path.abspath(path))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _identity(path: str) -> tuple[int, int] | None:
    """Return what names one file or folder however it is reached (``None`` if unreadable)."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def _walk(folder: Path) -> list[str]:
    """Return the image files below ``folder``, recursively, skipping hidden names.

    Every folder is searched once and every image listed once, however many names lead
    to it: symbolic links are followed only after all that can be reached without them,
    and only to folders and files not met yet. So an image is listed under its own name
    where it has one below ``folder``, a link back up (``sub/up -> ..``) adds nothing, and
    loops end. Images reached only through links come last, under the first link's name.
    """
    found: list[str] = []
    seen: set[tuple[int, int]] = set()  # (st_dev, st_ino) of the folders and files met
    links: collections.deque[str] = collections.deque()  # followed once the rest is listed

    def first_time(path: str) -> bool:
        identity = _identity(path)
        if identity is None:  # a broken link: listed, so that its row says so
            return True
        if identity in seen:
            return False
        seen.add(identity)
        return True

    def without_links(top: str) -> None:
        for root, dirs, files in os.walk(top):  # followlinks=False: links are queued
            kept = []
            for name in sorted(d for d in dirs if not d.startswith(".")):
                path = os.path.join(root, name)
                if os.path.islink(path):
                    links.append(path)
                elif first_time(path):
                    kept.append(name)
            dirs[:] = kept
            for name in sorted(files):
                if name.startswith(".") or not _is_image(Path(name)):
                    continue
                path = os.path.join(root, name)
                if os.path.islink(path):
                    links.append(path)
                elif first_time(path):
                    found.append(path)

    first_time(str(folder))
    without_links(str(folder))
    while links:
        path = links.popleft()
        if os.path.isdir(path):
            if first_time(path):
                without_links(path)
        elif first_time(path):
            found.append(path)
    return found


def _read_list(list_file: Path) -> list[str]:
    """Return the paths a ``.txt`` or ``.csv`` list file names, relative to its folder."""
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the list file {str(list_file)!r}: {exc}") from exc
    if list_file.suffix.lower() == ".csv":
        entries = _csv_paths(list_file, text)
    else:
        lines = (line.strip() for line in text.splitlines())
        entries = [line for line in lines if line and not line.startswith("#")]
    base = list_file.parent
    return [entry if os.path.isabs(entry) else str(base / entry) for entry in entries]


def _csv_rows(list_file: Path, text: str) -> list[list[str]]:
    return [row for _, row in _numbered_csv_rows(list_file, text)]


def _numbered_csv_rows(list_file: Path, text: str) -> list[tuple[int, list[str]]]:
    """Return the rows that are not blank, each with the line number it ends on."""
    reader = csv.reader(text.splitlines())
    try:
        return [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as exc:
        raise UserError(f"{str(list_file)!r} is not a valid CSV file: {exc}") from exc


def _column(header: Sequence[str], names: Iterable[str]) -> int | None:
    lowered = [cell.strip().lower() for cell in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    return None


def _csv_paths(list_file: Path, text: str) -> list[str]:
    rows = _csv_rows(list_file, text)
    if not rows:
        return []
    column = _column(rows[0], _PATH_COLUMNS)
    if column is not None:
        return [row[column].strip() for row in rows[1:] if len(row) > column and row[column]]
    if _is_image(Path(rows[0][0].strip())):  # no header: the first column holds the paths
        return [row[0].strip() for row in rows if row[0].strip()]
    raise UserError(
        f"{str(list_file)!r} has no column named {' or '.join(_PATH_COLUMNS[:3])}, and its "
        "first cell is not an image path; put the image paths in a column named 'path'."
    )


def _expand_one(spec: str) -> list[str]:
    path = Path(spec)
    if path.is_dir():
        found = _walk(path)
        if not found:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS)[:6])
            raise UserError(f"no image files in the folder {spec!r} (looked for {extensions}...)")
        return found
    if path.is_file():
        return _read_list(path) if path.suffix.lower() in LIST_EXTENSIONS else [spec]
    if _GLOB_CHARS & set(spec):
        found = []
        for match in sorted(glob.glob(spec, recursive=True)):
            if os.path.isdir(match):
                found += _walk(Path(match))
            elif _is_image(Path(match)):
                found.append(match)
        if not found:
            raise UserError(f"no image files match {spec!r}")
        return found
    raise UserError(f"no such file or folder: {spec!r}")


def expand_images(specs: Sequence[str]) -> list[str]:
    """Return the image files that the command-line arguments ``specs`` name.

    Parameters
    ----------
    specs : sequence of str
        Folders, glob patterns, list files or image files (see the module docstring).

    Returns
    -------
    list of str
        The files, in argument order, each once. Files named in list files are not
        checked here: the scoring commands report a missing one in its row.

    Raises
    ------
    UserError
        For a path that does not exist, a folder or pattern without images, an
        unreadable list file, or no images at all.
    """
    seen: set[str] = set()
    files = []
    for spec in specs:
        for file in _expand_one(spec):
            key = path_key(file)
            if key not in seen:
                seen.add(key)
                files.append(file)
    if not files:
        raise UserError(f"no image files in {', '.join(map(repr, specs))}")
    return files


def _parse_label(value: str, where: str) -> bool:
    word = value.strip().lower()
    if word in _ANOMALY:
        return True
    if word in _NORMAL:
        return False
    raise UserError(
        f"{where}: label {value!r} is neither normal (normal, good, ok, 0) nor an anomaly "
        "(anomaly, bad, defect, 1)"
    )


def read_labels(labels_file: str) -> tuple[list[str], Labels]:
    """Read a CSV file of image paths and labels.

    The file has a header with a ``path`` column (or ``file``, ``filename``, ``image``)
    and a ``label`` column (or ``class``, ``target``, ``y``). A label is ``normal``,
    ``good``, ``ok`` or ``0`` for a normal image, ``anomaly``, ``bad``, ``defect`` or
    ``1`` for an anomaly (any case). Relative paths are relative to the file's folder.

    Parameters
    ----------
    labels_file : str

    Returns
    -------
    paths : list of str
        The image files in file order, each once.
    labels : dict of str to bool
        ``True`` for an anomaly, by :func:`path_key`.

    Raises
    ------
    UserError
        For a missing or malformed file, missing columns, an unknown label, or an image
        labelled both normal and an anomaly (the message names the lines). An image
        listed twice with the same label is kept once: merged lists repeat entries, and
        the label is not in doubt.
    """
    where = Path(labels_file)
    if not where.is_file():
        raise UserError(f"no such labels file: {labels_file!r}")
    try:
        text = where.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the labels file {labels_file!r}: {exc}") from exc
    rows = _numbered_csv_rows(where, text)
    header = rows[0][1] if rows else []
    path_col, label_col = _column(header, _PATH_COLUMNS), _column(header, _LABEL_COLUMNS)
    if path_col is None or label_col is None:
        raise UserError(
            f"the labels file {labels_file!r} needs a header with the columns 'path' and "
            f"'label'; found {header!r}"
        )
    paths: list[str] = []
    labels: Labels = {}
    first_line: dict[str, int] = {}
    # by key: the entry, the line of its first label, the first line that contradicts it
    both: dict[str, tuple[str, int, int]] = {}
    for number, row in rows[1:]:
        if len(row) <= max(path_col, label_col):
            raise UserError(f"{labels_file}:{number}: expected a path and a label, got {row!r}")
        entry = row[path_col].strip()
        path = entry if os.path.isabs(entry) else str(where.parent / entry)
        key = path_key(path)
        label = _parse_label(row[label_col], f"{labels_file}:{number}")
        if key not in labels:
            paths.append(path)
            labels[key], first_line[key] = label, number
        elif labels[key] != label and key not in both:
            both[key] = (entry, first_line[key], number)
    if both:
        entry, first, second = next(iter(both.values()))
        more = f"; {len(both) - 1:,} more images have both labels" if len(both) > 1 else ""
        raise UserError(
            f"{labels_file}: {entry!r} is labelled both normal and an anomaly (lines {first} "
            f"and {second}){more}; give each image one label"
        )
    if not paths:
        raise UserError(f"the labels file {labels_file!r} lists no images")
    return paths, labels


def folder_labels(good: Sequence[str], bad: Sequence[str]) -> tuple[list[str], Labels]:
    """Return the images under ``good`` and ``bad`` and their labels (``bad``: anomalies).

    Either may be empty. Raises :class:`UserError` for a missing folder, a folder
    without images, or a file in both.
    """
    good_files = expand_images(good) if good else []
    bad_files = expand_images(bad) if bad else []
    labels: Labels = {path_key(file): False for file in good_files}
    both = [file for file in bad_files if path_key(file) in labels]
    if both:
        raise UserError(f"{both[0]!r} is both under --good and under --bad")
    labels.update({path_key(file): True for file in bad_files})
    return good_files + bad_files, labels
