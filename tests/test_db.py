"""BenchmarkDB on real DuckDB files: the original API, bulk ingest, validation, schema, threads."""

from __future__ import annotations

import json
import math
import threading
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from benchsync.storage.db import DB_FILENAME, BenchmarkDB, ReadOnlyDatabase
from benchsync.storage.errors import InvalidRecord
from benchsync.storage.records import (
    HardwareCompatibility,
    IntegrationTestResult,
    PerformanceResult,
)
from benchsync.storage.schema import PRIMARY_KEYS, SCHEMA_VERSION, TABLES, ensure_schema


@pytest.fixture
def db(tmp_path: Path):
    with BenchmarkDB(tmp_path / DB_FILENAME) as d:
        yield d


def perf(**kw):
    base = dict(model_name="bert-base", hardware_type="cuda", device_name="A100",
                throughput=100.0, latency_avg=5.0)
    return {**base, **kw}


def test_store_and_query_performance_round_trip(db: BenchmarkDB) -> None:
    rid = db.store_performance_result(**perf(batch_size=8, precision="fp16", latency_p90=6.0,
                                             latency_p95=7.0, latency_p99=9.5, memory_peak=1024.0,
                                             iterations=100, warmup_iterations=10,
                                             metrics={"tokens": 512}))
    [row] = db.query_performance_results("bert-base")
    assert row["result_id"] == rid
    assert (row["batch_size"], row["precision"], row["throughput"]) == (8, "fp16", 100.0)
    assert (row["latency_p90"], row["latency_p95"], row["latency_p99"]) == (6.0, 7.0, 9.5)
    assert row["memory_peak"] == 1024.0 and row["metrics"] == {"tokens": 512}
    # Stored under the original column names too.
    t = db.query("SELECT average_latency_ms, throughput_items_per_second, latency_p99_ms "
                 "FROM performance_results")
    assert t.to_pylist() == [{"average_latency_ms": 5.0, "throughput_items_per_second": 100.0,
                              "latency_p99_ms": 9.5}]


def test_record_object_and_defaults(db: BenchmarkDB) -> None:
    db.store_performance_result(PerformanceResult(model_name="m", hardware_type="cpu"))
    [row] = db.query_performance_results()
    assert (row["batch_size"], row["precision"], row["test_case"]) == (1, "fp32", "default")
    with pytest.raises(InvalidRecord):
        db.store_performance_result(HardwareCompatibility(model_name="m", hardware_type="cpu",
                                                          is_compatible=True))


def test_models_and_hardware_created_once_and_reused(db: BenchmarkDB) -> None:
    for _ in range(3):
        db.store_performance_result(**perf())
    db.store_performance_result(**perf(device_name="H100"))
    db.store_hardware_compatibility(model_name="bert-base", hardware_type="cuda",
                                    device_name="A100", is_compatible=True)
    counts = db.table_counts()
    assert counts["models"] == 1
    assert counts["hardware_platforms"] == 2  # A100 and H100
    assert counts["performance_results"] == 4


def test_query_filters_and_latest_only(db: BenchmarkDB) -> None:
    t0 = datetime(2024, 1, 1)
    db.store_performance_result(**perf(throughput=1.0, created_at=t0))
    db.store_performance_result(**perf(throughput=2.0, created_at=t0 + timedelta(days=1)))
    db.store_performance_result(**perf(throughput=3.0, batch_size=4, created_at=t0))
    db.store_performance_result(**perf(model_name="gpt2", throughput=4.0, precision="int8",
                                       hardware_type="cpu", device_name=None, created_at=t0))
    tput = [r["throughput"] for r in db.query_performance_results()]
    assert tput == [1.0, 3.0, 4.0, 2.0]  # oldest first
    assert [r["throughput"] for r in db.query_performance_results("bert-base", batch_size=1)] == [
        1.0, 2.0]
    assert [r["throughput"] for r in db.query_performance_results(hardware_type="cpu")] == [4.0]
    assert [r["throughput"] for r in db.query_performance_results(precision="int8")] == [4.0]
    assert [r["throughput"] for r in db.query_performance_results(
        since=t0 + timedelta(hours=1))] == [2.0]
    assert [r["throughput"] for r in db.query_performance_results(
        until=t0 + timedelta(hours=1))] == [1.0, 3.0, 4.0]
    latest = db.query_performance_results("bert-base", latest_only=True)
    assert sorted(r["throughput"] for r in latest) == [2.0, 3.0]


