"""Issue 10: correct answers in every scope, or a loud refusal.

Observations 1 (replicas scope mis-joins) and 6 (32-bit floats), on real
DuckDB files: the answer is compared with one DuckDB file holding every
node's records. Observation 5 (the offline path is not read-only) is
`test_query_scopes.test_offline_cli_refuses_reading_files`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from benchsync.storage.db import BenchmarkDB
from benchsync.storage.sandbox import QueryLimits, run_once
from benchsync.storage.schema import ID_COLUMNS, TABLES, ensure_schema
from benchsync.storage.scopes import ReplicaTables, ScopeInput, global_id, origin_tag, scope_tables

LIMITS = QueryLimits(timeout_s=30.0, max_rows=1_000_000, max_bytes=64 * 2**20)
MEMORY = "512MB"
MODELS = ["bert-base", "gpt2", "vit-b16", "t5-small"]
HARDWARE = ["cpu", "cuda", "rocm"]
# The README's join shape: ids only, no origin.
JOIN = ("SELECT m.model_name, h.hardware_type, count(*) AS n, sum(r.batch_size) AS bs "
        "FROM performance_results r JOIN models m USING (model_id) "
        "JOIN hardware_platforms h USING (hardware_id) GROUP BY 1, 2 ORDER BY 1, 2")


def perf(rng: random.Random, n: int) -> list[dict[str, Any]]:
    return [{"model_name": rng.choice(MODELS), "hardware_type": rng.choice(HARDWARE),
             "batch_size": rng.choice([1, 2, 4]), "throughput": rng.uniform(1, 100)}
            for _ in range(n)]  # fmt: skip


def own_tables(db: BenchmarkDB) -> dict[str, pa.Table]:
    return {t: db.query(f"SELECT * FROM {t}") for t in TABLES}


def as_replica(db: BenchmarkDB, dataset: str, where: Path) -> ReplicaTables:
    """`db`'s tables as the Parquet files of an installed replica."""
    where.mkdir(parents=True)
    files = {}
    for name, table in own_tables(db).items():
        pq.write_table(table, where / f"{name}.parquet")
        files[name] = where / f"{name}.parquet"
    return ReplicaTables(dataset, files)


def test_replicas_scope_joins_on_ids_give_the_single_database_answer(tmp_path: Path) -> None:
    """Observation 1: per-node counters never join one node's row to another's."""
    rng = random.Random(10)
    union = BenchmarkDB(tmp_path / "union.duckdb")
    dbs = [BenchmarkDB(tmp_path / f"{i}.duckdb") for i in range(3)]
    for i, db in enumerate(dbs):
        # Names in a different order on each node: model 1 is another model on each.
        recs = perf(rng, 40 + 10 * i)
        rng.shuffle(recs)
        db.ingest_records("perf", recs)
        union.ingest_records("perf", recs)
    scope = ScopeInput(own_tables(dbs[0]), origin="node-0", replicas=[
        as_replica(db, f"node-{i}", tmp_path / f"r{i}") for i, db in enumerate(dbs) if i])
    got = run_once(JOIN, scope_tables(scope), limits=LIMITS, memory_limit=MEMORY)
    want = union.query(JOIN)
    assert got.to_pylist() == want.to_pylist()
    # Every id column, key or reference, is remapped the same way: a batch result
    # still finds its result, and the local id is recoverable.
    tables = scope_tables(scope)
    ids = tables["performance_results"].column("model_id").to_pylist()
    assert set(ids) <= set(tables["models"].column("model_id").to_pylist())
    assert global_id("node-1", 3) == (origin_tag("node-1") << 32) + 3
    assert {i & 0xFFFFFFFF for i in ids} <= {1, 2, 3, 4}
    for db in (*dbs, union):
        db.close()


def test_origin_tags_that_collide_are_refused() -> None:
    assert len(ID_COLUMNS) >= 8 and {"model_id", "hardware_id", "run_id"} <= ID_COLUMNS
    tags = {origin_tag(f"12D3KooW{i}") for i in range(2000)}
    assert len(tags) == 2000 and all(0 <= t < 2**31 for t in tags)


def test_measurements_are_double_and_legacy_float_files_migrate(tmp_path: Path) -> None:
    """Observation 6: new measurements are DOUBLE; FLOAT values migrate as they are."""
    legacy = tmp_path / "legacy.duckdb"
    conn = duckdb.connect(str(legacy))
    conn.execute("CREATE TABLE models (model_id INTEGER PRIMARY KEY, model_name VARCHAR NOT NULL,"
                 " model_family VARCHAR, modality VARCHAR, source VARCHAR, version VARCHAR,"
                 " parameters_million FLOAT, metadata JSON, created_at TIMESTAMP)")
    conn.execute("CREATE TABLE hardware_platforms (hardware_id INTEGER PRIMARY KEY,"
                 " hardware_type VARCHAR NOT NULL, device_name VARCHAR, platform VARCHAR,"
                 " platform_version VARCHAR, driver_version VARCHAR, memory_gb FLOAT,"
                 " compute_units INTEGER, metadata JSON, created_at TIMESTAMP)")
    conn.execute("CREATE TABLE performance_results (result_id INTEGER PRIMARY KEY,"
                 " run_id INTEGER, model_id INTEGER NOT NULL REFERENCES models(model_id),"
                 " hardware_id INTEGER NOT NULL REFERENCES hardware_platforms(hardware_id),"
                 " test_case VARCHAR NOT NULL, batch_size INTEGER DEFAULT 1, precision VARCHAR,"
                 " total_time_seconds FLOAT, average_latency_ms FLOAT,"
                 " throughput_items_per_second FLOAT, memory_peak_mb FLOAT, iterations INTEGER,"
                 " warmup_iterations INTEGER, metrics JSON, created_at TIMESTAMP)")
    conn.execute("INSERT INTO models (model_id, model_name) VALUES (1, 'bert')")
    conn.execute("INSERT INTO hardware_platforms (hardware_id, hardware_type) VALUES (1, 'cpu')")
    conn.execute("INSERT INTO performance_results (result_id, model_id, hardware_id, test_case,"
                 " throughput_items_per_second) VALUES (1, 1, 1, 'default', 9.8)")
    conn.close()
    db = BenchmarkDB(legacy)
    try:
        db.ingest_records("perf", [{"model_name": "bert", "hardware_type": "cpu",
                                    "throughput": 9.8, "latency_avg": 0.1}])  # fmt: skip
        rows = db.query("SELECT result_id, throughput_items_per_second AS t, "
                        "average_latency_ms AS l FROM performance_results ORDER BY 1").to_pylist()
        # The legacy value is what its FLOAT held; the new one is exact.
        assert rows[0]["t"] == float(pa.scalar(9.8, pa.float32()).as_py())
        assert rows[1] == {"result_id": 2, "t": 9.8, "l": 0.1}
        types = {r["column_name"]: r["data_type"] for r in db.query(
            "SELECT column_name, data_type FROM duckdb_columns() "
            "WHERE table_name = 'performance_results'").to_pylist()}  # fmt: skip
        assert types["throughput_items_per_second"] == "DOUBLE"
        assert types["latency_p99_ms"] == "DOUBLE"
    finally:
        db.close()
    fresh = duckdb.connect(str(tmp_path / "fresh.duckdb"))
    ensure_schema(fresh)
    floats = fresh.execute("SELECT table_name, column_name FROM duckdb_columns() "
                           "WHERE data_type = 'FLOAT' AND schema_name = 'main'").fetchall()
    assert floats == []
