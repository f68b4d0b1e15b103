"""Throughput and memory of UnixFS chunking+hashing(+storing) and CAR decoding.

Every figure is reported next to plain `hashlib.sha256` over the same bytes,
read the same way, in the same run, so the ratio is meaningful on any machine
(and on a busy one, whose absolute numbers are not).

    .venv/bin/python bench/bench_unixfs.py [--mb 200] [--repeat 3]

Not part of the test run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from multiformats import CID

from benchsync.storage import car, unixfs
from benchsync.storage.blockstore import FsBlockstore

READ_SIZE = 1024 * 1024  # bytes per read of the input file
FEED_SIZE = 64 * 1024  # bytes per CarDecoder.feed (a typical network read)
BASE32_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # shard directory names are 2 of these


def discard(cid: CID, data: bytes) -> None:
    pass


Timed = tuple[Callable[[], Any], Callable[[Any], object], Callable[[Any], None]]


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    """Fastest wall time of `repeat` runs, in seconds (least disturbed by neighbours)."""
    return best_of_timed(repeat, (lambda: None, lambda _: fn(), lambda _: None))


def best_of_timed(repeat: int, timed: Timed) -> float:
    """Like best_of, timing only the middle of (setup, run, teardown)."""
    setup, run, teardown = timed
    times = []
    for _ in range(repeat):
        state = setup()
        start = time.perf_counter()
        run(state)
        times.append(time.perf_counter() - start)
        teardown(state)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="input size in MiB (default 200)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best kept)")
    args = parser.parse_args()
    size = args.mb * 1024 * 1024

    work = Path(tempfile.mkdtemp(prefix="bench-unixfs-"))
    try:
        src = work / "input.bin"
        with src.open("wb") as sink:  # random bytes: like compressed Parquet, incompressible
            for _ in range(0, size, READ_SIZE):
                sink.write(os.urandom(READ_SIZE))

        def plain_sha256() -> None:
            h = hashlib.sha256()
            with src.open("rb") as f:
                while chunk := f.read(READ_SIZE):
                    h.update(chunk)

        def chunk_and_hash() -> None:
            with src.open("rb") as f:
                unixfs.add_file(f, discard)

        counter = iter(range(10**6))

        def chunk_hash_store(fsync: bool, verify: bool = True, fresh: bool = False) -> Timed:
            """Store every block; by default into a store whose shard directories exist
            (a long-lived node), else into a fresh one (mkdir per new shard)."""

            def setup() -> FsBlockstore:
                store = FsBlockstore(work / f"blocks-{next(counter)}", fsync=fsync)
                if not fresh:
                    for a in BASE32_ALPHABET:
                        for b in BASE32_ALPHABET:
                            (store.root / (a + b)).mkdir()
                return store

            def run(store: FsBlockstore) -> None:
                def put(cid: CID, data: bytes) -> None:
                    store.put(cid, data, verify=verify)

                with src.open("rb") as f:
                    unixfs.add_file(f, put)

            def teardown(store: FsBlockstore) -> None:
                shutil.rmtree(store.root)

            return setup, run, teardown

        def plain_files(fsync: bool) -> Timed:
            """The filesystem's ceiling: each 256 KiB chunk written to its own file."""

            def setup() -> Path:
                d = work / f"plain-{next(counter)}"
                d.mkdir()
                return d

            def run(d: Path) -> None:
                with src.open("rb") as f:
                    for i, chunk in enumerate(iter(lambda: f.read(unixfs.CHUNK_SIZE), b"")):
                        fd = os.open(d / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                        os.write(fd, chunk)
                        if fsync:
                            os.fsync(fd)
                        os.close(fd)

            return setup, run, shutil.rmtree

        # A CAR of the file, decoded as the network side would: 64 KiB at a time.
        store = FsBlockstore(work / "car-src", fsync=False)
        with src.open("rb") as f:
            root, _, _ = unixfs.add_file(f, store.put)
        car_path = work / "file.car"
        with car_path.open("wb") as car_file:
            car.write_car(car_file, [root], unixfs.walk(store.get, root))
        car_bytes = car_path.read_bytes()
        shutil.rmtree(store.root)

        def decode_car() -> None:
            dec = car.CarDecoder()
            view = memoryview(car_bytes)
            for i in range(0, len(view), FEED_SIZE):
                dec.feed(view[i : i + FEED_SIZE])
            dec.close()

        def sha256_car() -> None:
            h = hashlib.sha256()
            view = memoryview(car_bytes)
            for i in range(0, len(view), FEED_SIZE):
                h.update(view[i : i + FEED_SIZE])

        base = best_of(args.repeat, plain_sha256)
        rows = [("chunk+hash (add_file, put discards)", best_of(args.repeat, chunk_and_hash))]
        cases: list[tuple[str, Timed]] = [
            ("disk ceiling: a file per chunk, no hash, fsync", plain_files(True)),
            ("disk ceiling: a file per chunk, no hash, no fsync", plain_files(False)),
            ("+ store: FsBlockstore.put (verify, fsync)", chunk_hash_store(True)),
            ("+ store: verify, no fsync", chunk_hash_store(False)),
            ("+ store: verify=False, fsync", chunk_hash_store(True, verify=False)),
            ("+ store: verify=False, no fsync", chunk_hash_store(False, verify=False)),
            ("+ store: verify, fsync, fresh store", chunk_hash_store(True, fresh=True)),
        ]
        rows += [(name, best_of_timed(args.repeat, timed)) for name, timed in cases]
        car_base = best_of(args.repeat, sha256_car)
        car_time = best_of(args.repeat, decode_car)

        setup, run, teardown = chunk_hash_store(True)
        state = setup()
        tracemalloc.start()
        run(state)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        teardown(state)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mib = size / (1024 * 1024)
    print(f"input: {mib:.0f} MiB of random bytes; best of {args.repeat} runs")
    print(f"{'baseline hashlib.sha256 (file reads)':50s} {mib / base:8.1f} MiB/s  ratio 1.00")
    for name, seconds in rows:
        print(f"{name:50s} {mib / seconds:8.1f} MiB/s  ratio {base / seconds:.2f}")
    print(f"{'baseline hashlib.sha256 (CAR bytes, 64 KiB)':50s} {mib / car_base:8.1f} MiB/s")
    print(
        f"{'CarDecoder.feed 64 KiB pieces (verifying)':50s} {mib / car_time:8.1f} MiB/s  "
        f"ratio {car_base / car_time:.2f}"
    )
    print(
        f"peak traced memory, chunk+hash+store: {peak / 1024:.0f} KiB "
        f"({peak / size:.2%} of the input)"
    )


if __name__ == "__main__":
    main()
