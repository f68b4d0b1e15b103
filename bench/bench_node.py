"""Benchmarks of a whole node process (not part of the test run).

Measures, in one run, each figure next to a baseline taken in the same run:
1. memory: resident set (RSS) of an idle `benchsync up` process, and the peak
   RSS of a second node while it syncs a large snapshot (`--rows` results,
   ~50-100 MB of Parquet) from a first one, next to a bare Python process that
   only imports the same libraries (duckdb, pyarrow, libp2p, trio);
2. latency of recording one result through the control API (HTTP/JSON on the
   Unix socket, what `benchsync record` and scripts use), next to an
   in-process `BenchmarkDB.store_performance_result` on a database file of
   its own; plus one `benchsync record perf` CLI call (process start included)
   for scale.

The large dataset is written offline with `BenchmarkDB.ingest_arrow` before
its node starts, so only the snapshot and the sync are measured. RSS comes
from /proc (Linux): VmRSS now, VmHWM for the peak since the process started.

Run: .venv/bin/python bench/bench_node.py [--rows 3000000] [--records 300] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from benchsync.daemon.demo import NodeProcess, free_port
from benchsync.storage.db import DB_FILENAME, BenchmarkDB

SETTLE = 2.0  # seconds an idle process is left alone before its RSS is read
SYNC_TIMEOUT = 600.0  # seconds for the second node to install the large snapshot
POLL_INTERVAL = 0.1  # seconds between status polls while syncing
INGEST_BATCH = 250_000  # rows per ingest_arrow call when building the large dataset
CLI_RUNS = 3  # `benchsync record` process runs (each ~1 s of imports)
KiB = 1024  # bytes
MiB = 1024 * KiB  # bytes
BARE_IMPORTS = "import duckdb, pyarrow, libp2p, trio"
RECORD = {
    "model_name": "bert-base-uncased", "hardware_type": "cuda", "device_name": "NVIDIA A100",
    "batch_size": 8, "precision": "fp16", "throughput": 1234.5, "latency_avg": 6.48,
    "latency_p95": 7.9, "memory_peak": 2048.0,
}  # fmt: skip


# --- measuring processes -------------------------------------------------------------------


def proc_status_kib(pid: int, field: str) -> int:
    """A `/proc/<pid>/status` memory field (VmRSS, VmHWM) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def mib(kib: int) -> str:
    return f"{kib / KiB:.1f} MiB"


