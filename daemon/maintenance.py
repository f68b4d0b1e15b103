"""When the node maintains its disk: history thinning, replica expiry, block GC, accounting.

`Maintenance.run` is a trio service that runs one pass `START_DELAY` seconds
after the node starts, then every `interval` seconds, and sooner after large
changes (`changed`: snapshots and installed replicas worth `after_bytes`).
A pass is the node's `maintain` coroutine, which does the work in a worker
thread (`LocalDataset.maintain`): writes and queries never wait for it, and
a snapshot waits only for the block deletions (the dataset's lock).

The service keeps the last pass's report for `status` and the metrics, and
the error of a failed pass (it retries at the next turn; the node keeps
serving). Times are trio's clock, so that tests run it on a virtual one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from benchsync.storage.dataset import MaintenanceReport
from benchsync.storage.errors import StorageError

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

START_DELAY = 60.0  # seconds after start-up: the first pass (accounting for `status`)
AFTER_BYTES = 64 * 1024 * 1024  # bytes of new versions and replicas that make a pass due
BUDGET_HINT = (
    "raise disk_budget, unpin or untag old versions (`benchsync pin ls`, `benchsync tag`), "
    "or free disk space"
)


class Maintenance:
    """Schedules maintenance passes; holds the last report. Start `run` with `nursery.start`.

    `maintain()` runs one pass and returns its `MaintenanceReport` (raising
    StorageError on failure); `on_report` is called with each report.
    """

    def __init__(
        self,
        maintain: Callable[[], Awaitable[MaintenanceReport]],
        *,
        interval: float,
        after_bytes: int = AFTER_BYTES,
        start_delay: float = START_DELAY,
        on_report: Callable[[MaintenanceReport], None] = lambda report: None,
    ) -> None:
        self._maintain = maintain
        self.interval = interval
        self.after_bytes = after_bytes
        self.start_delay = start_delay
        self._on_report = on_report
        self.last: MaintenanceReport | None = None
        self.error: str | None = None  # the last pass's failure, until one succeeds
        self.passes = 0
        self._changed = 0  # bytes of changes since the last pass
        self._due = trio.Event()
        self._lock = trio.Lock()  # one pass at a time (scheduled or asked for)

    def changed(self, nbytes: int) -> None:
        """Count `nbytes` of new data (a snapshot, a replica); enough makes a pass due.

        Call it from the trio thread."""
        self._changed += nbytes
        if self._changed >= self.after_bytes:
            self._due.set()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run passes on the schedule until cancelled."""
        task_status.started()
        wait = self.start_delay
        while True:
            with trio.move_on_after(wait):
                await self._due.wait()
            await self.run_now()
            wait = self.interval

    async def run_now(self) -> MaintenanceReport | None:
        """Run one pass now (after any pass in progress); its report, None if it failed."""
        async with self._lock:
            self._due = trio.Event()
            self._changed = 0
            try:
                report = await self._maintain()
            except (StorageError, OSError) as e:
                self.error = str(e)
                log.error("maintenance failed (retried at the next pass): %s", e)
                return None
            self.error = None
            self.last = report
            self.passes += 1
            self._on_report(report)
            if report.thinned_now or report.removed_blocks or report.expired_replicas:
                log.info(
                    "maintenance: %d version(s) thinned, %d block(s) (%d bytes) freed, "
                    "replicas expired: %s; history %d bytes, %.1f s",
                    report.thinned_now, report.removed_blocks, report.freed_bytes,
                    ", ".join(report.expired_replicas) or "none",
                    report.usage.history_bytes, report.seconds,
                )  # fmt: skip
            if report.over_budget:
                log.warning(
                    "over the disk budget: %d bytes used, budget %d, though thinned to the "
                    "minimum; %s", report.usage.total_bytes, report.budget, BUDGET_HINT,
                )  # fmt: skip
            return report

    def status(self, *, database_bytes: int, free_bytes: int) -> dict[str, Any]:
        """`status`'s "disk": the last pass's accounting with the live database size and
        free space measured now, the budget and a warning when over it."""
        report = self.last
        doc: dict[str, Any] = {"database_bytes": database_bytes, "free_bytes": free_bytes}
        if report is not None:
            usage = report.usage
            doc |= {
                "history_bytes": usage.history_bytes, "replica_bytes": usage.replica_bytes,
                "other_bytes": usage.other_bytes, "blocks_bytes": usage.blocks_bytes,
                "total_bytes": usage.total_bytes - usage.database_bytes + database_bytes,
                "versions": report.versions, "versions_kept": report.kept,
                "versions_thinned": report.thinned, "budget": report.budget,
                "over_budget": report.over_budget,
                "measured_at": report.finished_at,
                "age_seconds": round(time.time() - report.finished_at, 3),
            }  # fmt: skip
            if report.over_budget:
                doc["warning"] = (
                    f"over the disk budget ({usage.total_bytes} of {report.budget} bytes) "
                    "although history is thinned to pinned and tagged versions and the head"
                )
                doc["hint"] = BUDGET_HINT
        if self.error is not None:
            doc["error"] = self.error
        return doc
