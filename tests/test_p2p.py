"""Multi-node tests of the peer-to-peer side: real py-libp2p hosts on 127.0.0.1.

Every node has its own data directory (identity key) and its own filesystem
blockstore in tmp_path; DAGs are real UnixFS snapshots-shaped DAGs
(`manifest.json` + `tables/results.parquet`) of a few hundred KB.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.abc import IHost, INetStream
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from multiformats import CID

from benchsync.daemon.host import AccessPolicy, new_stream
from benchsync.daemon.lab import Lab
from benchsync.daemon.network import P2PNode
from benchsync.daemon.streams import StreamAdapter
from benchsync.protocol.fetch import CAR_PROTOCOL_ID, missing_blocks
from benchsync.protocol.frames import Refused
from benchsync.protocol.heads import Head, encode_head
from benchsync.storage import unixfs
from benchsync.storage.blockstore import Blockstore, FsBlockstore, MemoryBlockstore

NETWORK = "lab"
LAB_KEY = bytes(range(32))  # every node of these tests is in one lab (tests/test_lab.py: strangers)
TIMEOUT = 20  # seconds: generous bound for one multi-node scenario on a loaded 2-core box
CHUNK = 256 * 1024


def make_dag(store: Blockstore, payload: bytes, label: str) -> tuple[CID, CID, int]:
    """Store a snapshot-shaped UnixFS DAG; returns (root, tables CID, DAG bytes)."""
    fcid, _size, ftsize = unixfs.add_bytes(payload, store.put)
    tables, ttsize = unixfs.add_directory([("results.parquet", fcid, ftsize)], store.put)
    mcid, _msize, mtsize = unixfs.add_bytes(f'{{"label": "{label}"}}'.encode(), store.put)
    root, rtsize = unixfs.add_directory(
        [("manifest.json", mcid, mtsize), ("tables", tables, ttsize)], store.put
    )
    return root, tables, rtsize


def head_for(node: P2PNode, seq: int, dag: tuple[CID, CID, int]) -> Head:
    root, tables, size = dag
    return Head(node.peer_id, seq, root, tables, time.time(), size)


def dag_cids(store: Blockstore, root: CID) -> set[CID]:
    return {cid for cid, _ in unixfs.walk(store.get, root)}


def complete(store: Blockstore, root: CID) -> bool:
    return not missing_blocks(root, store.has, store.get)


class Node:
    """A P2PNode plus what the test needs to watch it."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        *,
        store: Blockstore | None = None,
        network: str = NETWORK,
        **p2p_kwargs: Any,
    ) -> None:
        self.home = tmp / name
        self.store = store or FsBlockstore(tmp / name / "blocks", fsync=False)
        self.completed: list[Head] = []

        async def on_complete(head: Head) -> None:
            # The installer's contract: called only for a complete DAG.
            assert complete(self.store, head.root), "on_complete called for a partial DAG"
            self.completed.append(head)

        p2p_kwargs.setdefault("lab_key", LAB_KEY)
        self.p2p = P2PNode(
            self.home,
            network=network,
            blockstore=self.store,
            on_complete=on_complete,
            retry_delay=0.2,
            **p2p_kwargs,
        )

    @property
    def peer_id(self) -> str:
        return self.p2p.peer_id

    def installed(self, dataset: str) -> Head | None:
        return self.p2p.syncer.installed(dataset)


@asynccontextmanager
async def running(*nodes: Node) -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        for n in nodes:
            await nursery.start(n.p2p.run)
        yield nursery
        nursery.cancel_scope.cancel()


def join_lab(host: IHost, key: bytes = LAB_KEY) -> Lab:
    """Make a bare scripted host answer the membership proof as a member holding `key`."""
    policy = AccessPolicy()
    lab = Lab((key,), me=host.get_id().to_base58(), policy=policy)
    lab.attach(StreamAdapter(host, network=NETWORK, policy=policy, membership=lab))
    return lab


async def wait_for(node: Node, predicate: Callable[[], bool]) -> None:
    await node.p2p.wait_until(predicate)


async def test_identity_is_persistent_and_private(tmp_path: Path) -> None:
    a = Node(tmp_path, "a")
    key = a.home / "identity.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    b = Node(tmp_path, "a")  # same data directory: same peer ID
    assert b.peer_id == a.peer_id
    assert Node(tmp_path, "c").peer_id != a.peer_id


