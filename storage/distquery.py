"""The DuckDB side of cross-node queries: the SQL dialect the planner uses, and the merge.

The planner (`benchsync.protocol.planner`) is pure: it splits a parsed SELECT
into a node part and a merge part, as ASTs. Turning SQL text into an AST and
back needs DuckDB's own parser (`json_serialize_sql` / `json_deserialize_sql`);
`DUCKDB` is that `SqlDialect`, run on one private in-memory connection that
never sees data. Its `parse` is the sandbox's read-only gate (`sandbox.gate`):
what cannot run in a sandbox is refused before it is planned.

The node part runs in each node's sandbox over that node's own dataset only
(never the replicas it holds, so no row is counted twice). The merge runs at
the coordinator over one table, the union of the nodes' partial answers
(`union_partials`), in a sandbox too, since the merge SQL holds the caller's
expressions (`sandbox.run_once` in-process, a sandbox worker in the daemon).

This module never imports `protocol/` (layering); the plan's SQL and column
names come in as plain arguments.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import duckdb
import pyarrow as pa

from benchsync.storage.errors import StorageError
from benchsync.storage.sandbox import QueryError, gate

__all__ = ["DUCKDB", "DuckDBDialect", "PartialsMismatch", "union_partials"]

# The parser connection: plain in-memory DuckDB used only for json_(de)serialize_sql.
_parser_lock = threading.Lock()
_parser: duckdb.DuckDBPyConnection | None = None


class PartialsMismatch(StorageError):
    """The nodes' partial answers cannot be unioned (their column types disagree)."""


def _parse_conn() -> duckdb.DuckDBPyConnection:
    global _parser
    if _parser is None:
        _parser = duckdb.connect(
            ":memory:", config={"enable_external_access": False, "lock_configuration": True}
        )
    return _parser


class DuckDBDialect:
    """DuckDB's parser as the planner's `SqlDialect` (thread-safe: one lock)."""

    def parse(self, sql: str) -> dict[str, Any]:
        """The read-only gate (`sandbox.gate`); returns the `json_serialize_sql` document.

        Raises InvalidSQL or QueryRefused. Cheap: callers use it to refuse a
        query before handing it to a sandbox (which checks again).
        """
        with _parser_lock:
            return gate(_parse_conn(), sql)

    def render(self, ast: Mapping[str, Any]) -> str:
        """SQL text of a `json_serialize_sql`-shaped document.

        Raises QueryError when DuckDB cannot render it (a planner bug, not the caller's SQL).
        """
        with _parser_lock:
            try:
                rows = _parse_conn().execute(
                    "SELECT json_deserialize_sql(?)", [json.dumps(ast)]
                ).fetchall()
            except duckdb.Error as e:
                raise QueryError(f"the query plan could not be rendered as SQL: {e}") from None
        return str(rows[0][0])

    def expression_name(self, expr: dict[str, Any]) -> str:
        """DuckDB's column name for an unaliased select item: its SQL text."""
        doc = {
            "error": False,
            "statements": [
                {
                    "node": {
                        "type": "SELECT_NODE", "modifiers": [], "cte_map": {"map": []},
                        "select_list": [expr], "from_table": {"type": "EMPTY", "alias": "",
                                                              "sample": None},
                        "where_clause": None, "group_expressions": [], "group_sets": [],
                        "aggregate_handling": "STANDARD_HANDLING", "having": None,
                        "sample": None, "qualify": None,
                    },
                    "named_param_map": [],
                }
            ],
        }  # fmt: skip
        return self.render(doc).removeprefix("SELECT ")

    def aggregate_names(self) -> frozenset[str]:
        """Every aggregate function DuckDB knows (so the planner can tell median() from round())."""
        return _aggregate_names()


@functools.cache
def _aggregate_names() -> frozenset[str]:
    with _parser_lock:
        rows = _parse_conn().execute(
            "SELECT DISTINCT function_name FROM duckdb_functions() "
            "WHERE function_type = 'aggregate'"
        ).fetchall()
    return frozenset(r[0].lower() for r in rows)


DUCKDB = DuckDBDialect()


def union_partials(partials: Sequence[pa.Table]) -> pa.Table:
    """The one table the merge runs over: the union of the nodes' answers.

    Nodes may type a column differently (e.g. all-NULL -> NULL type); Arrow
    unifies what it can. Raises PartialsMismatch for types that cannot be
    unified, ValueError for no partials.
    """
    if not partials:
        raise ValueError("no partial answers to merge; at least one node must answer")
    try:
        return pa.concat_tables(partials, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise PartialsMismatch(f"partial answers disagree on column types: {e}") from None
