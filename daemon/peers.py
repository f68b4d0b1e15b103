"""Knowing and reaching every peer: peer exchange, reconnection with backoff, a peerstore file.

This service owns the node's book of known peers (`KnownPeer`): the
bootstrap peers from the settings, the peers it was ever connected to
(remembered across restarts in `<home>/peers.json`, written atomically), and
the peers others told it about over `/benchsync/peers/1.0.0`
(`protocol/peers.py`). It serves and asks that protocol only through the
stream adapter (`streams.py`), so the node's access rules apply both ways.

Every known peer that is not connected is dialed, and on failure dialed
again after a backoff (`DIAL_RETRY_MIN` doubling up to `DIAL_RETRY_MAX`);
the last error and the next attempt are part of `status`, and a failure is
logged once per change of its error, not at every attempt. A newly connected
peer is asked for the peers it knows at once, and every connected peer again
every `EXCHANGE_INTERVAL`, so a leaf that joined through one node reaches
every other directly within seconds, and the lab does not depend on the
node it joined through.

Addresses travel only where they mean something (`protocol.peers.shareable`):
loopback addresses only between processes of one machine, link-local never.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from benchsync.daemon.host import DIAL_TIMEOUT, AccessPolicy
from benchsync.daemon.streams import Channel, StreamAdapter
from benchsync.protocol.frames import RemoteProtocolError
from benchsync.protocol.peers import (
    MAX_ADDRS_PER_PEER,
    PEERS_PROTOCOL_ID,
    UNUSABLE,
    InvalidPeers,
    PeerRecord,
    PeersRequest,
    PeersResponse,
    PeersSession,
    is_loopback_host,
    peers_response,
    scope_of,
)
from benchsync.protocol.session import REQUESTER, RESPONDER

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

PEERSTORE_FILE = "peers.json"  # in the data directory
PEERSTORE_VERSION = 1
MAX_KNOWN_PEERS = 256  # peers in the book (bootstrap peers are never forgotten)
DIAL_RETRY_MIN = 1.0  # seconds before the first redial of a peer that could not be reached
DIAL_RETRY_MAX = 15.0  # seconds: the backoff stops growing here (a restarted machine is back soon)
MAX_HEARSAY_FAILURES = 20  # failed dials before a peer we were only told about is dropped
FORGET_AFTER = 7 * 24 * 3600.0  # seconds since last seen before a remembered peer is dropped
EXCHANGE_INTERVAL = 5.0  # seconds between two peer exchanges with every connected peer
EXCHANGE_TIMEOUT = 10.0  # seconds for one whole peer exchange
SAVE_DELAY = 1.0  # seconds between a change of the book and writing the peerstore
MAX_ERROR_TEXT = 200  # characters of a dial error kept for status and logs


@dataclass
class KnownPeer:
    """One peer we know how to reach (addresses without `/p2p/`)."""

    peer_id: str
    addrs: list[str] = field(default_factory=list)
    bootstrap: bool = False
    last_seen: float | None = None  # Unix time we were last connected (None: hearsay only)
    failures: int = 0  # failed dials since the last success
    last_error: str | None = None
    next_dial: float = 0.0  # trio time of the next attempt
    dialing: bool = False

    def dial_json(self, now: float) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "addrs": list(self.addrs),
            "bootstrap": self.bootstrap,
            "failures": self.failures,
            "last_error": self.last_error,
            "next_retry_seconds": round(max(0.0, self.next_dial - now), 1),
            "last_seen": self.last_seen,
        }


def strip_p2p(addr: str) -> str:
    """`/ip4/…/tcp/…` of a full `/…/p2p/<id>` multiaddr."""
    head, sep, _ = addr.partition("/p2p/")
    return head if sep else addr


def describe_dial_error(e: BaseException) -> str:
    """A dial failure in one short line (py-libp2p's text is long and nested)."""
    if isinstance(e, trio.TooSlowError):
        return f"no answer within {DIAL_TIMEOUT:.0f} s"
    text = " ".join(str(e).split()) or type(e).__name__
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause):
        text = f"{text}: {' '.join(str(cause).split())}"
    return text[:MAX_ERROR_TEXT]


