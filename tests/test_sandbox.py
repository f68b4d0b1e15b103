"""The query sandbox refuses or limits hostile queries and keeps serving."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from benchsync.storage.sandbox import (
    InvalidSQL,
    QueryError,
    QueryLimits,
    QueryRefused,
    QuerySandbox,
    QueryTimeout,
    ResultTooLarge,
)

LIMITS = QueryLimits(timeout_s=10.0, max_rows=1_000_000, max_bytes=64 * 1024 * 1024)
NORMAL = "SELECT model_name, count(*) AS n FROM performance_results GROUP BY 1 ORDER BY 1"


def run(sb: QuerySandbox, sql: str, params: list[Any] | None = None, **limits: Any) -> pa.Table:
    """`sb.execute` under LIMITS with `limits` overriding some of them."""
    return sb.execute(sql, params, limits=replace(LIMITS, **limits))


@pytest.fixture
def sandbox() -> QuerySandbox:
    sb = QuerySandbox(memory_limit="256MB", threads=1)
    sb.load({
        "performance_results": pa.table({
            "model_name": ["bert", "bert", "gpt2"] * 1000,
            "throughput_items_per_second": [1.0, 2.0, 3.0] * 1000,
        }),
    })  # fmt: skip
    return sb


def assert_still_serving(sb: QuerySandbox) -> None:
    assert run(sb, NORMAL).to_pylist() == [
        {"model_name": "bert", "n": 2000},
        {"model_name": "gpt2", "n": 1000},
    ]


@pytest.mark.parametrize("sql", [
    "SELECT 1; SELECT 2",
    "COPY performance_results TO '/tmp/x.csv'",
    "ATTACH '/tmp/evil.duckdb' AS evil",
    "INSTALL httpfs",
    "LOAD httpfs",
    "PRAGMA database_list",
    "SET threads = 8",
    "SET enable_external_access = true",
    "RESET lock_configuration",
    "CREATE TABLE t AS SELECT 1",
    "INSERT INTO performance_results VALUES ('x', 1.0)",
    "DROP TABLE performance_results",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_parquet('/tmp/x.parquet')",
    "SELECT * FROM query('DROP TABLE performance_results')",
    "CALL pragma_version()",
    "EXPORT DATABASE '/tmp/out'",
    "SELECT * FROM read_blob('/etc/hostname')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_csv('http://127.0.0.1:9/x.csv')",
    "SELECT * FROM duckdb_settings()",
    "SELECT * FROM duckdb_settings",
    "SELECT name, value FROM pg_catalog.pg_settings",
    "SELECT current_setting('temp_directory')",
    "SELECT * FROM duckdb_extensions()",
    "SELECT * FROM duckdb_secrets()",
    "SELECT * FROM system.main.duckdb_settings()",
    "WITH s AS (SELECT * FROM duckdb_settings()) SELECT * FROM s",
    "SELECT (SELECT max(value) FROM pg_settings) AS v",
])  # fmt: skip
def test_hostile_statement_is_refused_and_sandbox_keeps_serving(
    sandbox: QuerySandbox, sql: str
) -> None:
    with pytest.raises((QueryRefused, InvalidSQL)) as info:
        run(sandbox, sql)
    assert info.value.kind in ("refused", "invalid_sql")
    assert_still_serving(sandbox)


def test_file_access_is_refused_not_just_missing(sandbox: QuerySandbox) -> None:
    with pytest.raises(QueryRefused, match="no file, network, extension or settings access"):
        run(sandbox, "SELECT * FROM read_csv('/etc/passwd')")


def test_nothing_under_the_working_directory_is_readable_or_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DuckDB's default temp directory is `<cwd>/.tmp/`: the sandbox must neither read
    it nor name the working directory or the user's home in anything it answers."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret.csv").write_text("a\n1\n")
    with QuerySandbox(memory_limit="64MB") as sb:
        sb.load({"t": pa.table({"x": [str(tmp_path), "/root"]})})
        for sql in ("SELECT * FROM read_csv('.tmp/secret.csv')",
                    f"SELECT * FROM read_csv('{tmp_path}/.tmp/secret.csv')",
                    "SELECT * FROM read_text('.tmp/*')"):  # fmt: skip
            with pytest.raises(QueryRefused):
                run(sb, sql)
        # What DuckDB itself says about its directories names neither place (its
        # `allowed_paths` names the working directory: the worker process runs in
        # an empty one, see test_sandbox_limits.py).
        for name in ("temp_directory", "home_directory", "secret_directory",
                     "extension_directory"):  # fmt: skip
            value = str(sb._conn.execute("SELECT current_setting(?)", [name]).fetchone())
            assert str(tmp_path) not in value and "/root" not in value, (name, value)
        # A query that would spill fails instead of writing under the working directory.
        with pytest.raises((ResultTooLarge, QueryTimeout)):
            run(sb, "SELECT x FROM range(20000000) t(x) ORDER BY x DESC", timeout_s=20)
    assert sorted(p.name for p in (tmp_path / ".tmp").iterdir()) == ["secret.csv"]


def test_writes_are_refused(sandbox: QuerySandbox) -> None:
    with pytest.raises(QueryRefused, match="only read-only SELECT"):
        run(sandbox, "DELETE FROM performance_results")
    assert_still_serving(sandbox)


def test_oversized_cross_join_times_out(sandbox: QuerySandbox) -> None:
    start = time.monotonic()
    with pytest.raises(QueryTimeout) as info:
        run(sandbox,
            "SELECT count(*) FROM performance_results a, performance_results b, "
            "performance_results c", timeout_s=0.3)  # fmt: skip
    assert info.value.kind == "timeout"
    assert time.monotonic() - start < 5.0
    assert_still_serving(sandbox)


def test_row_and_byte_limits(sandbox: QuerySandbox) -> None:
    with pytest.raises(ResultTooLarge, match="rows"):
        run(sandbox, "SELECT * FROM performance_results", max_rows=100)
    assert_still_serving(sandbox)
    with pytest.raises(ResultTooLarge, match="bytes"):
        run(sandbox, "SELECT * FROM performance_results", max_bytes=1000)
    assert_still_serving(sandbox)
    got = run(sandbox, "SELECT * FROM performance_results", max_rows=3000)
    assert got.num_rows == 3000


def test_memory_limit_is_enforced(sandbox: QuerySandbox) -> None:
    with pytest.raises((ResultTooLarge, QueryTimeout)):
        run(sandbox, "SELECT list(repeat('x', 1000000)) FROM range(1000)", timeout_s=5)
    assert_still_serving(sandbox)


def test_invalid_sql_and_unknown_table(sandbox: QuerySandbox) -> None:
    with pytest.raises(InvalidSQL, match="parse"):
        run(sandbox, "SELEC 1")
    with pytest.raises(InvalidSQL, match="nope"):
        run(sandbox, "SELECT * FROM nope")
    assert_still_serving(sandbox)


def test_reload_replaces_tables(sandbox: QuerySandbox) -> None:
    sandbox.load({"models": pa.table({"model_name": ["t5"]})})
    assert run(sandbox, "SELECT model_name FROM models").to_pylist() == [{"model_name": "t5"}]
    with pytest.raises(InvalidSQL):
        run(sandbox, "SELECT * FROM performance_results")


def test_parameters(sandbox: QuerySandbox) -> None:
    got = run(sandbox, "SELECT count(*) AS n FROM performance_results WHERE model_name = ?",
              ["gpt2"])
    assert got.to_pylist() == [{"n": 1000}]


def test_every_error_is_a_query_error_with_a_protocol_kind() -> None:
    from benchsync.protocol.query import ERROR_KINDS

    for cls in (QueryRefused, InvalidSQL, QueryError):
        assert cls.kind in ERROR_KINDS
    assert QueryTimeout(1.0).kind in ERROR_KINDS
    assert ResultTooLarge("x", limit=1, got=2).kind in ERROR_KINDS
