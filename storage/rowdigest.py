"""The canonical digest of a table's rows: "same content" across DuckDB versions and nodes.

A snapshot's `tables/` CID depends on the bytes of its Parquet files, and those
depend on the writer (DuckDB writes its version into every file, and its
encoders change between releases). Whether two snapshots hold the same rows is
therefore decided by this digest, which depends on the rows alone. Each
manifest stores it per table; "no change" and restore compare it.

Specification ("benchsync-rows/1"). All integers below are unsigned 64-bit
little-endian (`u64`) unless said otherwise; `H` is SHA-256.

Canonical row order
    Ascending by the table's key column (`schema.PRIMARY_KEYS`), then by every
    column in name order (UTF-8 byte order of the names), each ascending with
    NULLs last. When the key is unique and non-null (every table of our schema)
    this is simply key order. For tables without a unique key the order of rows
    whose sort values compare equal but encode differently (0.0 and -0.0) is
    not pinned down: such a table may digest differently on another node, which
    costs at most one needless new version, never a missed change.

Column types and their value encoding (Arrow types; DuckDB's in brackets)
    "bool"                1 byte, 0 or 1                              [BOOLEAN]
    "int8".."int64",      two's complement, native width, LE          [TINYINT..BIGINT]
    "uint8".."uint64"     unsigned, native width, LE                  [UTINYINT..UBIGINT]
    "float32"             IEEE-754 binary32 bits, LE                  [FLOAT, REAL]
    "float64"             IEEE-754 binary64 bits, LE                  [DOUBLE]
                          every NaN is written as the quiet NaN 0x7fc00000 /
                          0x7ff8000000000000; -0.0 keeps its sign bit. A FLOAT
                          column migrated to DOUBLE digests differently (its
                          type tag and width change), as its Parquet schema does.
    "utf8"                the value's UTF-8 bytes (variable width)    [VARCHAR, JSON]
    "binary"              the value's bytes (variable width)          [BLOB]
    "timestamp"           int64 microseconds since 1970-01-01, LE     [TIMESTAMP]
    "timestamptz"         int64 microseconds since 1970-01-01 UTC, LE [TIMESTAMPTZ]
    "date"                int32 days since 1970-01-01, LE             [DATE]
    Any other type (DECIMAL, HUGEINT, LIST, STRUCT, sub-microsecond timestamps,
    ...) has no digest: `table_digest` returns None and callers fall back to
    comparing bytes (the `tables/` CID).

One column, over its n rows in canonical order, gives three byte streams:
    V  one byte per row: 1 if the value is present, 0 if NULL
    L  variable-width types only: u64 byte length per row (0 for NULL); empty
       for fixed-width types
    D  fixed width: every row's encoding, NULL rows as that many zero bytes;
       variable width: the present values' bytes, concatenated
    column digest = H( H(V) || H(L) || H(D) )

The table:
    digest = H( b"benchsync-rows/1\\n" || u64(n rows) || u64(n columns) ||
                for each column in name order:
                    u64(len(name)) || name (UTF-8) ||
                    u64(len(tag)) || tag (ASCII) || column digest )
    written as 64 lowercase hex digits.

The streams make the encoding unambiguous ("ab","c" differs from "a","bc";
NULL from "" and from 0) and let whole Arrow batches be encoded with numpy,
without a Python loop over rows. `tests/test_rowdigest.py` holds a test vector.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

DIGEST_SPEC = b"benchsync-rows/1\n"

_INTS = {
    pa.int8(): "int8", pa.int16(): "int16", pa.int32(): "int32", pa.int64(): "int64",
    pa.uint8(): "uint8", pa.uint16(): "uint16", pa.uint32(): "uint32", pa.uint64(): "uint64",
}  # fmt: skip
_FLOATS = {pa.float32(): "float32", pa.float64(): "float64"}
_TIMESTAMP_UNITS = {"s": 1_000_000, "ms": 1_000, "us": 1}  # microseconds per unit


class Unsupported(Exception):
    """A column type the digest does not define; the table has no digest."""


def u64(n: int) -> bytes:
    """The spec's u64: unsigned 64-bit little-endian (also used by `segments`' rows/2)."""
    return n.to_bytes(8, "little")


_u64 = u64


def type_tag(t: pa.DataType) -> str:
    """The spec's tag for Arrow type `t`; raises Unsupported for any other type."""
    t = _plain_type(t)
    if t in _INTS:
        return _INTS[t]
    if t in _FLOATS:
        return _FLOATS[t]
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "utf8"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "binary"
    if pa.types.is_timestamp(t) and t.unit in _TIMESTAMP_UNITS:
        return "timestamptz" if t.tz else "timestamp"
    if pa.types.is_date32(t):
        return "date"
    raise Unsupported(f"no digest encoding for {t}")


