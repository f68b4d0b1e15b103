"""Snapshot throughput, peak memory and incremental size (issue 3's measurements).

Every figure is a ratio to a baseline measured in the same run, so it means
something on any machine (and on a busy one, whose absolute numbers do not):

- throughput: Parquet bytes chunked, hashed and stored per second by the
  snapshot pipeline (`add_tables` into an `FsBlockstore` batch, durable at the
  end) against plain `hashlib.sha256` over the same files read the same way;
  also the old per-block fsync, chunk+hash alone, and the whole `snapshot()`
  including DuckDB's Parquet export, for context;
- peak memory: the RSS high-water mark of a fresh process that snapshots, and
  one that restores, a database of about --small-mib and --large-mib of
  Parquet, against a bare process importing the same libraries and opening the
  same database; plus the Python-side peak (tracemalloc). It must not grow with
  the database. DuckDB's buffer manager (the export's sort, the restore's
  load) takes memory up to its `memory_limit` (80 % of RAM by default), so one
  more snapshot runs with DuckDB capped at DUCKDB_CAP_MIB to show the rest is flat;
- incremental: bytes a snapshot adds after +1 % rows, as a fraction of the
  snapshot's bytes;
- row digest: the time `parquet_digest` (the per-table content identity,
  `storage/rowdigest.py`) takes over the exported files of --digest-rows rows,
  as a ratio to DuckDB's Parquet export of the same rows (`--digest-only` runs
  just this).

- O(change) (issue 14, `--incremental`): per database size (`--sizes`, rows of
  performance_results), in a fresh process: a full snapshot (no head, no
  blocks, every segment exported) and then, after +1 % rows appended through
  the database's writer (which tells the snapshot what it changed), the
  incremental snapshot: its time as a ratio to the full one, the bytes it
  added as a ratio to the Parquet growth (the data that changed), the rows it
  exported again, and the process's peak RSS (VmHWM) over both, beside a bare
  process opening the same database.

    .venv/bin/python bench/bench_snapshot.py [--small-mib 50] [--large-mib 300] [--repeat 3]
    .venv/bin/python bench/bench_snapshot.py --digest-only [--digest-rows 1000000]
    .venv/bin/python bench/bench_snapshot.py --incremental [--sizes 200000,1000000]

Not part of the test run. Takes about 2-3 minutes with the defaults; `--incremental`
about a minute at its default sizes (12M rows: ~10 minutes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from multiformats import CID

from benchsync.daemon.cli.up import NODE_ALLOCATOR_ENV
from benchsync.storage import blockstore
from benchsync.storage.blockstore import FsBlockstore
from benchsync.storage.dataset import LocalDataset
from benchsync.storage.schema import PRIMARY_KEYS
from benchsync.storage.snapshot import (
    ROW_GROUP_SIZE,
    add_tables,
    export_tables,
    parquet_digest,
    snapshot_tables,
)
from benchsync.storage.unixfs import CHUNK_SIZE

DATASET = "12D3KooWBenchSnapshotAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
ROWS_PER_MIB = 23_000  # rows of the generated table per MiB of zstd Parquet (measured)
INSERT_BATCH = 1_000_000  # rows per INSERT ... SELECT (bounds DuckDB's memory while filling)
INCREMENT = 0.01  # fraction of rows appended before the incremental snapshot
DUCKDB_CAP_MIB = 512  # DuckDB memory_limit for the capped snapshot measurement, MiB
MIB = 1024 * 1024  # bytes

# Varied values (hash/md5 of the row number) so zstd cannot compress them away.
FILL_SQL = """
INSERT INTO performance_results (result_id, run_id, model_id, hardware_id, test_case,
    batch_size, precision, total_time_seconds, average_latency_ms, throughput_items_per_second,
    memory_peak_mb, iterations, warmup_iterations, metrics, created_at)
