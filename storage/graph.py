"""The benchmark knowledge graph and model similarity, computed in DuckDB SQL.

Nodes are named by value, not by local id where a value exists, so the same
node has the same name on every benchsync node: `model:<model_name>`,
`hardware:<hardware_type>`, and for single rows `run:<run_id>`,
`result:<result_id>` (performance), `compat:<compatibility_id>`,
`test:<test_result_id>`. A bare name means a model.

Edge types (source -> target):
- ran_on:            model -> hardware (count = performance results)
- compatible_with / incompatible_with: model -> hardware (count = compatibility results)
- same_family:       model -> model (both have the same non-null model_family)
- tested_in:         model or hardware -> run (count = results in that run)
- result_of:         result/compat/test -> run
- measures:          result/compat/test -> model
- measured_on:       result/compat/test -> hardware

Similarity compares performance profiles cell by cell over the
(hardware_type, batch_size) cells both models were measured on: per cell, the
ratio smaller/larger of mean throughput and of mean latency (1.0 = identical),
averaged over the metrics both have; the score is the mean over shared cells.
"""

from __future__ import annotations

from typing import Any

import duckdb

from benchsync.storage.errors import NotFound

NODE_KINDS = ("model", "hardware", "run", "result", "compat", "test")
# Row kinds: node prefix -> (table, id column)
_ROW_TABLES = {
    "result": ("performance_results", "result_id"),
    "compat": ("hardware_compatibility", "compatibility_id"),
    "test": ("integration_test_results", "test_result_id"),
}

_MODEL_EDGES = """
SELECT 'model:' || m.model_name AS source, 'ran_on' AS type,
       'hardware:' || h.hardware_type AS target, count(*) AS count
FROM performance_results r JOIN models m USING (model_id)
     JOIN hardware_platforms h USING (hardware_id)
WHERE {where} GROUP BY ALL
UNION ALL
SELECT 'model:' || m.model_name, CASE WHEN c.is_compatible THEN 'compatible_with'
       ELSE 'incompatible_with' END, 'hardware:' || h.hardware_type, count(*)
FROM hardware_compatibility c JOIN models m USING (model_id)
     JOIN hardware_platforms h USING (hardware_id)
WHERE {where} GROUP BY ALL
UNION ALL
SELECT 'model:' || m.model_name, 'same_family', 'model:' || o.model_name, 1
FROM models m JOIN models o ON o.model_family = m.model_family AND o.model_name <> m.model_name
WHERE {model_only} GROUP BY ALL
UNION ALL
SELECT {node}, 'tested_in', 'run:' || x.run_id, count(*)
FROM (SELECT run_id, model_id, hardware_id FROM performance_results
      UNION ALL SELECT run_id, model_id, hardware_id FROM hardware_compatibility
      UNION ALL SELECT run_id, model_id, hardware_id FROM integration_test_results) x
     LEFT JOIN models m USING (model_id) LEFT JOIN hardware_platforms h USING (hardware_id)
WHERE x.run_id IS NOT NULL AND {where} GROUP BY ALL
"""

_ROW_EDGES = """
SELECT '{prefix}:' || r.{pk} AS source, 'result_of' AS type, 'run:' || r.run_id AS target,
       1 AS count
FROM {table} r WHERE r.{pk} = $id AND r.run_id IS NOT NULL
UNION ALL
SELECT '{prefix}:' || r.{pk}, 'measures', 'model:' || m.model_name, 1
FROM {table} r JOIN models m USING (model_id) WHERE r.{pk} = $id
UNION ALL
SELECT '{prefix}:' || r.{pk}, 'measured_on', 'hardware:' || h.hardware_type, 1
FROM {table} r JOIN hardware_platforms h USING (hardware_id) WHERE r.{pk} = $id
"""

# sql: prefix, table and pk come from the fixed _ROW_TABLES above, never from a caller.
_RUN_EDGES = " UNION ALL ".join(
    f"SELECT '{prefix}:' || {pk} AS source, 'result_of' AS type, 'run:' || run_id AS target, "
    f"1 AS count FROM {table} WHERE run_id = $id"
    for prefix, (table, pk) in _ROW_TABLES.items()
)