def _plain_type(t: pa.DataType) -> pa.DataType:
    if isinstance(t, pa.BaseExtensionType):  # e.g. arrow.json, as pyarrow reads DuckDB's JSON
        t = t.storage_type
    if pa.types.is_dictionary(t):
        t = t.value_type
    return t


def _plain(array: pa.Array) -> pa.Array:
    """`array` as the plain Arrow type its tag is encoded from."""
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    if isinstance(array, pa.DictionaryArray):
        array = array.dictionary_decode()
    t = array.type
    if pa.types.is_string_view(t) or pa.types.is_large_string(t):
        return array.cast(pa.string())
    if pa.types.is_binary_view(t) or pa.types.is_large_binary(t):
        return array.cast(pa.binary())
    if pa.types.is_timestamp(t):
        scale = _TIMESTAMP_UNITS[t.unit]
        micros = array.cast(pa.int64())
        return micros if scale == 1 else pc.multiply_checked(micros, scale)
    if pa.types.is_date32(t):
        return array.cast(pa.int32())
    return array


class _Column:
    """The three streams of one column, hashed as batches arrive.

    Arrow's buffers are little-endian on every platform we run on, so a
    fixed-width array without nulls is its own D stream (checked at import).
    """

    def __init__(self, name: str, t: pa.DataType) -> None:
        self.name = name
        self.tag = type_tag(t)
        self.variable = self.tag in ("utf8", "binary")
        self.v = hashlib.sha256()
        self.lengths = hashlib.sha256()
        self.d = hashlib.sha256()

    def update(self, array: pa.Array) -> None:
        array = _plain(array)
        self.v.update(_fixed_bytes(pc.cast(array.is_valid(), pa.uint8())))
        if self.variable:
            self._update_variable(array)
        elif self.tag == "bool":
            self.d.update(_fixed_bytes(pc.cast(pc.fill_null(array, False), pa.uint8())))
        else:
            values = pc.fill_null(array, pa.scalar(0, type=array.type))
            if self.tag.startswith("float"):  # one NaN: the quiet NaN of the spec
                nan = pa.scalar(float("nan"), type=array.type)
                values = pc.if_else(pc.is_nan(values), nan, values)
            self.d.update(_fixed_bytes(values))

    def _update_variable(self, array: pa.Array) -> None:
        if array.null_count:
            empty = b"" if self.tag == "binary" else ""
            array = pc.fill_null(array, pa.scalar(empty, type=array.type))
        self.lengths.update(_fixed_bytes(pc.cast(pc.binary_length(array), pa.uint64())))
        _, offsets_buf, data_buf = array.buffers()
        if data_buf is not None and len(array):
            offsets = memoryview(offsets_buf).cast("i")
            start, end = offsets[array.offset], offsets[array.offset + len(array)]
            self.d.update(memoryview(data_buf)[start:end])

    def digest(self) -> bytes:
        return hashlib.sha256(self.v.digest() + self.lengths.digest() + self.d.digest()).digest()


def _fixed_bytes(array: pa.Array) -> memoryview:
    """The values buffer of a fixed-width `array` without nulls, as bytes (little-endian)."""
    width = array.type.bit_width // 8
    buf = array.buffers()[1]
    if buf is None:
        return memoryview(b"")
    return memoryview(buf)[array.offset * width : (array.offset + len(array)) * width]


if sys.byteorder != "little":  # pragma: no cover - the spec's byte order is Arrow's here
    raise ImportError("benchsync's row digest needs a little-endian platform")


