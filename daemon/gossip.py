"""py-libp2p's Pubsub with every path that handles a peer's input guarded.

py-libp2p handles a peer's GossipSub input in two places, and an exception in
either ends the node: the stream handler (`stream_handler` ->
`continuously_read_stream`: RPC parsing, subscriptions, control messages) and
the task it spawns per published message (`push_msg`: blacklist, seen cache,
signature check, topic validators, forwarding), which runs in pubsub's own
service nursery. Measured on 0.8.1: a message whose `from` is a sha2-256 peer
ID and whose `key` is not a protobuf public key makes `signature_validator`
raise `DecodeError`, and bytes that are no RPC make `ParseFromString` raise it;
both escaped to the node's nursery.

`GuardedPubsub` checks a peer's message before py-libp2p does (the signature
check, which must never raise here, runs inside a catch-all) and wraps both
entry points, so that any error rejects the input and reports the peer to
`on_misbehaviour`; the peer's stream is reset, the node keeps running.

`gate(peer)` decides, once per peer, whether pubsub talks to it at all (lab
membership: a stranger gets no pubsub stream from us, so nothing we publish or
forward reaches it, and its own stream is reset unread). It is awaited before
py-libp2p opens its stream to a new peer and before a peer's stream is read.

`open_signed_message(blob)` applies the same signature check to a serialized
message that arrived some other way (a replica head's envelope in a head
response, `daemon/announce.py`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import IHost, INetStream, IPubsubRouter
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.validators import signature_validator

log = logging.getLogger(__name__)

STREAM_RESET_TIMEOUT = 1.0  # seconds granted to resetting a misbehaving peer's stream

# (peer that sent the input, what was wrong with it)
MisbehaviourCallback = Callable[[ID, str], None]
# The forwarder is already known to be bad: drop its messages unverified.
RefuseCallback = Callable[[ID], bool]
# May pubsub talk to this peer at all (waits for its lab membership to be decided)?
GateCallback = Callable[[ID], Awaitable[bool]]


async def _open_gate(peer: ID) -> bool:
    return True


def message_problem(msg: rpc_pb2.Message) -> str | None:
    """Why a signed message from a peer cannot be accepted, or None when its signature holds.

    Never raises: whatever py-libp2p's checks raise on hostile input becomes
    the reason.
    """
    try:
        ID(msg.from_id).to_base58()
        if not signature_validator(msg):
            return "missing or invalid signature"
    except Exception as e:  # DecodeError, ValueError, ...: the bytes are the peer's
        return f"unverifiable message ({type(e).__name__}: {e})"
    return None


class UnverifiableMessage(Exception):
    """A serialized GossipSub message that does not parse or whose signature does not hold."""


def open_signed_message(blob: bytes) -> tuple[rpc_pb2.Message, str]:
    """Parse a serialized GossipSub message and verify it as gossip input is verified.

    Returns the message and its signer (the base58 of `from`, whose key made
    the signature: `signature_validator` checks that the key, inlined in the
    peer ID or given in `key`, derives `from`). Raises `UnverifiableMessage`,
    never anything else, whatever the bytes.
    """
    msg = rpc_pb2.Message()
    try:
        msg.ParseFromString(blob)
    except Exception as e:  # DecodeError and whatever else protobuf raises on hostile bytes
        raise UnverifiableMessage(f"not a GossipSub message ({type(e).__name__})") from None
    problem = message_problem(msg)
    if problem is not None:
        raise UnverifiableMessage(problem)
    try:
        return msg, ID(msg.from_id).to_base58()
    except Exception as e:  # message_problem parsed it already; kept total all the same
        raise UnverifiableMessage(f"bad from ({type(e).__name__})") from None


class GuardedPubsub(Pubsub):
    """A `Pubsub` (strict signing) in which no peer input can raise into the node.

    `on_misbehaviour(peer, reason)` is called, on the trio thread, for a
    message with a bad or unverifiable signature and for any error raised
    while reading or handling a peer's RPCs; `refuse(peer)` says whether
    messages forwarded by `peer` are dropped without being looked at.
    """

    def __init__(
        self,
        host: IHost,
        router: IPubsubRouter,
        *,
        allowed_topics: set[str],
        on_misbehaviour: MisbehaviourCallback,
        refuse: RefuseCallback = lambda peer: False,
        gate: GateCallback = _open_gate,
    ) -> None:
        super().__init__(host, router, strict_signing=True, allowed_topics=allowed_topics)
        self.on_misbehaviour = on_misbehaviour
        self.refuse = refuse
        self.gate = gate

    async def _handle_new_peer(self, peer_id: ID) -> None:
        if not await self._gate(peer_id):
            return  # no stream to it: our gossip never reaches it
        await super()._handle_new_peer(peer_id)

    async def _gate(self, peer: ID) -> bool:
        try:
            return await self.gate(peer)
        except Exception as e:  # the gate must not become the crash it prevents
            log.error("gossip gate for %s failed: %r", peer, e)
            return False

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        if msg_forwarder == self.my_id:
            # Our own publish: its errors are the caller's (Announcer._publish).
            await super().push_msg(msg_forwarder, msg)
            return
        try:
            if self.refuse(msg_forwarder) or self._is_msg_seen(msg):
                return
            problem = message_problem(msg)
        except Exception as e:
            problem = f"unreadable message ({type(e).__name__}: {e})"
        if problem is not None:
            # An honest router verifies a signature before forwarding the
            # message, so the forwarder is to blame, whoever the origin claims to be.
            self._misbehaved(msg_forwarder, problem)
            return
        try:
            # The signature check inside cannot raise now: it just passed here.
            await super().push_msg(msg_forwarder, msg)
        except Exception as e:
            # Topic validators catch their own errors: this is py-libp2p's
            # handling of an odd (but well-signed) message. Drop it, keep the node.
            log.warning("dropped a gossip message from %s: %r", msg_forwarder, e)

    async def stream_handler(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        if not await self._gate(peer):
            with trio.move_on_after(STREAM_RESET_TIMEOUT), contextlib.suppress(Exception):
                await stream.reset()
            return
        try:
            await super().stream_handler(stream)
        except Exception as e:  # an ExceptionGroup too: every one came from this peer's bytes
            with trio.move_on_after(STREAM_RESET_TIMEOUT), contextlib.suppress(Exception):
                await stream.reset()
            with contextlib.suppress(Exception):
                self._handle_dead_peer(peer)
            self._misbehaved(peer, f"broke the GossipSub stream ({type(e).__name__}: {e})")

    def _misbehaved(self, peer: ID, reason: str) -> None:
        log.info("gossip input from %s rejected: %s", peer, reason)
        try:
            self.on_misbehaviour(peer, reason)
        except Exception as e:  # the report must not become the crash it prevents
            log.error("misbehaviour report for %s failed: %r", peer, e)
