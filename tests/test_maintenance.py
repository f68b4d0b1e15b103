"""The maintenance service's schedule (virtual clock) and a node maintaining its disk."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from test_node import PERF, call, make_node

from benchsync.daemon.control import ControlAPIError, ControlClient
from benchsync.daemon.maintenance import Maintenance
from benchsync.storage.dataset import DiskUsage, MaintenanceReport
from benchsync.storage.errors import StorageError

TIMEOUT = 60.0  # seconds


def report(over_budget: bool = False) -> MaintenanceReport:
    usage = DiskUsage(database_bytes=10, history_bytes=20, replica_bytes=30, other_bytes=0,
                      blocks_bytes=50, free_bytes=1000)  # fmt: skip
    return MaintenanceReport(
        versions=5, kept=3, thinned_now=2, thinned=2, removed_blocks=4, freed_bytes=400,
        expired_replicas=[], usage=usage, budget=50 if over_budget else None,
        over_budget=over_budget, finished_at=0.0, seconds=0.1,
    )  # fmt: skip


async def test_passes_run_on_schedule_and_after_large_changes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    times: list[float] = []

    async def maintain() -> MaintenanceReport:
        times.append(trio.current_time())
        return report()

    service = Maintenance(maintain, interval=100.0, after_bytes=1000, start_delay=5.0)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await trio.sleep(250)
        assert [t - start for t in times] == [5.0, 105.0, 205.0]
        service.changed(600)  # not enough yet
        await trio.sleep(10)
        assert len(times) == 3
        service.changed(400)  # 1000 bytes since the last pass: due now
        await trio.sleep(1)
        assert [t - start for t in times][3:] == [260.0]
        await trio.sleep(100)  # the schedule restarts after the early pass
        assert [t - start for t in times][4:] == [360.0]
        nursery.cancel_scope.cancel()
    assert service.passes == 5 and service.last is not None


async def test_a_failed_pass_is_reported_and_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    outcomes: list[BaseException | MaintenanceReport] = [StorageError("disk on fire"), report(True)]

    async def maintain() -> MaintenanceReport:
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    service = Maintenance(maintain, interval=10.0, start_delay=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await trio.sleep(2)
        assert service.status(database_bytes=1, free_bytes=2)["error"] == "disk on fire"
        await trio.sleep(10)
        status = service.status(database_bytes=1, free_bytes=2)
        nursery.cancel_scope.cancel()
    assert "error" not in status and status["over_budget"] is True
    assert "over the disk budget" in status["warning"] and status["hint"]
    assert status["history_bytes"] == 20 and status["database_bytes"] == 1


async def test_node_thins_pins_tags_and_reports_its_disk(tmp_path: Path) -> None:
    # Seconds, as a test node sets them: every version older than 1 s but the newest
    # of each 10^9 s (one bucket, which the head claims) is thinned.
    node = make_node(tmp_path / "a", history_retention=1, history_interval=10**9)
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(node.run)
        client = ControlClient(socket_path=endpoints.socket_path)
        with trio.fail_after(TIMEOUT):
            cids = []
            for i in range(6):
                await call(client, "POST", "/v1/record/perf", PERF | {"batch_size": i + 1})
                cids.append((await call(client, "POST", "/v1/snapshot", {}))["cid"])
            tagged = await call(client, "POST", "/v1/tags", {"name": "first", "cid": cids[0]})
            assert tagged["cid"] == cids[0]
            assert (await call(client, "POST", "/v1/pins", {"cid": cids[1]}))["pinned"] == cids[1]
            assert (await call(client, "GET", "/v1/tags"))["tags"] == {"first": cids[0]}
            with trio.fail_after(TIMEOUT):  # versions must be older than the 1 s retention
                while (await call(client, "POST", "/v1/maintenance", {}))["thinned"] < 3:
                    await trio.sleep(0.2)
            thinned = node.dataset.thinned()
            assert set(cids[2:5]) == set(thinned) and cids[5] not in thinned  # head kept
            with_tag = await call(client, "POST", "/v1/restore", {"cid": "first"})
            assert with_tag["tables_cid"] == node.dataset.find(cids[0]).tables_cid
            try:
                await call(client, "POST", "/v1/restore", {"cid": cids[3]})
                raise AssertionError("a thinned version restored")
            except ControlAPIError as e:
                assert "thinned" in str(e)
            try:
                await call(client, "POST", "/v1/tags", {"name": "bafybad"})
                raise AssertionError("a CID-like tag was accepted")
            except ControlAPIError as e:
                assert e.status == 400

            status = await call(client, "GET", "/v1/status")
            disk = status["disk"]
            assert disk["database_bytes"] > 0 and disk["history_bytes"] > 0
            assert disk["free_bytes"] > 0 and disk["versions_thinned"] == 3
            metrics = (await trio.to_thread.run_sync(client.get_text, "/metrics"))
            assert 'benchsync_disk_bytes{kind="history"}' in metrics
            assert 'benchsync_history_versions{state="thinned"} 3.0' in metrics
        nursery.cancel_scope.cancel()
