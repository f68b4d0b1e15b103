"""The row digest's specification (storage/rowdigest.py): a test vector and a reference encoder.

`reference_digest` follows the module docstring literally, one value at a
time, so the vectorised implementation is checked against the spec's words,
and the committed vector pins both: a change of either is a change of every
manifest's digests, which must not happen silently.
"""

from __future__ import annotations

import hashlib
import math
import struct
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchsync.storage.rowdigest import table_digest

# (name, tag, Arrow type, values) in the order the rows are given (key order).
COLUMNS: list[tuple[str, str, pa.DataType, list[Any]]] = [
    ("id", "int32", pa.int32(), [1, 2, 3]),
    ("f", "float32", pa.float32(), [1.5, float("nan"), -0.0]),
    ("d", "float64", pa.float64(), [None, 1e300, 0.1]),
    ("s", "utf8", pa.string(), ["ab", "c", None]),
    ("t", "utf8", pa.string(), ["a", "bc", ""]),
    ("ok", "bool", pa.bool_(), [True, None, False]),
    ("n", "int64", pa.int64(), [-1, 2**40, None]),
    ("ts", "timestamp", pa.timestamp("us"),
     [datetime(2024, 3, 1, 10, 0, 0, 123456), None, datetime(1969, 12, 31, 23, 59, 59)]),
]  # fmt: skip
VECTOR = "661b37d3fbee72b6320e785597952a690f61be7e179de7b861a1add973cd9c18"

_FIXED = {"int32": "<i", "int64": "<q", "float32": "<f", "float64": "<d", "bool": "<B",
          "timestamp": "<q"}  # fmt: skip


def _encode(tag: str, v: Any) -> bytes:
    if tag in ("float32", "float64") and v is not None and math.isnan(v):
        return bytes.fromhex("0000c07f" if tag == "float32" else "000000000000f87f")
    if tag == "timestamp" and v is not None:
        delta = v - datetime(1970, 1, 1)
        v = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return struct.pack(_FIXED[tag], 0 if v is None else v)


def reference_digest(columns: list[tuple[str, str, Any, list[Any]]]) -> str:
    n = len(columns[0][3])
    out = hashlib.sha256(b"benchsync-rows/1\n" + n.to_bytes(8, "little")
                         + len(columns).to_bytes(8, "little"))  # fmt: skip
    for name, tag, _, values in sorted(columns, key=lambda c: c[0].encode()):
        v = bytes(0 if x is None else 1 for x in values)
        if tag == "utf8":
            lengths = b"".join(len((x or "").encode()).to_bytes(8, "little") for x in values)
            d = b"".join(x.encode() for x in values if x is not None)
        else:
            lengths, d = b"", b"".join(_encode(tag, x) for x in values)
        col = hashlib.sha256(
            b"".join(hashlib.sha256(s).digest() for s in (v, lengths, d))
        ).digest()
        out.update(len(name.encode()).to_bytes(8, "little") + name.encode())
        out.update(len(tag).to_bytes(8, "little") + tag.encode() + col)
    return out.hexdigest()


def _batch(order: list[int] | None = None) -> pa.RecordBatch:
    arrays = [pa.array(values, type=t) for _, _, t, values in COLUMNS]
    batch = pa.RecordBatch.from_arrays(arrays, names=[c[0] for c in COLUMNS])
    return batch if order is None else batch.take(pa.array(order))


def digest(batches: list[pa.RecordBatch], key: str | None = "id") -> str | None:
    return table_digest(batches[0].schema, lambda: iter(batches), key)


def test_vector_matches_the_spec_and_the_implementation() -> None:
    assert reference_digest(COLUMNS) == VECTOR
    assert digest([_batch()]) == VECTOR


def test_row_order_and_batching_do_not_matter() -> None:
    assert digest([_batch([2, 0, 1])]) == VECTOR  # not key order: sorted first
    assert digest([_batch([0]), _batch([1, 2])]) == VECTOR
    assert digest([_batch().slice(0, 2), _batch().slice(2)]) == VECTOR  # offsets into buffers


def test_values_that_print_alike_digest_apart() -> None:
    def with_value(column: str, row: int, value: Any) -> str | None:
        cols = [(n, tag, t, [value if (n == column and i == row) else x
                             for i, x in enumerate(vs)]) for n, tag, t, vs in COLUMNS]  # fmt: skip
        arrays = [pa.array(vs, type=t) for _, _, t, vs in cols]
        return digest([pa.RecordBatch.from_arrays(arrays, names=[c[0] for c in cols])])

    assert with_value("f", 2, 0.0) != VECTOR  # -0.0 is not 0.0
    assert with_value("s", 2, "") != VECTOR  # NULL is not ""
    assert with_value("n", 2, 0) != VECTOR  # NULL is not 0
    assert with_value("f", 0, 1.5000001) != VECTOR  # the next float32


def test_float32_and_float64_are_different_types() -> None:
    one = pa.RecordBatch.from_arrays([pa.array([1], pa.int32()), pa.array([1.5], pa.float32())],
                                     names=["id", "x"])  # fmt: skip
    wide = pa.RecordBatch.from_arrays([pa.array([1], pa.int32()), pa.array([1.5], pa.float64())],
                                      names=["id", "x"])  # fmt: skip
    assert digest([one]) != digest([wide])


def test_unsupported_type_has_no_digest() -> None:
    batch = pa.RecordBatch.from_arrays([pa.array([1]), pa.array([[1]])], names=["id", "l"])
    assert digest([batch]) is None


@pytest.mark.parametrize("row_group_size", [1, 2, 1000])
def test_duckdb_table_and_its_parquet_agree(tmp_path: Path, row_group_size: int) -> None:
    conn = duckdb.connect()
    conn.execute("CREATE TABLE t (id INTEGER, f FLOAT, d DOUBLE, s VARCHAR, t VARCHAR, "
                 "ok BOOLEAN, n BIGINT, ts TIMESTAMP)")  # fmt: skip
    conn.register("b", pa.Table.from_batches([_batch()]))
    conn.execute("INSERT INTO t SELECT * FROM b")
    path = tmp_path / "t.parquet"
    conn.execute(f"COPY (SELECT * FROM t ORDER BY id) TO '{path}' "
                 f"(FORMAT parquet, ROW_GROUP_SIZE {row_group_size})")  # fmt: skip
    reader = conn.sql("SELECT * FROM t ORDER BY id").to_arrow_reader(2)
    assert table_digest(reader.schema, lambda: reader, "id") == VECTOR
    schema = pq.ParquetFile(path).schema_arrow
    assert table_digest(schema, lambda: pq.ParquetFile(path).iter_batches(1), "id") == VECTOR