def next_version(payload: bytes) -> bytes:
    """The payload with ~1% appended: earlier chunks stay byte-identical."""
    return payload + os.urandom(max(1, len(payload) // 100))


def all_installed(n: Node, heads: dict[str, Head]) -> Callable[[], bool]:
    """A predicate: `n` has installed every head of `heads` but its own."""
    snapshot = dict(heads)
    return lambda: all(n.installed(p) == h for p, h in snapshot.items() if p != n.peer_id)


async def test_five_nodes_converge_over_gossip_and_a_late_joiner_catches_up(
    tmp_path: Path,
) -> None:
    early = [Node(tmp_path, f"n{i}") for i in range(4)]
    # 3 chunks each: appending 1% rewrites only the last chunk and the inner nodes.
    payloads = {n.peer_id: os.urandom(600_000 + i * 1000) for i, n in enumerate(early)}
    heads = {
        n.peer_id: head_for(n, 1, make_dag(n.store, payloads[n.peer_id], "v1")) for n in early
    }
    with trio.fail_after(TIMEOUT):
        async with running(*early):
            # Heads announced before anyone connects are learnt by asking on connect.
            for n in early:
                await n.p2p.announce(heads[n.peer_id])
            hub = early[0].p2p.addrs[0]
            for n in early[1:]:
                await n.p2p.connect(hub)
            for n in early:
                await wait_for(n, all_installed(n, heads))

            # Version 2 of every dataset travels by gossip only (connections exist,
            # nobody asks): leaves reach each other's heads through the hub's mesh.
            before = {n.peer_id: n.p2p.fetcher.stats.block_bytes for n in early}
            for n in early:
                payloads[n.peer_id] = next_version(payloads[n.peer_id])
                heads[n.peer_id] = head_for(n, 2, make_dag(n.store, payloads[n.peer_id], "v2"))
                await n.p2p.announce(heads[n.peer_id])
            for n in early:
                await wait_for(n, all_installed(n, heads))
            for n in early:
                moved = n.p2p.fetcher.stats.block_bytes - before[n.peer_id]
                # 3 datasets of ~600 KB each grew by 1%: the last chunk (~90 KB)
                # and the inner nodes move, never the first two chunks again.
                assert 0 < moved < 3 * 120_000, moved

            # A late joiner, given one bootstrap peer, gets every head by asking,
            # and everyone gets its head.
            late = Node(tmp_path, "late", bootstrap=[early[2].p2p.addrs[0]])
            nodes = [*early, late]
            heads[late.peer_id] = head_for(late, 1, make_dag(late.store, os.urandom(5000), "l"))
            late.p2p.set_local_head(heads[late.peer_id])
            async with trio.open_nursery() as inner:
                await inner.start(late.p2p.run)
                for n in nodes:
                    await wait_for(n, all_installed(n, heads))
                inner.cancel_scope.cancel()
    for n in nodes:
        for p, h in heads.items():
            assert complete(n.store, h.root), f"{n.peer_id} lacks blocks of {p}"
        got = sorted((h.dataset, h.seq) for h in n.completed)
        assert all((p, heads[p].seq) in got for p in heads if p != n.peer_id)
        for state in n.p2p.replica_states():
            assert state.lag_seq == 0 and state.last_error is None, state


async def test_restarted_node_keeps_its_peer_id_and_converges(tmp_path: Path) -> None:
    a, b = Node(tmp_path, "a"), Node(tmp_path, "b")
    pa = os.urandom(600_000)
    ha = head_for(a, 1, make_dag(a.store, pa, "a1"))
    hb = head_for(b, 1, make_dag(b.store, os.urandom(150_000), "b1"))
    with trio.fail_after(TIMEOUT):
        async with running(a) as nursery:
            await a.p2p.announce(ha)
            async with trio.open_nursery() as inner:
                await inner.start(b.p2p.run)
                await b.p2p.announce(hb)
                await b.p2p.connect(a.p2p.addrs[0])
                b_port = int(b.p2p.addrs[0].split("/tcp/")[1].split("/")[0])
                await wait_for(b, lambda: b.installed(a.peer_id) == ha)
                inner.cancel_scope.cancel()
            # b is down, and its shutdown closed every connection and its listener.
            assert not b.p2p.running
            assert not b.p2p.host.get_network().connections
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", b_port)
            # a moves on.
            ha2 = head_for(a, 2, make_dag(a.store, next_version(pa), "a2"))
            await a.p2p.announce(ha2)
            # b restarts from the same data directory and blockstore.
            b2 = Node(tmp_path, "b", store=b.store)
            assert b2.peer_id == b.peer_id
            b2.p2p.set_local_head(hb)
            await nursery.start(b2.p2p.run)
            await b2.p2p.connect(a.p2p.addrs[0])
            await wait_for(b2, lambda: b2.installed(a.peer_id) == ha2)
            await wait_for(a, lambda: a.installed(b.peer_id) == hb)
            assert complete(b2.store, ha2.root)
            # Only the new blocks moved after the restart: v1's chunks were kept.
            assert 0 < b2.p2p.fetcher.stats.block_bytes < 120_000


class CorruptingStore(MemoryBlockstore):
    """A liar's blockstore: holds the right blocks, serves them with one byte flipped."""

    def get(self, cid: CID) -> bytes:
        data = bytearray(super().get(cid))
        data[-1] ^= 0xFF
        return bytes(data)


def copy_dag(src: Blockstore, dst: Blockstore, root: CID) -> None:
    for cid, data in unixfs.walk(src.get, root):
        dst.put(cid, data)


async def test_lying_provider_is_banned_and_blocks_come_from_an_honest_one(
    tmp_path: Path,
) -> None:
    a, liar, r = Node(tmp_path, "a"), Node(tmp_path, "liar", store=CorruptingStore()), Node(
        tmp_path, "r"
    )
    dag = make_dag(a.store, os.urandom(700_000), "a1")
    copy_dag(a.store, liar.store, dag[0])
    with trio.fail_after(TIMEOUT):
        async with running(a, liar, r):
            await r.p2p.connect(liar.p2p.addrs[0])
            await r.p2p.connect(a.p2p.addrs[0])
            # The liar is asked first.
            result = await r.p2p.fetcher.fetch(dag[0], [liar.peer_id, a.peer_id])
            assert result.providers_used == [a.peer_id]
            assert r.p2p.policy.is_banned(liar.peer_id)
            assert liar.peer_id not in r.p2p.connected_peers()
            assert complete(r.store, dag[0])
            for cid, data in unixfs.walk(r.store.get, dag[0]):
                assert data == a.store.get(cid)
            # A banned peer that comes back is dropped again, or refused.
            try:
                await liar.p2p.fetcher.fetch_round(r.p2p.host.get_id(), dag[0], [dag[0]])
            except Refused as e:
                # Refused by r, or r hung up before the liar could prove membership.
                assert "banned" in e.reason or "not proven membership" in e.reason
            except BaseLibp2pError:
                pass  # r hung up on it as soon as it connected (dial, negotiation or stream)
            else:
                pytest.fail("a banned peer was served")


async def test_liar_owning_its_dataset_gets_nothing_stored(tmp_path: Path) -> None:
    liar, r = Node(tmp_path, "liar", store=CorruptingStore()), Node(tmp_path, "r")
    honest_copy = MemoryBlockstore()
    dag = make_dag(honest_copy, os.urandom(300_000), "liar1")
    copy_dag(honest_copy, liar.store, dag[0])
    head = head_for(liar, 1, dag)
    with trio.fail_after(TIMEOUT):
        async with running(liar, r):
            await liar.p2p.announce(head)
            await r.p2p.connect(liar.p2p.addrs[0])
            await wait_for(
                r,
                lambda: any(s.last_error for s in r.p2p.replica_states()),
            )
            state = r.p2p.replica_states()[0]
            assert state.head_seen == head and state.head_installed is None
            assert "misbehaved" in (state.last_error or "")
            assert r.p2p.policy.is_banned(liar.peer_id)
            assert not any(r.store.has(c) for c in dag_cids(honest_copy, dag[0]))
            assert r.completed == []


async def test_forged_and_stale_announcements_are_rejected(tmp_path: Path) -> None:
    m, r, victim = Node(tmp_path, "m"), Node(tmp_path, "r"), Node(tmp_path, "victim")
    d1 = make_dag(m.store, os.urandom(100_000), "m1")
    h1 = head_for(m, 1, d1)
    with trio.fail_after(TIMEOUT):
        async with running(m, r):
            await m.p2p.announce(h1)
            await r.p2p.connect(m.p2p.addrs[0])
            await wait_for(r, lambda: r.installed(m.peer_id) == h1)
            forged_dag = make_dag(m.store, os.urandom(50_000), "forged")
            forged = Head(victim.peer_id, 7, forged_dag[0], forged_dag[1], time.time(), 1)
            stale = Head(m.peer_id, 0, forged_dag[0], forged_dag[1], time.time(), 1)
            fork = Head(m.peer_id, 1, forged_dag[0], forged_dag[1], time.time(), 1)
            topic = m.p2p.announcer.topic
            for i, bad in enumerate([encode_head(forged), encode_head(stale), encode_head(fork),
                                     b"not json", b"x" * 5000]):
                # Gossip is lossy until the mesh forms: publish until r has judged it.
                while r.p2p.announcer.rejected <= i:
                    await m.p2p.announcer.pubsub.publish(topic, bad)
                    with trio.move_on_after(0.5):
                        await r.p2p.announcer.wait_rejected(i + 1)
            assert r.p2p.announcer.rejected == 5
            # Nothing of it touched r: no state for the victim, m's head unchanged,
            # no forged block fetched.
            assert victim.peer_id not in {s.dataset for s in r.p2p.replica_states()}
            assert r.p2p.announcer.book.get(m.peer_id) == h1
            assert not r.store.has(forged_dag[0])
            # m's genuine next head is still accepted.
            h2 = head_for(m, 2, make_dag(m.store, os.urandom(100_000), "m2"))
            await m.p2p.announce(h2)
            await wait_for(r, lambda: r.installed(m.peer_id) == h2)


async def test_untrusted_peer_and_other_network_are_refused(tmp_path: Path) -> None:
    a, u = Node(tmp_path, "a"), Node(tmp_path, "u")
    other = Node(tmp_path, "o", network="elsewhere")
    r = Node(tmp_path, "r", trusted_peers={a.peer_id, other.peer_id}, reannounce_interval=0.2)
    da = make_dag(a.store, os.urandom(100_000), "a1")
    du = make_dag(u.store, os.urandom(100_000), "u1")
    dr = make_dag(r.store, os.urandom(100_000), "r1")
    ha, hu = head_for(a, 1, da), head_for(u, 1, du)
    u.p2p.announcer.reannounce_interval = 0.2
    with trio.fail_after(TIMEOUT):
        async with running(a, u, other, r):
            await r.p2p.announce(head_for(r, 1, dr))
            await a.p2p.announce(ha)
            await u.p2p.announce(hu)
            await u.p2p.connect(r.p2p.addrs[0])
            await a.p2p.connect(r.p2p.addrs[0])
            await other.p2p.connect(r.p2p.addrs[0])
            r_id = r.p2p.host.get_id()
            with pytest.raises(Refused, match="trusted_peers"):
                await u.p2p.fetcher.fetch_round(r_id, dr[0], [dr[0]])
            with pytest.raises(Refused, match="trusted_peers"):
                await u.p2p.announcer.request_head(r_id)
            with pytest.raises(Refused, match="wrong network"):
                await other.p2p.fetcher.fetch_round(r_id, dr[0], [dr[0]])
            with pytest.raises(Refused, match="wrong network"):
                await other.p2p.announcer.request_head(r_id)
            # The trusted peer is followed; u's re-announcements are rejected.
            await wait_for(r, lambda: r.installed(a.peer_id) == ha)
            listed = {p.peer_id: p for p in r.p2p.peers()}
            assert listed[a.peer_id].trusted and listed[a.peer_id].head == ha
            assert not listed[u.peer_id].trusted and listed[u.peer_id].head is None
            await r.p2p.announcer.wait_rejected(1)
            assert {s.dataset for s in r.p2p.replica_states()} == {a.peer_id}
            assert not r.store.has(du[0])
            # Extra protocols (the query server's) get the same gate.
            got: list[str] = []

            async def echo(stream: INetStream) -> None:
                got.append("served")

            r.p2p.add_stream_handler("/benchsync/query/1.0.0", echo)
            stream = await u.p2p.open_stream(r.peer_id, "/benchsync/query/1.0.0")
            reply = await stream.read(4096)
            assert b"trusted_peers" in reply and got == []
            await stream.close()


async def test_provider_killed_mid_fetch_another_holder_completes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import benchsync.daemon.fetch as fetch_mod

    # Write block by block so the kill lands between blocks of one response.
    monkeypatch.setattr(fetch_mod, "IO_BATCH", CHUNK)
    armed = [False]
    a_node: list[Node] = []

    class KillOnFourthLeaf(MemoryBlockstore):
        leaves_read = 0

        def get(self, cid: CID) -> bytes:
            if armed[0] and cid.codec.name == "raw":
                self.leaves_read += 1
                if self.leaves_read == 4:
                    trio.from_thread.run_sync(a_node[0].p2p.stop)
            return super().get(cid)

    a = Node(tmp_path, "a", store=KillOnFourthLeaf())
    a_node.append(a)
    b, c = Node(tmp_path, "b"), Node(tmp_path, "c")
    dag = make_dag(a.store, os.urandom(8 * CHUNK + 1000), "a1")
    head = head_for(a, 1, dag)
    with trio.fail_after(TIMEOUT):
        async with running(b, c) as nursery:
            await nursery.start(a.p2p.run)
            await a.p2p.announce(head)
            await b.p2p.connect(a.p2p.addrs[0])
            await wait_for(b, lambda: b.installed(a.peer_id) == head)
            armed[0] = True
            # The writer first: b's head response would otherwise make c fetch from b
            # at once (fast catch-up), and a would never be asked.
            await c.p2p.connect(a.p2p.addrs[0])
            await c.p2p.connect(b.p2p.addrs[0])
            await wait_for(c, lambda: c.installed(a.peer_id) == head)
            assert not a.p2p.running, "the provider was not killed mid-fetch"
    assert complete(c.store, dag[0])
    total = sum(len(d) for _, d in unixfs.walk(c.store.get, dag[0]))
    # Blocks received from a before it died were kept: nothing was fetched twice.
    assert c.p2p.fetcher.stats.block_bytes == total
    assert a.p2p.provider.served.blocks > 0
    assert c.completed == [head]


async def test_a_wedged_connection_is_severed_and_the_next_fetch_dials_afresh(
    tmp_path: Path,
) -> None:
    a, b = Node(tmp_path, "a"), Node(tmp_path, "b")
    dag = make_dag(b.store, os.urandom(3 * CHUNK), "b1")
    b_id = ID.from_base58(b.peer_id)
    with trio.fail_after(TIMEOUT):
        async with running(a, b) as nursery:
            await a.p2p.connect(b.p2p.addrs[0])
            network = a.p2p.host.get_network()
            (conn,) = network.get_connections(b_id)
            # A writer holds the connection's write lock, as one waiting on a full socket
            # does (until the socket closes): py-libp2p's read loop then cannot even
            # acknowledge a new stream.
            wedged, socket_closed = trio.Event(), trio.Event()
            secured = conn.muxed_conn.secured_conn  # type: ignore[attr-defined]
            close_socket = secured.close

            async def close() -> None:
                socket_closed.set()
                await close_socket()

            secured.close = close

            async def hold_the_write_lock() -> None:
                async with conn.muxed_conn._write_lock:  # type: ignore[attr-defined]
                    wedged.set()
                    await socket_closed.wait()

            nursery.start_soon(hold_the_write_lock)
            await wedged.wait()
            with pytest.raises(trio.TooSlowError):
                await new_stream(a.p2p.host, b_id, [CAR_PROTOCOL_ID], 1.0)
            while conn in network.get_connections(b_id):  # under the test's deadline
                await trio.sleep(0.05)
            # The next fetch dials a new connection (before, it waited on the old one forever).
            await a.p2p.fetcher.fetch(dag[0], [b.peer_id])
    assert complete(a.store, dag[0])


def test_access_policy_trust_and_temporary_bans() -> None:
    open_policy = AccessPolicy(set())
    assert open_policy.refusal("anyone") is None
    strict = AccessPolicy({"alice"}, ban_duration=3600)
    assert strict.refusal("alice") is None
    assert "trusted_peers" in (strict.refusal("mallory") or "")
    strict.ban("alice", "sent a corrupt block")
    assert "banned" in (strict.refusal("alice") or "")
    assert strict.banned_peers() == {"alice": "sent a corrupt block"}
    expired = AccessPolicy(set(), ban_duration=0.0)
    expired.ban("bob", "garbage")
    assert expired.refusal("bob") is None, "a ban must end"
