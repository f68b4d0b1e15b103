"""Receiving a replica: a durable fetch vs a raw py-libp2p stream (not part of the test run).

Measures, in one run on 127.0.0.1, with the provider in a child process (as a
real peer would be; see bench_sync.py):
- raw: the same number of bytes over one Noise+Yamux stream (the baseline);
- batched: `Fetcher.fetch` of an N MiB DAG into an fsynced FsBlockstore, its
  syncs batched (DURABLE_BATCH_BYTES, the default);
- per-block: the same with DURABLE_BATCH_BYTES = 0, one fsync per block (the
  behaviour before batching);
- no-sync: an FsBlockstore with fsync=False (no durability: an upper bound);
- +copy: batched, then the file written out of the store and synced, as an
  installer materialising the replica's Parquet file does (two copies on disk);
- into-file: the leaves received straight into that file and kept as
  references (`FilePlacement`), its `finish()` included (one copy).
Each figure is the transfer's median throughput divided by the raw stream's
median, all measured in the same run, in rounds of every mode in a rotated
order (a shared box's load changes hit them alike).
Also printed: bytes this process wrote to disk per block byte received
(/proc/self/io write_bytes), which should be about 1.

Measured on the shared 2-core box (issue 14), ratios to the raw stream:
- --mb 32 --repeat 7, load 9-14: batched x0.76, per-block x0.61, no-sync x0.73;
- --mb 100 --repeat 3, load 5-9: batched x0.51, per-block x0.54, no-sync x0.56
  (raw 84 MiB/s): with a core to spare the per-block fsyncs overlap the
  network, and all three are bound by the requester's CPU, about one core for
  the whole fetch: the stream's own receive (~0.9 s of CPU per 100 MiB) plus
  hashing, parsing and writing the blocks (~0.75 s, mostly the kernel's copy
  into the page cache and SHA-256).

- --mb 32 --repeat 5, load 6-8 (raw 65 MiB/s): batched x0.43, per-block x0.37,
  no-sync x0.41, +copy x0.41 writing 2.07 bytes per block byte, into-file
  x0.35 writing 1.09.

Run: .venv/bin/python bench/bench_replica.py [--mb 16] [--repeat 3]
     (--mb 100 is the issue's figure; a few seconds per MiB-hundred on a quiet box)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
from multiformats import CID

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sync import BENCH_LAB_KEY, raw_from_child, spawn, tell  # noqa: E402

import benchsync.daemon.fetch as fetch_mod  # noqa: E402
from benchsync.daemon.network import P2PNode  # noqa: E402
from benchsync.storage import unixfs  # noqa: E402
from benchsync.storage.blockstore import FilePlacement, FsBlockstore  # noqa: E402

TIMEOUT = 1800  # seconds: upper bound for the whole run
MODES = ("batched", "per-block", "no-sync", "+copy", "into-file")
TABLE_FILE = "tables/results.parquet"  # the file of bench_sync's DAG


def disk_written() -> int:
    """Bytes this process has caused to be written to storage (Linux), else 0."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def write_out(store: FsBlockstore, root: CID, out: Path) -> None:
    """The replica's file out of the store, synced: what a copying installer does."""
    fcid = unixfs.resolve(store.get, root, TABLE_FILE)
    with out.open("wb") as f:
        for chunk in unixfs.cat(store.get, fcid):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


async def fetch_once(tmp: Path, addr: str, root: CID, mode: str) -> tuple[float, int, int]:
    """(seconds, block bytes, disk bytes written) of one fetch of `root` into a fresh node."""
    home = tmp / f"{mode.strip('+')}-{time.monotonic_ns()}"
    store = FsBlockstore(home / "blocks", fsync=mode != "no-sync")
    out = home / "replica.parquet"
    place = None
    if mode == "into-file":
        place = FilePlacement(store, root, lambda path: out if path == TABLE_FILE else None)
    saved = fetch_mod.DURABLE_BATCH_BYTES
    fetch_mod.DURABLE_BATCH_BYTES = 0 if mode == "per-block" else saved
    try:
        nd = P2PNode(home, network="bench", blockstore=store, lab_key=BENCH_LAB_KEY)
        async with trio.open_nursery() as nursery:
            await nursery.start(nd.run)
            peer = await nd.connect(addr)
            written = disk_written()
            t0 = time.perf_counter()
            result = await nd.fetcher.fetch(root, [peer], place=place)
            if place is not None:
                await trio.to_thread.run_sync(place.finish)
            elif mode == "+copy":
                await trio.to_thread.run_sync(write_out, store, root, out)
            elapsed = time.perf_counter() - t0
            written = disk_written() - written
            nursery.cancel_scope.cancel()
    finally:
        fetch_mod.DURABLE_BATCH_BYTES = saved
    return elapsed, result.stats.block_bytes, written


async def main(mb: int, repeat: int) -> None:
    nbytes = mb * 1024 * 1024
    raw: list[float] = []
    runs: dict[str, list[tuple[float, int, int]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp_s, trio.fail_after(TIMEOUT):
        tmp = Path(tmp_s)
        proc, info = await trio.to_thread.run_sync(spawn, "dag", nbytes, tmp / "provider")
        root = CID.decode(str(info["root"]))
        try:
            for i in range(repeat):
                # Each round measures the baseline and every mode, in a rotated
                # order: a change of load on a shared box hits all of them alike.
                order = ["raw", *MODES]
                order = order[i % len(order) :] + order[: i % len(order)]
                for mode in order:
                    if mode == "raw":
                        raw.append(await raw_from_child(nbytes, tmp))
                    else:
                        runs[mode].append(await fetch_once(tmp, str(info["addr"]), root, mode))
        finally:
            tell(proc, "announce")
            tell(proc, "quit")
            proc.wait(10)
    raw_s = statistics.median(raw)
    print(f"replica of {mb} MiB, provider in a child process, {repeat} rounds; raw Noise+Yamux "
          f"stream: median {raw_s:.2f} s ({nbytes / raw_s / 2**20:.0f} MiB/s; "
          f"{', '.join(f'{r:.2f}' for r in raw)} s)")
    for mode in MODES:
        secs = statistics.median(r[0] for r in runs[mode])
        got = runs[mode][0][1]
        written = statistics.median(r[2] for r in runs[mode])
        # Throughput per block byte over the raw stream's per byte, medians of the run.
        ratio = (got / secs) / (nbytes / raw_s)
        print(f"  {mode:9s}: median {secs:.2f} s ({got / secs / 2**20:.0f} MiB/s) -> "
              f"x{ratio:.2f} of the raw stream; disk written / block bytes {written / got:.2f} "
              f"({', '.join(f'{r[0]:.2f}' for r in runs[mode])} s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=16, help="replica size in MiB (default 16)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every mode (default 3)")
    args = parser.parse_args()
    trio.run(main, args.mb, args.repeat)
