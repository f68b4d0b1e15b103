"""A node process for tests/test_snapshot_crash.py, killed (SIGKILL) at a snapshot fault point.

Usage: snapshot_crash_child.py HOME POINT BITS START N

Opens the dataset "lab" in HOME (segments of about 2**BITS rows), appends
performance results START .. START+N-1 in three writes and updates result 7
(a middle segment) in a fourth, printing "acked <n>" after each write returns
(an acknowledged write), then snapshots, and kills itself with SIGKILL the
first time the snapshot reaches fault point POINT (`snapshot.SNAPSHOT_FAULT_POINTS`).
Exits 3 if the point never came.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import benchsync.storage.snapshot as snapshot_mod
from benchsync.storage import segments
from benchsync.storage.dataset import LocalDataset

UPDATED_ID = 7  # result_id the fourth write changes in place
UPDATED_CASE = "updated-before-the-crash"


def perf(start: int, n: int) -> list[dict[str, Any]]:
    return [
        {"model_name": f"model-{i % 4}", "hardware_type": "cpu", "test_case": f"case-{i}",
         "batch_size": 1, "latency_p90": float(i)}
        for i in range(start, start + n)
    ]  # fmt: skip


def use_bits(bits: int) -> None:
    bound = 2 ** (64 - bits)
    segments.BOUNDARY_BOUND = bound
    segments.BOUNDARY_HEX_BOUND = f"{bound:016x}"


def main() -> None:
    home, point, bits, start, n = sys.argv[1:]
    use_bits(int(bits))

    def hook(name: str) -> None:
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)

    snapshot_mod.FAULT_HOOK = hook
    with LocalDataset(Path(home), "lab") as ds:
        first, count = int(start), int(n)
        third = count // 3
        writes = ((first, third), (first + third, third), (first + 2 * third, count - 2 * third))
        for lo, k in writes:
            ds.db.ingest_records("perf", perf(lo, k))
            print(f"acked {k}", flush=True)
        ds.db.write(
            lambda c: c.execute(
                "UPDATE performance_results SET test_case = ? WHERE result_id = ?",
                [UPDATED_CASE, UPDATED_ID],
            ),
            changes={"performance_results": [(UPDATED_ID, UPDATED_ID)]},
        )
        print("acked update", flush=True)
        ds.snapshot()
    sys.exit(3)


if __name__ == "__main__":
    main()
