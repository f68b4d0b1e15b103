"""Bitswap between real py-libp2p hosts on 127.0.0.1: our server, our client, hostile peers.

Nodes in different labs (another lab key) are strangers: between them blocks
can only move over Bitswap, and only when the serving node has
`bitswap_serve = all`. A bare host speaking the wire format by hand plays the
hostile IPFS peer (a flood of unknown wants; a peer that never reads).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr
from multiformats import CID

from benchsync.daemon.host import new_benchsync_host, read_some
from benchsync.daemon.network import GetFailed
from benchsync.protocol.bitswap import (
    BITSWAP_120,
    WANT_BLOCK,
    WANT_HAVE,
    Message,
    MessageDecoder,
    WantEntry,
    encode_message,
    frame,
)
from benchsync.protocol.bitswap_ledger import MAX_WANTS
from benchsync.storage import dagpb, unixfs
from benchsync.storage.blockstore import Blockstore
from benchsync.storage.cid import RAW, block_cid
from tests.test_p2p import TIMEOUT, Node, complete, dag_cids, running

OTHER_KEY = bytes(range(1, 33))  # another lab: the two nodes are strangers
CHUNK = 256 * 1024


def add_tree(store: Blockstore, size: int = 5 * CHUNK + 123) -> tuple[CID, bytes]:
    """A directory with a multi-chunk file and a nested directory; (root, the big file)."""
    big = os.urandom(size)
    fcid, _, ftsize = unixfs.add_bytes(big, store.put)
    scid, _, stsize = unixfs.add_bytes(b"small", store.put)
    sub, subsize = unixfs.add_directory([("note.txt", scid, stsize)], store.put)
    root, _ = unixfs.add_directory([("big.bin", fcid, ftsize), ("sub", sub, subsize)], store.put)
    return root, big


def add_v0_file(store: Blockstore, data: bytes, chunk: int = 1000) -> CID:
    """A CIDv0 file as old Kubo writes it: dag-pb leaves and root, all CIDv0."""
    def v0(block: bytes) -> CID:
        return CID("base58btc", 0, "dag-pb", b"\x12\x20" + hashlib.sha256(block).digest())

    leaves = []
    for i in range(0, len(data), chunk):
        part = data[i : i + chunk]
        block = dagpb.encode_node([], dagpb.encode_unixfs(dagpb.TYPE_FILE, data=part,
                                                          filesize=len(part)))  # fmt: skip
        cid = v0(block)
        store.put(cid, block)
        leaves.append((cid, len(block), len(part)))
    root_block = dagpb.encode_node(
        [dagpb.Link(c, "", t) for c, t, _ in leaves],
        dagpb.encode_unixfs(
            dagpb.TYPE_FILE, filesize=len(data), blocksizes=[n for *_, n in leaves]
        ),
    )
    root = v0(root_block)
    store.put(root, root_block)
    return root


def read_file(store: Blockstore, cid: CID) -> bytes:
    return b"".join(unixfs.cat(store.get, cid))


async def test_stranger_gets_a_directory_over_bitswap_when_serving_all(tmp_path: Path) -> None:
    a = Node(tmp_path, "a", bitswap_serve="all")
    b = Node(tmp_path, "b", lab_key=OTHER_KEY)
    root, big = add_tree(a.store)
    v0 = add_v0_file(a.store, os.urandom(5000))
    async with running(a, b):
        with trio.fail_after(TIMEOUT):
            got = await b.p2p.get(root, dial=[a.p2p.addrs[0]])
            got_v0 = await b.p2p.get(v0)
    assert complete(b.store, root) and dag_cids(b.store, root) == dag_cids(a.store, root)
    file_cid = unixfs.resolve(b.store.get, root, "big.bin")
    assert read_file(b.store, file_cid) == big
    assert got.bitswap_peers == [a.peer_id] and got.car_peers == []  # strangers: no CAR
    assert got.blocks == len(dag_cids(a.store, root)) and got.bytes > len(big)
    assert read_file(b.store, v0) == read_file(a.store, v0) and got_v0.blocks == 6
    assert a.p2p.bitswap.stats.blocks_sent == got.blocks + got_v0.blocks


async def test_bitswap_get_resumes_from_the_blocks_it_holds(tmp_path: Path) -> None:
    a = Node(tmp_path, "a", bitswap_serve="all")
    b = Node(tmp_path, "b", lab_key=OTHER_KEY)
    root, big = add_tree(a.store)
    blocks = list(unixfs.walk(a.store.get, root))
    held = blocks[::2]  # every other block, interior nodes and leaves alike
    for cid, data in held:
        b.store.put(cid, data)
    async with running(a, b):
        with trio.fail_after(TIMEOUT):
            got = await b.p2p.get(root, dial=[a.p2p.addrs[0]])
    assert complete(b.store, root)
    assert got.blocks == a.p2p.bitswap.stats.blocks_sent == len(blocks) - len(held)


async def test_a_failed_get_keeps_what_it_received_and_the_next_fetches_the_rest(
    tmp_path: Path,
) -> None:
    a = Node(tmp_path, "a", bitswap_serve="all")
    b = Node(tmp_path, "b", lab_key=OTHER_KEY)
    root, _ = add_tree(a.store, size=12 * CHUNK)
    blocks = dict(unixfs.walk(a.store.get, root))
    lost = [c for c in blocks if c.codec.code == RAW][-1]  # the big file's last leaf
    a.store.delete(lost)
    async with running(a, b):
        with trio.fail_after(TIMEOUT):
            with pytest.raises(GetFailed, match="no peer has block"):
                await b.p2p.get(root, dial=[a.p2p.addrs[0]])
            kept = [c for c in blocks if b.store.has(c)]
            assert kept and lost not in kept
            a.store.put(lost, blocks[lost])
            got = await b.p2p.get(root)
    assert complete(b.store, root) and got.blocks == len(blocks) - len(kept)


async def test_a_lab_node_serves_no_stranger_by_default(tmp_path: Path) -> None:
    a = Node(tmp_path, "a")  # bitswap_serve = lab
    b = Node(tmp_path, "b", lab_key=OTHER_KEY, bitswap_serve="all")
    root, _ = add_tree(a.store)
    ipfs = RawPeer()  # a plain IPFS peer: no lab proof at all
    async with running(a, b), ipfs.host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        with trio.fail_after(TIMEOUT):
            b.p2p.bitswap.stall_timeout = 2.0
            with pytest.raises(GetFailed):  # a closed lab hangs up on a stranger
                await b.p2p.get(root, dial=[a.p2p.addrs[0]])
            want = WantEntry(root, WANT_HAVE, send_dont_have=True)
            await ipfs.send(a.p2p.addrs[0], [Message(entries=(want,))])
            while a.p2p.bitswap.stats.wants_refused == 0:
                await trio.sleep(0.05)
    assert a.p2p.bitswap.stats.blocks_sent == a.p2p.bitswap.stats.presences_sent == 0
    assert ipfs.presences == 0 and not b.store.has(root)


async def test_members_get_over_car_and_resume_from_what_they_hold(tmp_path: Path) -> None:
    a, b = Node(tmp_path, "a"), Node(tmp_path, "b")
    root, _ = add_tree(a.store)
    blocks = list(unixfs.walk(a.store.get, root))
    for cid, data in blocks[: len(blocks) // 2]:  # half of it is here already
        b.store.put(cid, data)
    async with running(a, b):
        with trio.fail_after(TIMEOUT):
            got = await b.p2p.get(root, dial=[a.p2p.addrs[0]])
            again = await b.p2p.get(root)
    assert complete(b.store, root)
    assert got.car_peers == [a.peer_id] and got.bitswap_peers == []
    assert got.blocks == len(blocks) - len(blocks) // 2  # present blocks not fetched again
    assert again.present and again.blocks == 0


async def test_members_also_get_over_bitswap(tmp_path: Path) -> None:
    a, b = Node(tmp_path, "a"), Node(tmp_path, "b")
    root, big = add_tree(a.store)
    async with running(a, b):
        with trio.fail_after(TIMEOUT):
            await b.p2p.connect(a.p2p.addrs[0])
            got = await b.p2p.bitswap.fetch_dag(root, [a.peer_id])
    assert complete(b.store, root) and got.peers == [a.peer_id]


async def test_dont_have_from_every_peer_fails_fast(tmp_path: Path) -> None:
    a = Node(tmp_path, "a", bitswap_serve="all")
    b = Node(tmp_path, "b", lab_key=OTHER_KEY)
    unknown = block_cid(RAW, b"nobody has this")
    async with running(a, b):
        with trio.fail_after(5), pytest.raises(GetFailed, match="no peer has block"):
            await b.p2p.get(unknown, dial=[a.p2p.addrs[0]])


# --- hostile peers ------------------------------------------------------------------------


class RawPeer:
    """A bare libp2p host speaking Bitswap by hand; `reading=False` never reads replies."""

    def __init__(self, *, reading: bool = True) -> None:
        self.host = new_benchsync_host(create_new_key_pair())
        self.reading = reading
        self.presences = 0
        self.blocks = 0
        self.messages = 0  # replies that carried blocks

        async def handler(stream: INetStream) -> None:
            if not self.reading:
                await trio.sleep_forever()
            decoder = MessageDecoder()
            while data := await read_some(stream):
                for msg in decoder.feed(data):
                    self.presences += len(msg.presences)
                    self.blocks += len(msg.blocks)
                    self.messages += bool(msg.blocks)

        self.host.set_stream_handler(TProtocol(BITSWAP_120), handler)

    async def send(self, addr: str, messages: list[Message]) -> None:
        info = info_from_p2p_addr(Multiaddr(addr))
        await self.host.connect(info)
        stream = await self.host.new_stream(info.peer_id, [TProtocol(BITSWAP_120)])
        for msg in messages:
            await stream.write(frame(encode_message(msg)))


async def test_ten_thousand_unknown_wants_cost_only_their_own_peer(tmp_path: Path) -> None:
    a = Node(tmp_path, "a", bitswap_serve="all")
    b = Node(tmp_path, "b", lab_key=OTHER_KEY)
    root, _ = add_tree(a.store, size=20 * CHUNK)
    flood = RawPeer()
    unknown = [block_cid(RAW, f"unknown {i}".encode()) for i in range(10_000)]
    messages = [
        Message(entries=tuple(WantEntry(c, WANT_HAVE, send_dont_have=True)
                              for c in unknown[i : i + 2500]))  # fmt: skip
        for i in range(0, len(unknown), 2500)
    ]
    seen: list[int] = []
    async with running(a, b), flood.host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        flooder = ID.from_base58(flood.host.get_id().to_base58()).to_base58()

        async def watch() -> None:
            while True:
                seen.append(a.p2p.bitswap.peer_state(flooder)["wants"])
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            with trio.fail_after(TIMEOUT):
                await flood.send(a.p2p.addrs[0], messages)
                got = await b.p2p.get(root, dial=[a.p2p.addrs[0]])
            nursery.cancel_scope.cancel()
    assert complete(b.store, root) and got.bitswap_peers == [a.peer_id]
    assert max(seen) <= MAX_WANTS  # never more than its wantlist limit held for it
    stats = a.p2p.bitswap.stats
    assert stats.wants_dropped > 0  # the rest were dropped, not queued
    assert flood.presences <= 10_000 - stats.wants_dropped


async def test_a_disconnected_peers_waiting_wants_are_forgotten(tmp_path: Path) -> None:
    a = Node(tmp_path, "a", bitswap_serve="all")
    waiting = RawPeer()
    unknown = [block_cid(RAW, f"not yet {i}".encode()) for i in range(100)]
    async with running(a), waiting.host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        pid = waiting.host.get_id()
        with trio.fail_after(TIMEOUT):
            # want-block without DONT_HAVE: kept, waiting for blocks we may get one day
            await waiting.send(a.p2p.addrs[0], [Message(entries=tuple(
                WantEntry(c, WANT_BLOCK) for c in unknown))])  # fmt: skip
            while a.p2p.bitswap.peer_state(pid.to_base58())["wants"] < len(unknown):
                await trio.sleep(0.05)
            await waiting.host.disconnect(ID.from_base58(a.peer_id))
            while pid.to_base58() in a.p2p.bitswap._peers:
                await trio.sleep(0.05)
    assert a.p2p.bitswap.peer_state(pid.to_base58()) == {"wants": 0, "inflight": 0}


async def test_a_peer_that_never_reads_loses_only_its_own_stream(tmp_path: Path) -> None:
    a = Node(tmp_path, "a", bitswap_serve="all")
    b = Node(tmp_path, "b", lab_key=OTHER_KEY)
    root, big = add_tree(a.store, size=16 * CHUNK)
    a.p2p.bitswap.send_timeout = 1.0
    stuck = RawPeer(reading=False)
    leaves = [c for c, _ in unixfs.walk(a.store.get, root) if c.codec.code == RAW]
    async with running(a, b), stuck.host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        sid = stuck.host.get_id().to_base58()
        with trio.fail_after(TIMEOUT):
            await stuck.send(
                a.p2p.addrs[0], [Message(entries=tuple(WantEntry(c, WANT_BLOCK) for c in leaves))]
            )
            got = await b.p2p.get(root, dial=[a.p2p.addrs[0]])
            while a.p2p.bitswap.stats.streams_reset == 0:
                await trio.sleep(0.05)
    assert complete(b.store, root) and got.blocks > len(leaves)
    assert a.p2p.bitswap.peer_state(sid) == {"wants": 0, "inflight": 0}


async def test_each_chunk_goes_out_in_a_message_of_its_own(tmp_path: Path) -> None:
    # As boxo serves: a requester gets its first chunk after one disk read, not after a
    # batch of them (a 2 MiB message of 8 chunks made Kubo wait ~90 ms for the first).
    a = Node(tmp_path, "a", bitswap_serve="all")
    root, _ = add_tree(a.store, size=10 * CHUNK)
    leaves = [c for c, _ in unixfs.walk(a.store.get, root) if c.codec.code == RAW]
    assert len(leaves) >= 10
    peer = RawPeer()
    async with running(a), peer.host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        with trio.fail_after(TIMEOUT):
            await peer.send(
                a.p2p.addrs[0], [Message(entries=tuple(WantEntry(c, WANT_BLOCK) for c in leaves))]
            )
            while peer.blocks < len(leaves):
                await trio.sleep(0.05)
    assert peer.messages == len(leaves)


async def test_a_reply_is_written_in_pieces_of_one_noise_message_each(tmp_path: Path) -> None:
    # py-libp2p's yamux frames a 64 KiB write as 65548 bytes, which its Noise splits in two
    # (two encryptions, two socket writes); pieces of WRITE_PIECE bytes fit one message.
    from benchsync.daemon.bitswap import WRITE_PIECE, BitswapService, _Peer
    from benchsync.protocol.bitswap import Block
    from benchsync.protocol.bitswap_ledger import Ledger

    class Recorder:
        def __init__(self) -> None:
            self.writes: list[bytes] = []

        async def write(self, data: bytes) -> None:
            self.writes.append(data)

    data = os.urandom(CHUNK)
    msg = Message(blocks=(Block(block_cid(RAW, data), data),))
    service = BitswapService(None, None, streams=None, policy=None)  # type: ignore[arg-type, unused-ignore]
    stream = Recorder()
    send, recv = trio.open_memory_channel[tuple[Message, int]](1)
    async with send:
        await send.send((msg, len(data)))
    await service._write("peer", _Peer(Ledger()), recv, [stream])  # type: ignore[list-item, unused-ignore]
    assert b"".join(stream.writes) == frame(encode_message(msg, BITSWAP_120))
    assert max(map(len, stream.writes)) == WRITE_PIECE == 65519 - 12
    assert service.stats.blocks_sent == 1 and service.stats.bytes_sent == len(data)


async def test_replies_loaded_for_a_peer_that_went_away_are_not_written() -> None:
    from benchsync.daemon.bitswap import BitswapService, _Peer
    from benchsync.protocol.bitswap import Block
    from benchsync.protocol.bitswap_ledger import Ledger

    data = b"loaded before its connection closed"
    service = BitswapService(None, None, streams=None, policy=None)  # type: ignore[arg-type, unused-ignore]
    state = _Peer(Ledger(), gone=True)
    box: list[INetStream] = []  # no stream opened (host None would fail if it were)
    send, recv = trio.open_memory_channel[tuple[Message, int]](1)
    async with send:
        await send.send((Message(blocks=(Block(block_cid(RAW, data), data),)), len(data)))
    await service._write("peer", state, recv, box)
    assert box == [] and service.stats.blocks_sent == 0