def test_compatibility_alias_and_queries(db: BenchmarkDB) -> None:
    assert db.store_compatibility_result == db.store_hardware_compatibility
    db.store_compatibility_result(model_name="llama", hardware_type="rocm", is_compatible=False,
                                  error_message="no kernel", error_type="NotImplementedError",
                                  created_at=datetime(2024, 1, 1))
    db.store_hardware_compatibility(HardwareCompatibility(
        model_name="llama", hardware_type="rocm", is_compatible=True, compatibility_score=0.5))
    rows = db.query_hardware_compatibility("llama", "rocm")
    assert [r["is_compatible"] for r in rows] == [False, True]
    assert rows[0]["detection_success"] is False  # follows is_compatible when unset
    assert rows[0]["error_message"] == "no kernel"
    latest = db.query_hardware_compatibility(model_name="llama", latest_only=True)
    assert [r["is_compatible"] for r in latest] == [True]
    assert db.query_hardware_compatibility(is_compatible=False)[0]["error_type"] == (
        "NotImplementedError")


def test_integration_tests_with_assertions_and_runs(db: BenchmarkDB) -> None:
    run = db.create_test_run("nightly", "integration", git_commit="abc123")
    tid = db.store_integration_test_result(
        test_module="tests.test_x", test_class="TestX", test_name="test_fwd", status="fail",
        model_name="bert-base", hardware_type="cuda", run_id=run, error_message="mismatch",
        assertions=[{"assertion_name": "shape", "passed": True},
                    {"assertion_name": "value", "passed": False, "expected_value": "1",
                     "actual_value": "2"}])
    db.store_integration_test_result(IntegrationTestResult(
        test_module="tests.test_y", test_name="test_y", status="skip"))
    [row] = db.query_integration_test_results(status="fail")
    assert row["test_result_id"] == tid and row["run_id"] == run
    assert [(a["assertion_name"], a["passed"]) for a in row["assertions"]] == [
        ("shape", True), ("value", False)]
    assert row["assertions"][1]["actual_value"] == "2"
    # A test without run_id gets a run of its own (integration_test_results.run_id is NOT NULL).
    [skip] = db.query_integration_test_results(test_module="tests.test_y")
    assert skip["run_id"] not in (None, run) and skip["model_name"] is None
    assert db.query_integration_test_results(model_name="bert-base")[0]["test_result_id"] == tid


def test_summaries(db: BenchmarkDB) -> None:
    db.store_performance_result(**perf(throughput=100.0, latency_avg=10.0))
    db.store_performance_result(**perf(throughput=200.0, latency_avg=5.0))
    db.store_performance_result(**perf(hardware_type="cpu", device_name=None, throughput=10.0))
    db.store_performance_result(**perf(model_name="gpt2", throughput=50.0))
    summary = db.get_model_performance_summary("bert-base")
    by_hw = {r["hardware_type"]: r for r in summary}
    assert by_hw["cuda"]["results"] == 2 and by_hw["cuda"]["avg_throughput"] == 150.0
    assert by_hw["cuda"]["max_throughput"] == 200.0 and by_hw["cuda"]["min_latency_ms"] == 5.0
    assert by_hw["cpu"]["results"] == 1
    hw = db.get_hardware_benchmark_summary("cuda")
    assert {r["model_name"]: r["results"] for r in hw} == {"bert-base": 2, "gpt2": 1}
    assert db.get_model_performance_summary("nope") == []


@pytest.mark.parametrize("bad, field", [
    (perf(model_name=None), "model_name"),
    (perf(model_name="  "), "model_name"),
    (perf(throughput=-1.0), "throughput"),
    (perf(latency_p99=math.nan), "latency_p99"),
    (perf(latency_avg=math.inf), "latency_avg"),
    (perf(throughput="fast"), "throughput"),
    (perf(batch_size=2.5), "batch_size"),
    (perf(batch_size=True), "batch_size"),
    (perf(batch_size=0), "batch_size"),
    (perf(memory_peak=1e40), "memory_peak"),
    (perf(metrics=[1, 2]), "metrics"),
    (perf(colour="red"), "colour"),
    (perf(run_id=999), "run_id"),  # no such test run
])
def test_bad_performance_input_names_field_and_writes_nothing(db: BenchmarkDB, bad, field) -> None:
    with pytest.raises(InvalidRecord) as e:
        db.store_performance_result(**bad)
    assert e.value.field == field
    assert field in str(e.value)
    assert all(n == 0 for n in db.table_counts().values()), db.table_counts()


