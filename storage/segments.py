"""Content-defined table segments: the rule that splits a table into Parquet files.

A snapshot stores each table as `tables/<table>/part-NNNN.parquet`, segments
in key order whose boundaries depend only on the rows, so that the same rows
give the same segments (and the same CIDs) whatever order they were written
in, an append touches only the last segment and an update only its own.
This is the rule; `snapshot` applies it and `docs/storage-format.md` explains
the choice of constants. It is hand-written because no library splits a SQL
table by content: Prolly trees and Dolt chunk their own storage, not DuckDB's.

The boundary rule ("benchsync-segment/1")
    A segment ends after every key `k` (an integer key column, `schema.PRIMARY_KEYS`)
    whose boundary hash falls below the threshold::

        h = SHA-256(b"benchsync-segment/1:" || ASCII decimal of k)
            (canonical: an optional "-", no leading zeros, "0" for zero)
        boundary  <=>  the first 8 bytes of h, as a big-endian u64, < 2**(64 - SEGMENT_BITS)

    so a segment holds 2**SEGMENT_BITS rows on average (rows of equal keys
    are never split). Segment i holds the keys in (b[i-1], b[i]] for the
    boundary keys b in ascending order; the last one holds the keys above
    the last boundary and every NULL key, and is left out when it is empty
    (an empty table is one empty segment). A table whose key is missing or
    not an integer is one segment. The hash is SHA-256 over a specified
    encoding, computed alike by DuckDB's `sha256()` (over `CAST(k AS
    VARCHAR)`, exact for integers) and by Python (`is_boundary`): never
    DuckDB's `hash()`, which may change between releases.

Rows inside a segment are ordered by key, then every column (ties cannot
reorder), and written by DuckDB with a fixed row-group size.

The digest of a segmented table ("benchsync-rows/2") combines the segments'
`rowdigest` ("benchsync-rows/1") digests, so unchanged segments keep theirs::

    H(b"benchsync-rows/2\\n" || u64(rows) || u64(n segments) ||
      for each segment in order: u64(its rows) || its rows/1 digest (32 bytes))

It is a function of the rows alone (the segments are), so it is "same
content" across DuckDB versions like rows/1, which tables in the old layout
(`tables/<table>.parquet`) keep.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from benchsync.storage import rowdigest
from benchsync.storage.sqlnames import ident, literal

SEGMENT_SPEC = b"benchsync-segment/1:"
SEGMENT_BITS = 17  # 2**17 = 131,072 rows per segment on average (~4 MiB of our Parquet)
BOUNDARY_BOUND = 2 ** (64 - SEGMENT_BITS)  # boundary iff the hash's first u64 is below this
# The same comparison on SHA-256's lowercase hex: equal-length hex strings order as numbers.
BOUNDARY_HEX_BOUND = f"{BOUNDARY_BOUND:016x}"
# A `tables/<table>/` directory block lists its segments; past ~256 KiB Kubo would shard
# it (HAMT, not supported here), which ~4,900 entries reach. 4,096 segments are ~540M rows.
MAX_SEGMENTS = 4096
SEGMENT_NAME_RE = re.compile(r"^part-([0-9]{4,})\.parquet$")
ROWS2_SPEC = b"benchsync-rows/2\n"
INTEGER_TYPES = frozenset({
    "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT",
})  # fmt: skip


def segment_name(index: int) -> str:
    """The link name of segment `index` (0-based): part-0000.parquet, ..."""
    return f"part-{index:04d}.parquet"


def is_boundary(key: int) -> bool:
    """Does a segment end after `key`? (The rule above, in Python.)"""
    h = hashlib.sha256(SEGMENT_SPEC + str(int(key)).encode("ascii")).digest()
    return int.from_bytes(h[:8], "big") < BOUNDARY_BOUND


def boundary_sql(key: str) -> str:
    """A SQL boolean: is the row's key (column `key`) a boundary? (The rule, in DuckDB.)"""
    # sql: the key is quoted by ident(); the spec and bound are our constants.
    return (
        f"(substr(sha256({literal(SEGMENT_SPEC.decode())} || CAST({ident(key)} AS VARCHAR)), "
        f"1, 16) < {literal(BOUNDARY_HEX_BOUND)})"
    )


