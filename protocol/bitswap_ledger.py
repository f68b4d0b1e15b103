"""Bitswap's state machines, sans-IO: what each peer wants of us, and what we want of peers.

`Ledger` is one peer's account as a *server*: its wantlist (at most
`max_wants` entries, held or answered-but-unsent alike), a request-rate limit
(a token bucket of wantlist entries per second), and the replies we owe it
(blocks, HAVE, DONT_HAVE) in the order they became known. The daemon asks it
which wants to look up in the blockstore (`to_look_up`), reports what it found
(`looked_up`), takes batches of replies to send (`next_batch`, at most
`max_inflight` bytes of blocks handed out and not yet `sent`) and reports
cancels and full wantlists through `receive`. Everything a peer can make us
hold is bounded by its own ledger's limits, so a peer over a limit only loses
its own wants: a peer asking for 10,000 unknown CIDs gets the first
`max_wants` looked up and the rest dropped (counted), and a peer that never
reads stops getting blocks loaded for it.

`WantQueue` is one fetch as a *client*: the CIDs we still lack, which peer we
asked for each (one peer at a time, so a block crosses the wire once), which
peers said DONT_HAVE, and the window of wants in flight. The boxo scheme of
want-have broadcasts is not needed for our use (a user names the peers, or the
node's connected peers are few); asking one peer and moving to the next on
DONT_HAVE keeps the bytes exact.

Times are plain floats passed in by the caller (trio's clock in the daemon,
numbers in tests), so every transition is tested byte- and time-exactly.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from multiformats import CID

from benchsync.protocol.bitswap import WANT_BLOCK, WANT_HAVE, Message, WantEntry, key
from benchsync.storage.limits import MAX_BLOCK_SIZE

# boxo's default MaxQueuedWantlistEntriesPerPeer: a peer's wants we track at once.
MAX_WANTS = 1024  # entries
WANT_RATE = 2000.0  # wantlist entries per second a peer may add, sustained
WANT_BURST = 2048  # entries a peer may add at once (the token bucket's size)
MAX_INFLIGHT = 8 * 1024 * 1024  # bytes of blocks handed to one peer's sender, not yet written
# Bytes of blocks a reply message is filled to, as boxo's targetMessageSize (16 KiB): small
# blocks share a message, a 256 KiB chunk goes alone as soon as it is read. One big message
# of several chunks makes the requester wait for the last of them (measured against Kubo:
# 8 blocks in one 2 MiB message came ~90 ms after the want; one per message, 30 ms).
MAX_BATCH = 16 * 1024
CLIENT_WINDOW = 64  # blocks a fetch asks for at once, over all peers

BLOCK = "block"
HAVE = "have"
DONT_HAVE = "dont_have"

_NEW = "new"  # to be looked up
_LOOKING = "looking"  # handed out by to_look_up, result not back yet
_WAITING = "waiting"  # not held, no DONT_HAVE asked: kept until held, cancelled or replaced


@dataclass
class _Want:
    cid: CID
    want_type: int
    send_dont_have: bool
    priority: int
    seq: int  # arrival order, for stable priority ordering
    state: str = _NEW


@dataclass(frozen=True)
class Reply:
    """Something we owe a peer: a block of `size` bytes, a HAVE or a DONT_HAVE."""

    kind: str
    cid: CID
    size: int = 0


@dataclass(frozen=True)
class Received:
    """What `Ledger.receive` did with one message's wantlist."""

    accepted: int = 0  # new or updated wants
    cancelled: int = 0
    over_limit: int = 0  # dropped: the wantlist was full
    over_rate: int = 0  # dropped: the peer asked faster than its rate


