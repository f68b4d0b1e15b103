"""Sybil heads: identities are free, following datasets is not.

A peer can make thousands of key pairs and sign a valid head for each one's
own dataset. The node must follow a bounded number of datasets, take new ones
from one connection only at a limited rate, back off fetches that keep
failing, and still follow honest peers (directly or relayed by a hub).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX
from multiformats import CID, multihash

from benchsync.daemon.fetch import FetchFailed, FetchResult
from benchsync.daemon.host import AccessPolicy
from benchsync.daemon.sync import Syncer
from benchsync.protocol.heads import Head, NewDatasetLimiter, encode_head
from tests.test_gossip_hostile import hostile_host, send_rpc
from tests.test_p2p import TIMEOUT, Node, head_for, make_dag, running, wait_for

SYBILS = 300  # identities the attacker makes (the measured attack used 2,000)
BATCH = 50  # messages per RPC frame


def nobodys_root(i: int) -> CID:
    """A root no node holds: every fetch of it fails."""
    return CID("base32", 1, "dag-pb", multihash.digest(b"sybil %d" % i, "sha2-256"))


def sybil_message(topic: str, i: int) -> rpc_pb2.Message:
    """A correctly signed head of a fresh identity's own dataset."""
    keys = create_new_key_pair()
    peer = ID.from_pubkey(keys.public_key)
    root = nobodys_root(i)
    head = Head(peer.to_base58(), 1, root, root, time.time(), 1000)
    msg = rpc_pb2.Message(
        from_id=peer.to_bytes(), data=encode_head(head), seqno=os.urandom(8), topicIDs=[topic]
    )
    msg.signature = keys.private_key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
    return msg


def test_new_dataset_limiter_allows_a_burst_then_a_rate_per_source() -> None:
    limiter = NewDatasetLimiter(burst=3, per_second=0.5, max_sources=2)
    assert [limiter.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b", 0.0), "each source has its own bucket"
    assert not limiter.allow("a", 1.0)
    assert limiter.allow("a", 2.0)  # one token back after 2 s
    assert not limiter.allow("a", 2.0)
    assert [limiter.allow("a", 100.0) for _ in range(4)] == [True, True, True, False]
    limiter.allow("c", 100.0)  # a third source: the least recent ("b") is forgotten
    assert limiter.allow("b", 100.0)


class FailingFetcher:
    """A fetcher whose every fetch fails (no provider holds the root); records when."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def fetch(self, root: CID, providers: list[str]) -> FetchResult:
        self.calls.append(trio.current_time())
        raise FetchFailed(root, 1, {})


async def test_a_failing_dataset_backs_off_however_often_it_is_announced(
    autojump_clock: trio.abc.Clock,
) -> None:
    fetcher = FailingFetcher()
    syncer = Syncer(fetcher, me="me", policy=AccessPolicy(), retry_delay=1.0)
    head = Head("sybil", 1, nobodys_root(0), nobodys_root(0), 0.0, 1000)
    async with trio.open_nursery() as nursery:
        await nursery.start(syncer.run)
        start = trio.current_time()
        for _ in range(600):  # the same head, re-announced 10 times a second for 60 s
            await syncer.head_seen(head, "sybil")
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    # 1, 2, 4, 8, 16 s between attempts (the next would be at 63 s), not one per announcement.
    assert [t - start for t in fetcher.calls] == [0.0, 1.0, 3.0, 7.0, 15.0, 31.0]


async def test_sybil_heads_over_one_connection_stay_bounded_and_honest_peers_sync(
    tmp_path: Path,
) -> None:
    burst = 20
    victim = Node(
        tmp_path,
        "victim",
        max_followed=60,
        limiter=NewDatasetLimiter(burst=burst, per_second=1.0),
    )
    with trio.fail_after(TIMEOUT):
        async with running(victim), hostile_host() as attacker:
            topic = victim.p2p.announcer.topic
            started = time.monotonic()
            for first in range(0, SYBILS, BATCH):
                rpc = rpc_pb2.RPC(
                    subscriptions=[rpc_pb2.RPC.SubOpts(subscribe=True, topicid=topic)],
                    publish=[sybil_message(topic, i) for i in range(first, first + BATCH)],
                )
                await send_rpc(attacker, victim, rpc.SerializeToString())
            # The flood is judged: most of it is refused, not followed.
            await victim.p2p.announcer.wait_rejected(SYBILS // 2)
            elapsed = time.monotonic() - started
            followed = len(victim.p2p.replica_states())
            assert followed <= burst + elapsed * 1.0 + 1, (followed, elapsed)
            assert not victim.p2p.policy.is_banned(attacker.get_id().to_base58())

            # An honest peer on its own connection is still followed and synced,
            # and so is one whose heads only reach the victim through it (a hub).
            hub = Node(tmp_path, "hub")
            leaf = Node(tmp_path, "leaf", reannounce_interval=0.5)
            hub_head = head_for(hub, 1, make_dag(hub.store, os.urandom(200_000), "hub"))
            leaf_head = head_for(leaf, 1, make_dag(leaf.store, os.urandom(200_000), "leaf"))
            async with running(hub, leaf):
                await hub.p2p.announce(hub_head)
                await leaf.p2p.connect(hub.p2p.addrs[0])
                await hub.p2p.connect(victim.p2p.addrs[0])
                await leaf.p2p.announce(leaf_head)
                await wait_for(victim, lambda: victim.installed(hub.peer_id) == hub_head)
                await wait_for(victim, lambda: victim.installed(leaf.peer_id) == leaf_head)
            assert len(victim.p2p.replica_states()) <= 60
