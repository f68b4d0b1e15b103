"""`benchsync record` and `benchsync query` as a user runs them (real processes, real files)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

from benchsync.storage.db import DB_FILENAME, BenchmarkDB


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not home.exists():  # only init and up create a data directory
        init = [sys.executable, "-m", "benchsync.daemon.cli", "init", "--home", str(home)]
        subprocess.run(init, capture_output=True, check=True, timeout=120)
    argv = [sys.executable, "-m", "benchsync.daemon.cli", *args, "--home", str(home)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_record_flags_then_query_all_formats(tmp_path: Path) -> None:
    home = tmp_path / "node"
    r = cli(home, "record", "perf", "--model", "bert", "--hardware", "cuda", "--device", "A100",
            "--batch-size", "8", "--precision", "fp16", "--throughput", "1250.5",
            "--latency-avg", "6.25", "--latency-p90", "7", "--latency-p95", "8",
            "--latency-p99", "9.5", "--memory-peak", "2048", "--metrics", '{"seq": 128}')
    assert r.returncode == 0, r.stderr
    assert (home / DB_FILENAME).exists()
    r = cli(home, "record", "compat", "--model", "bert", "--hardware", "rocm", "--no-compatible",
            "--error-message", "no kernel")
    assert r.returncode == 0, r.stderr
    r = cli(home, "record", "test", "--test-module", "t.m", "--test-name", "fwd",
            "--status", "pass", "--model", "bert")
    assert r.returncode == 0, r.stderr
    sql = ("SELECT m.model_name, r.batch_size, r.throughput_items_per_second AS tput, "
           "r.latency_p99_ms FROM performance_results r JOIN models m USING (model_id)")
    r = cli(home, "query", sql, "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"model_name": "bert", "batch_size": 8, "tput": 1250.5,
                                     "latency_p99_ms": 9.5}]
    r = cli(home, "query", sql, "--format", "csv")
    assert list(csv.reader(io.StringIO(r.stdout))) == [
        ["model_name", "batch_size", "tput", "latency_p99_ms"], ["bert", "8", "1250.5", "9.5"]]
    r = cli(home, "query", "SELECT is_compatible, error_message FROM hardware_compatibility")
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["is_compatible", "error_message"]
    assert lines[2].split() == ["False", "no", "kernel"] and lines[-1] == "(1 row)"


def test_record_from_jsonl_all_or_nothing(tmp_path: Path) -> None:
    home = tmp_path / "node"
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"model_name": f"m{i}", "hardware_type": "cpu",
                                        "batch_size": 2, "throughput": i, "latency_p95": 1.5})
                            + "\n" for i in range(25)))
    r = cli(home, "record", "perf", "--from", str(good))
    assert r.returncode == 0, r.stderr and "25" in r.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + json.dumps({"model_name": "x", "hardware_type": "cpu",
                                                  "throughput": -3}) + "\n")
    r = cli(home, "record", "perf", "--from", str(bad))
    assert r.returncode != 0
    assert "bad.jsonl:26" in r.stderr and "throughput" in r.stderr and "Try:" in r.stderr
    with BenchmarkDB(home / DB_FILENAME, read_only=True) as db:
        assert db.table_counts()["performance_results"] == 25


def test_errors_go_to_stderr_with_a_hint(tmp_path: Path) -> None:
    home = tmp_path / "node"
    r = cli(home, "query", "SELECT 1")
    assert r.returncode != 0 and "no database" in r.stderr and "Try:" in r.stderr
    r = cli(home, "record", "perf", "--hardware", "cuda", "--throughput", "1")
    assert r.returncode != 0 and "model_name" in r.stderr and "--model" in r.stderr
    r = cli(home, "record", "perf", "--model", "m", "--hardware", "cuda", "--throughput", "nan")
    assert r.returncode != 0 and "finite" in r.stderr
    r = cli(home, "record", "test", "--test-module", "m", "--test-name", "t", "--status", "ok")
    assert r.returncode != 0 and "pass|fail|error|skip" in r.stderr
    with BenchmarkDB(home / DB_FILENAME, read_only=True) as db:
        assert sum(db.table_counts().values()) == 0  # nothing written by the failures
    r = cli(home, "query", "DELETE FROM models")
    assert r.returncode != 0 and "read-only" in r.stderr
    r = cli(home, "query", "SELECT * FROM nope")
    assert r.returncode != 0 and "nope" in r.stderr and r.stdout == ""
    r = cli(home, "query", "SELECT 1", "--scope", "network")
    assert r.returncode != 0 and "needs a running node" in r.stderr
    # The replicas scope works offline: own rows plus installed replicas, with `origin`.
    r = cli(home, "query", "SELECT DISTINCT origin FROM performance_results", "--scope", "replicas",
            "--format", "csv")
    assert r.returncode == 0 and r.stdout.splitlines()[0] == "origin", r.stderr
