"""Benchmarks of the peer-to-peer side (not part of the test run).

Measures, in one run on 127.0.0.1:
1. sync of a ~100 MB DAG between two nodes (announce -> every block verified
   and stored), next to a raw py-libp2p stream (same Noise + Yamux host
   configuration) moving the same number of bytes: the ratio is the figure;
2. propagation of a new head to 10 nodes (time until every node has seen it,
   and until every node has installed its DAG);
3. bytes on the wire for an incremental fetch (+1 % appended) vs the full DAG.

The provider of measurements 1 (both the raw stream and the DAG) runs in a
child process, as a real peer would: with both ends in one process, the
requester's hashing and disk-writing threads would compete for one GIL with
the provider's encryption, which no deployment does. `--same-process` measures
that configuration as well.

Run: .venv/bin/python bench/bench_sync.py [--mb 100] [--nodes 10] [--same-process]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiformats import CID

from benchsync.daemon.host import new_benchsync_host, read_some
from benchsync.daemon.network import P2PNode
from benchsync.protocol.heads import Head
from benchsync.storage import unixfs
from benchsync.storage.blockstore import Blockstore, FsBlockstore

RAW_PROTOCOL = TProtocol("/bench/raw/1.0.0")
BENCH_LAB_KEY = bytes(32)  # every node of the benchmark is in one lab
WRITE_SIZE = 256 * 1024  # bytes per write on the raw stream (one UnixFS chunk)
TIMEOUT = 600  # seconds: upper bound for any one measurement


def make_dag(store: Blockstore, payload: bytes) -> tuple[CID, CID, int]:
    fcid, _, ftsize = unixfs.add_bytes(payload, store.put)
    tables, ttsize = unixfs.add_directory([("results.parquet", fcid, ftsize)], store.put)
    mcid, _, mtsize = unixfs.add_bytes(b'{"bench": true}', store.put)
    root, rtsize = unixfs.add_directory(
        [("manifest.json", mcid, mtsize), ("tables", tables, ttsize)], store.put
    )
    return root, tables, rtsize


async def raw_stream_throughput(nbytes: int) -> float:
    """Seconds to move `nbytes` over one Noise+Yamux stream between two fresh hosts."""
    a = new_benchsync_host(create_new_key_pair())
    b = new_benchsync_host(create_new_key_pair())
    block = os.urandom(WRITE_SIZE)
    done = trio.Event()
    received = [0]

    async def sink(stream: object) -> None:
        while True:
            data = await read_some(stream)
            if not data:
                break
            received[0] += len(data)
        done.set()

    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with a.run(listen), b.run(listen):
        b.set_stream_handler(RAW_PROTOCOL, sink)
        await a.connect(info_from_p2p_addr(b.get_addrs()[0]))
        stream = await a.new_stream(b.get_id(), [RAW_PROTOCOL])
        t0 = time.perf_counter()
        sent = 0
        while sent < nbytes:
            await stream.write(block)
            sent += len(block)
        await stream.close()
        await done.wait()
        elapsed = time.perf_counter() - t0
        await a.close()
        await b.close()
    assert received[0] == sent
    return elapsed


def node(tmp: Path, name: str, **kw: object) -> P2PNode:
    store = FsBlockstore(tmp / name / "blocks", fsync=False)
    return P2PNode(tmp / name, network="bench", blockstore=store, retry_delay=0.1,
                   lab_key=BENCH_LAB_KEY, **kw)  # fmt: skip


async def dag_sync(tmp: Path, nbytes: int) -> tuple[float, int, int]:
    """Seconds from announce to a complete verified DAG at the second node."""
    a, b = node(tmp, "sa"), node(tmp, "sb")
    payload = os.urandom(nbytes)
    dag = make_dag(a.blockstore, payload)
    head = Head(a.peer_id, 1, dag[0], dag[1], time.time(), dag[2])
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        await b.connect(a.addrs[0])
        t0 = time.perf_counter()
        await a.announce(head)
        await b.wait_until(lambda: b.syncer.installed(a.peer_id) == head)
        elapsed = time.perf_counter() - t0
        stats = b.fetcher.stats
        nursery.cancel_scope.cancel()
    return elapsed, stats.block_bytes, stats.wire_in


async def incremental(tmp: Path, nbytes: int) -> tuple[int, int, int]:
    """(wire bytes of the +1 % fetch, new blocks' bytes, full DAG bytes)."""
    a, b = node(tmp, "ia"), node(tmp, "ib")
    payload = os.urandom(nbytes)
    d1 = make_dag(a.blockstore, payload)
    h1 = Head(a.peer_id, 1, d1[0], d1[1], time.time(), d1[2])
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        await a.announce(h1)
        await b.connect(a.addrs[0])
        await b.wait_until(lambda: b.syncer.installed(a.peer_id) == h1)
        old = {c for c, _ in unixfs.walk(a.blockstore.get, d1[0])}
        d2 = make_dag(a.blockstore, payload + os.urandom(nbytes // 100))
        h2 = Head(a.peer_id, 2, d2[0], d2[1], time.time(), d2[2])
        wire0 = b.fetcher.stats.wire_in + b.fetcher.stats.wire_out
        await a.announce(h2)
        await b.wait_until(lambda: b.syncer.installed(a.peer_id) == h2)
        wire = b.fetcher.stats.wire_in + b.fetcher.stats.wire_out - wire0
        blocks = list(unixfs.walk(a.blockstore.get, d2[0]))
        new = sum(len(d) for c, d in blocks if c not in old)
        full = sum(len(d) for _, d in blocks)
        nursery.cancel_scope.cancel()
    return wire, new, full


async def propagation(tmp: Path, n: int) -> tuple[float, float]:
    """(seconds until all n-1 peers saw a new head, seconds until all installed it)."""
    nodes = [node(tmp, f"p{i}", reannounce_interval=3600.0) for i in range(n)]
    src = nodes[0]
    async with trio.open_nursery() as nursery:
        for nd in nodes:
            await nursery.start(nd.run)
        # A sparse topology: each node dials the previous two (gossip must relay).
        for i, nd in enumerate(nodes[1:], start=1):
            for j in range(max(0, i - 2), i):
                await nd.connect(nodes[j].addrs[0])
        await trio.sleep(3)  # let GossipSub meshes form (heartbeat 1 s)
        dag = make_dag(src.blockstore, os.urandom(512 * 1024))
        head = Head(src.peer_id, 1, dag[0], dag[1], time.time(), dag[2])
        seen_at: dict[str, float] = {}
        t0 = time.perf_counter()
        await src.announce(head)

        async def watch(nd: P2PNode) -> None:
            await nd.wait_until(
                lambda: any(s.head_seen == head for s in nd.replica_states())
            )
            seen_at[nd.peer_id] = time.perf_counter() - t0
            await nd.wait_until(lambda: nd.syncer.installed(src.peer_id) == head)

        async with trio.open_nursery() as watchers:
            for nd in nodes[1:]:
                watchers.start_soon(watch, nd)
        installed = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    return max(seen_at.values()), installed


# --- provider in a child process ---------------------------------------------------


async def serve_child(kind: str, nbytes: int, home: str) -> None:
    """Child process: serve a raw stream or a DAG; print the address, obey stdin."""
    if kind == "raw":
        host = new_benchsync_host(create_new_key_pair())
        block = os.urandom(WRITE_SIZE)

        async def source(stream: object) -> None:
            sent = 0
            while sent < nbytes:
                await stream.write(block)  # type: ignore[attr-defined]
                sent += len(block)
            await stream.close()  # type: ignore[attr-defined]

        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            host.set_stream_handler(RAW_PROTOCOL, source)
            print(json.dumps({"addr": str(host.get_addrs()[0])}), flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)  # "quit"
            await host.close()
        return
    nd = node(Path(home), "child")
    dag = make_dag(nd.blockstore, os.urandom(nbytes))
    async with trio.open_nursery() as nursery:
        await nursery.start(nd.run)
        # The root too: bench_replica.py fetches it without an announcement.
        print(json.dumps({"addr": nd.addrs[0], "dag_bytes": dag[2], "root": str(dag[0])}),
              flush=True)  # fmt: skip
        await trio.to_thread.run_sync(sys.stdin.readline)  # "announce"
        await nd.announce(Head(nd.peer_id, 1, dag[0], dag[1], time.time(), dag[2]))
        await trio.to_thread.run_sync(sys.stdin.readline)  # "quit"
        nursery.cancel_scope.cancel()


def spawn(kind: str, nbytes: int, home: Path) -> tuple[subprocess.Popen[str], dict[str, object]]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--bytes", str(nbytes), "--home", str(home)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())


def tell(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(word + "\n")
    proc.stdin.flush()


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def raw_from_child(nbytes: int, tmp: Path, cpu: list[float] | None = None) -> float:
    """Seconds to read `nbytes` over one raw stream from a child; with `cpu`, appends the
    CPU seconds the receiver (this process) and the provider used meanwhile."""
    proc, info = await trio.to_thread.run_sync(spawn, "raw", nbytes, tmp)
    host = new_benchsync_host(create_new_key_pair())
    try:
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            peer = info_from_p2p_addr(multiaddr.Multiaddr(str(info["addr"])))
            await host.connect(peer)
            cpu0 = (time.process_time(), process_cpu(proc.pid))
            t0 = time.perf_counter()
            stream = await host.new_stream(peer.peer_id, [RAW_PROTOCOL])
            got = 0
            while data := await read_some(stream):
                got += len(data)
            elapsed = time.perf_counter() - t0
            if cpu is not None:
                cpu += [time.process_time() - cpu0[0], process_cpu(proc.pid) - cpu0[1]]
            await host.close()
        assert got >= nbytes, got
        return elapsed
    finally:
        tell(proc, "quit")
        proc.wait(10)


async def dag_from_child(nbytes: int, tmp: Path) -> tuple[float, int]:
    proc, info = await trio.to_thread.run_sync(spawn, "dag", nbytes, tmp / "child")
    b = node(tmp, "parent")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(b.run)
            peer = await b.connect(str(info["addr"]))
            t0 = time.perf_counter()
            tell(proc, "announce")
            await b.wait_until(lambda: b.syncer.installed(peer) is not None)
            elapsed = time.perf_counter() - t0
            nursery.cancel_scope.cancel()
        return elapsed, b.fetcher.stats.block_bytes
    finally:
        tell(proc, "quit")
        proc.wait(10)


async def main(mb: int, nodes: int, same_process: bool) -> None:
    nbytes = mb * 1024 * 1024
    with tempfile.TemporaryDirectory() as tmp_s, trio.fail_after(TIMEOUT):
        tmp = Path(tmp_s)
        raw_a = await raw_from_child(nbytes, tmp)
        sync_s, got = await dag_from_child(nbytes, tmp)
        raw_b = await raw_from_child(nbytes, tmp)
        raw_best = min(raw_a, raw_b)
        print(f"two processes: raw py-libp2p stream of {mb} MiB: {raw_a:.2f} s, {raw_b:.2f} s "
              f"({nbytes / raw_best / 2**20:.0f} MiB/s best); DAG sync announce -> "
              f"{got / 2**20:.0f} MiB verified and stored: {sync_s:.2f} s "
              f"({got / sync_s / 2**20:.0f} MiB/s)")
        print(f"  sync throughput / raw stream throughput = {raw_best / sync_s * got / nbytes:.2f}")
        if same_process:
            raw = await raw_stream_throughput(nbytes)
            sync_s, got, wire = await dag_sync(tmp, nbytes)
            raw2 = await raw_stream_throughput(nbytes)  # again, to see the noise
            raw_best = min(raw, raw2)
            print(f"one process: raw stream {raw:.2f} s, {raw2:.2f} s; DAG sync {sync_s:.2f} s "
                  f"({wire / 2**20:.1f} MiB on the wire) -> ratio "
                  f"{raw_best / sync_s * got / nbytes:.2f}")
        inc_wire, new, full = await incremental(tmp, max(nbytes // 4, 4 * 2**20))
        print(f"incremental fetch (+1 %): {inc_wire} bytes on the wire, new blocks {new} bytes, "
              f"full DAG {full} bytes -> wire/full = {inc_wire / full:.3f}, "
              f"wire/new = {inc_wire / new:.3f}")
        seen, installed = await propagation(tmp, nodes)
        print(f"new head to {nodes} nodes: all saw it after {seen * 1000:.0f} ms, "
              f"all installed its 512 KiB DAG after {installed * 1000:.0f} ms")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=100, help="DAG size in MiB (default 100)")
    parser.add_argument("--nodes", type=int, default=10, help="nodes for propagation (default 10)")
    parser.add_argument("--same-process", action="store_true",
                        help="also measure with both ends of the transfer in one process")
    parser.add_argument("--serve", choices=["raw", "dag"], help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(serve_child, args.serve, args.bytes, args.home)
    else:
        trio.run(main, args.mb, args.nodes, args.same_process)