def range_sql(key: str, lo: int | None, hi: int | None) -> str:
    """A SQL predicate: the key lies in (lo, hi]; hi None: above lo, NULL keys included."""
    k = ident(key)
    parts = []
    if lo is not None:
        parts.append(f"{k} > {int(lo)}")
    if hi is not None:
        parts.append(f"{k} <= {int(hi)}")
        return " AND ".join(parts)
    above = " AND ".join(parts) or "TRUE"
    return f"(({above}) OR {k} IS NULL)"


def segmented_key(conn: Any, table: str, key: str | None) -> str | None:
    """`key` if `table` has it as an integer column (then it is segmented), else None."""
    if key is None:
        return None
    row = conn.execute(
        "SELECT data_type FROM information_schema.columns "
        "WHERE table_schema = 'main' AND table_name = ? AND column_name = ?",
        [table, key],
    ).fetchone()
    return key if row is not None and str(row[0]) in INTEGER_TYPES else None


def combine(segments: Sequence[tuple[int, str | None]]) -> str | None:
    """The rows/2 digest of a table from its segments' (rows, rows/1 digest), in order."""
    if any(digest is None for _, digest in segments):
        return None
    out = hashlib.sha256(
        ROWS2_SPEC + rowdigest.u64(sum(n for n, _ in segments)) + rowdigest.u64(len(segments))
    )
    for rows, digest in segments:
        assert digest is not None
        out.update(rowdigest.u64(rows) + bytes.fromhex(digest))
    return out.hexdigest()


def parquet_files(path: Path) -> list[Path]:
    """A table's Parquet files: `path` itself, or a segment directory's parts in order."""
    if not path.is_dir():
        return [path]
    parts = [p for p in path.iterdir() if SEGMENT_NAME_RE.fullmatch(p.name)]
    return sorted(parts, key=lambda p: int(SEGMENT_NAME_RE.fullmatch(p.name)[1]))  # type: ignore[index]


def read_parquet_sql(path: Path) -> str:
    """`read_parquet(...)` over a table's file or segment directory, names quoted."""
    files = parquet_files(path)
    # sql: every path goes through literal().
    return f"read_parquet([{', '.join(literal(p) for p in files)}])"


def segment_digest_stream(
    batches: Iterable[pa.RecordBatch], schema: pa.Schema, key: str | None, flag: str | None
) -> str | None:
    """The rows/2 digest of rows streamed in key order, split by the segment rule.

    `flag` names a boolean column (dropped before digesting) that is true on
    the rows whose key is a boundary, as `boundary_sql` computes it; a
    segment ends after the last row of such a key. None: one segment. Holds
    one segment's rows at a time, never the table.
    """
    fields = [f for f in schema if f.name != flag]
    plain = pa.schema(fields)
    names = [f.name for f in fields]
    found: list[tuple[int, str | None]] = []
    pending: list[pa.RecordBatch] = []

    def close() -> None:
        held = list(pending)
        rows = sum(b.num_rows for b in held)
        found.append((rows, rowdigest.table_digest(plain, lambda: iter(held), key)))
        pending.clear()

    carry: Any = None  # the previous batch ended on rows of this boundary key
    for batch in batches:
        n = batch.num_rows
        if not n:
            continue
        if flag is None or key is None:
            pending.append(batch.select(names))
            continue
        marks = pc.fill_null(batch.column(flag), False)
        keys = batch.column(key)
        cuts = []
        if carry is not None and keys[0].as_py() != carry:
            cuts.append(0)
        for p in pc.indices_nonzero(marks).to_pylist():  # boundary rows: few
            if p + 1 < n and keys[p + 1].as_py() != keys[p].as_py():
                cuts.append(p + 1)
        carry = keys[n - 1].as_py() if marks[n - 1].as_py() else None
        start = 0
        for cut in cuts:
            pending.append(batch.slice(start, cut - start).select(names))
            close()
            start = cut
        pending.append(batch.slice(start).select(names))
    if sum(b.num_rows for b in pending) or not found:
        close()
    return combine(found)
