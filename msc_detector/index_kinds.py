"""Which index kinds have a plain-array form, decided from their names alone.

Kept apart from :mod:`msc_detector.index` so that reading a model file's description
(:func:`msc_detector.inspect`) needs no Faiss import.
"""

from __future__ import annotations

import re

__all__ = ["ARRAY_KINDS_TEXT", "FACTORY_LAYOUTS", "INDEX_KINDS", "has_plain_form"]

#: The named index kinds; any other string is read as a Faiss ``index_factory`` string.
INDEX_KINDS = ("flat", "ivf", "ivfpq", "hnsw")
#: Factory strings with a plain-array form, and the structure each reads as.
FACTORY_LAYOUTS = (
    (re.compile(r"Flat"), "flat"),
    (re.compile(r"IVF(?P<nlist>\d+),Flat"), "ivf"),
    (re.compile(r"IVF(?P<nlist>\d+),PQ(?P<pq_m>\d+)(?:x(?P<pq_nbits>\d+))?"), "ivfpq"),
    (re.compile(r"IVF(?P<nlist>\d+),SQ(?P<sq>4|6|8|fp16|bf16)"), "ivfsq"),
    (re.compile(r"HNSW(?P<M>\d+)(?:,Flat)?"), "hnsw"),
)
ARRAY_KINDS_TEXT = (
    "'flat', 'ivf', 'ivfpq', 'hnsw' and the factory strings 'Flat', 'IVF<nlist>,Flat', "
    "'IVF<nlist>,PQ<m>x<nbits>', 'IVF<nlist>,SQ<4|6|8|fp16|bf16>' and 'HNSW<M>,Flat'"
)


def has_plain_form(kind: str) -> bool:
    """Whether an index of ``kind`` can be stored as plain arrays (model files then are)."""
    return kind in INDEX_KINDS or any(pattern.fullmatch(kind) for pattern, _ in FACTORY_LAYOUTS)
