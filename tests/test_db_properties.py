"""Property tests: random valid records stored one by one or in bulk come back equal."""

from __future__ import annotations

import json
from datetime import datetime

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchsync.storage.db import DB_FILENAME, BenchmarkDB
from benchsync.storage.errors import InvalidRecord
from benchsync.storage.records import TEST_STATUSES

# FLOAT columns hold float32: generate values they store exactly.
measure = st.none() | st.floats(min_value=0, max_value=1e9, width=32, allow_nan=False)
name = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
               max_size=12).filter(lambda s: s.strip())
count = st.none() | st.integers(min_value=0, max_value=2**31 - 1)
stamp = st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1)).map(
    lambda d: d.replace(fold=0))  # fold does not survive storage and is irrelevant to UTC

perf_records = st.fixed_dictionaries({
    "model_name": name, "hardware_type": st.sampled_from(["cpu", "cuda", "rocm", "mps"]),
    "device_name": st.none() | name, "batch_size": st.integers(1, 4096),
    "precision": st.sampled_from(["fp32", "fp16", "int8"]), "test_case": name,
    "throughput": measure, "latency_avg": measure, "latency_p90": measure,
    "latency_p95": measure, "latency_p99": measure, "memory_peak": measure,
    "total_time_seconds": measure, "iterations": count, "warmup_iterations": count,
    "metrics": st.none() | st.dictionaries(name, st.integers(-100, 100) | name, max_size=3),
    "created_at": stamp,
})
test_records = st.fixed_dictionaries({
    "test_module": name, "test_name": name, "status": st.sampled_from(TEST_STATUSES),
    "test_class": st.none() | name, "model_name": st.none() | name,
    "execution_time_seconds": measure, "error_message": st.none() | name, "created_at": stamp,
    "assertions": st.lists(st.fixed_dictionaries({
        "assertion_name": name, "passed": st.booleans(), "expected_value": st.none() | name,
        "actual_value": st.none() | name, "message": st.none() | name}), max_size=3),
})

PROPS = settings(max_examples=25, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


def canon(rows: list[dict], keys) -> list[str]:
    """Rows restricted to `keys`, order-independent, for comparing multisets of records."""
    def norm(v):
        if isinstance(v, dict):
            return sorted((k, norm(x)) for k, x in v.items())
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v
    return sorted(repr(norm({k: r[k] for k in keys})) for r in rows)


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory):
    with BenchmarkDB(tmp_path_factory.mktemp("shared") / DB_FILENAME) as db:
        yield db


@PROPS
@given(rec=perf_records)
def test_single_perf_round_trip(shared_db: BenchmarkDB, rec: dict) -> None:
    rid = shared_db.store_performance_result(**rec)
    [row] = [r for r in shared_db.query_performance_results(rec["model_name"])
             if r["result_id"] == rid]
    assert {k: row[k] for k in rec} == rec


@PROPS
@given(recs=st.lists(test_records, min_size=1, max_size=6))
def test_bulk_tests_round_trip(shared_db: BenchmarkDB, recs: list[dict]) -> None:
    before = {r["test_result_id"] for r in shared_db.query_integration_test_results()}
    shared_db.ingest_records("test", recs)
    rows = [r for r in shared_db.query_integration_test_results()
            if r["test_result_id"] not in before]
    assert canon(rows, recs[0]) == canon(recs, recs[0])


@settings(PROPS, max_examples=15)
@given(recs=st.lists(perf_records, min_size=1, max_size=12))
def test_bulk_perf_equals_one_by_one_and_arrow(tmp_path_factory, recs: list[dict]) -> None:
    base = tmp_path_factory.mktemp("b")
    with BenchmarkDB(base / "bulk.duckdb") as bulk, BenchmarkDB(base / "one.duckdb") as one, \
            BenchmarkDB(base / "arrow.duckdb") as arrow:
        assert bulk.ingest_records("perf", recs) == len(recs)
        for r in recs:
            one.store_performance_result(**r)
        # Arrow tables carry JSON as text
        table = pa.Table.from_pylist(
            [{**r, "metrics": None if r["metrics"] is None else json.dumps(r["metrics"])}
             for r in recs])
        assert arrow.ingest_arrow("perf", table) == len(recs)
        sql = "SELECT * FROM performance_results ORDER BY result_id"
        want = one.query(sql)
        assert bulk.query(sql) == want  # same ids, columns and values
        assert arrow.query(sql) == want
        models = "SELECT * EXCLUDE (created_at) FROM models ORDER BY model_id"
        assert bulk.query(models) == one.query(models) == arrow.query(models)
        assert canon(bulk.query_performance_results(), recs[0]) == canon(recs, recs[0])


@PROPS
@given(recs=st.lists(perf_records, min_size=1, max_size=10), bad_at=st.integers(0, 9),
       bad=st.sampled_from([("throughput", -1.0), ("latency_p99", float("nan")),
                            ("model_name", ""), ("batch_size", "8"), ("iterations", 1.5)]))
def test_any_bad_record_fails_whole_batch(shared_db: BenchmarkDB, recs, bad_at, bad) -> None:
    field, value = bad
    i = bad_at % len(recs)
    recs[i] = {**recs[i], field: value}
    before = shared_db.table_counts()
    with pytest.raises(InvalidRecord) as e:
        shared_db.ingest_records("perf", recs)
    assert e.value.field == field and e.value.index == i  # type: ignore[attr-defined]
    assert shared_db.table_counts() == before
