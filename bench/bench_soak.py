"""Soak: N real nodes on loopback, a steady writer on each, disk and process figures over time.

Each node records `--rows` results every `--every` seconds (it snapshots after
100 rows by default: a version per write) and runs maintenance with short test
settings (`--retention`, `--interval`, `--maintenance` seconds), so that what a
month does to the history happens in minutes. Every `--sample` seconds it
prints per node: RSS, open file descriptors, blockstore bytes, versions (all /
restorable), database bytes; at the end, the blockstore's ratio to its bound:

    bound = live data (the node's own head and its replicas' heads, snapshot bytes)
          + data written within the retention window (rows written in the last
            `--retention` seconds by every node, at the head's bytes per row)

Issue 19 aims at ratio <= 3. Not part of the test run:

    .venv/bin/python bench/bench_soak.py                 # 3 nodes, 3 minutes
    .venv/bin/python bench/bench_soak.py --minutes 30    # the issue's soak

`--env K=V` starts the nodes with an environment variable, e.g. Arrow's and
glibc's allocator defaults (`--env ARROW_DEFAULT_MEMORY_POOL=mimalloc --env
MALLOC_ARENA_MAX=16`), which `benchsync up` replaces (daemon/cli/up.py); what
grows inside one node, and before/after in the same run: bench/bench_memory.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchsync.daemon.demo import NodeProcess, start_lab

NETWORK = "soak"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # collected meanwhile
                total += os.stat(os.path.join(root, name)).st_size
    return total


def records(rng: random.Random, start: int, n: int) -> list[dict[str, Any]]:
    hardware = ["cpu", "cuda"]
    return [{"model_name": f"model-{(start + i) % 50}", "hardware_type": rng.choice(hardware),
             "device_name": f"dev-{i % 4}", "batch_size": 1 + i % 32,
             "throughput": rng.uniform(1, 5000), "latency_avg": rng.uniform(0.1, 50),
             "memory_peak": rng.uniform(100, 40000)} for i in range(n)]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--rows", type=int, default=150, help="rows per write")
    ap.add_argument("--every", type=float, default=2.0, help="seconds between writes per node")
    ap.add_argument("--retention", type=float, default=60.0, help="history_retention, seconds")
    ap.add_argument("--interval", type=float, default=20.0, help="history_interval, seconds")
    ap.add_argument("--maintenance", type=float, default=15.0,
                    help="maintenance_interval, seconds")  # fmt: skip
    ap.add_argument("--sample", type=float, default=30.0, help="seconds between reports")
    ap.add_argument("--env", action="append", default=[], metavar="K=V",
                    help="environment of the nodes (they inherit this process's)")  # fmt: skip
    args = ap.parse_args()
    os.environ.update(kv.split("=", 1) for kv in args.env)

    base = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    extra = ["--history-retention", str(args.retention), "--history-interval", str(args.interval),
             "--maintenance-interval", str(args.maintenance)]  # fmt: skip
    nodes = start_lab(base, args.nodes, NETWORK, extra_args=extra)
    rng = random.Random(7)
    written: list[tuple[float, int]] = []  # (time, rows) of every write, all nodes
    counts = [0] * len(nodes)
    start = time.monotonic()
    end = start + args.minutes * 60
    next_write = [start + i * args.every / len(nodes) for i in range(len(nodes))]
    next_sample = start
    print(f"{args.nodes} nodes in {base}; {args.rows} rows every {args.every:g} s each; "
          f"retention {args.retention:g} s, interval {args.interval:g} s; "
          f"env {args.env or '-'}")  # fmt: skip
    print(f"{'t(s)':>6} {'node':>4} {'RSS MiB':>8} {'FDs':>4} {'blocks MB':>10} "
          f"{'versions':>9} {'kept':>5} {'db MB':>6} {'bound MB':>9} {'ratio':>6}")  # fmt: skip
    ratios: list[float] = []
    try:
        while (now := time.monotonic()) < end:
            for i, node in enumerate(nodes):
                if now >= next_write[i]:
                    node.client.post("/v1/record/perf",
                                     {"records": records(rng, counts[i], args.rows)})  # fmt: skip
                    counts[i] += args.rows
                    written.append((now, args.rows))
                    next_write[i] += args.every
            if now >= next_sample:
                ratios = sample_all(nodes, now - start, written, args)
                next_sample += args.sample
            time.sleep(0.05)
        ratios = sample_all(nodes, time.monotonic() - start, written, args)
    finally:
        for node in nodes:
            node.stop()
    print(f"final ratio (blockstore / bound): max {max(ratios):.2f}, aim <= 3")
    return 0 if max(ratios) <= 3 else 1


def sample_all(nodes: list[NodeProcess], t: float, written: list[tuple[float, int]],
               args: argparse.Namespace) -> list[float]:  # fmt: skip
    """One report line per node; their blockstore / bound ratios."""
    heads = []  # (snapshot bytes, rows) of every node's head: each node holds them all
    for node in nodes:
        history = node.client.get("/v1/history?limit=1")["versions"]
        heads.append((history[0]["bytes"], sum(history[0]["rows"].values())) if history
                     else (0, 0))  # fmt: skip
    live = sum(b for b, _ in heads)
    rows = sum(r for _, r in heads)
    per_row = live / rows if rows else 0.0
    now = time.monotonic()
    window = sum(n for when, n in written if now - when <= args.retention) * per_row
    return [sample(node, i, t, live + window) for i, node in enumerate(nodes)]


def sample(node: NodeProcess, index: int, t: float, bound: float) -> float:
    assert node.proc is not None
    disk = node.status().get("disk", {})
    blocks = tree_bytes(node.home / "blocks")
    ratio = blocks / bound if bound else 0.0
    print(f"{t:6.0f} {index:>4} {rss_bytes(node.proc.pid) / 2**20:8.0f} "
          f"{fd_count(node.proc.pid):>4} {blocks / 1e6:10.2f} "
          f"{disk.get('versions', '-'):>9} {disk.get('versions_kept', '-'):>5} "
          f"{disk.get('database_bytes', 0) / 1e6:6.2f} {bound / 1e6:9.2f} {ratio:6.2f}",
          flush=True)  # fmt: skip
    return ratio


if __name__ == "__main__":
    sys.exit(main())
