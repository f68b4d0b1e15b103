"""The node's peer-to-peer side as one service: `P2PNode`.

This module composes the libp2p host (`host.py`), head announcements
(`announce.py`), block serving and fetching (`fetch.py`) and the replica
follower (`sync.py`) into the one object the node wires in. It owns the
host's lifetime (listening, bootstrap, clean close of every connection), the
reaction to new connections (ask the peer for its head and the peers it
knows: `peers.py` keeps every known peer connected) and the node's one
stream adapter (`streams.py`), through which every protocol handler is
registered, so that a failing handler, or an untrusted or banned peer, costs
one stream and never the node.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.peer.id import ID
from multiaddr import Multiaddr
from multiformats import CID

from benchsync.daemon.announce import REANNOUNCE_INTERVAL, Announcer
from benchsync.daemon.bitswap import BitswapFetchFailed, BitswapService
from benchsync.daemon.fetch import BlockProvider, Fetcher, FetchFailed, FetchLimits
from benchsync.daemon.host import (
    DIAL_TIMEOUT,
    PRIVATE_LISTEN,
    AccessPolicy,
    new_benchsync_host,
    new_stream,
    parse_multiaddr,
    parse_peer_addr,
)
from benchsync.daemon.identity import load_or_create_identity
from benchsync.daemon.lab import MEMBER, STRANGER, Lab, load_lab_keys
from benchsync.daemon.peers import EXCHANGE_INTERVAL, PEERSTORE_FILE, PeerExchange, PeerStore
from benchsync.daemon.streams import StreamAdapter
from benchsync.daemon.sync import (
    DEFAULT_MAX_FOLLOWED,
    RETRY_DELAY,
    CompleteCallback,
    ReplicaState,
    Syncer,
)
from benchsync.protocol.fetch import CAR_PROTOCOL_ID
from benchsync.protocol.heads import Head, NewDatasetLimiter, check_network_name
from benchsync.storage.blockstore import Blockstore
from benchsync.storage.errors import StorageError

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 5.0  # seconds granted to closing the host at shutdown
CONNECT_QUEUE = 1024  # new-connection events buffered before the greeter drops some


@dataclass(frozen=True)
class PeerStatus:
    """One connected peer as `peers()` reports it."""

    peer_id: str
    addrs: list[str]
    trusted: bool
    banned: str | None  # the ban reason, when banned
    head: Head | None  # its latest head we accepted
    membership: str = "pending"  # in our lab: member, stranger or pending

    def to_json(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "addrs": self.addrs,
            "membership": self.membership,
            "trusted": self.trusted,
            "banned": self.banned,
            "head": None if self.head is None else self.head.to_json(),
        }


class GetFailed(Exception):
    """`P2PNode.get` could not complete a DAG from any peer; `errors` says what each did."""

    def __init__(self, root: CID, errors: dict[str, str]) -> None:
        detail = "; ".join(f"{p}: {e}" for p, e in errors.items()) or "no peer is connected"
        super().__init__(f"could not fetch {root}: {detail}")
        self.root = root
        self.errors = errors


@dataclass
class GetResult:
    """What one `P2PNode.get` did: blocks and bytes fetched, over which protocol, from whom."""

    root: CID
    blocks: int = 0
    bytes: int = 0
    present: bool = False  # the DAG was complete before the call
    car_peers: list[str] = field(default_factory=list)  # benchsync members, /benchsync/car
    bitswap_peers: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "cid": str(self.root), "blocks": self.blocks, "bytes": self.bytes,
            "already_present": self.present, "car_peers": self.car_peers,
            "bitswap_peers": self.bitswap_peers,
        }  # fmt: skip


class _ConnectionEvents(INotifee):
    """Forwards new connections to the greeter task (never blocks the swarm), and
    tells the lab at once, so that the peer is pending before any stream of it is served;
    a closed one ends the peer's membership and its Bitswap wants."""

    def __init__(
        self, send: trio.MemorySendChannel[ID], lab: Lab, bitswap: BitswapService
    ) -> None:
        self.send = send
        self.lab = lab
        self.bitswap = bitswap

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        peer = getattr(conn.muxed_conn, "peer_id", None)
        if peer is not None:
            self.lab.connected(peer.to_base58())
            with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                self.send.send_nowait(peer)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        peer = getattr(conn.muxed_conn, "peer_id", None)
        if peer is not None and not network.get_connections(peer):
            self.lab.disconnected(peer.to_base58())
            self.bitswap.disconnected(peer.to_base58())

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass


class P2PNode:
    """A benchsync node's libp2p side: identity, host, heads, fetch and sync.

    Construct, then `await nursery.start(node.run)`: it returns once the host
    listens; cancelling `run` (or calling `stop()`) closes the host and every
    connection.
    """

    def __init__(
        self,
        home: Path,
        *,
        network: str,
        blockstore: Blockstore,
        listen: list[str] | None = None,
        bootstrap: list[str] | None = None,
        announce: list[str] | None = None,
        trusted_peers: set[str] | None = None,
        mdns: bool = False,
        limits: FetchLimits | None = None,
        reannounce_interval: float = REANNOUNCE_INTERVAL,
        retry_delay: float = RETRY_DELAY,
        on_complete: CompleteCallback | None = None,
        max_followed: int = DEFAULT_MAX_FOLLOWED,
        limiter: NewDatasetLimiter | None = None,
        lab_key: bytes | None = None,
        lab_key_next: bytes | None = None,
        open: bool = False,
        open_queries: bool = False,
        bitswap_serve: str = "lab",
        exchange_interval: float = EXCHANGE_INTERVAL,
        client_only: bool = False,
    ) -> None:
        self.network = check_network_name(network)
        self.listen = [parse_multiaddr(a, "listen") for a in (listen or PRIVATE_LISTEN)]
        self.bootstrap = [parse_peer_addr(a) for a in (bootstrap or [])]
        self.blockstore = blockstore
        self.key_pair = load_or_create_identity(Path(home))
        self.host = new_benchsync_host(self.key_pair, mdns=mdns, announce=announce or ())
        self.policy = AccessPolicy(trusted_peers)
        self.limits = limits or FetchLimits()
        # The lab: `lab_key` (bytes), else the home's lab.key (created if missing).
        keys = (lab_key,) if lab_key is not None else load_lab_keys(Path(home))
        if lab_key_next is not None and lab_key_next not in keys:
            keys = (*keys, lab_key_next)
        self.lab = Lab(keys, me=self.peer_id, policy=self.policy, open=open,
                       open_queries=open_queries)  # fmt: skip
        # Every stream protocol is served and requested through this one adapter.
        self.streams = StreamAdapter(
            self.host, network=self.network, policy=self.policy, membership=self.lab
        )
        self.lab.attach(self.streams)
        self.fetcher = Fetcher(
            self.host,
            blockstore,
            network=self.network,
            policy=self.policy,
            streams=self.streams,
            limits=self.limits,
        )
        self.provider = BlockProvider(blockstore, limits=self.limits)
        # Bitswap serves lab members; strangers and plain IPFS peers only when asked to.
        self.serve_strangers = bitswap_serve == "all" or open
        self.bitswap = BitswapService(
            self.host, blockstore, streams=self.streams, policy=self.policy,
            serve_all=self.serve_strangers,
        )  # fmt: skip
        # A short-lived client (`benchsync get` without a running node): host, lab,
        # pubsub and Bitswap only; it announces no head, follows no replica, and
        # exchanges no peers.
        self.client_only = client_only
        # Peers a `get` dialed on purpose: not hung up on as strangers while it runs.
        self._getting: dict[str, int] = {}
        self.syncer = Syncer(
            self.fetcher,
            me=self.peer_id,
            policy=self.policy,
            on_complete=on_complete,
            connected_peers=self.connected_peers,
            retry_delay=retry_delay,
            max_followed=max_followed,
            limiter=limiter,
        )
        self.announcer = Announcer(
            self.host,
            network=self.network,
            policy=self.policy,
            streams=self.streams,
            on_head=self.syncer.head_seen,
            on_replica_hint=self.syncer.replica_hint,
            replicas=self.syncer.replica_heads,
            reannounce_interval=reannounce_interval,
            admit=self.syncer.admit,
            lab=self.lab,
        )
        # Bootstrap peers, remembered peers and those other peers told us of, kept connected.
        self.peer_exchange = PeerExchange(
            self.host,
            network=self.network,
            streams=self.streams,
            policy=self.policy,
            store=PeerStore(Path(home) / PEERSTORE_FILE),
            bootstrap=self.bootstrap,
            own_addrs=lambda: self.addrs,
            connected=self.connected_peers,
            exchange_interval=exchange_interval,
        )
        self._cancel = trio.CancelScope()
        self.running = False

    # --- identity and addresses -----------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self.host.get_id().to_base58()

    @property
    def addrs(self) -> list[str]:
        """Full multiaddrs of this node, each ending in /p2p/<peer id>: dialable ones
        (a wildcard listener gives the interface addresses), then `announce`."""
        return [str(a) for a in self.host.get_addrs()]

    # --- service ----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, serve and sync until cancelled or `stop()`; then close every connection."""
        # Blocks a transfer killed before its sync left behind are re-hashed before any
        # of them can be served (or trusted by a fetch).
        await self.fetcher.recover()
        send, recv = trio.open_memory_channel[ID](CONNECT_QUEUE)
        self.host.get_network().register_notifee(_ConnectionEvents(send, self.lab, self.bitswap))
        self.streams.serve(CAR_PROTOCOL_ID, self.provider.new_session, self.provider.answer)
        self.bitswap.register()
        try:
            with self._cancel:
                async with self.host.run(self.listen), trio.open_nursery() as nursery:
                    await nursery.start(self.bitswap.run)
                    # Pubsub runs in a client too: its connection notifee blocks every
                    # new connection until pubsub takes it.
                    await nursery.start(self.announcer.run)
                    if not self.client_only:
                        await nursery.start(self.syncer.run)
                        await nursery.start(self.peer_exchange.run)
                        nursery.start_soon(self._greeter, recv, nursery)
                    self.running = True
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self.running = False
            # Leaving host.run() closes nothing: close the listener and every
            # connection explicitly, even when we are being cancelled.
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await self.host.close()

    def stop(self) -> None:
        """Ask `run` to shut down (it returns after closing the host)."""
        self._cancel.cancel()

    async def _greeter(self, recv: trio.MemoryReceiveChannel[ID], nursery: trio.Nursery) -> None:
        async with recv:
            async for peer in recv:
                nursery.start_soon(self._greet, peer)

    async def _greet(self, peer: ID) -> None:
        """A peer connected: drop it if banned, prove lab membership (drop a stranger
        unless `open`), then ask a member for its head (late joiners)."""
        peer_s = peer.to_base58()
        if self.policy.is_banned(peer_s):
            with trio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(Exception):
                await self.host.disconnect(peer)
            return
        await self.streams.settle(peer_s)
        state = self.lab.state(peer_s)
        wanted = peer_s in self._getting  # dialed by `get`: its blocks are checked by CID
        if state == STRANGER and not self.lab.open and not self.serve_strangers and not wanted:
            # Hanging up keeps our gossip (and so our heads) from it as well.
            with trio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(Exception):
                await self.host.disconnect(peer)
            return
        if state != MEMBER:
            return  # a stranger of an open lab is served, never asked; an unproven peer waits
        if not self.policy.is_trusted(peer_s):
            return  # we neither follow it nor ask it anything; it gets refusals
        self.peer_exchange.peer_connected(peer_s)
        # Peers further away learn our head by gossip once the newcomer is in the mesh.
        self.announcer.announce_soon()
        self.syncer.peer_connected(peer_s)
        try:
            await self.announcer.request_head(peer)
        except Exception as e:  # a peer that cannot answer is simply not followed yet
            log.info("head request to %s failed: %r", peer_s, e)
        # Then the peers it knows, so that we reach every node directly.
        try:
            await self.peer_exchange.exchange(peer_s)
        except Exception as e:  # the periodic exchange tries again
            log.info("peer exchange with %s failed: %r", peer_s, e)

    # --- heads ------------------------------------------------------------------------

    def set_local_head(self, head: Head | None) -> None:
        """Our dataset's head, as answered to head requests and re-announced."""
        self.announcer.set_local_head(head)

    async def announce(self, head: Head) -> None:
        """Publish a new head of our dataset now (and periodically afterwards)."""
        await self.announcer.announce(head)

    # --- peers and replicas -------------------------------------------------------------

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self.host.get_connected_peers()]

    def peers(self) -> list[PeerStatus]:
        """Connected peers with their addresses, trust, ban and last accepted head."""
        out = []
        store = self.host.get_peerstore()
        for peer in self.host.get_connected_peers():
            p = peer.to_base58()
            try:
                addrs = [str(a) for a in store.addrs(peer)]
            except Exception:  # the peerstore raises when it has no address
                addrs = []
            out.append(
                PeerStatus(
                    peer_id=p,
                    addrs=addrs,
                    trusted=self.policy.is_trusted(p),
                    banned=self.policy.ban_reason(p),
                    head=self.announcer.book.get(p),
                    membership=self.lab.state(p) or "pending",
                )
            )
        return sorted(out, key=lambda s: s.peer_id)

    def dial_states(self) -> list[dict[str, Any]]:
        """Known peers not connected now: addresses, failed dials, last error, next retry."""
        return self.peer_exchange.dial_states()

    def replica_states(self) -> list[ReplicaState]:
        """Per followed dataset: head seen, head installed, bytes, lag, last error."""
        return self.syncer.replica_states()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` holds; re-checked whenever replica state changes."""
        await self.syncer.wait_until(predicate)

    # --- streams for other services -------------------------------------------------------

    def add_stream_handler(
        self, protocol_id: str, handler: Callable[[INetStream], Awaitable[None]]
    ) -> None:
        """Serve `protocol_id` with `handler` through the stream adapter (`self.streams`).

        An untrusted or banned peer gets a refusal frame (`{"status":
        "refused", "reason": ...}`) and its stream closed; an exception in
        `handler` resets that stream only. Prefer `self.streams.serve` with a
        session: it checks the network too.
        """
        self.streams.serve_stream(protocol_id, handler)

    async def open_stream(self, peer_id: str, protocol_id: str) -> INetStream:
        """Open a stream to `peer_id` speaking `protocol_id` (dialing it if needed)."""
        return await new_stream(self.host, ID.from_base58(peer_id), [protocol_id], DIAL_TIMEOUT)

    async def connect(self, addr: str) -> str:
        """Connect to a full `/p2p/` multiaddr; returns the peer ID once its lab
        membership is settled (member or stranger; bounded by `MEMBERSHIP_TIMEOUT`).

        Raises `HostConfigError` for a malformed address and `trio.TooSlowError`
        or the libp2p dial error when the peer cannot be reached.
        """
        info = parse_peer_addr(addr)
        with trio.fail_after(DIAL_TIMEOUT):
            await self.host.connect(info)
        peer = info.peer_id.to_base58()
        await self.streams.settle(peer)
        return peer

    # --- any DAG by CID -------------------------------------------------------------------

    async def get(
        self,
        root: CID,
        *,
        dial: list[str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> GetResult:
        """Make the whole DAG under `root` present in the blockstore, from peers.

        Peers of `dial` (full `/p2p/` multiaddrs) are connected first and asked
        first. Lab members are asked over `/benchsync/car/1.0.0` (the
        `Fetcher`), then every connected peer that is not banned (Kubo, Helia,
        members) over Bitswap for whatever is still missing. Blocks already
        held are not fetched again; every block is verified before it is
        stored. Raises `HostConfigError` for a malformed address,
        `GetFailed` when the DAG could not be completed (blocks fetched so far
        stay), `StorageError` when storing fails.
        """
        dialed = [parse_peer_addr(a).peer_id.to_base58() for a in dial or []]
        for peer in dialed:
            self._getting[peer] = self._getting.get(peer, 0) + 1
        try:
            return await self._get(root, dial or [], progress)
        finally:
            for peer in dialed:
                self._getting[peer] -= 1
                if not self._getting[peer]:
                    del self._getting[peer]

    async def _get(
        self, root: CID, dial: list[str], progress: Callable[[int], None] | None
    ) -> GetResult:
        result = GetResult(root)
        errors: dict[str, str] = {}
        first: list[str] = []
        for addr in dial:
            try:
                first.append(await self.connect(addr))
            except Exception as e:  # unreachable: the other peers may still have it
                errors[addr] = f"cannot connect: {type(e).__name__}: {e}"
        if not await self.fetcher.missing(root, limit=1):
            result.present = True
            return result
        peers = list(dict.fromkeys([*first, *self.connected_peers()]))
        members = [p for p in peers if self.lab.state(p) == MEMBER]
        if members:
            before = (self.fetcher.stats.blocks, self.fetcher.stats.block_bytes)
            try:
                fetched = await self.fetcher.fetch(root, members)
                result.car_peers = fetched.providers_used
            except FetchFailed as e:
                errors.update({p: f"car: {why}" for p, why in e.errors.items()})
            got = self.fetcher.stats.block_bytes - before[1]
            result.blocks += self.fetcher.stats.blocks - before[0]
            result.bytes += got
            if progress is not None and got:
                progress(got)
            if not await self.fetcher.missing(root, limit=1):
                return result
        # The peers named for this get first (`peers` starts with them); members were
        # asked over /benchsync/car already, so no other order helps.
        others = [p for p in peers if not self.policy.is_banned(p)]
        try:
            got_bs = await self.bitswap.fetch_dag(root, others, progress=progress)
        except BitswapFetchFailed as e:
            errors["bitswap"] = str(e)
            raise GetFailed(root, errors) from None
        except StorageError:
            raise
        result.blocks += got_bs.blocks
        result.bytes += got_bs.bytes
        result.bitswap_peers = got_bs.peers
        return result