class Ledger:
    """One peer's wantlist and the replies we owe it (see the module docstring)."""

    def __init__(
        self,
        *,
        max_wants: int = MAX_WANTS,
        rate: float = WANT_RATE,
        burst: int = WANT_BURST,
        max_inflight: int = MAX_INFLIGHT,
        max_block: int = MAX_BLOCK_SIZE,
        now: float = 0.0,
    ) -> None:
        self.max_wants = max_wants
        self.rate = rate
        self.burst = burst
        self.max_inflight = max_inflight
        self.max_block = max_block
        self._wants: OrderedDict[bytes, _Want] = OrderedDict()
        self._replies: OrderedDict[bytes, Reply] = OrderedDict()
        self._tokens = float(burst)
        self._last = now
        self._seq = 0
        self.inflight = 0  # bytes of blocks handed out by next_batch, not yet `sent`
        self.dropped = 0  # wants dropped over the limits, in total

    # --- input ----------------------------------------------------------------------

    def receive(self, msg: Message, now: float) -> Received:
        """Apply a message's wantlist (cancels, new wants, a full replacement)."""
        accepted = cancelled = over_limit = 0
        self._refill(now)
        if msg.full:
            listed = {key(e.cid) for e in msg.entries if not e.cancel}
            for k in [k for k in self._wants if k not in listed]:
                del self._wants[k]
            for k in [k for k in self._replies if k not in listed]:
                del self._replies[k]
        over_rate = msg.dropped_entries  # more entries than a message may carry: as a flood
        for entry in msg.entries:
            k = key(entry.cid)
            if entry.cancel:
                cancelled += (self._wants.pop(k, None) or self._replies.pop(k, None)) is not None
                continue
            current = self._wants.get(k)
            if current is not None:
                # An update (want-have becoming want-block, say): looked up again.
                current.want_type = entry.want_type
                current.send_dont_have = entry.send_dont_have
                current.priority = entry.priority
                current.state = _NEW
                accepted += 1
                continue
            queued = self._replies.get(k)
            if queued is not None and (queued.kind != HAVE or entry.want_type == WANT_HAVE):
                continue  # already answered as asked, not yet sent
            if queued is not None:
                del self._replies[k]  # a HAVE owed, now the block is wanted
            if len(self._wants) + len(self._replies) >= self.max_wants:
                over_limit += 1
                continue
            if self._tokens < 1:
                over_rate += 1
                continue
            self._tokens -= 1
            self._seq += 1
            self._wants[k] = _Want(
                entry.cid, entry.want_type, entry.send_dont_have, entry.priority, self._seq
            )
            accepted += 1
        self.dropped += over_limit + over_rate
        return Received(accepted, cancelled, over_limit, over_rate)

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = max(self._last, now)

    def to_look_up(self, limit: int) -> list[CID]:
        """Up to `limit` wants to look up in the blockstore, highest priority first.

        Each is handed out once (until `looked_up`); a want updated meanwhile is
        handed out again.
        """
        new = [w for w in self._wants.values() if w.state == _NEW]
        new.sort(key=lambda w: (-w.priority, w.seq))
        out = []
        for w in new[: max(limit, 0)]:
            w.state = _LOOKING
            out.append(w.cid)
        return out

    def holds(self, k: bytes) -> bool:
        """Whether the block with key `k` (`bitswap.key`) is still wanted or owed."""
        return k in self._wants or k in self._replies

    def wants_block(self, cid: CID) -> bool:
        """Whether `cid` is wanted as a block (not only its presence) right now."""
        want = self._wants.get(key(cid))
        return want is not None and want.want_type == WANT_BLOCK

    def looked_up(self, cid: CID, size: int | None) -> None:
        """The blockstore holds `cid` (`size` bytes) or not (None): owe the right reply."""
        k = key(cid)
        want = self._wants.get(k)
        if want is None or want.state != _LOOKING:
            return  # cancelled, replaced or updated meanwhile
        if size is None or size > self.max_block:
            if want.send_dont_have:
                del self._wants[k]
                self._replies[k] = Reply(DONT_HAVE, want.cid)
            else:
                want.state = _WAITING  # kept: `block_added` makes it current again
            return
        del self._wants[k]
        if want.want_type == WANT_BLOCK:
            self._replies[k] = Reply(BLOCK, want.cid, size)
        else:
            self._replies[k] = Reply(HAVE, want.cid)

    def block_added(self, cid: CID) -> bool:
        """We now hold `cid`: a want left waiting for it is looked up again. Whether one was."""
        want = self._wants.get(key(cid))
        if want is None or want.state != _WAITING:
            return False
        want.state = _NEW
        return True

    # --- output ---------------------------------------------------------------------

    def next_batch(self, max_bytes: int = MAX_BATCH) -> list[Reply]:
        """The next replies to send: every presence owed, and blocks up to `max_bytes`
        (at least one block, if any is owed and the in-flight limit allows; with the
        default, a 256 KiB chunk goes alone).

        Block bytes handed out count as in flight until `sent`.
        """
        out: list[Reply] = []
        total = 0
        for k, reply in list(self._replies.items()):
            if reply.kind == BLOCK:
                if self.inflight + reply.size > self.max_inflight and self.inflight:
                    continue
                if out and total + reply.size > max_bytes:
                    continue
                total += reply.size
                self.inflight += reply.size
            out.append(reply)
            del self._replies[k]
        return out

    def sent(self, nbytes: int) -> None:
        """Blocks of `nbytes` handed out by `next_batch` were written (or given up)."""
        self.inflight = max(0, self.inflight - nbytes)

    def clear(self) -> int:
        """Forget everything (the peer went away, or stopped reading); what was dropped."""
        n = len(self._wants) + len(self._replies)
        self._wants.clear()
        self._replies.clear()
        self.inflight = 0
        return n

    # --- state ----------------------------------------------------------------------

    @property
    def wants(self) -> int:
        """Entries held for this peer: wants not answered yet and replies not sent yet."""
        return len(self._wants) + len(self._replies)

    @property
    def lookups_pending(self) -> bool:
        return any(w.state == _NEW for w in self._wants.values())

    @property
    def replies_pending(self) -> bool:
        return bool(self._replies)

    def wanted(self) -> list[CID]:
        """The CIDs of this peer's current wants (answered ones excluded)."""
        return [w.cid for w in self._wants.values()]


