"""The snapshot policy on trio's virtual clock: exact times of scheduled snapshots,
the disk-full pause and its retries (after space was freed, or every DISK_FULL_RETRY)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

from benchsync.daemon.snapshot_policy import (
    DISK_FREED_BYTES,
    DISK_FULL_RETRY,
    POLICY_TICK,
    SnapshotPolicy,
)
from benchsync.storage.snapshot import DiskFull, SnapshotError

FREE = 10 * 1024 * 1024  # bytes free on the pretend disk when a snapshot fails


class Disk:
    """What the policy drives: a snapshot function that can be told to fail, the free
    space, and the virtual times of every attempt (relative to the start)."""

    def __init__(self) -> None:
        self.t0 = trio.current_time()
        self.free = FREE
        self.fail: str | None = None  # "disk_full", "error" or None (succeed)
        self.attempts: list[tuple[float, str]] = []
        self.policy: SnapshotPolicy | None = None
        self.changes = 0

    def now(self) -> float:
        return trio.current_time() - self.t0

    async def snapshot(self) -> None:
        assert self.policy is not None
        if self.fail == "disk_full":
            self.attempts.append((self.now(), "disk_full"))
            e = DiskFull("no space left on device")
            await self.policy.disk_full(e)  # as Node.snapshot reports it
            raise e
        if self.fail == "error":
            self.attempts.append((self.now(), "error"))
            raise SnapshotError("export failed")
        self.attempts.append((self.now(), "ok"))
        self.policy.succeeded()

    async def free_space(self) -> int:
        return self.free

    def make(self, *, after_writes: int = 0, interval: float = 0) -> SnapshotPolicy:
        def changed() -> None:
            self.changes += 1

        self.policy = SnapshotPolicy(
            self.snapshot, self.free_space, after_writes=after_writes, interval=interval,
            on_change=changed,
        )  # fmt: skip
        return self.policy


@asynccontextmanager
async def running(policy: SnapshotPolicy) -> AsyncIterator[None]:
    """The policy's service, started and (after the body) cancelled."""
    async with trio.open_nursery() as nursery:
        await nursery.start(policy.run)
        yield
        nursery.cancel_scope.cancel()


async def until(predicate: object, *, within: float) -> None:
    """Wait (virtual time) for `predicate()`; fail after `within` seconds."""
    with trio.fail_after(within):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(POLICY_TICK / 5)


async def at(disk: Disk, t: float) -> None:
    """Sleep until `t` seconds after the start. Tests act between the policy's ticks
    (at x.25 s), so that no action ties with a tick."""
    await trio.sleep_until(disk.t0 + t)


async def test_after_n_writes_snapshots_at_the_next_tick(
    autojump_clock: trio.testing.MockClock,
) -> None:
    disk = Disk()
    policy = disk.make(after_writes=3)
    async with running(policy):
        policy.wrote(2)
        await at(disk, 5.25)
        assert disk.attempts == []  # 2 < 3 rows: nothing is due
        policy.wrote(1)
        await until(lambda: disk.attempts, within=60)
        assert disk.attempts == [(5.5, "ok")]
        assert disk.changes == 1
        await at(disk, 40.25)
        assert len(disk.attempts) == 1  # no rows since: no snapshot


async def test_interval_snapshots_only_when_something_changed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    disk = Disk()
    policy = disk.make(interval=10.0)
    async with running(policy):
        await at(disk, 25.25)
        assert disk.attempts == []  # nothing written: nothing to snapshot
        policy.wrote(1)  # the interval ran out long ago
        await until(lambda: disk.attempts, within=60)
        assert disk.attempts == [(25.5, "ok")]
        await at(disk, 25.75)
        policy.wrote(1)  # the next one waits for the interval again
        await until(lambda: len(disk.attempts) == 2, within=60)
        assert disk.attempts[1] == (35.5, "ok")


