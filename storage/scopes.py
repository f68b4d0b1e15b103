"""What a query sees in each scope, as Arrow tables handed to a sandbox.

A sandbox reads no files itself: the caller hands in the tables of the
query's scope (`ScopeInput`) and `scope_tables` turns them into the name ->
table mapping a `QuerySandbox` loads:

- `local`: the node's own tables, as they are.
- `replicas`: each table name is the union (by column name, missing columns
  NULL, like DuckDB's `UNION ALL BY NAME`) of the node's own rows and every
  installed replica's, with a leading `origin` column naming the dataset
  (peer ID) each row came from.

Replica tables are Parquet files under the node's replicas directory, named
by the caller (the replica store); they are read here with pyarrow, never by
DuckDB, and only those files. Table names pass `check_table_name` first.
In the daemon this runs inside the sandbox's worker process, so a replica
whose Parquet expands beyond the worker's memory limit costs that worker only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from benchsync.storage.sqlnames import check_table_name

ORIGIN_COLUMN = "origin"


@dataclass(frozen=True)
class ReplicaTables:
    """One installed replica: its dataset (peer ID) and its Parquet file per table."""

    dataset: str
    tables: Mapping[str, Path]

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "tables": {k: str(v) for k, v in self.tables.items()}}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ReplicaTables:
        return cls(str(doc["dataset"]), {str(k): Path(v) for k, v in doc["tables"].items()})


@dataclass(frozen=True)
class ScopeInput:
    """The data of one scope: own tables, and (replicas scope) origin and replicas.

    `origin` None means the local scope: own tables only, no `origin` column.
    """

    own: Mapping[str, pa.Table]
    origin: str | None = None
    replicas: Sequence[ReplicaTables] = field(default_factory=tuple)


def scope_tables(scope: ScopeInput) -> dict[str, pa.Table]:
    """The tables a query in `scope` sees (name -> Arrow table).

    Raises UnsafeName for a table name outside the rule, OSError or
    pyarrow.ArrowInvalid for an unreadable replica file, pyarrow.ArrowTypeError
    when a replica's column cannot be unified with ours.
    """
    if scope.origin is None:
        return {check_table_name(name): table for name, table in scope.own.items()}
    parts: dict[str, list[pa.Table]] = {}
    for name, table in scope.own.items():
        parts.setdefault(check_table_name(name), []).append(_with_origin(table, scope.origin))
    for replica in scope.replicas:
        for name, path in replica.tables.items():
            table = pq.read_table(path)
            parts.setdefault(check_table_name(name), []).append(
                _with_origin(table, replica.dataset)
            )
    return {name: pa.concat_tables(ts, promote_options="permissive") for name, ts in parts.items()}


def _with_origin(table: pa.Table, origin: str) -> pa.Table:
    table = _plain(table)
    if ORIGIN_COLUMN in table.column_names:
        table = table.drop_columns([ORIGIN_COLUMN])
    return table.add_column(0, ORIGIN_COLUMN, pa.repeat(origin, table.num_rows))


def _plain(table: pa.Table) -> pa.Table:
    """Extension columns as their storage type: DuckDB hands JSON over as
    `arrow.json`, Parquet reads it back as string, and the union needs one type."""
    for i, f in enumerate(table.schema):
        if isinstance(f.type, pa.BaseExtensionType):
            column = table.column(i)
            plain = pa.chunked_array([c.storage for c in column.chunks], type=f.type.storage_type)
            table = table.set_column(i, pa.field(f.name, f.type.storage_type), plain)
    return table