def bare_import_rss() -> int:
    """RSS (KiB) of a Python process that imported the node's heavy libraries, then idles."""
    proc = subprocess.Popen(
        [sys.executable, "-c",
         f"{BARE_IMPORTS}; import sys; print('ok', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ok"
        time.sleep(SETTLE)  # same settling time as the node gets
        return proc_status_kib(proc.pid, "VmRSS")
    finally:
        proc.communicate("")


def pid_of(node: NodeProcess) -> int:
    assert node.proc is not None
    return node.proc.pid


# --- the large dataset ---------------------------------------------------------------------


def _pick(values: list[str], n: int) -> pa.Array:
    idx = pc.cast(pc.floor(pc.multiply(pc.random(n), len(values))), pa.int64())
    return pa.array(values).take(idx)


def _floats(n: int, scale: float) -> pa.Array:
    return pc.round(pc.multiply(pc.random(n), scale), 3)


def fill_large_dataset(home: Path, rows: int) -> float:
    """Write `rows` random performance results into home's database; returns seconds taken."""
    models = [f"model-{i:03d}" for i in range(200)]
    hardware = ["cuda", "rocm", "cpu", "mps", "openvino", "webgpu"]
    started = time.monotonic()
    with BenchmarkDB(home / DB_FILENAME) as db:
        done = 0
        while done < rows:
            n = min(INGEST_BATCH, rows - done)
            table = pa.table({
                "model_name": _pick(models, n),
                "hardware_type": _pick(hardware, n),
                "device_name": _pick([f"device-{i}" for i in range(12)], n),
                "batch_size": pc.cast(_pick(["1", "2", "4", "8", "16", "32"], n), pa.int64()),
                "precision": _pick(["fp32", "fp16", "int8"], n),
                "throughput": _floats(n, 5000.0),
                "latency_avg": _floats(n, 100.0),
                "latency_p90": _floats(n, 120.0),
                "latency_p95": _floats(n, 130.0),
                "latency_p99": _floats(n, 160.0),
                "memory_peak": _floats(n, 80_000.0),
            })  # fmt: skip
            db.ingest_arrow("perf", table)
            done += n
    return time.monotonic() - started


# --- latency -------------------------------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_calls(fn: Any, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def describe(samples: list[float]) -> str:
    return (f"median {statistics.median(samples) * 1e3:7.2f} ms  "
            f"p95 {percentile(samples, 0.95) * 1e3:7.2f} ms  (n={len(samples)})")  # fmt: skip


# --- the run -------------------------------------------------------------------------------


class PeakSampler:
    """Samples a process's VmRSS in a thread (VmHWM gives the peak; this gives the curve's mean)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(proc_status_kib(self.pid, "VmRSS"))
            except (OSError, RuntimeError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3_000_000,
                        help="performance results on the node whose snapshot is synced")
    parser.add_argument("--records", type=int, default=300,
                        help="single-record writes timed per path")
    parser.add_argument("--keep", action="store_true", help="keep the data directories")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="benchsync-bench-node-"))
    network = f"bench-{os.getpid()}"
    print(f"data in {base}")

    # 1a. memory of an idle node vs a bare process importing the same libraries
    bare = bare_import_rss()
    idle = NodeProcess(base / "idle", free_port(), network, extra_args=["--snapshot-interval", "0"])
    idle.start()
    nodes = [idle]
    try:
        idle.wait_ready()
        time.sleep(SETTLE)
        idle_rss = proc_status_kib(pid_of(idle), "VmRSS")
        print("\n== memory (RSS) ==")
        print(f"bare python + {BARE_IMPORTS[7:]}: {mib(bare)}")
        print(f"idle node (empty data dir):       {mib(idle_rss)}"
              f"   ratio {idle_rss / bare:.2f}x bare")  # fmt: skip

        # 2. latency of one write: control API vs in-process
        one = {k: v for k, v in RECORD.items()}
        client = idle.client
        client.post("/v1/record/perf", one)  # warm-up: model and hardware rows exist
        api = time_calls(lambda: client.post("/v1/record/perf", one), args.records)
        with BenchmarkDB(base / "inproc.duckdb") as db:
            db.store_performance_result(**one)
            local = time_calls(lambda: db.store_performance_result(**one), args.records)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BENCHSYNC_")}
        argv = [sys.executable, "-m", "benchsync.daemon.cli", "record", "perf",
                "--home", str(idle.home), "--model", "bert-base-uncased", "--hardware", "cuda",
                "--throughput", "1234.5"]  # fmt: skip
        cli = time_calls(lambda: subprocess.run(argv, check=True, capture_output=True, env=env),
                         CLI_RUNS)  # fmt: skip
        print("\n== latency of recording one result ==")
        print(f"in-process store_performance_result: {describe(local)}")
        print(f"control API POST /v1/record/perf:    {describe(api)}")
        print(f"`benchsync record perf` (CLI):       {describe(cli)}")
        ratio = statistics.median(api) / statistics.median(local)
        print(f"control API / in-process (medians):  {ratio:.2f}x")
        print(f"CLI / in-process (medians):          "
              f"{statistics.median(cli) / statistics.median(local):.0f}x")  # fmt: skip

        # 1b. memory while a second node syncs a large snapshot
        big = NodeProcess(base / "big", free_port(), network,
                          extra_args=["--snapshot-interval", "0"])  # fmt: skip
        took = fill_large_dataset(big.home, args.rows)
        print(f"\n== sync of a large snapshot ({args.rows} results, written in {took:.1f} s) ==")
        big.start()
        nodes.append(big)
        big.wait_ready()
        big_idle = proc_status_kib(pid_of(big), "VmRSS")
        t = time.monotonic()
        version = big.client.post("/v1/snapshot", {})
        snap_s = time.monotonic() - t
        size = int(version.get("bytes") or 0)
        big_after = proc_status_kib(pid_of(big), "VmHWM")
        print(f"provider: idle with data {mib(big_idle)}, peak through snapshot {mib(big_after)}"
              f" (snapshot of {size / MiB:.1f} MiB took {snap_s:.1f} s)")  # fmt: skip
        print(f"provider peak RSS through snapshot: ratio {big_after / bare:.2f}x bare,"
              f" {(big_after - big_idle) / KiB / max(1.0, size / MiB):.2f} MiB per snapshot MiB")

        follower = NodeProcess(base / "follower", free_port(), network, bootstrap=[big.addr],
                               extra_args=["--snapshot-interval", "0"])  # fmt: skip
        t = time.monotonic()
        follower.start()
        nodes.append(follower)
        follower.wait_ready()
        with PeakSampler(pid_of(follower)) as sampler:
            deadline = time.monotonic() + SYNC_TIMEOUT
            replica: dict[str, Any] = {}
            while time.monotonic() < deadline:
                replicas = {r["dataset"]: r for r in follower.status()["replicas"]}
                replica = replicas.get(big.peer_id, {})
                if replica.get("head_installed") == version["cid"]:
                    break
                time.sleep(POLL_INTERVAL)
            else:
                raise TimeoutError(f"follower did not install the snapshot in {SYNC_TIMEOUT} s")
        sync_s = time.monotonic() - t
        peak = proc_status_kib(pid_of(follower), "VmHWM")
        after = proc_status_kib(pid_of(follower), "VmRSS")
        synced = int(replica.get("bytes") or size or 0)
        print(f"follower synced {synced / MiB:.1f} MiB in {sync_s:.1f} s (process start included)")
        print(f"follower peak RSS while syncing: {mib(peak)}   ratio {peak / bare:.2f}x bare,"
              f" {peak / idle_rss:.2f}x idle node")  # fmt: skip
        if sampler.samples:
            mean = sum(sampler.samples) / len(sampler.samples)
            print(f"follower mean RSS while syncing: {mib(int(mean))}"
                  f"   ratio {mean / bare:.2f}x bare")  # fmt: skip
        print(f"follower RSS once installed:     {mib(after)}")
        print(f"peak growth over idle node per synced MiB: "
              f"{(peak - idle_rss) / KiB / max(1.0, synced / MiB):.2f} MiB/MiB")  # fmt: skip
    finally:
        codes = [n.stop() for n in nodes]
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\nnodes stopped (exit codes {codes})" + (f"; data kept in {base}" if args.keep else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