SELECT i, i // 100, hash(i) % 50, hash(i + 1) % 5, 'case-' || (i % 11), 1 + i % 16,
    CASE WHEN i % 2 = 0 THEN 'fp16' ELSE 'fp32' END,
    (hash(i * 3) % 1000000) / 1000.0, (hash(i * 5) % 1000000) / 997.0,
    (hash(i * 7) % 10000000) / 991.0, (hash(i * 11) % 4000000) / 100.0,
    (hash(i * 13) % 1000)::INTEGER, 10, '{"seed": "' || md5(i::VARCHAR) || '"}',
    TIMESTAMP '2026-01-01' + to_microseconds((hash(i) % 1000000000000)::BIGINT)
FROM range(?, ?) t(i)
"""


def fill(ds: LocalDataset, start: int, stop: int) -> None:
    """Append rows [start, stop) to performance_results through the database's one writer.

    It declares what it changes (ids from `start` on), as the record and
    ingest paths do, so the next snapshot exports only those segments.
    """
    for lo in range(start, stop, INSERT_BATCH):
        hi = min(stop, lo + INSERT_BATCH)
        ds.db.write(
            lambda conn, lo=lo, hi=hi: conn.execute(FILL_SQL, [lo, hi]),
            changes={"performance_results": [(lo, None)]},
        )


Case = tuple[Callable[[], Any], Callable[[Any], object], Callable[[Any], None]]


def best_of_interleaved(repeat: int, cases: dict[str, Case]) -> dict[str, float]:
    """Fastest wall time of each case's `run(setup())`, in seconds.

    The cases take turns within each round, so a busy neighbour slows them
    alike instead of skewing whichever case ran during the burst.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, (setup, run, teardown) in cases.items():
            state = setup()
            start = time.perf_counter()
            run(state)
            times[name].append(time.perf_counter() - start)
            teardown(state)
    return {name: min(t) for name, t in times.items()}


def nothing() -> None:
    return None


def sha256_files(files: dict[str, Path]) -> None:
    for path in files.values():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_SIZE):
                h.update(chunk)


def discard(cid: CID, data: bytes) -> None:
    pass


# --- measurements in a fresh process --------------------------------------------------------


def child(kind: str, home: Path) -> None:
    """Run one measured operation and print its peaks as JSON (called as a subprocess)."""
    if kind != "bare":
        tracemalloc.start()
    with LocalDataset(home, DATASET) as ds:
        if kind == "bare":  # same imports, same database opened and touched
            ds.db.table_counts()
        elif kind == "snapshot":
            ds.snapshot()
        elif kind == "snapshot-capped":  # DuckDB told to spill beyond a fixed budget
            ds.db.query(f"SET memory_limit = '{DUCKDB_CAP_MIB}MiB'")
            ds.snapshot()
        elif kind == "onefile":
            print(json.dumps(one_file_child(ds, home)))
        elif kind == "incremental":
            print(json.dumps(incremental_child(ds)))
        elif kind == "restore":
            head = ds.head()
            assert head is not None, "the parent made a snapshot first"
            ds.restore(head.cid)
        else:
            raise SystemExit(f"unknown child measurement {kind!r}")
    traced = tracemalloc.get_traced_memory()[1] if tracemalloc.is_tracing() else 0
    print(json.dumps({"rss": peak_rss(), "traced": traced}))


def peak_rss() -> int:
    """This process's RSS high-water mark, in bytes.

    Not getrusage's ru_maxrss: Linux carries that over from the forked parent
    across exec, so every child would report the (large) parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: KiB


def measure_child(kind: str, home: Path) -> dict[str, Any]:
    """Peaks of one operation in a fresh process, or {"error": its last stderr line}."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(home)],
        capture_output=True,
        text=True,
        # The allocator settings `benchsync up` gives a node (Arrow on the system allocator).
        env={**os.environ, **NODE_ALLOCATOR_ENV},
    )
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or [f"exit status {out.returncode}"]
        errors = [line for line in lines if "Error" in line or "Exception" in line]
        return {"error": (errors or lines)[-1][:160]}
    lines = out.stdout.strip().splitlines()
    doc: dict[str, Any] = json.loads(lines[-1])
    if len(lines) > 1:
        doc["result"] = json.loads(lines[-2])
    return doc


