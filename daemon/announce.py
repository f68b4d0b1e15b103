"""Head announcements over GossipSub and the direct head protocol.

This service owns the node's GossipSub router on the topic
`benchsync/<network>/heads/1`, the validator guarding it, the periodic
re-announcement of the local head, and `/benchsync/head/1.0.0` on both sides
(answering "what is your head" and asking it of a newly connected peer, so
late joiners and lost gossip do not matter).

Trust model: a gossip message is signed by its origin (StrictSign), and the
validator accepts it only when the origin is the dataset's owner, is allowed
by the `AccessPolicy` (trusted, not banned), the head parses, and its seq
grows. A head response's own head must be the responder's dataset (Noise
authenticated the connection as its writer). Accepted heads are handed to
`on_head(head, peer)`.

Replica heads (fast catch-up): a head response also lists the heads of the
datasets the responder holds. Each must come with the GossipSub message in
which its writer announced it, which this node keeps, for the datasets it
follows, from the gossip it accepted (`signed_heads`, the latest
`MAX_SIGNED_PER_DATASET` heads per dataset) and serves alongside the replicas
it holds. The receiver checks the envelope exactly as gossip input: the
signature holds for its key and the key is `from` (`open_signed_message`,
`daemon/gossip.py`), `from` is the head's dataset, the topic is this
network's heads topic and the body is that very head (`check_signed_hint`);
then the access policy, the lab, the seq (`HeadBook`) and `admit` as for a
gossip head. Only then is it that dataset's head, handed to
`on_replica_hint(head, peer)` (`peer` holds it). A replica head without a
verifiable envelope is hearsay: ignored and counted (`unverified_hints`),
never followed, so no peer can make this node install a fake snapshot of
another writer's dataset. Signed envelopes live in memory only: after a
restart a node lists no replica heads until gossip delivers their writers'
announcements again (at most a re-announce interval).

Identities are free, so a head of a dataset not yet followed must also pass
`admit(dataset, source)` (the syncer's follow limit and per-connection rate
of new datasets); a refused head is not delivered, booked or forwarded, and
its source is not blamed (an honest hub relays many datasets).

Lab membership (`daemon/lab.py`): pubsub talks only to peers proven members
(and, with `open`, to strangers, who then receive our heads): `GuardedPubsub`'s
gate waits for the verdict. A message is rejected when its forwarder is not a
member, or its signer is a connected stranger: a member forwards only what
passed its own validator, so a stranger's head never enters the lab's mesh,
while a member we are not connected to (behind a hub) is still heard. Gossip input
that no honest router sends (an unverifiable signature, a malformed RPC) is
rejected by `GuardedPubsub` and its sender banned.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.tools.anyio_service import background_trio_service

from benchsync.daemon.config import SETTINGS_BY_NAME
from benchsync.daemon.gossip import GuardedPubsub, UnverifiableMessage, open_signed_message
from benchsync.daemon.host import AccessPolicy
from benchsync.daemon.lab import MEMBER, STRANGER, Lab
from benchsync.daemon.streams import Channel, StreamAdapter
from benchsync.protocol.heads import (
    HEAD_PROTOCOL_ID,
    Head,
    HeadBook,
    HeadRequest,
    HeadResponse,
    HeadSession,
    InvalidHead,
    check_announcement,
    check_signed_hint,
    decode_head,
    encode_head,
    topic_for,
)
from benchsync.protocol.session import REQUESTER, RESPONDER

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

REANNOUNCE_INTERVAL: float = SETTINGS_BY_NAME["reannounce_interval"].default  # seconds
HEARTBEAT_INTERVAL = 1  # seconds (py-libp2p's default of 120 s makes a mesh form far too slowly)
MESH_DEGREE = 6  # GossipSub D: peers in the mesh per topic (go-libp2p's default)
MESH_DEGREE_LOW = 4  # D_lo: graft more below this
MESH_DEGREE_HIGH = 12  # D_hi: prune above this
REQUEST_TIMEOUT = 10.0  # seconds for a whole head request/response exchange
JOIN_ANNOUNCE_DELAY = 2.0  # seconds after a peer joins before we re-announce (2 heartbeats)
DISCONNECT_TIMEOUT = 2.0  # seconds granted to hanging up on a misbehaving peer
MAX_SIGNED_PER_DATASET = 2  # signed announcements kept per dataset (the head seen and installed)

HeadCallback = Callable[[Head, str], Awaitable[None]]
# (dataset, peer that delivered its head) -> why it is not followed, or None
AdmitCallback = Callable[[str, str], str | None]
ReplicaHintCallback = Callable[[Head, str], Awaitable[None]]


class Announcer:
    """GossipSub heads for one network, plus the head request protocol.

    `run()` starts the router and serves until cancelled; `announce(head)`
    publishes our head now and keeps re-announcing it; `request_head(peer)`
    asks a peer directly.
    """

    def __init__(
        self,
        host: IHost,
        *,
        network: str,
        policy: AccessPolicy,
        streams: StreamAdapter,
        on_head: HeadCallback,
        on_replica_hint: ReplicaHintCallback | None = None,
        replicas: Callable[[], list[Head]] = list,
        reannounce_interval: float = REANNOUNCE_INTERVAL,
        admit: AdmitCallback = lambda dataset, source: None,
        lab: Lab | None = None,
    ) -> None:
        self.host = host
        self.network = network
        self.topic = topic_for(network)
        self.policy = policy
        self.streams = streams
        self.on_head = on_head
        self.on_replica_hint = on_replica_hint
        self.replicas = replicas
        self.admit = admit
        self.lab = lab
        self.reannounce_interval = reannounce_interval
        self.book = HeadBook()
        self.local_head: Head | None = None
        self.rejected = 0  # gossip messages the validator refused (for status and tests)
        self.unverified_hints = 0  # replica heads ignored: no or a bad writer's signature
        # dataset -> its latest accepted heads -> the writer's signed message (serialized)
        self.signed_heads: dict[str, dict[Head, bytes]] = {}
        self._rejected_event = trio.Event()
        self.my_id = host.get_id().to_base58()
        self.gossipsub = GossipSub(
            protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11],
            degree=MESH_DEGREE,
            degree_low=MESH_DEGREE_LOW,
            degree_high=MESH_DEGREE_HIGH,
            heartbeat_interval=HEARTBEAT_INTERVAL,
            # Eclipse protection grafts for IP diversity; a lab (and a loopback
            # test) runs many nodes per address, where it only adds churn.
            eclipse_protection_enabled=False,
        )
        # py-libp2p's Pubsub lets a hostile RPC or key raise into the node: guarded.
        self.pubsub = GuardedPubsub(
            host,
            self.gossipsub,
            allowed_topics={self.topic},
            on_misbehaviour=self._misbehaved,
            refuse=lambda peer: self.policy.is_banned(peer.to_base58()),
            gate=self._gossip_gate,
        )
        self._nursery: trio.Nursery | None = None
        self._wake_reannounce = trio.Event()
        self._soon_deadline: float | None = None  # trio time of a pending join announcement

    # --- service ----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the router, the subscription and the re-announcer until cancelled."""
        self.streams.serve(HEAD_PROTOCOL_ID, lambda: HeadSession(RESPONDER), self._answer_head)
        async with background_trio_service(self.pubsub), background_trio_service(self.gossipsub):
            await self.pubsub.wait_until_ready()
            self.pubsub.set_topic_validator(self.topic, self._validate, False)
            subscription = await self.pubsub.subscribe(self.topic)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._receive, subscription)
                nursery.start_soon(self._reannounce_loop)
                task_status.started()

    async def _receive(self, subscription: object) -> None:
        get = subscription.get  # type: ignore[attr-defined]
        while True:
            msg: rpc_pb2.Message = await get()
            signer = ID(msg.from_id).to_base58()
            if signer == self.my_id:
                continue
            try:
                head = decode_head(msg.data)
                # Re-check: another head of this dataset may have been accepted
                # between validation and delivery.
                self.book.accept(head)
            except InvalidHead as e:
                log.debug("dropping stale announcement from %s: %s", signer, e)
                continue
            self._keep_signed(head, msg.SerializeToString())
            await self.on_head(head, signer)

    def _keep_signed(self, head: Head, envelope: bytes) -> None:
        """Remember the writer's signed announcement of `head` (the dataset's current head).

        Only heads that passed the validator (a followed, admitted dataset)
        or a verified hint get here, so the datasets are bounded by the follow
        limit; per dataset the `MAX_SIGNED_PER_DATASET` latest are kept.
        """
        if self.book.get(head.dataset) != head:
            return  # superseded meanwhile
        kept = self.signed_heads.setdefault(head.dataset, {})
        kept.pop(head, None)
        kept[head] = envelope
        while len(kept) > MAX_SIGNED_PER_DATASET:
            del kept[next(iter(kept))]

    def signed_head(self, head: Head) -> bytes | None:
        """The writer's signed announcement of `head`, when this node accepted one."""
        return self.signed_heads.get(head.dataset, {}).get(head)

    def _validate(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        """GossipSub topic validator: True lets the message be delivered and forwarded."""
        try:
            signer = ID(msg.from_id).to_base58()
        except Exception:
            self._reject()
            return False
        if signer == self.my_id:
            return True  # our own publish passes through the validator too
        # Trust is about the origin (its signature was checked by pubsub); a
        # relay only matters when it is banned. Rejecting a trusted origin's
        # message because an untrusted peer relayed it would cache it as invalid.
        reason = (
            self.policy.refusal(signer)
            or self.policy.ban_reason(forwarder.to_base58())
            or self._lab_refusal(signer, forwarder.to_base58())
        )
        if reason is not None:
            log.info("rejecting head announcement from %s via %s: %s", signer, forwarder, reason)
            self._reject()
            return False
        try:
            head = check_announcement(msg.data, signer, self.book)
        except InvalidHead as e:
            log.info("rejecting head announcement from %s: %s", signer, e)
            self._reject()
            return False
        # Identities are free: a new dataset is taken (and forwarded) only within
        # the follow limits, counted against the peer that delivered it.
        reason = self.admit(head.dataset, forwarder.to_base58())
        if reason is not None:
            log.debug("not taking head of %s via %s: %s", signer, forwarder, reason)
            self._reject()
            return False
        return True

    async def _gossip_gate(self, peer: ID) -> bool:
        """Whether pubsub may talk to `peer`: once its membership is settled, a member
        (or any peer when the lab is `open`)."""
        if self.lab is None:
            return True
        await self.streams.settle(peer.to_base58())
        return self.lab.may_gossip(peer.to_base58())

    def _lab_refusal(self, signer: str, forwarder: str) -> str | None:
        """Why the lab rejects a message signed by `signer` and forwarded by `forwarder`."""
        if self.lab is None:
            return None
        if self.lab.state(forwarder) != MEMBER:
            self.lab.strangers_refused += 1
            return f"forwarder {forwarder} is not a proven member of this node's lab"
        if self.lab.state(signer) == STRANGER:
            self.lab.strangers_refused += 1
            return f"signer {signer} is not a member of this node's lab"
        return None

    def _misbehaved(self, peer: ID, reason: str) -> None:
        """A peer sent gossip input no honest router sends: reject, score, ban, hang up."""
        self._reject()
        scorer = getattr(self.gossipsub, "scorer", None)
        if scorer is not None:
            scorer.on_invalid_message(peer, self.topic)
        self.policy.ban(peer.to_base58(), f"gossip: {reason}")
        if self._nursery is not None:
            self._nursery.start_soon(self._disconnect, peer)

    async def _disconnect(self, peer: ID) -> None:
        with trio.move_on_after(DISCONNECT_TIMEOUT):
            try:
                await self.host.disconnect(peer)
            except Exception as e:  # the connection may already be gone
                log.debug("disconnecting %s: %r", peer, e)

    def _reject(self) -> None:
        self.rejected += 1
        self._rejected_event.set()
        self._rejected_event = trio.Event()

    async def wait_rejected(self, count: int) -> None:
        """Return once the validator has rejected at least `count` messages."""
        while self.rejected < count:
            await self._rejected_event.wait()

    # --- announcing -------------------------------------------------------------

    def set_local_head(self, head: Head | None) -> None:
        """Make `head` the head we answer head requests with and re-announce."""
        if head is not None and head.dataset != self.my_id:
            raise ValueError(
                f"local head names dataset {head.dataset}, but this node is {self.my_id}"
            )
        self.local_head = head

    async def announce(self, head: Head) -> None:
        """Set `head` as ours and publish it now (and periodically from then on)."""
        self.set_local_head(head)
        await self._publish()
        self._wake_reannounce.set()  # restart the interval from this publish

    async def _publish(self) -> None:
        if self.local_head is None:
            return
        try:
            await self.pubsub.publish(self.topic, encode_head(self.local_head))
        except Exception as e:  # a publish failure must not stop the node
            log.warning("could not publish head seq %d: %r", self.local_head.seq, e)

    def announce_soon(self) -> None:
        """Publish our head again shortly (a peer joined: let it reach the whole mesh).

        Delayed by `JOIN_ANNOUNCE_DELAY` so the newcomer's subscription and
        mesh are in place; several joins in that window cause one publish.
        """
        if self._soon_deadline is None:
            self._soon_deadline = trio.current_time() + JOIN_ANNOUNCE_DELAY
            self._wake_reannounce.set()

    async def _reannounce_loop(self) -> None:
        next_periodic = trio.current_time() + self.reannounce_interval
        while True:
            deadline = next_periodic
            if self._soon_deadline is not None:
                deadline = min(deadline, self._soon_deadline)
            with trio.move_on_at(deadline):
                await self._wake_reannounce.wait()
            if self._wake_reannounce.is_set():
                # announce() published just now, or announce_soon() moved the deadline.
                self._wake_reannounce = trio.Event()
                if self._soon_deadline is None:
                    next_periodic = trio.current_time() + self.reannounce_interval
                continue
            if self._soon_deadline is not None and trio.current_time() >= self._soon_deadline:
                self._soon_deadline = None
            else:
                next_periodic = trio.current_time() + self.reannounce_interval
            await self._publish()

    # --- /benchsync/head/1.0.0 ---------------------------------------------------

    async def _answer_head(self, channel: Channel, request: object) -> None:
        """Answer an admitted head request (the adapter checked the peer and the network).

        Only replicas whose writer's signed announcement we kept are listed:
        anything else would be hearsay, which the requester ignores.
        """
        replicas = [(h, self.signed_head(h)) for h in self.replicas()]
        signed = [(h, e) for h, e in replicas if e is not None]
        await channel.send(
            HeadResponse(self.local_head, tuple(h for h, _ in signed), tuple(e for _, e in signed))
        )

    async def request_head(self, peer: ID) -> HeadResponse:
        """Ask `peer` for its head and the replicas it serves.

        Accepted heads go to `on_head`, and replica heads whose writer's
        signature verifies to `on_replica_hint` (see the module docstring).
        Raises `Refused` (by us or with the peer's reason),
        `RemoteProtocolError` for a malformed answer, `Interrupted`,
        `trio.TooSlowError`, or the libp2p error of a failed dial.
        """
        session = HeadSession(REQUESTER, responder=str(peer))
        with trio.fail_after(REQUEST_TIMEOUT):
            async with self.streams.open(str(peer), HEAD_PROTOCOL_ID, session) as channel:
                await channel.send(HeadRequest(self.network))
                response = await channel.expect(HeadResponse)
        assert isinstance(response, HeadResponse)
        peer_s = str(peer)
        reason = None if response.head is None else self.admit(response.head.dataset, peer_s)
        if response.head is not None and reason is not None:
            log.info("not taking head of %s: %s", peer_s, reason)
        elif response.head is not None:
            try:
                self.book.accept(response.head)
            except InvalidHead as e:
                log.info("ignoring head from %s: %s", peer_s, e)
            else:
                await self.on_head(response.head, peer_s)
        for rep, envelope in zip(response.replicas, response.signed, strict=True):
            if rep.dataset == self.my_id:
                continue
            problem = self._hint_problem(rep, envelope, peer_s)
            if problem is not None:
                log.info("ignoring replica head of %s from %s: %s", rep.dataset, peer_s, problem)
                continue
            assert envelope is not None
            self.book.accept(rep)
            self._keep_signed(rep, envelope)
            await (self.on_replica_hint or self.on_head)(rep, peer_s)
        return response

    def _hint_problem(self, head: Head, envelope: bytes | None, peer: str) -> str | None:
        """Why replica `head`, listed by `peer` with `envelope`, is not that dataset's head.

        The checks of a gossip head (`_validate`), the relay being `peer`: a
        missing or unverifiable signature is counted in `unverified_hints`.
        """
        try:
            if envelope is None:
                raise UnverifiableMessage("no signed announcement from its writer")
            msg, signer = open_signed_message(envelope)
            check_signed_hint(head, signer, msg.topicIDs, msg.data, self.topic)
        except (UnverifiableMessage, InvalidHead) as e:
            self.unverified_hints += 1
            return str(e)
        reason = self.policy.refusal(signer)
        if reason is None and self.lab is not None and self.lab.state(signer) == STRANGER:
            reason = f"signer {signer} is not a member of this node's lab"
        if reason is not None:
            return reason
        try:
            self.book.classify(head)
        except InvalidHead as e:  # an older head (or a fork): not news
            return str(e)
        return self.admit(head.dataset, peer)
