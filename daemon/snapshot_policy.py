"""When the node snapshots by itself: the snapshot policy and its disk-full pause.

`SnapshotPolicy.run` is a trio service that takes a snapshot after
`after_writes` written rows and/or every `interval` seconds when rows were
written since the last one. A full disk pauses it (status shows why) instead
of failing the node: the unsnapshotted rows stay pending, and the snapshot is
retried as soon as `DISK_FREED_BYTES` were freed, or every `DISK_FULL_RETRY`
seconds. Manual snapshots report their outcome here too (`succeeded`,
`disk_full`), so that one pause state covers both.

The policy takes no snapshot itself: it calls the `snapshot` function it was
given, and measures free space with `free_space`. Times are trio's clock, so
that tests run it on a virtual one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from benchsync.storage.errors import StorageError
from benchsync.storage.snapshot import DiskFull

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

POLICY_TICK = 0.5  # seconds between checks of the policy
DISK_FULL_RETRY = 60.0  # seconds: a paused snapshot is retried at least this often
DISK_FREED_BYTES = 1024 * 1024  # bytes freed since the last failure that make a retry due
PAUSE_HINT = "free disk space (e.g. `benchsync gc`); snapshots resume by themselves"


@dataclass
class SnapshotPause:
    """Why snapshots are paused (a full disk), and what a retry waits for."""

    reason: str  # "disk_full"
    message: str
    since: float  # seconds since the epoch
    free_bytes: int  # free space measured after the last failure
    retried_at: float  # trio time of the last attempt


class SnapshotPolicy:
    """Decides when to snapshot; holds the disk-full pause. Start `run` with `nursery.start`.

    `snapshot()` takes one snapshot (raising DiskFull or another StorageError);
    it must report its outcome through `succeeded` / `disk_full`, as the
    node's `snapshot` does. `free_space()` returns the free bytes of the data
    directory's file system. `on_change` is called after every attempt the
    policy makes (the node updates its systemd status line).
    """

    def __init__(
        self,
        snapshot: Callable[[], Awaitable[Any]],
        free_space: Callable[[], Awaitable[int]],
        *,
        after_writes: int,
        interval: float,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._snapshot = snapshot
        self._free_space = free_space
        self.after_writes = after_writes
        self.interval = interval
        self._on_change = on_change
        self.pause: SnapshotPause | None = None  # set while a full disk pauses snapshots
        self._written = 0  # rows written since the policy last looked; bumped from threads
        self._lock = threading.Lock()
        self._last_snapshot: float | None = None  # trio time; None until run() starts

    def wrote(self, rows: int) -> None:
        """Count written rows; safe to call from any thread (the database's writer)."""
        with self._lock:
            self._written += rows

    def _take_written(self) -> int:
        with self._lock:
            n, self._written = self._written, 0
            return n

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check the policy every POLICY_TICK seconds until cancelled."""
        if self._last_snapshot is None:
            self._last_snapshot = trio.current_time()
        task_status.started()
        pending = 0
        while True:
            await trio.sleep(POLICY_TICK)
            pending += self._take_written()
            if not pending:
                continue
            if self.pause is not None:
                due = await self._space_returned(self.pause)
            else:
                due = (self.after_writes > 0 and pending >= self.after_writes) or (
                    self.interval > 0
                    and trio.current_time() - self._last_snapshot >= self.interval
                )
            if due:
                await self._attempt()
                if self.pause is None:  # paused: the rows stay pending for the retry
                    pending = 0

    async def _attempt(self) -> None:
        try:
            await self._snapshot()
        except DiskFull:
            pass  # disk_full() paused the policy and logged it
        except StorageError as e:
            log.error("scheduled snapshot failed: %s", e)
        self._on_change()

    async def _space_returned(self, pause: SnapshotPause) -> bool:
        """While paused by a full disk: is it time to retry?"""
        if trio.current_time() - pause.retried_at >= DISK_FULL_RETRY:
            return True
        return await self._free_space() >= pause.free_bytes + DISK_FREED_BYTES

    # --- outcomes of every snapshot, scheduled or not ------------------------------------

    def succeeded(self) -> None:
        """A snapshot was taken (new or not): the interval starts again, a pause ends."""
        self._last_snapshot = trio.current_time()
        if self.pause is not None:
            log.info("snapshots resumed: there is disk space again")
            self.pause = None

    async def disk_full(self, e: DiskFull) -> None:
        """A snapshot failed for a full disk: pause, or after a failed retry wait for
        more space than there is now."""
        free = await self._free_space()
        if self.pause is None:
            log.error("snapshots paused, the node keeps serving: %s", e)
            self.pause = SnapshotPause(
                reason="disk_full", message=str(e), since=time.time(),
                free_bytes=free, retried_at=trio.current_time(),
            )  # fmt: skip
        else:
            self.pause.message = str(e)
            self.pause.free_bytes = free
            self.pause.retried_at = trio.current_time()

    def status(self) -> dict[str, Any]:
        """`status`'s "snapshots": {"state": "ok"}, or "paused" with the reason, the
        error, since when, the free bytes measured and a hint."""
        pause = self.pause
        if pause is None:
            return {"state": "ok"}
        return {
            "state": "paused", "reason": pause.reason, "error": pause.message,
            "since": pause.since, "free_bytes": pause.free_bytes, "hint": PAUSE_HINT,
        }  # fmt: skip
