"""`benchsync.compat`: the original API's users' code, run with only its import line changed.

The examples live in tests/compat_examples/ (copied from the notes on the original
API); each runs in a fresh directory on real DuckDB files, and the test checks
what its user relied on. Node-backed calls run against real node processes.
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pytest
from legacy_fixtures import build_legacy_db
from multiformats import CID

from benchsync.compat import (
    BenchmarkDBAPI,
    BenchmarkDBAPIIPFS,
    CompatError,
    IPFSConfig,
)
from benchsync.storage import unixfs
from benchsync.storage.blockstore import MemoryBlockstore
from benchsync.storage.cid import RAW

EXAMPLES = Path(__file__).parent / "compat_examples"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh current directory, and no local node (a data directory that does not exist)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BENCHSYNC_HOME", str(tmp_path / "no-node-here"))
    return tmp_path


def run_example(name: str, **given: Any) -> dict[str, Any]:
    """Run one example as a script; its module globals (closed afterwards)."""
    return runpy.run_path(str(EXAMPLES / name), init_globals=given)


def close_all(ns: dict[str, Any]) -> None:
    for v in ns.values():
        if hasattr(v, "close") and type(v).__module__ == "benchsync.compat":
            v.close()


def test_plain_api_example(workdir: Path) -> None:
    ns = run_example("plain_api.py")
    r = ns["r"]
    assert isinstance(r, dict) and r["result_id"] == 1
    assert "ipfs_cid" not in r  # IPFS is off by default: the plain API
    rows = ns["api"].query_performance_results(model_name="bert-base-uncased")
    assert [(x["batch_size"], x["throughput"]) for x in rows] == [(8, 812.5)]
    assert (workdir / "benchmark_db.duckdb").exists()  # the default db_path, in the cwd
    close_all(ns)
    with duckdb.connect(str(workdir / "benchmark_db.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM performance_results").fetchone() == (1,)


def test_versions_example(workdir: Path) -> None:
    ns = run_example("versions.py")
    api, cid_v1, cid_v2 = ns["api"], ns["cid_v1"], ns["cid_v2"]
    assert ns["r"]["ipfs_cid"].startswith("bafk")  # a raw-leaf UnixFS file: ipfs add's CID
    assert cid_v1 and cid_v2 and cid_v1 != cid_v2
    history = api.get_version_history()
    assert api.sync_to_ipfs() == history[0]["cid"]  # no change -> no new version, same CID
    # newest first: the restore's new head, then v2, then v1
    assert [h["cid"] for h in history[1:]] == [cid_v2, cid_v1]
    assert all(isinstance(h["timestamp"], float) for h in history)
    assert history[0]["timestamp"] >= history[1]["timestamp"] >= history[2]["timestamp"]
    assert history[0]["tables_cid"] == history[2]["tables_cid"]  # v1's content, same CID
    # the rollback happened: only v1's row is there
    assert [r["model_name"] for r in api.query_performance_results()] == ["bert-base-uncased"]
    assert api.get_ipfs_cid() == history[0]["cid"]
    sidecar = json.loads((workdir / ".benchmark_db.duckdb.ipfs.json").read_text())
    assert sidecar["cid"] == history[0]["cid"]
    assert sidecar["size"] == (workdir / "benchmark_db.duckdb").stat().st_size
    assert sidecar["timestamp"] == history[0]["timestamp"]
    assert api.restore_from_ipfs(cid_v2) is True  # and forward again
    assert len(api.query_performance_results()) == 2
    close_all(ns)


def test_ipfs_cid_of_a_result_is_what_ipfs_computes(workdir: Path) -> None:
    api = BenchmarkDBAPIIPFS(enable_ipfs=True)
    r = api.store_performance_result(model_name="m", hardware_type="cpu", batch_size=2,
                                     throughput=1.5)
    doc = api._backend.retrieve_result_from_ipfs(r["ipfs_cid"])
    assert doc is not None and doc["result_id"] == r["result_id"] and doc["throughput"] == 1.5
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    root, _, _ = unixfs.add_bytes(data, MemoryBlockstore().put)  # `ipfs add --cid-version=1`
    assert str(root) == r["ipfs_cid"]
    assert CID.decode(r["ipfs_cid"]).codec.name == "raw"
    assert api._backend.retrieve_result_from_ipfs(str(root).replace("a", "b", 1)) is None
    api.close()


def test_backend_example(workdir: Path) -> None:
    ns = run_example("backend.py")
    backend, cid = ns["backend"], ns["cid"]
    assert cid and backend.get_current_cid() is not None
    stats = backend.get_ipfs_stats()
    assert stats["enabled"] is True and stats["versions"] == 2 and stats["blocks"] > 0
    assert stats["node"] is None  # no node runs
    assert (workdir / ".benchmarks.db.ipfs.json").exists()
    stored = backend.store_result_to_ipfs({"model": "x", "score": 3})
    assert backend.retrieve_result_from_ipfs(stored) == {"model": "x", "score": 3}
    close_all(ns)


def test_config_example_maps_or_reports_every_field(
    workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "benchsync.compat"):
        ns = run_example("config.py")
    api = ns["api"]
    assert api.enable_ipfs and api.enable_distributed and api.enable_knowledge_graph
    status = api.get_status()
    assert status["ipfs_enabled"] and status["node"] is None
    # every field either has an effect or is reported (once) as having none
    for _name, effect, why in IPFSConfig().effects():
        assert effect or why
    with caplog.at_level(logging.WARNING, "benchsync.compat"):
        IPFSConfig(ipfs_gateway_url="http://x:1")
        IPFSConfig(ipfs_gateway_url="http://x:2")
    assert sum("ipfs_gateway_url has no effect" in m for m in caplog.messages) == 1
    with pytest.raises(CompatError, match="no benchsync node is running"):
        api.execute_distributed_query("SELECT 1 AS one")
    close_all(ns)


def test_config_from_json_file(workdir: Path) -> None:
    path = workdir / "ipfs.json"
    path.write_text(json.dumps({"enable_ipfs_storage": True, "auto_pin": True,
                                "cache_ttl_seconds": 60}))
    api = BenchmarkDBAPIIPFS(ipfs_config=IPFSConfig.from_file(path))
    assert api.enable_ipfs and api.sync_to_ipfs()
    path.write_text(json.dumps({"enable_ipfs": True}))
    with pytest.raises(CompatError, match="unknown configuration field"):
        IPFSConfig.from_file(path)
    api.close()


def test_summaries_and_other_stores_are_dicts(workdir: Path) -> None:
    api = BenchmarkDBAPI("bench.duckdb")
    for bs in (1, 2):
        api.store_performance_result(model_name="bert", hardware_type="cuda", batch_size=bs,
                                     throughput=10.0 * bs)
    c = api.store_hardware_compatibility(model_name="bert", hardware_type="cuda",
                                         is_compatible=True)
    t = api.store_integration_test_result(test_module="m", test_name="t", status="pass")
    assert c["result_id"] == 1 and t["result_id"] == 1
    s = api.get_model_performance_summary("bert")
    assert s["model_name"] == "bert" and s["total_results"] == 2 and len(s["summary"]) == 2
    h = api.get_hardware_benchmark_summary("cuda")
    assert h["total_results"] == 2
    assert len(api.query_hardware_compatibility(model_name="bert")) == 1
    assert len(api.query_integration_test_results(status="pass")) == 1
    api.close()


def test_ipfs_off_behaves_like_the_plain_api(workdir: Path) -> None:
    api = BenchmarkDBAPIIPFS(db_path="x.duckdb")
    assert api.sync_to_ipfs() is None and api.get_version_history() == []
    assert api.restore_from_ipfs() is False and api.get_ipfs_stats() == {"enabled": False}
    assert api.execute_distributed_query("SELECT count(*) AS n FROM performance_results") == [
        {"n": 0}]
    api.close()


def test_migration_example(workdir: Path) -> None:
    for name in ("existing_benchmark.duckdb", "db1.duckdb", "db2.duckdb"):
        build_legacy_db(workdir / name, seed=len(name))
    (workdir / "db3.duckdb").write_bytes(b"not a database")
    ns = run_example("migration.py")
    assert ns["cid"] is None  # the loop variable: db3 failed
    results = ns["results"]
    assert list(results) == ["db1.duckdb", "db2.duckdb", "db3.duckdb"]
    assert results["db1.duckdb"] and results["db2.duckdb"] and results["db3.duckdb"] is None
    assert results["db1.duckdb"] != results["db2.duckdb"]
    assert (workdir / "db1.duckdb.pre-benchsync-backup").exists()
    assert json.loads((workdir / ".db1.duckdb.ipfs.json").read_text())["cid"] == (
        results["db1.duckdb"])
    # the migrated file opens with the API, its versions where the migration left them
    api = BenchmarkDBAPIIPFS(db_path="db1.duckdb", enable_ipfs=True)
    assert api.get_ipfs_cid() == results["db1.duckdb"]
    assert api.query_performance_results()
    api.close()


def test_benchsync_migrate_accepts_the_old_json_config(workdir: Path) -> None:
    home = workdir / "home"
    env = {**os.environ, "BENCHSYNC_HOME": str(home)}
    bs = [sys.executable, "-m", "benchsync.daemon.cli"]
    subprocess.run([*bs, "init"], env=env, check=True, capture_output=True)
    build_legacy_db(workdir / "old.duckdb")
    cfg = workdir / "ipfs.json"
    cfg.write_text(json.dumps({"enable_ipfs_storage": True, "enable_distributed": True,
                               "ipfs_api_url": "http://127.0.0.1:5001", "auto_pin": True,
                               "cache_ttl_seconds": 3600}))
    p = subprocess.run([*bs, "migrate", "--db", "old.duckdb", "--config", str(cfg), "--json"],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["results"][0]["status"] == "migrated"
    assert "TOML" not in p.stderr
    assert "ipfs_api_url" in p.stderr and "cache_ttl_seconds" in p.stderr  # no effect: said so
    script = Path(sys.executable).with_name("migrate_to_ipfs")
    build_legacy_db(workdir / "old2.duckdb", seed=3)
    p = subprocess.run([str(script), "--db", "old2.duckdb", "--config", str(cfg), "--no-backup",
                        "--verbose"], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "migrated" in p.stdout and not (workdir / "old2.duckdb.pre-benchsync-backup").exists()


# --- against real nodes ---------------------------------------------------------------------


@pytest.mark.slow
def test_any_machine_restore_and_distributed_query_through_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two machines of one lab: a version made on A restores on B (B's node fetches it from
    A's), and a distributed query on B answers with both nodes' rows."""
    import time

    from benchsync.daemon.demo import NodeProcess, free_port, lab_key_file

    key = lab_key_file(tmp_path)  # one lab
    a, b = (NodeProcess(tmp_path / n, free_port(), f"compat-{os.getpid()}", lab_key=key,
                        extra_args=["--snapshot-interval", "0"]) for n in ("a", "b"))
    a.bootstrap, b.bootstrap = [b.addr], [a.addr]
    try:
        a.start(), b.start()
        a.wait_ready(), b.wait_ready()
        deadline = time.monotonic() + 30
        while not b.client.get("/v1/peers")["peers"] and time.monotonic() < deadline:
            time.sleep(0.2)
        # machine A: a version of its own file, which its node now holds for the lab
        (tmp_path / "work-a").mkdir()
        monkeypatch.chdir(tmp_path / "work-a")
        monkeypatch.setenv("BENCHSYNC_HOME", str(a.home))
        ns = run_example("versions.py")
        cid_v1 = ns["cid_v1"]
        close_all(ns)
        # machine B: never had it
        (tmp_path / "work-b").mkdir()
        monkeypatch.chdir(tmp_path / "work-b")
        monkeypatch.setenv("BENCHSYNC_HOME", str(b.home))
        ns = run_example("any_machine.py", CID_V1=cid_v1)
        api2 = ns["api2"]
        assert api2.restore_from_ipfs(cid_v1) is True  # (again: now it is here)
        # Partly here (a table's block lost): the missing blocks are fetched again, not refused.
        blocks = api2._backend.dataset.blocks
        leaf = [c for c, _ in unixfs.walk(blocks.get, CID.decode(cid_v1))
                if c.codec.code == RAW][-1]  # the last file's (manifest.json sorts first)
        blocks.delete(leaf)
        assert api2.restore_from_ipfs(cid_v1) is True and blocks.has(leaf)
        assert [r["model_name"] for r in api2.query_performance_results()] == [
            "bert-base-uncased"]
        # the distributed query: each node's own rows, from B
        a.client.post("/v1/record/perf", {"model_name": "on-a", "hardware_type": "cpu",
                                            "batch_size": 1, "throughput": 1.0})
        b.client.post("/v1/record/perf", {"model_name": "on-b", "hardware_type": "cpu",
                                            "batch_size": 1, "throughput": 2.0})
        api = BenchmarkDBAPIIPFS(db_path="dist.duckdb", enable_distributed=True)
        rows = api.execute_distributed_query(
            "SELECT model_name, sum(throughput_items_per_second) AS t FROM performance_results "
            "JOIN models USING (model_id) GROUP BY model_name ORDER BY model_name")
        assert rows == [{"model_name": "on-a", "t": 1.0}, {"model_name": "on-b", "t": 2.0}]
        assert api.get_status()["node"]["peer_id"] == b.peer_id
        api.close()
        close_all(ns)
    except BaseException:
        for node in (a, b):
            print(f"--- {node.home.name} log ---\n{node.tail_log(40)}", file=sys.stderr)
        raise
    finally:
        for node in (a, b):
            node.stop()