def test_bad_status_and_assertions(db: BenchmarkDB) -> None:
    with pytest.raises(InvalidRecord) as e:
        db.store_integration_test_result(test_module="m", test_name="t", status="passed")
    assert e.value.field == "status" and e.value.value == "passed"
    with pytest.raises(InvalidRecord) as e:
        db.store_integration_test_result(test_module="m", test_name="t", status="pass",
                                         assertions=[{"assertion_name": "a"}])
    assert e.value.field == "passed"
    with pytest.raises(InvalidRecord) as e:
        db.store_hardware_compatibility(model_name="m", hardware_type="cpu", is_compatible="yes")
    assert e.value.field == "is_compatible"
    assert all(n == 0 for n in db.table_counts().values())


def test_ingest_records_one_transaction(db: BenchmarkDB) -> None:
    records = [perf(model_name=f"m{i % 7}", batch_size=1 + i % 4, throughput=float(i))
               for i in range(500)]
    assert db.ingest_records("perf", records) == 500
    counts = db.table_counts()
    assert counts["performance_results"] == 500 and counts["models"] == 7
    rows = db.query_performance_results()
    assert [r["throughput"] for r in rows] == [float(i) for i in range(500)]
    # ids continue monotonically after single inserts and across batches
    db.store_performance_result(**perf())
    db.ingest_records("performance", [perf(), perf()])
    ids = db.query("SELECT result_id FROM performance_results ORDER BY result_id")
    assert ids.column(0).to_pylist() == list(range(1, 504))
    model_ids = db.query("SELECT model_id FROM models ORDER BY model_id").column(0).to_pylist()
    assert model_ids == list(range(1, 8)) + [8]  # bert-base created last


def test_failed_batch_writes_nothing_of_that_batch(db: BenchmarkDB) -> None:
    db.store_performance_result(**perf())
    before = db.table_counts()
    good = [perf(model_name=f"new{i}") for i in range(50)]
    with pytest.raises(InvalidRecord) as e:
        db.ingest_records("perf", [*good, perf(throughput=-5.0), *good])
    assert e.value.field == "throughput" and e.value.index == 50  # type: ignore[attr-defined]
    with pytest.raises(InvalidRecord) as e:  # fails in SQL, after models would be created
        db.ingest_records("perf", [*good, perf(run_id=42)])
    assert e.value.field == "run_id"
    assert db.table_counts() == before
    # the writer is still usable and ids carry on from where they were
    assert db.store_performance_result(**perf()) == 2