def table_digest(
    schema: pa.Schema,
    open_batches: Callable[[], Iterable[pa.RecordBatch]],
    key: str | None,
) -> str | None:
    """The spec's digest (hex) of the rows `open_batches()` yields, or None for an unsupported type.

    `open_batches` is called once, and a second time only if the rows turn out
    not to arrive in ascending, unique `key` order (then they are all read and
    sorted in memory: tables without a unique key are legacy and small). Pass
    rows ordered by `key` (as the snapshot export writes them) to stay streaming.
    """
    try:
        columns = {f.name: _Column(f.name, f.type) for f in schema}
    except Unsupported:
        return None
    names = sorted(columns, key=lambda n: n.encode())
    rows = _feed_in_key_order(columns, open_batches(), key)
    if rows is None:
        columns = {f.name: _Column(f.name, f.type) for f in schema}
        rows = _feed_sorted(columns, schema, open_batches(), key, names)
    out = hashlib.sha256(DIGEST_SPEC + _u64(rows) + _u64(len(names)))
    for name in names:
        col = columns[name]
        out.update(_u64(len(name.encode())) + name.encode())
        out.update(_u64(len(col.tag)) + col.tag.encode() + col.digest())
    return out.hexdigest()


class KeyOrderDigest:
    """The digest of rows fed batch by batch in ascending, unique `key` order (streaming).

    `hexdigest()` is None when a type is unsupported or the rows did not arrive in
    that order (then `table_digest`, which may sort, is the way to digest them).
    """

    def __init__(self, schema: pa.Schema, key: str | None) -> None:
        try:
            self.columns: dict[str, _Column] | None = {
                f.name: _Column(f.name, f.type) for f in schema
            }
        except Unsupported:
            self.columns = None
        self.key = key
        self.in_order = (
            self.columns is not None
            and key is not None
            and key in self.columns
            and not self.columns[key].variable
        )
        self.last: Any = None
        self.rows = 0

    def feed(self, batch: pa.RecordBatch) -> None:
        if not self.in_order or not batch.num_rows:
            return
        assert self.columns is not None and self.key is not None
        keys = _plain(batch.column(self.key))
        increasing = not keys.null_count and (
            pc.all(pc.greater(keys[1:], keys[:-1])).as_py() is not False
        )
        if not increasing or (self.last is not None and not keys[0].as_py() > self.last):
            self.in_order = False
            return
        self.last = keys[-1].as_py()
        for name, col in self.columns.items():
            col.update(batch.column(name))
        self.rows += batch.num_rows

    def hexdigest(self) -> str | None:
        if not self.in_order or self.columns is None:
            return None
        names = sorted(self.columns, key=lambda n: n.encode())
        out = hashlib.sha256(DIGEST_SPEC + _u64(self.rows) + _u64(len(names)))
        for name in names:
            col = self.columns[name]
            out.update(_u64(len(name.encode())) + name.encode())
            out.update(_u64(len(col.tag)) + col.tag.encode() + col.digest())
        return out.hexdigest()


def _feed_in_key_order(
    columns: dict[str, _Column], batches: Iterable[pa.RecordBatch], key: str | None
) -> int | None:
    """Hash the batches if their keys strictly increase; rows hashed, or None if not key order."""
    if key is None or key not in columns or columns[key].variable:
        return None
    last: Any = None
    rows = 0
    for batch in batches:
        if not batch.num_rows:
            continue
        keys = _plain(batch.column(key))
        if keys.null_count:
            return None
        increasing = pc.all(pc.greater(keys[1:], keys[:-1])).as_py() is not False
        if not increasing or (last is not None and not keys[0].as_py() > last):
            return None
        last = keys[-1].as_py()
        for name, col in columns.items():
            col.update(batch.column(name))
        rows += batch.num_rows
    return rows


def _feed_sorted(
    columns: dict[str, _Column],
    schema: pa.Schema,
    batches: Iterable[pa.RecordBatch],
    key: str | None,
    names: list[str],
) -> int:
    table = pa.Table.from_batches(list(batches), schema=schema)
    if not table.num_rows:
        return 0
    # Sorted by the values the spec encodes (JSON as text, timestamps as integers).
    plain = pa.table(
        {n: pa.concat_arrays([_plain(c) for c in table.column(n).chunks]) for n in names}
    )
    order = ([key] if key in columns else []) + names
    # pyarrow places NULLs last, and NaN after every other value, by default.
    indices = pc.sort_indices(plain, sort_keys=[(n, "ascending") for n in order])
    for batch in table.take(indices).to_batches():
        for name, col in columns.items():
            col.update(batch.column(name))
    return table.num_rows