async def test_a_manual_snapshot_restarts_the_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    disk = Disk()
    policy = disk.make(interval=10.0)
    async with running(policy):
        await at(disk, 8.25)
        policy.wrote(1)
        await disk.snapshot()  # the API's snapshot, which the policy hears of
        policy.wrote(1)
        await until(lambda: len(disk.attempts) == 2, within=60)
        assert disk.attempts == [(8.25, "ok"), (18.5, "ok")]


async def test_disk_full_pauses_and_retries_every_disk_full_retry_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    disk = Disk()
    policy = disk.make(after_writes=1)
    disk.fail = "disk_full"
    async with running(policy):
        policy.wrote(5)
        await until(lambda: disk.attempts, within=60)
        assert disk.attempts == [(0.5, "disk_full")]
        status = policy.status()
        assert status["state"] == "paused" and status["reason"] == "disk_full"
        assert status["free_bytes"] == FREE and "no space" in status["error"]
        assert "benchsync gc" in status["hint"]
        # Paused: new rows do not make a snapshot due; only the retry timer does.
        await at(disk, 0.75)
        policy.wrote(5)
        await until(lambda: len(disk.attempts) == 3, within=3 * DISK_FULL_RETRY)
        assert disk.attempts[1:] == [(0.5 + DISK_FULL_RETRY, "disk_full"),
                                     (0.5 + 2 * DISK_FULL_RETRY, "disk_full")]  # fmt: skip
        # Space returns for the next retry: it succeeds and the pause ends.
        await at(disk, 2 * DISK_FULL_RETRY + 1.25)
        disk.fail = None
        await until(lambda: len(disk.attempts) == 4, within=2 * DISK_FULL_RETRY)
        assert disk.attempts[3] == (0.5 + 3 * DISK_FULL_RETRY, "ok")
        assert policy.status() == {"state": "ok"} and policy.pause is None


async def test_a_paused_snapshot_retries_as_soon_as_space_was_freed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    disk = Disk()
    policy = disk.make(after_writes=1)
    disk.fail = "disk_full"
    async with running(policy):
        policy.wrote(1)
        await until(lambda: disk.attempts, within=60)
        await at(disk, 10.25)
        disk.free = FREE + DISK_FREED_BYTES - 1  # not enough freed yet
        await at(disk, 15.25)
        assert len(disk.attempts) == 1
        disk.fail = None
        disk.free = FREE + DISK_FREED_BYTES
        await until(lambda: len(disk.attempts) == 2, within=60)
        assert disk.attempts == [(0.5, "disk_full"), (15.5, "ok")]
        assert policy.pause is None


async def test_a_failed_retry_waits_for_more_space_than_now(
    autojump_clock: trio.testing.MockClock,
) -> None:
    disk = Disk()
    policy = disk.make(after_writes=1)
    disk.fail = "disk_full"
    async with running(policy):
        policy.wrote(1)
        await until(lambda: disk.attempts, within=60)
        await at(disk, 0.75)
        disk.free = FREE + DISK_FREED_BYTES  # freed, but the retry fails again
        await until(lambda: len(disk.attempts) == 2, within=60)
        assert disk.attempts[1] == (1.0, "disk_full")
        assert policy.pause is not None and policy.pause.free_bytes == FREE + DISK_FREED_BYTES
        await at(disk, 30.25)
        assert len(disk.attempts) == 2  # the same free space does not retry again


async def test_another_failure_is_logged_and_the_rows_are_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    disk = Disk()
    policy = disk.make(after_writes=1)
    disk.fail = "error"
    async with running(policy):
        policy.wrote(1)
        await until(lambda: disk.attempts, within=60)
        assert disk.attempts == [(0.5, "error")] and policy.pause is None
        assert disk.changes == 1
        await at(disk, 30.25)
        assert len(disk.attempts) == 1  # not paused: only a new write makes it due again
        policy.wrote(1)
        await until(lambda: len(disk.attempts) == 2, within=60)
        assert disk.attempts[1] == (30.5, "error")