def test_ingest_jsonl(db: BenchmarkDB, tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    lines = [json.dumps(perf(throughput=float(i), latency_p95=1.5)) for i in range(20)]
    path.write_text("\n".join(lines) + "\n\n")
    assert db.ingest_jsonl("perf", path) == 20
    assert db.table_counts()["performance_results"] == 20
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n" + json.dumps(perf(throughput=float("nan"))) + "\n")
    with pytest.raises(InvalidRecord) as e:
        db.ingest_jsonl("perf", bad)
    assert e.value.line == 2 and "bad.jsonl:2" in str(e.value)  # type: ignore[attr-defined]
    assert db.table_counts()["performance_results"] == 20


def test_ingest_arrow_and_vectorised_validation(db: BenchmarkDB) -> None:
    table = pa.table({
        "model_name": ["a", "b", "a"], "hardware_type": ["cpu", "cpu", "cuda"],
        "throughput": [1, 2, 3],  # ints are fine for a float field
        "latency_p99": [0.5, None, 1.5],
        "metrics": ['{"k": 1}', None, None],
    })
    assert db.ingest_arrow("perf", table) == 3
    rows = db.query_performance_results()
    assert [(r["model_name"], r["throughput"], r["latency_p99"]) for r in rows] == [
        ("a", 1.0, 0.5), ("b", 2.0, None), ("a", 3.0, 1.5)]
    assert rows[0]["metrics"] == {"k": 1} and rows[0]["batch_size"] == 1
    before = db.table_counts()
    for bad, field, value in [
        (table.set_column(2, "throughput", pa.array([1.0, -2.0, 3.0])), "throughput", -2.0),
        (table.set_column(2, "throughput", pa.array([1.0, math.nan, 3.0])), "throughput", None),
        (table.set_column(2, "throughput", pa.array(["1", "2", "3"])), "throughput", "1"),
        (table.set_column(0, "model_name", pa.array(["a", None, "c"])), "model_name", None),
        (table.drop_columns(["hardware_type"]), "hardware_type", None),
        (table.append_column("bogus", pa.array([1, 2, 3])), "bogus", None),
    ]:
        with pytest.raises(InvalidRecord) as e:
            db.ingest_arrow("perf", bad)
        assert e.value.field == field
        if value is not None:
            assert e.value.value == value
    tests = pa.table({"test_module": ["m", "m"], "test_name": ["a", "b"],
                      "status": ["pass", "nope"]})
    with pytest.raises(InvalidRecord) as e:
        db.ingest_arrow("test", tests)
    assert (e.value.field, e.value.value) == ("status", "nope")
    with pytest.raises(InvalidRecord):  # malformed JSON text is caught by DuckDB's cast
        db.ingest_arrow("perf", table.set_column(4, "metrics", pa.array(["{", None, None])))
    assert db.table_counts() == before


def test_ingest_tests_with_assertions_bulk(db: BenchmarkDB) -> None:
    recs = [{"test_module": "m", "test_name": f"t{i}", "status": "pass",
             "assertions": [{"assertion_name": f"a{j}", "passed": True} for j in range(i)]}
            for i in range(4)]
    assert db.ingest_records("test", recs) == 4
    rows = db.query_integration_test_results()
    assert [len(r["assertions"]) for r in rows] == [0, 1, 2, 3]
    assert [a["assertion_name"] for a in rows[3]["assertions"]] == ["a0", "a1", "a2"]
    arrow = pa.table({"test_module": ["m"], "test_name": ["z"], "status": ["error"],
                      "assertions": [[{"assertion_name": "x", "passed": False}]]})
    db.ingest_arrow("test", arrow)
    [z] = db.query_integration_test_results(status="error")
    assert z["assertions"][0]["assertion_name"] == "x"
    assert db.table_counts()["test_runs"] == 2  # one run per batch without run_id


def test_on_write_callbacks_and_generic_write(db: BenchmarkDB) -> None:
    seen: list[int] = []
    db.on_write.append(seen.append)
    db.store_performance_result(**perf())  # model + hardware + result
    db.store_performance_result(**perf())
    db.ingest_records("perf", [perf(model_name="x"), perf(model_name="y")])
    assert seen == [3, 1, 4]
    n = db.write(lambda c: c.execute("DELETE FROM performance_results WHERE model_id = "
                                     "(SELECT model_id FROM models WHERE model_name='x')"))
    assert n is not None and seen[-1] == 0
    # write() may change ids behind the writer's back; the writer must re-read them
    db.write(lambda c: c.execute("INSERT INTO performance_results (result_id, model_id, "
                                 "hardware_id, test_case) VALUES (100, 1, 1, 'manual')"))
    assert db.store_performance_result(**perf()) == 101
    with pytest.raises(ZeroDivisionError):
        db.write(lambda c: (c.execute("DELETE FROM models"), 1 / 0))
    assert db.table_counts()["models"] == 3  # rolled back


def test_concurrent_writers_and_readers(db: BenchmarkDB) -> None:
    errors: list[BaseException] = []
    ids: list[int] = []
    lock = threading.Lock()

    def writer(k: int) -> None:
        try:
            for i in range(15):
                rid = db.store_performance_result(**perf(model_name=f"w{k}", throughput=float(i)))
                with lock:
                    ids.append(rid)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def reader() -> None:
        try:
            for _ in range(15):
                db.query_performance_results()
                db.table_counts()
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert sorted(ids) == list(range(1, 46))
    assert db.table_counts()["models"] == 3


def test_reopen_persists_and_read_only(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    with BenchmarkDB(path) as db:
        db.store_performance_result(**perf())
    with BenchmarkDB(path) as db:
        assert db.store_performance_result(**perf()) == 2  # ids continue after reopen
    with BenchmarkDB(path, read_only=True) as ro:
        assert len(ro.query_performance_results()) == 2
        with pytest.raises(ReadOnlyDatabase):
            ro.store_performance_result(**perf())


ORIGINAL_DDL = [
    "CREATE TABLE hardware_platforms (hardware_id INTEGER PRIMARY KEY, hardware_type VARCHAR "
    "NOT NULL, device_name VARCHAR, platform VARCHAR, platform_version VARCHAR, driver_version "
    "VARCHAR, memory_gb FLOAT, compute_units INTEGER, metadata JSON, created_at TIMESTAMP "
    "DEFAULT CURRENT_TIMESTAMP)",
    "CREATE TABLE models (model_id INTEGER PRIMARY KEY, model_name VARCHAR NOT NULL, "
    "model_family VARCHAR, modality VARCHAR, source VARCHAR, version VARCHAR, "
    "parameters_million FLOAT, metadata JSON, created_at TIMESTAMP)",
    "CREATE TABLE test_runs (run_id INTEGER PRIMARY KEY, test_name VARCHAR NOT NULL, test_type "
    "VARCHAR NOT NULL, started_at TIMESTAMP, completed_at TIMESTAMP, execution_time_seconds "
    "FLOAT, success BOOLEAN, git_commit VARCHAR, git_branch VARCHAR, command_line VARCHAR, "
    "metadata JSON, created_at TIMESTAMP)",
    "CREATE TABLE performance_results (result_id INTEGER PRIMARY KEY, run_id INTEGER, model_id "
    "INTEGER NOT NULL, hardware_id INTEGER NOT NULL, test_case VARCHAR NOT NULL, batch_size "
    "INTEGER DEFAULT 1, precision VARCHAR, total_time_seconds FLOAT, average_latency_ms FLOAT, "
    "throughput_items_per_second FLOAT, memory_peak_mb FLOAT, iterations INTEGER, "
    "warmup_iterations INTEGER, metrics JSON, created_at TIMESTAMP, "
    "FOREIGN KEY (run_id) REFERENCES test_runs(run_id), "
    "FOREIGN KEY (model_id) REFERENCES models(model_id), "
    "FOREIGN KEY (hardware_id) REFERENCES hardware_platforms(hardware_id))",
    "CREATE TABLE web_platform_results (id INTEGER PRIMARY KEY, model_id INTEGER, browser "
    "VARCHAR, FOREIGN KEY (model_id) REFERENCES models(model_id))",
    "CREATE VIEW latest_performance_metrics AS SELECT m.model_name, p.throughput_items_per_second "
    "FROM performance_results p JOIN models m USING (model_id)",
    "INSERT INTO models VALUES (1, 'bert-base', 'bert', 'text', NULL, NULL, 110, NULL, "
    "'2023-05-01')",
    "INSERT INTO hardware_platforms (hardware_id, hardware_type, device_name) "
    "VALUES (1, 'cuda', 'A100')",
    "INSERT INTO performance_results (result_id, model_id, hardware_id, test_case, "
    "throughput_items_per_second, average_latency_ms, created_at) "
    "VALUES (1, 1, 1, 'default', 250, 4, '2023-05-01')",
    "INSERT INTO web_platform_results VALUES (1, 1, 'chrome')",
]


def test_original_schema_file_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    for sql in ORIGINAL_DDL:
        con.execute(sql)
    con.close()
    with BenchmarkDB(path) as db:
        [old] = db.query_performance_results("bert-base")
        assert (old["throughput"], old["latency_p99"], old["model_family"]) == (250.0, None, "bert")
        # new rows reuse the existing model and hardware and get the next ids
        assert db.store_performance_result(**perf(latency_p99=8.0)) == 2
        assert db.table_counts()["models"] == 1
        assert db.ingest_records("perf", [perf(), perf(model_name="gpt2")]) == 2
        assert db.query("SELECT max(model_id) AS m FROM models").column(0).to_pylist() == [2]
        # unknown tables and views are carried as they are
        assert db.query("SELECT browser FROM web_platform_results").column(0).to_pylist() == [
            "chrome"]
        assert db.query("SELECT count(*) FROM latest_performance_metrics").column(0)[0].as_py() == 4
        assert db.query("SELECT max(version) FROM schema_version").column(0)[0].as_py() == (
            SCHEMA_VERSION)
    with BenchmarkDB(path) as db:  # idempotent on reopen
        assert len(db.query("SELECT * FROM schema_version")) == SCHEMA_VERSION


def test_schema_constants_and_ensure_schema_idempotent(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "x.duckdb"))
    ensure_schema(con)
    ensure_schema(con)
    names = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert set(TABLES) <= names and "schema_version" in names
    for table in TABLES:
        cols = {r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()}
        assert PRIMARY_KEYS[table] in cols
    cols = {r[0] for r in con.execute("DESCRIBE performance_results").fetchall()}
    assert {"latency_p90_ms", "latency_p95_ms", "latency_p99_ms"} <= cols
    con.execute("INSERT INTO schema_version VALUES (?, 'future', NULL)", [SCHEMA_VERSION + 1])
    from benchsync.storage.schema import SchemaTooNew
    with pytest.raises(SchemaTooNew):
        ensure_schema(con)
