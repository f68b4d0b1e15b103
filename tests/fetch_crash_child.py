"""A requester process for tests/test_fetch_durability.py, killed (SIGKILL) at a fault point.

Usage: fetch_crash_child.py HOME PROVIDER_ADDR ROOT BATCH_BYTES POINT NTH LAB_KEY_HEX [TARGET]

Fetches ROOT from the provider into HOME/blocks (an fsynced FsBlockstore),
with `DURABLE_BATCH_BYTES` = BATCH_BYTES, and kills itself with SIGKILL the
NTH time the fetcher reaches fault point POINT ("written": a batch written,
not yet synced; "synced"). With TARGET, the leaves of the DAG's file
"results.parquet" are received into that file (`FilePlacement`). Exits 3 if
the point never came.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import trio
from multiformats import CID

import benchsync.daemon.fetch as fetch_mod
from benchsync.daemon.network import P2PNode
from benchsync.storage.blockstore import FilePlacement, FsBlockstore


def main() -> None:
    home, addr, root, batch_bytes, point, nth, lab_key, *target = sys.argv[1:]
    fetch_mod.DURABLE_BATCH_BYTES = int(batch_bytes)
    reached = [0]

    def hook(name: str) -> None:
        if name == point:
            reached[0] += 1
            if reached[0] == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)

    fetch_mod.FAULT_HOOK = hook

    async def run() -> None:
        store = FsBlockstore(Path(home) / "blocks")
        node = P2PNode(Path(home), network="lab", blockstore=store,
                       lab_key=bytes.fromhex(lab_key))  # fmt: skip
        place = None
        if target:
            out = Path(target[0])

            def place_file(path: str) -> Path | None:
                return out if path == "results.parquet" else None

            place = FilePlacement(store, CID.decode(root), place_file)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            peer = await node.connect(addr)
            await node.fetcher.fetch(CID.decode(root), [peer], place=place)
            nursery.cancel_scope.cancel()

    trio.run(run)
    sys.exit(3)


if __name__ == "__main__":
    main()