# --- the client side ---------------------------------------------------------------------


class NoProvider(Exception):
    """Every peer asked said it lacks a block (or went away): `cid` cannot be fetched."""

    def __init__(self, cid: CID, asked: Sequence[str]) -> None:
        who = ", ".join(asked) or "no peer"
        super().__init__(f"no peer has block {cid} (asked: {who})")
        self.cid = cid
        self.asked = list(asked)


@dataclass
class _Asked:
    cid: CID
    peer: str
    since: float


@dataclass
class WantQueue:
    """One fetch's wants: queued, asked of one peer each, failed (see the module docstring).

    `peers` in the order they are asked; `window` wants in flight at most.
    """

    peers: list[str]
    window: int = CLIENT_WINDOW
    _queued: deque[CID] = field(default_factory=deque)
    _queued_keys: set[bytes] = field(default_factory=set)
    _asked: dict[bytes, _Asked] = field(default_factory=dict)
    _lacking: dict[bytes, set[str]] = field(default_factory=dict)
    _gone: set[str] = field(default_factory=set)

    def want(self, cids: Iterable[CID]) -> None:
        """Queue `cids` (those already queued or asked are ignored)."""
        for cid in cids:
            k = key(cid)
            if k not in self._asked and k not in self._queued_keys:
                self._queued.append(cid)
                self._queued_keys.add(k)

    def add_peer(self, peer: str) -> None:
        if peer not in self.peers:
            self.peers.append(peer)
        self._gone.discard(peer)

    @property
    def in_flight(self) -> int:
        return len(self._asked)

    @property
    def done(self) -> bool:
        return not self._queued and not self._asked

    def asked_of(self, peer: str) -> list[CID]:
        return [a.cid for a in self._asked.values() if a.peer == peer]

    def next_requests(self, now: float) -> dict[str, list[WantEntry]]:
        """Wants to send now, per peer (want-block, send DONT_HAVE), within the window.

        Raises `NoProvider` for a queued CID no remaining peer may still have.
        """
        out: dict[str, list[WantEntry]] = {}
        while self._queued and len(self._asked) < self.window:
            cid = self._queued.popleft()
            k = key(cid)
            self._queued_keys.discard(k)
            lacking = self._lacking.get(k, set())
            peer = next((p for p in self.peers if p not in lacking and p not in self._gone), None)
            if peer is None:
                raise NoProvider(cid, sorted(lacking))
            self._asked[k] = _Asked(cid, peer, now)
            out.setdefault(peer, []).append(WantEntry(cid, WANT_BLOCK, send_dont_have=True))
        return out

    def received(self, peer: str, cid: CID, now: float = 0.0) -> bool:
        """A verified block arrived from `peer`: whether we wanted it (from anyone).

        Its other wants count as progressing from `now` (see `stalled`).
        """
        for a in self._asked.values():
            if a.peer == peer:
                a.since = max(a.since, now)
        k = key(cid)
        asked = self._asked.pop(k, None)
        if asked is None:
            if k in self._queued_keys:  # wanted, not asked yet: take it all the same
                self._queued_keys.discard(k)
                self._queued = deque(c for c in self._queued if key(c) != k)
                return True
            return False
        self._lacking.pop(k, None)
        return True

    def dont_have(self, peer: str, cid: CID) -> None:
        """`peer` lacks `cid`: ask the next peer (requeued at the front)."""
        k = key(cid)
        asked = self._asked.get(k)
        self._lacking.setdefault(k, set()).add(peer)
        if asked is not None and asked.peer == peer:
            del self._asked[k]
            self._queued.appendleft(asked.cid)
            self._queued_keys.add(k)

    def peer_gone(self, peer: str) -> list[CID]:
        """`peer` disconnected, stalled or refused: its wants go to the next peers."""
        self._gone.add(peer)
        moved = [a for a in self._asked.values() if a.peer == peer]
        for a in moved:
            k = key(a.cid)
            del self._asked[k]
            self._lacking.setdefault(k, set()).add(peer)
            self._queued.appendleft(a.cid)
            self._queued_keys.add(k)
        return [a.cid for a in moved]

    def stalled(self, now: float, timeout: float) -> list[str]:
        """Peers asked for a block more than `timeout` ago that has not come."""
        return sorted({a.peer for a in self._asked.values() if now - a.since > timeout})

    def cancels(self) -> dict[str, list[WantEntry]]:
        """Cancel entries for every want still in flight (the fetch is being abandoned)."""
        out: dict[str, list[WantEntry]] = {}
        for a in self._asked.values():
            out.setdefault(a.peer, []).append(WantEntry(a.cid, cancel=True))
        return out
