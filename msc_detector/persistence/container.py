"""The model file's container: a zip archive of stored members under a checked manifest.

Reading verifies, before anything is parsed, that the archive holds exactly the
expected members, uncompressed, within their size limits, matching the manifest's
sizes and SHA-256 digests.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from msc_detector.persistence.schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LIMITS,
    MANIFEST,
    MANIFEST_SCHEMA,
    MEMBERS,
    PAYLOAD,
    check,
    error,
    is_int,
    parse,
)

__all__ = ["verified_members", "write_archive"]

_ZIP_MAGIC = b"PK\x03\x04"
# What zipfile raises on a damaged archive: a flipped bit can give any of these.
_ZIP_ERRORS: tuple[type[Exception], ...] = (zipfile.BadZipFile, OSError, NotImplementedError)
_ZIP_ERRORS += (EOFError, struct.error, ValueError)


def verified_members(source: str | os.PathLike[str] | bytes) -> tuple[Any, Any, dict[str, bytes]]:
    """Check the archive, its members, the manifest and the checksums; read the payload.

    ``source`` is a path or the archive's bytes (:func:`~msc_detector.persistence.dumps`).
    Returns how messages name it, the manifest and the payload members by name.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        where: Any = f"<{len(source)} bytes>"
        handle: IO[bytes] = io.BytesIO(bytes(source))
    elif (where := Path(source)).is_dir():
        raise error(where, "it is a directory; a model file is one zip archive.")
    else:
        handle = where.open("rb")
    with handle:
        head = handle.read(len(_ZIP_MAGIC))
        if head[:1] == b"\x80":  # the PROTO opcode that starts pickles of protocol 2 and later
            raise error(
                where,
                "it is a pickle (e.g. from joblib.dump), not a file written by MSCDetector.save. "
                "It was not unpickled: that can run any code. Load pickles only from trusted "
                "sources, with joblib.load.",
            )
        if head != _ZIP_MAGIC:
            raise error(where, f"it is not a zip archive: it starts with {head!r}.")
        size = handle.seek(0, io.SEEK_END)  # no member declares more (zipfile seeks itself)
        try:
            archive = zipfile.ZipFile(handle)
        except _ZIP_ERRORS as exc:
            raise error(where, f"the zip archive is truncated or damaged ({exc}).") from exc
        with archive:
            names: list[str] = []
            for info in archive.infolist():
                name, limit = info.filename, min(size, LIMITS.get(info.filename, size))
                if name in names:
                    raise error(where, f"member {name!r} appears more than once.")
                if max(info.file_size, info.compress_size) > limit:
                    raise error(where, f"member {name!r} declares more than {limit} bytes.")
                if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                    raise error(where, f"member {name!r} is compressed or encrypted.")
                names.append(name)
            if MANIFEST in names:  # first: a newer format may hold other members
                manifest = parse(where, MANIFEST, _read(where, archive, MANIFEST), json.loads)
                _check_manifest(where, manifest)
            wrong = [f"unexpected member {name!r}" for name in names if name not in MEMBERS]
            wrong += [f"missing member {name!r}" for name in MEMBERS if name not in names]
            if wrong:
                raise error(where, f"{wrong[0]}; a model file holds exactly {', '.join(MEMBERS)}.")
            members = {name: _read(where, archive, name) for name in PAYLOAD}
    for name, data in members.items():
        entry = manifest["members"][name]
        if len(data) != entry["size"]:
            raise error(where, f"member {name!r} has {len(data)} bytes, not {entry['size']}.")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise error(where, f"member {name!r} does not match its SHA-256: it was altered.")
    return where, manifest, members


def _read(where: object, archive: zipfile.ZipFile, name: str) -> bytes:
    try:
        return archive.read(name)
    except _ZIP_ERRORS as exc:  # CRC mismatch, truncation, a damaged local header
        raise error(where, f"member {name!r} is corrupted ({exc}).") from exc


def _check_manifest(where: object, manifest: Any) -> None:
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT_NAME:
        raise error(where, f"{MANIFEST} declares format {found!r}, not {FORMAT_NAME!r}.")
    version = manifest.get("format_version")
    if is_int(version) and version == 1:
        raise error(
            where,
            "it was written by a development version of msc-detector before 0.1.0 (model-file "
            "format 1), which this version does not read. Fit the detector again and save it.",
        )
    if is_int(version) and version > FORMAT_VERSION:
        raise error(
            where,
            f"it uses model-file format {version}, written by a newer msc-detector; this "
            f"version reads formats up to {FORMAT_VERSION}. Upgrade msc-detector to load it.",
        )
    check(where, MANIFEST, manifest, MANIFEST_SCHEMA)


def write_archive(handle: IO[bytes], payload: Mapping[str, bytes]) -> None:
    """Write ``payload`` (from ``encode``) to ``handle`` as stored members under a manifest."""
    listed = {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in payload.items()
    }
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "members": listed}
    members = {MANIFEST: json.dumps(manifest, indent=2).encode(), **payload}
    with zipfile.ZipFile(handle, "w") as archive:  # stored: the default
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=time.localtime()[:6])
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
