"""The fetcher's timers on trio's virtual clock: the stall timeout, and waiting for a
provider's lab membership to be proven, at exact virtual times (hosts joined by
in-memory streams, `memnet`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import pytest
import trio
import trio.testing
from libp2p.abc import INetStream
from memnet import MemoryNet, memory_net
from multiformats import CID

from benchsync.daemon.fetch import STALL_TIMEOUT, BlockProvider, Fetcher, FetchFailed
from benchsync.daemon.host import AccessPolicy, remote_peer
from benchsync.daemon.streams import MEMBERSHIP_TIMEOUT, Channel, Membership, StreamAdapter
from benchsync.protocol.fetch import (
    CAR_PROTOCOL_ID,
    Block,
    FetchRequest,
    FetchSession,
    FetchStatus,
    missing_blocks,
)
from benchsync.protocol.frames import Interrupted
from benchsync.protocol.session import RESPONDER
from benchsync.storage import unixfs
from benchsync.storage.blockstore import Blockstore, MemoryBlockstore

NETWORK = "lab"
CHUNK = 256 * 1024  # bytes: a UnixFS leaf
T = TypeVar("T")


@pytest.fixture(autouse=True)
def inline_worker_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the fetcher's and provider's worker-thread hops inline.

    The autojump clock jumps whenever every task waits, and a task waiting on a
    worker thread counts as waiting: a pending deadline (the request timeout)
    would fire while a thread hashes a block. Inline, the clock moves only
    when the protocol really waits.
    """

    async def inline(fn: Callable[..., T], *args: object, **_: object) -> T:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", inline)


def make_dag(store: Blockstore, payload: bytes) -> CID:
    fcid, _, ftsize = unixfs.add_bytes(payload, store.put)
    root, _ = unixfs.add_directory([("results.parquet", fcid, ftsize)], store.put)
    return root


def leaves_of(store: Blockstore, root: CID) -> list[CID]:
    return [c for c, _ in unixfs.walk(store.get, root) if c.codec.name == "raw"]


def fetcher_on(net: MemoryNet, store: Blockstore, membership: Membership | None = None) -> Fetcher:
    host = net.host()
    policy = AccessPolicy()
    streams = StreamAdapter(host, network=NETWORK, policy=policy, membership=membership)
    return Fetcher(host, store, network=NETWORK, policy=policy, streams=streams)


# --- the stall timeout ------------------------------------------------------------------


async def test_a_stall_fails_the_round_stall_timeout_after_the_last_byte(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = MemoryBlockstore()
    root = make_dag(source, os.urandom(3 * CHUNK))
    leaves = leaves_of(source, root)
    release = trio.Event()

    async def trickling_provider(stream: INetStream) -> None:
        # One leaf, 9 s of silence, the next, 9 s more, half the third, then nothing.
        session = FetchSession(RESPONDER)
        channel = Channel(stream, session, str(remote_peer(stream)))
        request = await channel.expect(FetchRequest)
        assert isinstance(request, FetchRequest) and list(request.want) == leaves
        await channel.send(FetchStatus(count=3, bytes=3 * CHUNK, missing=()))
        await channel.send(Block(leaves[0], source.get(leaves[0])))
        await trio.sleep(9)
        await channel.send(Block(leaves[1], source.get(leaves[1])))
        await trio.sleep(9)
        await channel.write(session.send(Block(leaves[2], source.get(leaves[2])))[: CHUNK // 2])
        await release.wait()

    async with memory_net() as net:
        provider = net.host()
        provider.set_stream_handler(CAR_PROTOCOL_ID, trickling_provider)
        fetcher = fetcher_on(net, MemoryBlockstore())
        start = trio.current_time()
        with pytest.raises(Interrupted, match=f"no data for {STALL_TIMEOUT} s"):
            await fetcher.fetch_round(provider.get_id(), root, leaves)
        # Each byte restarts the timeout: 9 + 9 s of trickle, then STALL_TIMEOUT of silence.
        assert trio.current_time() - start == 18.0 + STALL_TIMEOUT
        release.set()
    assert fetcher.store.has(leaves[0]) and fetcher.store.has(leaves[1])
    assert not fetcher.store.has(leaves[2])
    assert not fetcher.policy.is_banned(provider.get_id().to_base58())


# --- a provider still proving its lab membership ----------------------------------------


class SlowProof:
    """Lab membership whose verdict (member) arrives only when `decide()` is called."""

    def __init__(self) -> None:
        self.member = False
        self.decided = trio.Event()

    async def settle(self, peer: str) -> None:
        await self.decided.wait()

    def decide(self) -> None:
        self.member = True
        self.decided.set()

    def refusal(self, peer: str, protocol: str, *, asking: bool = False) -> str | None:
        return None if self.member else f"peer {peer} has not proven membership of this lab"

    def failure(self, peer: str) -> Exception | None:
        return None


async def provider_on(net: MemoryNet, payload: bytes) -> tuple[str, CID]:
    """A real `BlockProvider` serving a DAG of `payload`; returns its peer ID and the root."""
    host = net.host()
    store = MemoryBlockstore()
    root = make_dag(store, payload)
    provider = BlockProvider(store)
    streams = StreamAdapter(host, network=NETWORK, policy=AccessPolicy())
    streams.serve(CAR_PROTOCOL_ID, provider.new_session, provider.answer)
    return host.get_id().to_base58(), root


async def test_a_provider_mid_proof_is_waited_for_not_skipped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    proof = SlowProof()
    async with memory_net() as net:
        peer, root = await provider_on(net, os.urandom(2 * CHUNK))
        fetcher = fetcher_on(net, MemoryBlockstore(), proof)
        start = trio.current_time()

        async def verdict_later() -> None:
            await trio.sleep(3)
            proof.decide()

        net.nursery.start_soon(verdict_later)
        result = await fetcher.fetch(root, [peer])
        assert trio.current_time() - start == 3.0
    assert result.providers_used == [peer]
    assert not missing_blocks(root, fetcher.store.has, fetcher.store.get)


async def test_a_provider_never_proven_is_skipped_after_the_membership_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_net() as net:
        peer, root = await provider_on(net, os.urandom(CHUNK))
        fetcher = fetcher_on(net, MemoryBlockstore(), SlowProof())
        start = trio.current_time()
        with pytest.raises(FetchFailed, match="has not proven membership") as failed:
            await fetcher.fetch(root, [peer])
        assert trio.current_time() - start == MEMBERSHIP_TIMEOUT
    assert list(failed.value.errors) == [peer]