def incremental_child(ds: LocalDataset) -> dict[str, Any]:
    """A full snapshot, +1 % rows, an incremental one: their times, bytes and rows."""
    (ds.snapshots.head_path).unlink(missing_ok=True)
    ds.snapshots.index_path.unlink(missing_ok=True)
    ds.blocks.gc([])  # every block new again, as in a first snapshot
    rows = ds.db.table_counts()["performance_results"]
    start = time.perf_counter()
    full = ds.snapshot()
    full_s = time.perf_counter() - start
    fill(ds, rows, rows + max(1, int(rows * INCREMENT)))
    start = time.perf_counter()
    inc = ds.snapshot()
    inc_s = time.perf_counter() - start
    growth = inc.version.manifest.total_bytes - full.version.manifest.total_bytes
    return {
        "rows": rows,
        "full_s": full_s,
        "inc_s": inc_s,
        "full_bytes": full.version.manifest.total_bytes,
        "growth": growth,
        "inc_new_bytes": inc.new_bytes,
        "inc_exported": inc.exported_rows,
        "segments": inc.version.manifest.tables["performance_results"].segments,
    }


def one_file_child(ds: LocalDataset, home: Path) -> dict[str, Any]:
    """The one-file layout's full snapshot of the table, as snapshots were before issue 14.

    Every table in one `ORDER BY key` file under DuckDB's node-wide memory limit,
    its rows/1 digest, then chunked into a fresh blockstore batch: the baseline
    the segmented full snapshot is compared with in the same run.
    """
    scratch = home / "onefile"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    store = FsBlockstore(home / "onefile-blocks")
    start = time.perf_counter()
    with ds.db.reader() as conn:
        files = {}
        for table in snapshot_tables(conn):
            path = scratch / f"{table}.parquet"
            key = PRIMARY_KEYS[table]
            # sql: our own schema's table and key names.
            conn.execute(
                f"COPY (SELECT * FROM {table} ORDER BY {key}) TO '{path}' "
                f"(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {ROW_GROUP_SIZE})"
            )
            parquet_digest(path, table)
            files[table] = path
    with store.batch():
        add_tables(files, lambda cid, data: store.put(cid, data, verify=False))
    seconds = time.perf_counter() - start
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(home / "onefile-blocks", ignore_errors=True)
    return {"seconds": seconds}


def o_change(work: Path, sizes: list[int]) -> None:
    """Issue 14's table: +1 % snapshot vs full, new bytes vs changed data, peak RSS."""
    print(
        "O(change): per size, a fresh process: full snapshot, +1 % rows, incremental snapshot"
    )
    print(
        f"  {'rows':>11} {'segs':>5} {'full s':>7} {'+1% s':>6} {'+1%/full':>8} "
        f"{'new/changed':>11} {'re-exported':>11} {'peak RSS':>9} {'bare RSS':>9} "
        f"{'1-file s':>8} {'full/1-file':>11} {'1-file RSS':>10}"
    )
    for rows in sizes:
        home = work / f"inc-{rows}"
        with LocalDataset(home, DATASET) as ds:
            fill(ds, 0, rows)
        bare = measure_child("bare", home)
        one = measure_child("onefile", home)
        got = measure_child("incremental", home)
        if "error" in got or "error" in bare or "error" in one:
            print(f"  {rows:>11,} failed: {got.get('error') or bare.get('error') or one}")
            continue
        r = got["result"]
        one_s = one["result"]["seconds"]
        print(
            f"  {rows:>11,} {r['segments']:>5} {r['full_s']:>7.2f} {r['inc_s']:>6.2f} "
            f"{r['inc_s'] / r['full_s']:>7.3f}x {r['inc_new_bytes'] / max(1, r['growth']):>10.2f}x "
            f"{r['inc_exported']:>11,} {got['rss'] / MIB:>5.0f} MiB {bare['rss'] / MIB:>5.0f} MiB "
            f"{one_s:>8.2f} {r['full_s'] / one_s:>10.2f}x {one['rss'] / MIB:>6.0f} MiB"
        )
        shutil.rmtree(home, ignore_errors=True)


