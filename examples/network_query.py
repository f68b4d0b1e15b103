"""A cross-node query: three `benchsync up` processes, one SQL question, one merged answer.

Starts three real nodes on 127.0.0.1 (each with its own temporary data
directory, as `benchsync demo` does), records a different machine's results
on each through its control API, and asks node 0 a `network`-scope query:
node 0 plans it, runs the per-node part on every node at once, and merges the
partial answers, so the result equals what one database holding every node's
rows would return. The answer lists every node's status: a node that did not
answer is reported, never silently left out.

No snapshot or replication is needed for a network query; compare with
examples/two_nodes_sync.py (replicas scope, no network round trip).

    python examples/network_query.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from benchsync.daemon.demo import HARDWARE, render_table, sample_results, start_lab

NODES = 3
PER_NODE = 50  # results recorded on each node
QUERY_TIMEOUT = 10.0  # seconds node 0 waits for its peers

# Grouping uses values (model name, hardware type), never local ids, which
# collide across nodes. median() cannot be merged from per-node medians; the
# planner sees that and ships the rows it needs instead. Latencies are stored
# as 32-bit floats: cast before rounding, or 2.14 prints as 2.140000104904175.
SQL = """
SELECT h.hardware_type, count(*) AS runs,
       round(avg(p.throughput_items_per_second), 1) AS mean_items_per_s,
       round(median(p.average_latency_ms::DOUBLE), 2) AS median_latency_ms
FROM performance_results p
JOIN hardware_platforms h ON p.hardware_id = h.hardware_id
WHERE p.batch_size = $batch
GROUP BY h.hardware_type
ORDER BY mean_items_per_s DESC
"""


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="benchsync-example-") as tmp:
        nodes = start_lab(Path(tmp), NODES, f"example-{os.getpid()}",
                          extra_args=["--snapshot-interval", "0"])  # fmt: skip
        try:
            for i, node in enumerate(nodes):
                records = sample_results(i, PER_NODE)
                answer = node.client.post("/v1/record/perf", {"records": records})
                print(f"node{i} ({HARDWARE[i][0]:<4}) {node.peer_id[:16]}…"
                      f" recorded {answer['stored']} results")  # fmt: skip
            answer = nodes[0].client.post("/v1/query", {
                "sql": SQL, "params": {"batch": 8}, "scope": "network",
                "timeout": QUERY_TIMEOUT, "require_all": True,
            })  # fmt: skip
            print(f"\nnetwork query from node0 (plan: {answer['strategy']}):")
            print(render_table(answer["columns"], answer["rows"]))
            print("\nwho answered:")
            for p in answer["peers"]:
                who = "node0 (local)" if p["local"] else p["peer_id"][:16] + "…"
                print(f"  {who:<18} {p['status']:<9} {p['rows']} partial row(s)")
        finally:
            codes = [node.stop() for node in nodes]
    if any(codes):
        print(f"some nodes exited uncleanly: {codes}", file=sys.stderr)
        return 1
    print("\nall nodes stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