_SIMILAR_SQL = """
WITH profile AS (
    SELECT m.model_name, h.hardware_type, r.batch_size,
           avg(r.throughput_items_per_second) AS tput, avg(r.average_latency_ms) AS lat
    FROM performance_results r JOIN models m USING (model_id)
         JOIN hardware_platforms h USING (hardware_id)
    GROUP BY ALL
),
cells AS (
    SELECT o.model_name, me.hardware_type, me.batch_size,
           CASE WHEN me.tput IS NULL OR o.tput IS NULL THEN NULL
                WHEN greatest(me.tput, o.tput) = 0 THEN 1.0
                ELSE least(me.tput, o.tput) / greatest(me.tput, o.tput) END AS r_tput,
           CASE WHEN me.lat IS NULL OR o.lat IS NULL THEN NULL
                WHEN greatest(me.lat, o.lat) = 0 THEN 1.0
                ELSE least(me.lat, o.lat) / greatest(me.lat, o.lat) END AS r_lat
    FROM profile me JOIN profile o
      ON o.hardware_type = me.hardware_type AND o.batch_size = me.batch_size
     AND o.model_name <> me.model_name
    WHERE me.model_name = $model
)
SELECT model_name,
       avg((coalesce(r_tput, r_lat) + coalesce(r_lat, r_tput)) / 2) AS score,
       count(*) AS shared_measurements,
       list(DISTINCT hardware_type ORDER BY hardware_type) AS shared_hardware
FROM cells WHERE r_tput IS NOT NULL OR r_lat IS NOT NULL
GROUP BY model_name
ORDER BY score DESC, shared_measurements DESC, model_name
LIMIT $top_k
"""


def parse_node(node_id: str) -> tuple[str, str]:
    """Split "kind:value" (a bare value is a model); raises ValueError for an unknown kind."""
    kind, sep, value = node_id.partition(":")
    if not sep:
        return "model", node_id
    if kind not in NODE_KINDS:
        raise ValueError(
            f"unknown node kind {kind!r} in {node_id!r}; expected one of "
            + ", ".join(f"{k}:..." for k in NODE_KINDS)
        )
    return kind, value


def _edges(cur: duckdb.DuckDBPyConnection, sql: str,
           params: dict[str, Any]) -> list[dict[str, Any]]:
    # sql: `sql` is one of this module's fixed edge queries; values go in as `params`.
    rows = cur.execute(f"SELECT * FROM ({sql}) ORDER BY type, source, target", params).fetchall()
    return [{"source": s, "type": t, "target": d, "count": int(c)} for s, t, d, c in rows]


def _exists(cur: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> bool:
    return bool(cur.execute(sql + " LIMIT 1", params).fetchall())


def relationships(cur: duckdb.DuckDBPyConnection, node_id: str) -> list[dict[str, Any]]:
    """Edges touching `node_id`, as dicts {source, type, target, count}, sorted.

    Raises `NotFound` if the node does not exist, ValueError for a malformed id.
    """
    kind, value = parse_node(node_id)
    if kind == "model":
        if not _exists(cur, "SELECT 1 FROM models WHERE model_name = ?", [value]):
            raise NotFound(f"no model named {value!r}")
        sql = _MODEL_EDGES.format(where="m.model_name = $v", model_only="m.model_name = $v",
                                  node="'model:' || m.model_name")
        return _edges(cur, sql, {"v": value})
    if kind == "hardware":
        if not _exists(cur, "SELECT 1 FROM hardware_platforms WHERE hardware_type = ?", [value]):
            raise NotFound(f"no hardware platform of type {value!r}")
        sql = _MODEL_EDGES.format(where="h.hardware_type = $v", model_only="false",
                                  node="'hardware:' || h.hardware_type")
        return _edges(cur, sql, {"v": value})
    try:
        row_id = int(value)
    except ValueError:
        raise ValueError(f"{kind} ids are integers, got {value!r}") from None
    if kind == "run":
        if not _exists(cur, "SELECT 1 FROM test_runs WHERE run_id = ?", [row_id]):
            raise NotFound(f"no test run with id {row_id}")
        return _edges(cur, _RUN_EDGES, {"id": row_id})
    table, pk = _ROW_TABLES[kind]  # sql: fixed names from _ROW_TABLES; the id is a parameter
    if not _exists(cur, f"SELECT 1 FROM {table} WHERE {pk} = ?", [row_id]):
        raise NotFound(f"no {kind} with id {row_id}")
    return _edges(cur, _ROW_EDGES.format(prefix=kind, table=table, pk=pk), {"id": row_id})


def similar_models(cur: duckdb.DuckDBPyConnection, model_name: str,
                   top_k: int = 5) -> list[dict[str, Any]]:
    """Up to `top_k` other models, most similar first, with their evidence.

    Each is {model_name, score (0..1], shared_measurements, shared_hardware}.
    Models sharing no (hardware_type, batch_size) measurement are not listed.
    Raises `NotFound` for an unknown model.
    """
    if not _exists(cur, "SELECT 1 FROM models WHERE model_name = ?", [model_name]):
        raise NotFound(f"no model named {model_name!r}")
    rows = cur.execute(_SIMILAR_SQL, {"model": model_name, "top_k": int(top_k)}).fetchall()
    return [{"model_name": name, "score": float(score), "shared_measurements": int(shared),
             "shared_hardware": list(hw)} for name, score, shared, hw in rows]
