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

With --install: a real snapshot (benchmark rows in segmented Parquet) of a
LocalDataset served by an in-process provider, received end to end into
another LocalDataset: fetch, then `install_replica` until it is queryable
(the provider serves the writer's blockstore from a child process).
- copy-install: fetched as blocks, then installed by writing each
  content-addressed segment file from them (the copying path, as every
  install was before issue 14: two copies);
- placed-install: as the syncer does now, each leaf received into its segment
  file (`replica_placement`), then the install only checks and links;
- +1%: after placed-install of v1, 1 % more rows, snapshot v2, fetched and
  installed the same way: bytes written vs the bytes of the changed files.
Ratios are each mode's Parquet bytes per second over the raw stream's, medians
of the same run.

Run: .venv/bin/python bench/bench_replica.py --install [--kubo] [--mb 8] [--repeat 3]

Measured (issue 14, --install --mb 64 --repeat 3, load 2-4; 62.6 MiB, 28
segments; raw stream 0.70 s, 89 MiB/s): copy-install x0.25 of the raw stream
(fetch 1.33 s + install 1.47 s), disk written 2.09 per Parquet byte;
placed-install x0.18 (fetch 2.02 s, finish 0.14 s, install 1.38 s), 1.09 per
byte; a +1 % version writes 1.23-1.29x its changed files (3.0 MB). The install
was ~60 % check_parquet_file decoding every row group of every segment, the
unchanged ones included (profiled at 1M rows: 0.56 of 0.96 s).

After remembering checks by file CID, measuring text columns with DuckDB, and
reading no leaf twice (--install --kubo --mb 100 --repeat 3, load 1.2-1.5;
97.5 MiB, 43 segments; raw 0.64 s, 153 MiB/s, the receiver at 97 % of a core
and the provider at 89 % meanwhile; SHA-256 + write of the bytes 0.25 s, so
x0.72 is the floor; in other runs the write took 0.10 s, a floor of x0.88):
copy-install x0.25 (fetch 1.55 s, install 0.97 s), 2.08 bytes written per
byte; placed-install x0.29 (fetch 1.53 s, finish 0.16 s, install 0.48 s),
1.10 per byte, x0.94 of Kubo -> Kubo (2.09 s); a +1 % version 0.38-0.43 s,
writing 1.39-1.51x its changed files (1.5 MB).

With --kubo: Kubo -> Kubo on the same files (tests/kubo.py; a fresh Kubo per
round Downloads what another Kubo added, after our rounds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from multiformats import CID

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.kubo (--kubo)

from bench_sync import BENCH_LAB_KEY, raw_from_child, spawn, tell  # noqa: E402

import benchsync.daemon.fetch as fetch_mod  # noqa: E402
from benchsync.daemon.network import P2PNode  # noqa: E402
from benchsync.storage import unixfs  # noqa: E402
from benchsync.storage.blockstore import FilePlacement, FsBlockstore  # noqa: E402
from benchsync.storage.dataset import LocalDataset  # noqa: E402

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


def bench_rows(start: int, n: int) -> list[dict[str, object]]:
    """Benchmark rows whose text does not compress away (~20 bytes each in our zstd Parquet)."""
    return [
        {"model_name": f"model-{i % 7}", "hardware_type": "cpu",
         "test_case": os.urandom(12).hex(), "batch_size": 1 + i % 8,
         "latency_p90": float(i) * 1.25}
        for i in range(start, start + n)
    ]  # fmt: skip


async def serve_home(home: str) -> None:
    """Child process: serve the blockstore of the dataset at `home`; print the address."""
    store = FsBlockstore(Path(home) / "blocks")
    nd = P2PNode(Path(home) / "p2p-child", network="bench", blockstore=store,
                 lab_key=BENCH_LAB_KEY)  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(nd.run)
        print(json.dumps({"addr": nd.addrs[0]}), flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)  # "quit"
        nursery.cancel_scope.cancel()


async def install_once(
    tmp: Path, addr: str, dataset: str, root: str, mode: str, b: LocalDataset | None = None
) -> tuple[list[float], int, LocalDataset]:
    """([fetch, finish, install] seconds, disk bytes written, the receiving dataset) of one
    fetch + install of `root` from the provider at `addr`."""
    if b is None:
        b = LocalDataset(tmp / f"{mode}-{time.monotonic_ns()}", "benchreceiver")
    b.db  # noqa: B018  (opened: a running node's database is open when a replica arrives)
    nd = P2PNode(b.home / "p2p", network="bench", blockstore=b.blocks, lab_key=BENCH_LAB_KEY)
    place = None if mode == "copy-install" else b.replica_placement(dataset, CID.decode(root))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(nd.run)
            peer = await nd.connect(addr)
            written = disk_written()
            t0 = time.perf_counter()
            await nd.fetcher.fetch(
                CID.decode(root), [peer], place=None if place is None else place.files
            )
            t1 = time.perf_counter()
            if place is not None:
                await trio.to_thread.run_sync(place.finish)
            t2 = time.perf_counter()
            await trio.to_thread.run_sync(b.install_replica, root)
            t3 = time.perf_counter()
            written = disk_written() - written
            nursery.cancel_scope.cancel()
    finally:
        if place is not None:
            place.close()
    return [t1 - t0, t2 - t1, t3 - t2], written, b


def kubo_rounds(tmp: Path, home: Path, root: str, repeat: int) -> tuple[list[float], int]:
    """Kubo -> Kubo on the same bytes: the version's files added to a Kubo (its default
    DAG), each round a fresh Kubo connects and Downloads them (fetch and write, as our
    install is); the seconds of each round and the bytes."""
    from bench_bitswap import extract, timed_download, tree_bytes

    from tests.kubo import Kubo

    files = tmp / "kubo-files"
    with LocalDataset(home, "benchwriter", read_only=True) as a:
        extract(a.blocks.get, CID.decode(root), files)
    nbytes = tree_bytes(files)
    with Kubo(tmp / "kubo-source") as source:
        cid = source.add(files)
        return [timed_download(tmp, source.addr, cid, nbytes, f"k{i}") for i in range(repeat)], (
            nbytes
        )


def hash_and_write(nbytes: int, tmp: Path) -> float:
    """Seconds to SHA-256 and write `nbytes` in 256 KiB blocks (page cache, no sync): the
    least work a receiver that verifies and stores every byte adds to the stream's."""
    block = os.urandom(unixfs.CHUNK_SIZE)
    out = tmp / "hash-and-write"
    t0 = time.perf_counter()
    with out.open("wb") as f:
        for _ in range(nbytes // len(block)):
            hashlib.sha256(block).digest()
            f.write(block)
    elapsed = time.perf_counter() - t0
    out.unlink()
    return elapsed


async def install_main(mb: int, repeat: int, kubo: bool = False) -> None:
    rows = mb * 2**20 // 20  # ~20 bytes per row in our zstd Parquet
    with tempfile.TemporaryDirectory() as tmp_s, trio.fail_after(TIMEOUT):
        tmp = Path(tmp_s)
        raw: list[float] = []
        raw_cpu: list[float] = []  # receiver, provider CPU seconds of each raw run
        floor: list[float] = []  # hash_and_write seconds, once a round
        runs: dict[str, list[tuple[list[float], int]]] = {"copy-install": [],
                                                          "placed-install": []}  # fmt: skip
        delta: list[tuple[float, int, int]] = []
        with LocalDataset(tmp / "a", "benchwriter") as a:
            for start in range(0, rows, 200_000):
                a.db.ingest_records("perf", bench_rows(start, min(200_000, rows - start)))
            v1 = a.snapshot().version
            a.db.ingest_records("perf", bench_rows(rows, max(1, rows // 100)))  # +1 %
            v2 = a.snapshot().version
            dataset = a.dataset
        size = v1.manifest.total_bytes
        proc = subprocess.Popen([sys.executable, __file__, "--serve-home", str(tmp / "a")],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        addr = str(json.loads(proc.stdout.readline())["addr"])
        try:
            for i in range(repeat):
                order = ["raw", "copy-install", "placed-install"]
                order = order[i % 3 :] + order[: i % 3]
                for mode in order:
                    if mode == "raw":
                        raw.append(await raw_from_child(size, tmp, raw_cpu))
                        floor.append(await trio.to_thread.run_sync(hash_and_write, size, tmp))
                        continue
                    times, written, b = await install_once(tmp, addr, dataset, v1.cid, mode)
                    runs[mode].append((times, written))
                    if mode == "placed-install":
                        # The +1 % version into the same replica, as the syncer does.
                        files = b.replicas.root / dataset / "files"
                        before = {f.name for f in files.iterdir()}
                        secs2, written2, _ = await install_once(tmp, addr, dataset, v2.cid,
                                                                mode, b)  # fmt: skip
                        changed = sum(f.stat().st_size for f in files.iterdir()
                                      if f.name not in before)  # fmt: skip
                        delta.append((sum(secs2), written2, changed))
                    b.close()
        finally:
            tell(proc, "quit")
            proc.wait(10)
        if kubo:  # after ours (the provider holds the writer's store open until it quits)
            kubo_runs, kubo_bytes = await trio.to_thread.run_sync(
                kubo_rounds, tmp, tmp / "a", v1.cid, repeat
            )
    raw_s = statistics.median(raw)
    print(f"replica install of {size / 2**20:.1f} MiB of segmented Parquet ({rows} rows, "
          f"{v1.manifest.tables['performance_results'].segments} segments), provider in a child "
          f"process, {repeat} rounds; raw Noise+Yamux stream of the same bytes: median "
          f"{raw_s:.2f} s ({size / raw_s / 2**20:.0f} MiB/s)")
    receiver, provider = (statistics.median(raw_cpu[k::2]) / raw_s for k in (0, 1))
    floor_s = statistics.median(floor)
    print(f"  raw stream CPU: receiver {receiver:.0%} of a core, provider {provider:.0%}; "
          f"SHA-256 + writing the same bytes {floor_s:.2f} s -> a receiver that verifies and "
          f"stores every byte reaches at most x{raw_s / (raw_s + floor_s):.2f} of the raw "
          f"stream on this box while the stream keeps its cores busy")
    for mode, got in runs.items():
        secs = statistics.median(sum(r[0]) for r in got)
        parts = [statistics.median(r[0][k] for r in got) for k in range(3)]
        median_written = statistics.median(r[1] for r in got)
        print(f"  {mode:14s}: fetch+install median {secs:.2f} s -> x{raw_s / secs:.2f} of the raw "
              f"stream (fetch {parts[0]:.2f} s, finish {parts[1]:.2f} s, install "
              f"{parts[2]:.2f} s); disk written / Parquet bytes {median_written / size:.2f}")
    if kubo:
        kubo_s = statistics.median(kubo_runs)
        ours_s = statistics.median(sum(r[0]) for r in runs["placed-install"])
        print(f"  Kubo -> Kubo  : {kubo_bytes / 2**20:.1f} MiB of the version's files Downloaded "
              f"by a fresh Kubo, median {kubo_s:.2f} s "
              f"({', '.join(f'{r:.2f}' for r in kubo_runs)} s) -> placed-install (per byte) "
              f"x{(size / ours_s) / (kubo_bytes / kubo_s):.2f} of Kubo -> Kubo")
    for delta_s, delta_written, changed in delta:
        print(f"  +1% version   : {delta_s:.2f} s, disk written {delta_written} bytes, "
              f"changed files "
              f"{changed} bytes -> x{delta_written / max(1, changed):.2f} of the changed data")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=16, help="replica size in MiB (default 16)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every mode (default 3)")
    parser.add_argument("--serve-home", help=argparse.SUPPRESS)
    parser.add_argument("--install", action="store_true",
                        help="a real snapshot fetched and installed end to end (see above)")
    parser.add_argument("--kubo", action="store_true",
                        help="with --install: also Kubo -> Kubo on the same files (kubo-python)")
    args = parser.parse_args()
    if args.serve_home:
        trio.run(serve_home, args.serve_home)
    else:
        if args.install:
            trio.run(install_main, args.mb, args.repeat, args.kubo)
        else:
            trio.run(main, args.mb, args.repeat)
