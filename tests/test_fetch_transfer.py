"""The fetch protocol's fast paths keep its guarantees.

Covers what the sync-throughput work changed: CID text on the wire (our fast
base32 path must spell and parse exactly as multiformats does, and leave every
other spelling to multiformats), and the requester's batched receive path
(reads gathered into `IO_BATCH` batches before the worker thread decodes,
verifies and stores them) over real py-libp2p hosts on 127.0.0.1: a multi-batch
DAG arrives intact, a bad block in a later batch still gets the provider
banned while the earlier blocks stay stored, and a provider that stalls
mid-batch costs no block that arrived complete.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import multiaddr
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from multiformats import CID

import benchsync.daemon.fetch as fetch_mod
from benchsync.daemon.fetch import FetchFailed, FetchLimits
from benchsync.daemon.host import StreamReader, new_benchsync_host
from benchsync.daemon.network import P2PNode
from benchsync.protocol.fetch import (
    CAR_PROTOCOL_ID,
    MAX_FETCH_FRAME,
    FetchProtocolError,
    FetchRequest,
    FetchStatus,
    missing_blocks,
)
from benchsync.protocol.frames import Interrupted, decode_json, encode_json_frame
from benchsync.protocol.heads import Head
from benchsync.storage import car, unixfs
from benchsync.storage.blockstore import Blockstore, FsBlockstore, MemoryBlockstore
from benchsync.storage.cid import DAG_PB, RAW, block_cid, cid_text
from tests.test_p2p import LAB_KEY, join_lab

NETWORK = "lab"
TIMEOUT = 30  # seconds: bound for one two-node scenario on a loaded 2-core box
CHUNK = 256 * 1024  # bytes: a UnixFS leaf


# --- CID text -----------------------------------------------------------------------------

cids = st.builds(block_cid, st.sampled_from([RAW, DAG_PB]), st.binary(max_size=64))


@settings(max_examples=50, deadline=None)
@given(want=st.lists(cids, min_size=1, max_size=20, unique=True), root=cids)
def test_request_spells_and_parses_cids_as_multiformats_does(want: list[CID], root: CID) -> None:
    request = FetchRequest(NETWORK, root, tuple(want))
    doc = request.to_json()
    assert doc["want"] == [str(c) for c in want] and doc["root"] == str(root)
    parsed = FetchRequest.from_json(doc)
    assert parsed == request
    for ours, theirs in zip(parsed.want, want, strict=True):
        assert str(ours) == str(theirs) and bytes(ours) == bytes(theirs)


def test_other_cid_forms_still_go_through_multiformats() -> None:
    v0 = CID.decode("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG")
    assert cid_text(v0) == str(v0)
    leaf = block_cid(RAW, b"x")
    base58 = leaf.set(base="base58btc")
    assert cid_text(base58) == str(base58) and str(base58).startswith("z")
    status = FetchStatus(count=0, bytes=0, missing=(v0, base58))
    assert FetchStatus.from_json(status.to_json()).missing == (v0, leaf)


@settings(max_examples=50, deadline=None)
@given(cid=cids, position=st.integers(min_value=0, max_value=58), char=st.characters())
def test_any_respelled_cid_gets_the_multiformats_verdict(
    cid: CID, position: int, char: str
) -> None:
    text = str(cid)
    mutated = text[:position] + char + text[position + 1 :]
    for candidate in (mutated, mutated.upper(), text.upper(), text[:-1]):
        doc = {"network": NETWORK, "root": candidate, "want": [candidate]}
        try:
            expected: CID | None = CID.decode(candidate)
        except Exception:
            expected = None
        if expected is None:
            with pytest.raises(FetchProtocolError):
                FetchRequest.from_json(doc)
        else:
            assert FetchRequest.from_json(doc).root == expected


# --- the batched receive path over real hosts ---------------------------------------------


def make_dag(store: Blockstore, payload: bytes) -> CID:
    fcid, _, ftsize = unixfs.add_bytes(payload, store.put)
    root, _ = unixfs.add_directory([("results.parquet", fcid, ftsize)], store.put)
    return root


def complete(store: Blockstore, root: CID) -> bool:
    return not missing_blocks(root, store.has, store.get)


def p2p_node(
    tmp: Path, name: str, store: Blockstore | None = None, limits: FetchLimits | None = None
) -> P2PNode:
    blocks = store or FsBlockstore(tmp / name / "blocks", fsync=False)
    return P2PNode(tmp / name, network=NETWORK, blockstore=blocks, retry_delay=0.2, limits=limits,
                   lab_key=LAB_KEY)  # fmt: skip


class CorruptsOneLeaf(MemoryBlockstore):
    """Serves every block right except one leaf, which gets a flipped byte."""

    bad: CID | None = None

    def get(self, cid: CID) -> bytes:
        data = super().get(cid)
        return data[:-1] + bytes([data[-1] ^ 0xFF]) if cid == self.bad else data


async def test_multi_batch_dag_arrives_verified_and_intact(tmp_path: Path) -> None:
    a, b = p2p_node(tmp_path, "a"), p2p_node(tmp_path, "b")
    payload = os.urandom(12 * CHUNK + 1000)  # 13 leaves: > 3 batches of IO_BATCH
    root = make_dag(a.blockstore, payload)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            await b.connect(a.addrs[0])
            result = await b.fetcher.fetch(root, [a.peer_id])
            nursery.cancel_scope.cancel()
    assert result.providers_used == [a.peer_id]
    assert complete(b.blockstore, root)
    leaf_file = unixfs.resolve(b.blockstore.get, root, "results.parquet")
    assert b"".join(unixfs.cat(b.blockstore.get, leaf_file)) == payload
    held = {cid: data for cid, data in unixfs.walk(a.blockstore.get, root)}
    assert result.stats.block_bytes == sum(len(d) for d in held.values())
    assert result.stats.blocks == len(held)


async def test_bad_block_in_a_later_batch_bans_and_keeps_the_earlier_blocks(
    tmp_path: Path,
) -> None:
    liar_store = CorruptsOneLeaf()
    liar, r = p2p_node(tmp_path, "liar", liar_store), p2p_node(tmp_path, "r")
    root = make_dag(liar_store, os.urandom(12 * CHUNK))
    leaves = [c for c, _ in unixfs.walk(liar_store.get, root) if c.codec.name == "raw"]
    liar_store.bad = leaves[9]  # in the third 1 MiB batch
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(liar.run)
            await nursery.start(r.run)
            await r.connect(liar.addrs[0])
            with pytest.raises(FetchFailed, match="misbehaved"):
                await r.fetcher.fetch(root, [liar.peer_id])
            nursery.cancel_scope.cancel()
    assert r.policy.is_banned(liar.peer_id)
    assert all(r.blockstore.has(c) for c in leaves[:9])
    assert not any(r.blockstore.has(c) for c in leaves[9:])


async def test_provider_stalling_mid_batch_costs_no_complete_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch_mod, "STALL_TIMEOUT", 0.5)
    source = MemoryBlockstore()
    root = make_dag(source, os.urandom(3 * CHUNK))
    leaves = [c for c, _ in unixfs.walk(source.get, root) if c.codec.name == "raw"]
    # Two whole leaves (512 KiB: under one IO_BATCH) and half of the third, then silence.
    sent = [car.encode_section(c, source.get(c)) for c in leaves]
    partial = sent[0] + sent[1] + sent[2][: CHUNK // 2]
    release = trio.Event()

    async def stalling_provider(stream: INetStream) -> None:
        body = await StreamReader(stream, max_frame=MAX_FETCH_FRAME).frame()
        request = FetchRequest.from_json(decode_json(body))
        assert list(request.want) == leaves
        status = FetchStatus(count=3, bytes=3 * CHUNK, missing=())
        await stream.write(
            encode_json_frame(status.to_json()) + car.encode_header([root]) + partial
        )
        await release.wait()

    host = new_benchsync_host(create_new_key_pair())
    join_lab(host, LAB_KEY)  # a scripted provider inside the lab
    r = p2p_node(tmp_path, "r")
    with trio.fail_after(TIMEOUT):
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            host.set_stream_handler(TProtocol(CAR_PROTOCOL_ID), stalling_provider)
            async with trio.open_nursery() as nursery:
                await nursery.start(r.run)
                await r.connect(f"{host.get_addrs()[0]}/p2p/{host.get_id()}")
                with pytest.raises(Interrupted, match="no data"):
                    await r.fetcher.fetch_round(host.get_id(), root, leaves)
                release.set()
                nursery.cancel_scope.cancel()
            await host.close()
    assert r.blockstore.has(leaves[0]) and r.blockstore.has(leaves[1])
    assert not r.blockstore.has(leaves[2])
    assert not r.policy.is_banned(host.get_id().to_base58())


async def test_nodes_with_different_response_limits_sync_without_banning(
    tmp_path: Path,
) -> None:
    # The provider would fill a response up to 1 GiB; the requester takes 1 MiB.
    # The snapshot (12 chunks, 3 MiB) is larger than the smaller limit.
    a = p2p_node(tmp_path, "a", limits=FetchLimits(max_response=1024 * 1024 * 1024))
    b = p2p_node(tmp_path, "b", limits=FetchLimits(max_response=1024 * 1024))
    root = make_dag(a.blockstore, os.urandom(12 * CHUNK))
    size = sum(len(d) for _, d in unixfs.walk(a.blockstore.get, root))
    head = Head(a.peer_id, 1, root, root, time.time(), size)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            await a.announce(head)
            await b.connect(a.addrs[0])
            await b.wait_until(lambda: b.syncer.installed(a.peer_id) == head)
            nursery.cancel_scope.cancel()
    assert complete(b.blockstore, root)
    assert not b.policy.is_banned(a.peer_id)
    assert b.fetcher.stats.rounds >= 4  # the leaves came in several 1 MiB responses
