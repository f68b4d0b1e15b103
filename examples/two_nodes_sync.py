"""A node with sync: two in-process nodes on 127.0.0.1 replicate each other's snapshots.

Node A and node B run in one trio program (`benchsync.daemon.node.Node`, the
same object `benchsync up` runs). Each records results into its own
database and takes a snapshot; each follows the other over libp2p (B
bootstraps to A), fetches the other's snapshot block by block, verifies it
and installs it as a replica. B then answers a `replicas`-scope query over
both datasets, with the `origin` of every row, without any network round
trip.

    python examples/two_nodes_sync.py
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import trio

from benchsync.daemon.config import load_config
from benchsync.daemon.demo import lab_key_file
from benchsync.daemon.node import Node

SYNC_TIMEOUT = 30.0  # seconds for both nodes to install each other's snapshot
NETWORK = "example-sync"  # nodes only talk to nodes of the same network name

RESULTS = {
    "A": [("bert-base-uncased", "cuda", "NVIDIA A100", 1200.0),
          ("whisper-tiny", "cuda", "NVIDIA A100", 310.0)],
    "B": [("bert-base-uncased", "cpu", "Intel Xeon 8380", 140.0),
          ("whisper-tiny", "cpu", "Intel Xeon 8380", 22.0),
          ("t5-small", "cpu", "Intel Xeon 8380", 95.0)],
}  # fmt: skip

# In the replicas scope every table is a union over datasets with an `origin`
# column; local ids collide across nodes, so joins match the origin too.
BY_HARDWARE = """
SELECT h.hardware_type, m.model_name, p.throughput_items_per_second AS items_per_s,
       left(p.origin, 12) || '…' AS origin
FROM performance_results p
JOIN models m USING (origin, model_id)
JOIN hardware_platforms h USING (origin, hardware_id)
ORDER BY h.hardware_type, m.model_name
"""


def make_node(home: Path, bootstrap: Sequence[str] = ()) -> Node:
    config = load_config(home, env={}, overrides={
        "network": NETWORK,
        "listen": ["/ip4/127.0.0.1/tcp/0"],  # any free port
        "bootstrap": list(bootstrap),
        "snapshot_interval": 0,  # this example snapshots explicitly
        "log_level": "warning",
        # Both nodes hold one lab key; other peers are strangers and get nothing.
        "lab_key": str(lab_key_file(home.parent)),
    })  # fmt: skip
    return Node(config)


def record(node: Node, name: str) -> int:
    for model, hw, device, throughput in RESULTS[name]:
        node.dataset.db.store_performance_result(
            model_name=model, hardware_type=hw, device_name=device, batch_size=1,
            throughput=throughput, latency_avg=1000.0 / throughput,
        )  # fmt: skip
    return len(RESULTS[name])


async def wait_installed(follower: Node, leader: Node, root: str) -> None:
    """Return once `follower` installed `leader`'s snapshot `root` (event-driven, no polling)."""

    def installed() -> bool:
        return any(r["dataset"] == leader.peer_id and r["head_installed"] == root
                   for r in follower.replicas())  # fmt: skip

    await follower.p2p.wait_until(installed)


async def main() -> int:
    with tempfile.TemporaryDirectory(prefix="benchsync-example-") as tmp:
        async with trio.open_nursery() as nursery:
            a = await trio.to_thread.run_sync(make_node, Path(tmp) / "a")
            await nursery.start(a.run)
            b = await trio.to_thread.run_sync(make_node, Path(tmp) / "b", a.p2p.addrs)
            await nursery.start(b.run)
            print(f"node A {a.peer_id} listening on {a.p2p.addrs[0]}")
            print(f"node B {b.peer_id} listening on {b.p2p.addrs[0]}")

            for name, node in (("A", a), ("B", b)):
                n = await trio.to_thread.run_sync(record, node, name)
                version, _ = await node.snapshot()
                print(f"node {name} recorded {n} results, snapshot seq {version.seq} {version.cid}")

            with trio.fail_after(SYNC_TIMEOUT):
                head_a, head_b = a.dataset.head(), b.dataset.head()
                assert head_a is not None and head_b is not None
                await wait_installed(b, a, head_a.cid)
                await wait_installed(a, b, head_b.cid)
            print("both nodes installed each other's snapshot")
            for name, node in (("A", a), ("B", b)):
                for r in node.replicas():
                    print(f"  node {name} holds replica {r['dataset'][:12]}…"
                          f" seq {r['seq_installed']}"
                          f" ({r['bytes']} bytes, lag {r['lag']})")  # fmt: skip

            table = await trio.to_thread.run_sync(
                lambda: b.dataset.query(BY_HARDWARE, scope="replicas"))
            print(f"\nnode B, replicas scope ({table.num_rows} rows from both nodes):")
            for row in table.to_pylist():
                print(f"  {row['hardware_type']:<5} {row['model_name']:<18}"
                      f" {row['items_per_s']:>8.1f} items/s  from {row['origin']}")
            nursery.cancel_scope.cancel()  # stops both nodes: hosts close, databases close
    print("\nboth nodes stopped")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(trio.run(main))
