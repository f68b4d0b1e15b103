"""The first snapshot after a restart, and the per-write cost of the change log (issue 14).

A snapshot's change set is logged in the write's own transaction (the
node-local table `snapshot_changes`, see docs/storage-format.md), so a restart
does not make the next snapshot a full export. Measured in one run:
- a database of N rows is snapshotted in full, closed and reopened (a
  restart), given one more row and snapshotted again: that snapshot's time as
  a ratio to the full one (before the log it was a full export, about 1x);
- 500 single-record writes with the log on vs the log switched off in the
  same process, best of 3 alternating rounds.

    .venv/bin/python bench/bench_snapshot_restart.py --rows 1000000
    .venv/bin/python bench/bench_snapshot_restart.py --rows 4000000

Measured on the shared 2-core box: restart +1 row / full = 0.37x and 0.56x at
1M rows (its tail segment held 412k rows: content-defined boundaries fall so),
0.030x at 4M rows; 500 writes with the log / without = 0.91-0.97x (noise).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_snapshot import fill  # noqa: E402

import benchsync.storage.db as dbmod  # noqa: E402
from benchsync.storage.dataset import LocalDataset  # noqa: E402

RECORD = {"model_name": "m", "hardware_type": "cpu", "batch_size": 1, "throughput": 1.0}


def restart_ratio(tmp: Path, rows: int) -> float:
    home = tmp / "node"
    with LocalDataset(home, "lab") as ds:
        fill(ds, 0, rows)
        t = time.perf_counter()
        r = ds.snapshot()
        full = time.perf_counter() - t
        print(f"full snapshot of {rows} rows: {full:.3f} s, {r.exported_rows} rows exported")
    with LocalDataset(home, "lab") as ds:  # the restart
        fill(ds, rows, rows + 1)
        t = time.perf_counter()
        r = ds.snapshot()
        inc = time.perf_counter() - t
        print(f"after a restart, +1 row: {inc:.3f} s, {r.exported_rows} rows exported, "
              f"{r.new_blocks} new blocks")  # fmt: skip
    return inc / full


def log_cost(tmp: Path, writes: int = 500, rounds: int = 3) -> float:
    real = dbmod._log_changes
    best = {"log": float("inf"), "nolog": float("inf")}
    try:
        with LocalDataset(tmp / "writes", "lab") as ds:
            for _ in range(rounds):
                for name in ("nolog", "log"):
                    dbmod._log_changes = real if name == "log" else (lambda c, s: None)
                    t = time.perf_counter()
                    for _ in range(writes):
                        ds.db.store_performance_result(RECORD)
                    best[name] = min(best[name], time.perf_counter() - t)
    finally:
        dbmod._log_changes = real
    print(f"{writes} single-record writes: {best['log']:.3f} s with the log, "
          f"{best['nolog']:.3f} s without")  # fmt: skip
    return best["log"] / best["nolog"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-restart-"))
    try:
        ratio = restart_ratio(tmp, args.rows)
        print(f"restart +1 row snapshot / full snapshot = {ratio:.3f}x")
        print(f"writes with the change log / without = {log_cost(tmp):.3f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