# --- the run ---------------------------------------------------------------------------------


def build(home: Path, mib: int) -> tuple[LocalDataset, int]:
    ds = LocalDataset(home, DATASET)
    rows = mib * ROWS_PER_MIB
    fill(ds, 0, rows)
    return ds, rows


def throughput(ds: LocalDataset, work: Path, repeat: int) -> list[tuple[str, float, float]]:
    """(name, seconds, ratio to sha256) rows for the large database."""
    export_dir = work / "export"
    export_dir.mkdir()
    with ds.db.reader() as conn:
        files = export_tables(conn, export_dir)
    counter = iter(range(10**6))

    def fresh_store(fsync: bool = True) -> Callable[[], FsBlockstore]:
        return lambda: FsBlockstore(work / f"blocks-{next(counter)}", fsync=fsync)

    def remove(store: FsBlockstore) -> None:
        shutil.rmtree(store.root)

    def pipeline(store: FsBlockstore) -> None:
        """What SnapshotStore.snapshot does after the export: durable when this returns."""
        with store.batch():
            add_tables(files, lambda cid, data: store.put(cid, data, verify=False))

    def without_early_writeback(store: FsBlockstore) -> None:
        saved = blockstore._sync_file_range
        blockstore._sync_file_range = None  # as where libc lacks sync_file_range
        try:
            pipeline(store)
        finally:
            blockstore._sync_file_range = saved

    def per_block_fsync(store: FsBlockstore) -> None:
        add_tables(files, lambda cid, data: store.put(cid, data, verify=False))

    def first_snapshot() -> None:
        ds.snapshots.blocks.gc([])  # every block new again, as in a first snapshot
        ds.snapshots.head_path.unlink(missing_ok=True)

    def export(_: None) -> None:
        scratch = work / "export-again"
        scratch.mkdir()
        with ds.db.reader() as conn:
            export_tables(conn, scratch)
        shutil.rmtree(scratch)

    def skip(_: object) -> None:
        return None

    base_name = "baseline hashlib.sha256 (256 KiB reads)"
    cases: dict[str, Case] = {
        base_name: (nothing, lambda _: sha256_files(files), skip),
        "chunk+hash only (put discards)": (nothing, lambda _: add_tables(files, discard), skip),
        "chunk+hash+store, batch, durable (snapshot now)": (fresh_store(), pipeline, remove),
        "  same, without early writeback thread": (
            fresh_store(),
            without_early_writeback,
            remove,
        ),
        "chunk+hash+store, fsync per block (before)": (fresh_store(), per_block_fsync, remove),
        "chunk+hash+store, not durable (no sync at all)": (
            fresh_store(fsync=False),
            pipeline,
            remove,
        ),
    }
    best = best_of_interleaved(repeat, cases)
    # Context: DuckDB's share. Slow, so fewer runs.
    best |= best_of_interleaved(
        max(1, repeat // 2),
        {
            "DuckDB Parquet export alone (context)": (nothing, export, skip),
            "whole snapshot(): export+chunk+hash+store": (
                first_snapshot,
                lambda _: ds.snapshot(),
                skip,
            ),
        },
    )
    base = best[base_name]
    return [(name, seconds, base / seconds) for name, seconds in best.items()]


def digest_cost(work: Path, rows: int, repeat: int) -> tuple[float, float]:
    """(export seconds, digest seconds), best of `repeat`, over `rows` performance_results."""
    with LocalDataset(work / "digest", DATASET) as ds:
        fill(ds, 0, rows)
        files: dict[str, Path] = {}

        def export(_: None) -> None:
            scratch = work / "digest-export"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            with ds.db.reader() as conn:
                files.update(export_tables(conn, scratch))

        export(None)
        best = best_of_interleaved(
            repeat,
            {
                "export": (nothing, export, lambda _: None),
                "digest": (
                    nothing,
                    lambda _: [parquet_digest(path, table) for table, path in files.items()],
                    lambda _: None,
                ),
            },
        )
    return best["export"], best["digest"]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--small-mib", type=int, default=50, help="MiB of Parquet (default 50)")
    parser.add_argument("--large-mib", type=int, default=300, help="MiB of Parquet (default 300)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing (best kept)")
    parser.add_argument("--digest-rows", type=int, default=1_000_000, help="rows (default 1M)")
    parser.add_argument("--digest-only", action="store_true", help="only the row digest's cost")
    parser.add_argument("--incremental", action="store_true", help="only issue 14's O(change)")
    parser.add_argument(
        "--sizes",
        default="200000,1000000",
        help="rows per database for --incremental, comma-separated (default 200000,1000000)",
    )
    parser.add_argument("--child", nargs=2, metavar=("KIND", "HOME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-snapshot-"))
    if args.incremental:
        try:
            o_change(work, [int(x) for x in args.sizes.split(",")])
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    try:
        export_s, digest_s = digest_cost(work, args.digest_rows, args.repeat)
        print(
            f"row digest: {args.digest_rows:,} rows: export {export_s:.2f} s, digest "
            f"{digest_s:.2f} s, ratio digest/export {digest_s / export_s:.2f} "
            f"(best of {args.repeat})"
        )
        if args.digest_only:
            return
        large, large_rows = build(work / "large", args.large_mib)
        table = throughput(large, work, args.repeat)
        parquet = sum(t.bytes for t in large.head().manifest.tables.values())
        large.close()
        small, small_rows = build(work / "small", args.small_mib)
        small.close()

        memory: list[tuple[str, dict[str, Any]]] = []
        for name, home in (("small", work / "small"), ("large", work / "large")):
            memory.append((f"{name}: bare (imports + open DB)", measure_child("bare", home)))
            for kind, label in (
                ("snapshot-capped", f"snapshot(), DuckDB {DUCKDB_CAP_MIB} MiB cap"),
                ("snapshot", "snapshot()"),  # last: restore() needs its head
            ):
                # A first snapshot: every block is new and written.
                (home / "snapshots" / "HEAD.json").unlink(missing_ok=True)
                shutil.rmtree(home / "blocks", ignore_errors=True)
                memory.append((f"{name}: {label}", measure_child(kind, home)))
            memory.append((f"{name}: restore()", measure_child("restore", home)))

        with LocalDataset(work / "small", DATASET) as small:
            first = small.snapshot()
            before = first.version.manifest.total_bytes
            fill(small, small_rows, small_rows + int(small_rows * INCREMENT))
            second = small.snapshot()
            incremental = second.new_bytes / second.version.manifest.total_bytes
            small_parquet = before
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"throughput: {parquet / MIB:.0f} MiB of Parquet ({large_rows:,} rows), "
        f"best of {args.repeat}"
    )
    for name, seconds, ratio in table:
        print(f"  {name:50s} {parquet / MIB / seconds:8.1f} MiB/s  ratio {ratio:5.2f}")
    print(
        f"peak memory (fresh process each; small = {small_parquet / MIB:.0f} MiB, "
        f"large = {parquet / MIB:.0f} MiB of Parquet); ratio = RSS / bare RSS of that DB"
    )
    bare: dict[str, int] = {}
    for name, m in memory:
        size = name.split(":")[0]
        if "error" in m:
            print(f"  {name:42s} failed: {m['error']}")
            continue
        bare.setdefault(size, m["rss"])
        print(
            f"  {name:42s} RSS {m['rss'] / MIB:7.1f} MiB  ratio {m['rss'] / bare[size]:5.2f}"
            f"   python peak {m['traced'] / MIB:6.1f} MiB"
        )
    print(
        f"incremental: +{INCREMENT:.0%} rows -> new bytes = {incremental:.1%} of the snapshot "
        f"({second.new_bytes / MIB:.1f} of {second.version.manifest.total_bytes / MIB:.1f} MiB)"
    )


if __name__ == "__main__":
    main()