def stream_same_machine(stream: INetStream) -> bool:
    """Whether the peer at the other end of `stream` is connected over loopback."""
    try:
        remote = stream.get_remote_address()
    except Exception:  # not every transport knows
        return False
    return remote is not None and is_loopback_host(str(remote[0]))


class PeerStore:
    """The remembered peers of a data directory: `peers.json`, written atomically."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def load(self) -> list[KnownPeer]:
        """The peers saved by an earlier run; [] when none (or the file is damaged: logged)."""
        if self.path is None or not self.path.exists():
            return []
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("version") != PEERSTORE_VERSION:
                raise ValueError(f"unknown version {doc.get('version')!r}")
            out = []
            for obj in doc["peers"][:MAX_KNOWN_PEERS]:
                record = PeerRecord.from_json(obj)
                addrs = [a for a in record.addrs if scope_of(a) != UNUSABLE]
                seen = obj.get("last_seen")
                seen = float(seen) if isinstance(seen, (int, float)) else None
                out.append(KnownPeer(record.peer_id, addrs, last_seen=seen))
            return out
        except (OSError, ValueError, KeyError, TypeError, AttributeError, InvalidPeers) as e:
            log.warning("ignoring the peerstore %s, which cannot be read: %s", self.path, e)
            return []

    def save(self, peers: list[KnownPeer]) -> None:
        """Write `peers` (those ever connected) to the file: a new file, fsynced, renamed."""
        if self.path is None:
            return
        doc = {
            "version": PEERSTORE_VERSION,
            "peers": [
                {"peer_id": p.peer_id, "addrs": p.addrs, "last_seen": p.last_seen}
                for p in peers
                if p.last_seen is not None and p.addrs
            ],
        }
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):  # make the rename durable where the OS allows
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class PeerExchange:
    """The book of known peers, kept connected; see the module docstring.

    `own_addrs()` gives this node's full dialable multiaddrs, `connected()`
    the peer IDs connected now. Construct, `await nursery.start(px.run)`;
    call `peer_connected(peer)` and `exchange(peer)` when a peer connects.
    """

    def __init__(
        self,
        host: IHost,
        *,
        network: str,
        streams: StreamAdapter,
        policy: AccessPolicy,
        store: PeerStore,
        bootstrap: list[PeerInfo],
        own_addrs: Callable[[], list[str]],
        connected: Callable[[], list[str]],
        exchange_interval: float = EXCHANGE_INTERVAL,
    ) -> None:
        self.host = host
        self.network = network
        self.streams = streams
        self.policy = policy
        self.store = store
        self.own_addrs = own_addrs
        self.connected = connected
        self.exchange_interval = exchange_interval
        self.me = host.get_id().to_base58()
        self.book: dict[str, KnownPeer] = {}
        for info in bootstrap:
            peer = self._entry(info.peer_id.to_base58())
            peer.bootstrap = True
            peer.addrs = list(dict.fromkeys(str(a) for a in info.addrs))
        self._wake = trio.Event()
        self._dirty = trio.Event()

    # --- service ------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve peer exchange, dial, exchange and save until cancelled (then save once more)."""
        for saved in await trio.to_thread.run_sync(self.store.load):
            if saved.peer_id == self.me:
                continue
            peer = self._entry(saved.peer_id)
            peer.last_seen = saved.last_seen
            peer.addrs = list(dict.fromkeys(peer.addrs + saved.addrs))[:MAX_ADDRS_PER_PEER]
        self.streams.serve(PEERS_PROTOCOL_ID, lambda: PeersSession(RESPONDER), self._answer)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._dial_loop, nursery)
                nursery.start_soon(self._exchange_loop)
                nursery.start_soon(self._save_loop)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(OSError):
                await trio.to_thread.run_sync(self.store.save, list(self.book.values()))

    # --- the book -----------------------------------------------------------------------

    def _entry(self, peer_id: str) -> KnownPeer:
        peer = self.book.get(peer_id)
        if peer is None:
            peer = self.book[peer_id] = KnownPeer(peer_id)
            self._evict()
        return peer

    def _evict(self) -> None:
        """Keep at most MAX_KNOWN_PEERS: hearsay first, then the longest unseen."""
        now = time.time()
        for p in [p for p in self.book.values() if p.last_seen is not None]:
            if not p.bootstrap and now - p.last_seen > FORGET_AFTER:  # type: ignore[operator]
                del self.book[p.peer_id]
        while len(self.book) > MAX_KNOWN_PEERS:
            candidates = [p for p in self.book.values() if not p.bootstrap]
            if not candidates:
                return
            victim = min(candidates, key=lambda p: (p.last_seen is not None, p.last_seen or 0.0))
            del self.book[victim.peer_id]

    def learn(self, record: PeerRecord, *, same_machine: bool, told_by: str) -> bool:
        """Take `record` from peer `told_by`; True when it is a peer we did not know.

        A peer's own record replaces the addresses we had for it; another's is
        merged in. Our own record, and peers we may not talk to, are ignored.
        """
        record = record.filtered(same_machine=same_machine)
        pid = record.peer_id
        if pid == self.me or not record.addrs or self.policy.refusal(pid) is not None:
            return False
        new = pid not in self.book
        peer = self._entry(pid)
        if pid == told_by:
            merged = list(record.addrs) + [a for a in peer.addrs if a not in record.addrs]
        else:
            merged = peer.addrs + [a for a in record.addrs if a not in peer.addrs]
        merged = merged[:MAX_ADDRS_PER_PEER]
        if merged != peer.addrs:
            peer.addrs = merged
            self._dirty.set()
        if new:
            log.info("learned of peer %s from %s (%s)", pid, told_by, ", ".join(record.addrs))
            self._wake.set()
        return new

    def peer_connected(self, peer_id: str) -> None:
        """`peer_id` is connected (we dialed it or it dialed us)."""
        if peer_id == self.me:
            return
        peer = self._entry(peer_id)
        if peer.failures and peer.last_error is not None:
            log.warning("peer %s is reachable again", peer_id)
        peer.last_seen = time.time()
        peer.failures = 0
        peer.last_error = None
        self._dirty.set()

    def dial_states(self) -> list[dict[str, Any]]:
        """Known peers that are not connected: addresses, failures, last error, next retry."""
        connected = set(self.connected())
        now = trio.current_time()
        return [
            p.dial_json(now)
            for p in sorted(self.book.values(), key=lambda p: p.peer_id)
            if p.peer_id not in connected
        ]

    def known(self) -> list[str]:
        return sorted(self.book)

    # --- dialing ------------------------------------------------------------------------

    async def _dial_loop(self, nursery: trio.Nursery) -> None:
        while True:
            self._wake = trio.Event()
            now = trio.current_time()
            connected = set(self.connected())
            wait = DIAL_RETRY_MAX
            for peer in list(self.book.values()):
                if peer.peer_id in connected or peer.dialing or not peer.addrs:
                    continue
                if self.policy.refusal(peer.peer_id) is not None:
                    continue
                if peer.next_dial <= now:
                    peer.dialing = True
                    nursery.start_soon(self._dial, peer)
                else:
                    wait = min(wait, peer.next_dial - now)
            # Also look again soon: a connection that drops must be redialed quickly.
            with trio.move_on_after(min(wait, DIAL_RETRY_MIN)):
                await self._wake.wait()

    async def _dial(self, peer: KnownPeer) -> None:
        try:
            pid = ID.from_base58(peer.peer_id)
            addrs = [Multiaddr(a) for a in peer.addrs]
            # Only our addresses: identify filled the peerstore with the peer's own list,
            # loopback included, which on another machine is not that peer.
            self.host.get_peerstore().clear_addrs(pid)
            with trio.fail_after(DIAL_TIMEOUT):
                await self.host.connect(PeerInfo(pid, addrs))
        except Exception as e:  # down, unreachable, or not the peer it claimed to be
            self._failed(peer, describe_dial_error(e))
        else:
            self.peer_connected(peer.peer_id)
        finally:
            peer.dialing = False
            self._wake.set()

    def _failed(self, peer: KnownPeer, error: str) -> None:
        peer.failures += 1
        delay = min(DIAL_RETRY_MAX, DIAL_RETRY_MIN * 2 ** min(peer.failures - 1, 16))
        peer.next_dial = trio.current_time() + delay
        if error != peer.last_error:  # once per change, not at every attempt
            kind = "bootstrap peer" if peer.bootstrap else "peer"
            log.warning(
                "cannot reach %s %s at %s: %s (retrying, at most every %.0f s)",
                kind, peer.peer_id, ", ".join(peer.addrs), error, DIAL_RETRY_MAX,
            )  # fmt: skip
        peer.last_error = error
        if peer.last_seen is None and not peer.bootstrap and peer.failures >= MAX_HEARSAY_FAILURES:
            self.book.pop(peer.peer_id, None)  # only ever heard of, never reached: forget it

    # --- the protocol -------------------------------------------------------------------

    def _records(self, *, same_machine: bool) -> list[PeerRecord]:
        """Ourselves, then the peers connected now, then those seen before; addresses filtered."""
        mine = [strip_p2p(a) for a in self.own_addrs()]
        records = [PeerRecord(self.me, tuple(dict.fromkeys(mine))[:MAX_ADDRS_PER_PEER])]
        connected = set(self.connected())
        seen = [p for p in self.book.values() if p.last_seen is not None and p.addrs]
        seen.sort(key=lambda p: (p.peer_id not in connected, -(p.last_seen or 0.0)))
        records += [PeerRecord(p.peer_id, tuple(p.addrs)) for p in seen]
        return [r.filtered(same_machine=same_machine) for r in records]

    async def _answer(self, channel: Channel, request: object) -> None:
        same = stream_same_machine(channel.stream)
        await channel.send(peers_response(self._records(same_machine=same)))

    async def exchange(self, peer_id: str) -> int:
        """Ask `peer_id` for the peers it knows and learn them; returns how many were new.

        Raises what `StreamAdapter.open` raises (`Refused`, a dial error),
        `RemoteProtocolError` for a malformed answer, `trio.TooSlowError`.
        """
        with trio.fail_after(EXCHANGE_TIMEOUT):
            async with self.streams.open(peer_id, PEERS_PROTOCOL_ID, PeersSession(REQUESTER)) as ch:
                await ch.send(PeersRequest(self.network))
                response = await ch.expect(PeersResponse)
                same = stream_same_machine(ch.stream)
        assert isinstance(response, PeersResponse)
        return sum(self.learn(r, same_machine=same, told_by=peer_id) for r in response.peers)

    async def _exchange_loop(self) -> None:
        async def one(peer: str) -> None:
            try:
                await self.exchange(peer)
            except (Exception, trio.TooSlowError) as e:  # its next exchange will tell
                level = logging.INFO if isinstance(e, RemoteProtocolError) else logging.DEBUG
                log.log(level, "peer exchange with %s failed: %r", peer, e)

        while True:
            await trio.sleep(self.exchange_interval)
            async with trio.open_nursery() as nursery:
                for peer in self.connected():
                    if self.policy.refusal(peer) is None:
                        nursery.start_soon(one, peer)

    async def _save_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await trio.sleep(SAVE_DELAY)  # several changes, one write
            self._dirty = trio.Event()
            try:
                await trio.to_thread.run_sync(self.store.save, list(self.book.values()))
            except OSError as e:
                log.warning("could not save the peerstore %s: %s", self.store.path, e)
