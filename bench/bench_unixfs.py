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

from benchsync.storage import car, unixfs
from benchsync.storage.blockstore import FsBlockstore
from multiformats import CID

READ_SIZE = 1024 * 1024  # bytes per read of the input file
FEED_SIZE = 64 * 1024  # bytes per CarDecoder.feed (a typical network read)


def discard(cid: CID, data: bytes) -> None:
    pass


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    """Fastest wall time of `repeat` runs, in seconds (least disturbed by neighbours)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
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
        with src.open("wb") as f:  # random bytes: like compressed Parquet, incompressible
            for _ in range(0, size, READ_SIZE):
                f.write(os.urandom(READ_SIZE))

        def plain_sha256() -> None:
            h = hashlib.sha256()
            with src.open("rb") as f:
                while chunk := f.read(READ_SIZE):
                    h.update(chunk)

        def chunk_and_hash() -> None:
            with src.open("rb") as f:
                unixfs.add_file(f, discard)

        counter = iter(range(10**6))

        def chunk_hash_store(fsync: bool) -> Callable[[], None]:
            def run() -> None:
                store = FsBlockstore(work / f"blocks-{next(counter)}", fsync=fsync)
                with src.open("rb") as f:
                    unixfs.add_file(f, store.put)
                shutil.rmtree(store.root)

            return run

        # A CAR of the file, decoded as the network side would: 64 KiB at a time.
        with src.open("rb") as f:
            root, _, _ = unixfs.add_file(f, lambda c, d: None)
        store = FsBlockstore(work / "car-src", fsync=False)
        with src.open("rb") as f:
            unixfs.add_file(f, store.put)
        car_path = work / "file.car"
        with car_path.open("wb") as out:
            car.write_car(out, [root], unixfs.walk(store.get, root))
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
        rows = [
            ("chunk+hash (add_file, put discards)", best_of(args.repeat, chunk_and_hash)),
            ("chunk+hash+store, FsBlockstore fsync", best_of(args.repeat, chunk_hash_store(True))),
            ("chunk+hash+store, FsBlockstore no fsync", best_of(args.repeat, chunk_hash_store(False))),
        ]
        car_base = best_of(args.repeat, sha256_car)
        car_time = best_of(args.repeat, decode_car)

        tracemalloc.start()
        chunk_hash_store(True)()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mib = size / (1024 * 1024)
    print(f"input: {mib:.0f} MiB of random bytes; best of {args.repeat} runs")
    print(f"{'baseline hashlib.sha256 (file reads)':44s} {mib / base:8.1f} MiB/s  ratio 1.00")
    for name, seconds in rows:
        print(f"{name:44s} {mib / seconds:8.1f} MiB/s  ratio {base / seconds:.2f}")
    print(f"{'baseline hashlib.sha256 (CAR bytes, 64 KiB)':44s} {mib / car_base:8.1f} MiB/s")
    print(
        f"{'CarDecoder.feed 64 KiB pieces (verifying)':44s} {mib / car_time:8.1f} MiB/s  "
        f"ratio {car_base / car_time:.2f}"
    )
    print(f"peak traced memory, chunk+hash+store: {peak / 1024:.0f} KiB ({peak / size:.2%} of input)")


if __name__ == "__main__":
    main()
