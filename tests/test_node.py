"""Two in-process nodes driven through their control API over its real Unix socket."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from benchsync.daemon.config import load_config
from benchsync.daemon.control import ControlAPIError, ControlClient
from benchsync.daemon.demo import lab_key_file
from benchsync.daemon.node import Node

NETWORK = "node-test"
SYNC_TIMEOUT = 30.0  # seconds


def make_node(home: Path, bootstrap: list[str] | None = None, **overrides: Any) -> Node:
    config = load_config(home, env={}, overrides={
        "network": NETWORK, "listen": ["/ip4/127.0.0.1/tcp/0"], "bootstrap": bootstrap or [],
        "snapshot_interval": 0, "snapshot_after_writes": 0,
        "lab_key": str(lab_key_file(home.parent)),  # the test's nodes are one lab
        **overrides,
    })  # fmt: skip
    return Node(config)


async def call(client: ControlClient, method: str, path: str, body: Any = None) -> Any:
    # The client is synchronous (it is the CLI's); run it off the trio thread.
    if method == "GET":
        return await trio.to_thread.run_sync(client.get, path)
    return await trio.to_thread.run_sync(client.post, path, body)


async def installed(node: Node, dataset: str, root: str) -> None:
    def done() -> bool:
        return any(r["dataset"] == dataset and r["head_installed"] == root for r in node.replicas())

    await node.p2p.wait_until(done)


PERF = {"model_name": "bert-base-uncased", "hardware_type": "cuda", "device_name": "A100",
        "batch_size": 8, "throughput": 812.5, "latency_avg": 9.8}  # fmt: skip


async def test_record_snapshot_sync_query_restore_and_metrics(tmp_path: Path) -> None:
    a = make_node(tmp_path / "a")
    async with trio.open_nursery() as nursery:
        ep_a = await nursery.start(a.run)
        b = make_node(tmp_path / "b", bootstrap=[a.p2p.addrs[0]])
        ep_b = await nursery.start(b.run)
        ca, cb = (
            ControlClient(socket_path=ep_a.socket_path),
            ControlClient(socket_path=ep_b.socket_path),
        )
        assert (ep_a.socket_path.stat().st_mode & 0o777) == 0o600

        with trio.fail_after(SYNC_TIMEOUT):
            one = await call(ca, "POST", "/v1/record/perf", PERF)
            assert one == {"stored": 1, "id": 1}
            many = await call(ca, "POST", "/v1/record/perf",
                              {"records": [PERF | {"batch_size": n} for n in (1, 2, 4)]})
            assert many == {"stored": 3}
            v1 = await call(ca, "POST", "/v1/snapshot", {})
            assert v1["created"] and v1["rows"]["performance_results"] == 4
            await call(
                cb,
                "POST",
                "/v1/record/compat",
                {"model_name": "t5-small", "hardware_type": "cpu", "is_compatible": True},
            )
            vb = await call(cb, "POST", "/v1/snapshot", {})

            await installed(b, a.peer_id, v1["cid"])
            await installed(a, b.peer_id, vb["cid"])

        status = await call(cb, "GET", "/v1/status")
        assert status["peer_id"] == b.peer_id and status["network"] == NETWORK
        assert all(addr.endswith(f"/p2p/{b.peer_id}") for addr in status["addrs"])
        assert status["head"] == vb["cid"]
        [rep] = [r for r in status["replicas"] if r["dataset"] == a.peer_id]
        assert rep["head_installed"] == v1["cid"] and rep["lag"] == 0

        # Replicas scope on B: A's rows with their origin, no network round trip.
        rows = await call(cb, "POST", "/v1/query", {
            "sql": "SELECT origin, count(*) AS n FROM performance_results GROUP BY origin",
            "scope": "replicas"})  # fmt: skip
        assert rows["rows"] == [[a.peer_id, 4]]
        # Network scope from B: A answers for its own dataset, B for its own.
        net = await call(cb, "POST", "/v1/query", {
            "sql": "SELECT sum(batch_size) AS s, count(*) AS n FROM performance_results",
            "scope": "network", "require_all": True})  # fmt: skip
        assert net["rows"] == [[15, 4]] and net["strategy"] == "decomposed"
        assert {p["status"] for p in net["peers"]} == {"answered"}

        # Restore A to before its last write; B follows the new head.
        await call(ca, "POST", "/v1/record/perf", PERF | {"batch_size": 64})
        v2 = await call(ca, "POST", "/v1/snapshot", {})
        v3 = await call(ca, "POST", "/v1/restore", {"cid": v1["cid"]})
        assert v3["seq"] == 3 and v3["parent"] == v2["cid"] and v3["tables_cid"] == v1["tables_cid"]
        history = await call(ca, "GET", "/v1/history")
        assert [v["seq"] for v in history["versions"]] == [3, 2, 1]
        with trio.fail_after(SYNC_TIMEOUT):
            await installed(b, a.peer_id, v3["cid"])
        again = await call(cb, "POST", "/v1/query", {
            "sql": "SELECT count(*) FROM performance_results", "scope": "replicas"})  # fmt: skip
        assert again["rows"] == [[4]]
        # Writes go on after the restore, into the restored database.
        await call(ca, "POST", "/v1/record/perf", PERF)
        local = await call(
            ca, "POST", "/v1/query", {"sql": "SELECT count(*) FROM performance_results"}
        )
        assert local["rows"] == [[5]]

        metrics = await trio.to_thread.run_sync(cb.get_text, "/metrics")
        received = [line for line in metrics.splitlines()
                    if line.startswith('benchsync_fetch_bytes_total{direction="received"}')]
        assert received and float(received[0].split()[-1]) > 0
        assert "benchsync_queries_total" in metrics
        # Read from the syncer's state by /metrics itself, not left behind by `status`.
        assert f'benchsync_replica_lag{{dataset="{a.peer_id}"}} 0.0' in metrics

        nursery.cancel_scope.cancel()
    assert not ep_a.socket_path.exists()


async def test_bad_requests_get_one_error_shape(tmp_path: Path) -> None:
    node = make_node(tmp_path / "a")
    async with trio.open_nursery() as nursery:
        ep = await nursery.start(node.run)
        client = ControlClient(socket_path=ep.socket_path)
        cases = [
            ("POST", "/v1/record/perf", {"model_name": "x", "hardware_type": "cpu",
                                         "throughput": -1},
             422, "invalid_record"),
            ("POST", "/v1/record/bogus", {}, 404, "unknown_kind"),
            ("POST", "/v1/query", {"sql": "DROP TABLE models"}, 400, "refused"),
            ("POST", "/v1/query", {"sql": "SELECT * FROM nowhere"}, 400, "invalid_sql"),
            ("POST", "/v1/query", {"sql": "SELECT 1", "scope": "moon"}, 400, "bad_scope"),
            # Found by the control API fuzz: a peer list that is not a list was a 500.
            ("POST", "/v1/query", {"sql": "SELECT 1", "scope": "network", "peers": True},
             400, "bad_request"),
            ("POST", "/v1/query", {"sql": "SELECT 1", "scope": "network", "peers": {"a": 1}},
             400, "bad_request"),
            ("POST", "/v1/restore", {"cid": "bafynothing"}, 404, "not_found"),
            # Found by the control API fuzz: text multiformats fails on with IndexError
            # ("m") was a 500; so were parameters that are not a list (a worker crash).
            ("POST", "/v1/restore", {"cid": "m"}, 404, "not_found"),
            ("POST", "/v1/pins", {"cid": "m", "action": "add"}, 404, "not_found"),
            ("POST", "/v1/get", {"cid": "m"}, 400, "bad_cid"),
            ("POST", "/v1/query", {"sql": "SELECT 1", "params": 5}, 400, "invalid_sql"),
        ]  # fmt: skip
        for method, path, body, status, code in cases:
            with pytest.raises(ControlAPIError) as info:
                await call(client, method, path, body)
            assert (info.value.status, info.value.code) == (status, code), (
                path,
                info.value.message,
            )
            assert info.value.message
        # Nothing was written by the failures, and the node still serves.
        ok = await call(client, "POST", "/v1/query", {"sql": "SELECT count(*) FROM models"})
        assert ok["rows"] == [[0]]
        nursery.cancel_scope.cancel()


async def test_snapshot_policy_after_n_writes(tmp_path: Path) -> None:
    node = make_node(tmp_path / "a", snapshot_after_writes=3)
    async with trio.open_nursery() as nursery:
        ep = await nursery.start(node.run)
        client = ControlClient(socket_path=ep.socket_path)
        await call(client, "POST", "/v1/record/perf", {"records": [PERF] * 3})
        with trio.fail_after(SYNC_TIMEOUT):
            while node.dataset.head() is None:  # the policy ticks every POLICY_TICK seconds
                await trio.sleep(0.05)
        assert node.dataset.head().manifest.tables["performance_results"].rows == 3
        nursery.cancel_scope.cancel()


async def test_migrate_through_the_running_node(tmp_path: Path) -> None:
    from legacy_fixtures import build_legacy_db

    legacy = build_legacy_db(tmp_path / "legacy.duckdb", seed=0)
    node = make_node(tmp_path / "a")
    async with trio.open_nursery() as nursery:
        ep = await nursery.start(node.run)
        client = ControlClient(socket_path=ep.socket_path)
        answer = await call(client, "POST", "/v1/migrate", {"paths": [str(legacy.path)]})
        [result] = answer["results"]
        assert answer["ok"] and result["status"] == "migrated" and result["verified"]
        assert result["cid"] == node.dataset.head().cid  # snapshot taken after the import
        rows = await call(client, "POST", "/v1/query", {
            "sql": "SELECT count(*) FROM performance_results"})  # fmt: skip
        assert rows["rows"] == [[legacy.rows["performance_results"]]]
        again = await call(client, "POST", "/v1/migrate", {"paths": [str(legacy.path)]})
        assert again["results"][0]["status"] == "already-migrated"
        nursery.cancel_scope.cancel()


async def test_status_shows_paused_snapshots_to_humans_and_scripts(tmp_path: Path) -> None:
    """`status` (human) says what `status --json` says under "snapshots": paused, why,
    since when and what to try."""
    import json
    import sys

    from benchsync.storage.snapshot import DiskFull

    node = make_node(tmp_path / "a")

    async def status(*flags: str) -> str:
        r = await trio.run_process(
            [sys.executable, "-m", "benchsync.daemon.cli", "status", "--home", str(node.home),
             *flags], capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return r.stdout.decode()

    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        assert "PAUSED" not in await status()
        # What a snapshot that fails for a full disk reports to the policy.
        await node.snapshot_policy.disk_full(DiskFull("disk full: no space left on device"))
        doc = json.loads(await status("--json"))
        assert doc["snapshots"]["state"] == "paused" and doc["snapshots"]["reason"] == "disk_full"
        human = await status()
        [line] = [x for x in human.splitlines() if x.startswith("snapshots")]
        assert "PAUSED (disk full)" in line and "no space left on device" in line, human
        assert f"try: {doc['snapshots']['hint']}" in human
        nursery.cancel_scope.cancel()
