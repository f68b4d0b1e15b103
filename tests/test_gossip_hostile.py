"""A hostile peer speaking GossipSub wrongly, against a real node on 127.0.0.1.

The hostile side is a bare py-libp2p host (Noise + Yamux, like ours) that
opens a `/meshsub/1.2.0` stream to the victim and writes RPC protobufs built
by hand, so it can send what no honest router would: a message whose `key`
is not a protobuf public key, or bytes that are no RPC at all. Whatever it
sends, the victim must stay up, reject the input, penalise the sender and
keep syncing with an honest peer.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V12
from libp2p.pubsub.pb import rpc_pb2
from libp2p.utils.varint import encode_uvarint
from multiaddr import Multiaddr

from benchsync.daemon.host import new_benchsync_host
from tests.test_p2p import TIMEOUT, Node, head_for, join_lab, make_dag, running, wait_for

SHA2_256 = 0x12  # multihash code: a peer ID of this kind does not embed its key


@asynccontextmanager
async def hostile_host() -> AsyncIterator[IHost]:
    host = new_benchsync_host(create_new_key_pair())
    join_lab(host)  # a member (issue 20): its attacks reach the gossip code they test
    async with host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        try:
            yield host
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await host.close()


def sha256_peer_id(seed: bytes) -> bytes:
    """A well-formed sha2-256 peer ID (the kind RSA keys get): its key must come in `key`."""
    return bytes([SHA2_256, 32]) + hashlib.sha256(seed).digest()


def bad_key_message(topic: str) -> rpc_pb2.Message:
    return rpc_pb2.Message(
        from_id=sha256_peer_id(b"nobody"),
        data=b'{"dataset": "x"}',
        seqno=os.urandom(8),
        topicIDs=[topic],
        signature=b"\x01" * 64,
        key=b"\xff\xff\xff",  # not a crypto.pb.PublicKey: DecodeError when parsed
    )


async def send_rpc(attacker: IHost, victim: Node, payload: bytes) -> None:
    """Dial `victim`, open a GossipSub stream and write `payload` as one varint frame."""
    await attacker.connect(info_from_p2p_addr(Multiaddr(victim.p2p.addrs[0])))
    stream = await attacker.new_stream(
        ID.from_base58(victim.peer_id), [TProtocol(PROTOCOL_ID_V12)]
    )
    await stream.write(encode_uvarint(len(payload)) + payload)


async def assert_still_syncs(tmp_path: Path, victim: Node, name: str) -> None:
    """An honest peer connecting now still gets its head installed by `victim`."""
    honest = Node(tmp_path, name)
    head = head_for(honest, 1, make_dag(honest.store, os.urandom(300_000), name))
    async with running(honest):
        await honest.p2p.announce(head)
        await honest.p2p.connect(victim.p2p.addrs[0])
        await wait_for(victim, lambda: victim.installed(honest.peer_id) == head)


async def test_message_with_malformed_key_is_rejected_and_the_node_stays_up(
    tmp_path: Path,
) -> None:
    victim = Node(tmp_path, "victim")
    with trio.fail_after(TIMEOUT):
        async with running(victim), hostile_host() as attacker:
            topic = victim.p2p.announcer.topic
            rpc = rpc_pb2.RPC(
                subscriptions=[rpc_pb2.RPC.SubOpts(subscribe=True, topicid=topic)],
                publish=[bad_key_message(topic)],
            )
            await send_rpc(attacker, victim, rpc.SerializeToString())
            await victim.p2p.announcer.wait_rejected(1)
            attacker_id = attacker.get_id().to_base58()
            # The forwarder of a message that cannot even be checked is penalised.
            assert victim.p2p.policy.is_banned(attacker_id)
            assert victim.p2p.running
            await assert_still_syncs(tmp_path, victim, "honest")
            assert victim.p2p.running


async def test_garbage_instead_of_an_rpc_costs_the_sender_its_stream(tmp_path: Path) -> None:
    victim = Node(tmp_path, "victim")
    with trio.fail_after(TIMEOUT):
        async with running(victim), hostile_host() as attacker:
            await send_rpc(attacker, victim, b"\xff\xff\xff\xff not a protobuf")
            attacker_id = attacker.get_id().to_base58()
            await victim.p2p.announcer.wait_rejected(1)
            assert victim.p2p.policy.is_banned(attacker_id)
            await assert_still_syncs(tmp_path, victim, "honest")
            assert victim.p2p.running
