"""Replica heads are their writer's word, signed (issue 11 observation 5, security).

A head response lists the heads of the datasets its responder holds; each must
come with the GossipSub message in which that dataset's writer announced it. A
lab member answering with a fake snapshot of someone else's dataset (no
signature, another key's, another dataset's, another head's, another network's)
is ignored: the victim does not follow the dataset, let alone install it. The
same member relaying the writer's genuine signed announcement is followed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX

from benchsync.daemon.streams import Channel
from benchsync.protocol.heads import Head, HeadResponse, encode_head, topic_for
from tests.hostile_peer import signed_message
from tests.test_p2p import NETWORK, TIMEOUT, Node, make_dag, running, wait_for


class Scene:
    """A victim, a member (mallory) who holds a fake snapshot, and a writer who is elsewhere."""

    def __init__(self, tmp_path: Path) -> None:
        self.victim = Node(tmp_path, "victim")
        self.mallory = Node(tmp_path, "mallory")
        self.writer = create_new_key_pair()
        self.writer_id = ID.from_pubkey(self.writer.public_key).to_base58()
        self.topic = topic_for(NETWORK)
        root, tables, size = make_dag(self.mallory.store, os.urandom(50_000), "fake")
        # The writer's dataset, as mallory's snapshot: what the victim must not install.
        self.fake = Head(self.writer_id, 1, root, tables, time.time(), size)
        host = self.mallory.p2p.host
        self.mallory_keys = KeyPair(host.get_private_key(), host.get_public_key())

    def by_writer(self, head: Head, topic: str | None = None) -> bytes:
        """The writer's genuine signed announcement of `head`."""
        msg = signed_message(self.writer, topic or self.topic, encode_head(head), 1)
        return msg.SerializeToString()

    def answer_with(self, head: Head, envelope: bytes | None) -> None:
        """Make mallory answer every head request with `head` as a replica it holds."""

        async def answer(channel: Channel, request: object) -> None:
            if envelope is None:  # the answer of a node that keeps no signatures
                await channel.send(HeadResponse(None, (head,)))
            else:
                await channel.send(HeadResponse(None, (head,), (envelope,)))

        self.mallory.p2p.announcer._answer_head = answer


def unsigned(s: Scene) -> tuple[Head, bytes | None]:
    return s.fake, None


def signed_by_the_wrong_key(s: Scene) -> tuple[Head, bytes | None]:
    """`from` says the writer, the signature and key are mallory's."""
    writer = ID.from_base58(s.writer_id).to_bytes()
    msg = rpc_pb2.Message(
        data=encode_head(s.fake), topicIDs=[s.topic], from_id=writer, seqno=(1).to_bytes(8, "big")
    )
    msg.signature = s.mallory_keys.private_key.sign(
        PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString()
    )
    msg.key = s.mallory_keys.public_key.serialize()
    return s.fake, msg.SerializeToString()


def valid_for_another_dataset(s: Scene) -> tuple[Head, bytes | None]:
    """Mallory's own genuine announcement of its own dataset."""
    own = Head(s.mallory.peer_id, 1, s.fake.root, s.fake.tables, s.fake.created_at, s.fake.bytes)
    msg = signed_message(s.mallory_keys, s.topic, encode_head(own), 1)
    return s.fake, msg.SerializeToString()


def valid_for_another_head(s: Scene) -> tuple[Head, bytes | None]:
    """The writer's genuine announcement of its real seq 1, claimed for a fake seq 2."""
    real = Head(s.writer_id, 1, s.fake.tables, s.fake.tables, s.fake.created_at, 10)
    fake2 = Head(s.writer_id, 2, s.fake.root, s.fake.tables, s.fake.created_at, s.fake.bytes)
    return fake2, s.by_writer(real)


def valid_on_another_network(s: Scene) -> tuple[Head, bytes | None]:
    return s.fake, s.by_writer(s.fake, topic_for("another-lab"))


def not_a_message(s: Scene) -> tuple[Head, bytes | None]:
    return s.fake, b"\x0a\xff\xff\xff\xff\x0fgarbage"


@pytest.mark.parametrize(
    "forge",
    [
        unsigned,
        signed_by_the_wrong_key,
        valid_for_another_dataset,
        valid_for_another_head,
        valid_on_another_network,
        not_a_message,
    ],
)
async def test_a_forged_replica_head_is_not_followed(
    tmp_path: Path, forge: Callable[[Scene], tuple[Head, bytes | None]]
) -> None:
    s = Scene(tmp_path)
    claimed, envelope = forge(s)
    s.answer_with(claimed, envelope)
    with trio.fail_after(TIMEOUT):
        async with running(s.victim, s.mallory):
            await s.victim.p2p.connect(s.mallory.p2p.addrs[0])
            # The answer's replicas are judged before request_head returns.
            response = await s.victim.p2p.announcer.request_head(ID.from_base58(s.mallory.peer_id))
            assert response.replicas == (claimed,)
            assert s.writer_id not in s.victim.p2p.syncer.states
            announcer = s.victim.p2p.announcer
            assert announcer.unverified_hints >= 1
            assert announcer.book.get(s.writer_id) is None
            assert announcer.signed_heads == {}
            assert s.victim.installed(s.writer_id) is None
            assert not s.victim.store.has(s.fake.root)


async def test_a_writers_signed_head_relayed_by_a_member_is_followed(tmp_path: Path) -> None:
    s = Scene(tmp_path)
    envelope = s.by_writer(s.fake)
    s.answer_with(s.fake, envelope)
    with trio.fail_after(TIMEOUT):
        async with running(s.victim, s.mallory):
            await s.victim.p2p.connect(s.mallory.p2p.addrs[0])
            await wait_for(s.victim, lambda: s.victim.installed(s.writer_id) == s.fake)
            announcer = s.victim.p2p.announcer
            assert announcer.unverified_hints == 0
            assert announcer.book.get(s.writer_id) == s.fake
            # The victim can pass the writer's word on in its own head responses.
            assert announcer.signed_head(s.fake) == envelope
