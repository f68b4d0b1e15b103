"""The node's lab: its key files and who, per connection, has proven membership.

Every node is in a lab. Its key (`KEY_BYTES` random bytes) lives in
`<home>/lab.key` (mode 0600), created by `init` and by `up` on a home without
one, or in the file the `lab_key` setting names; `lab_key_next` adds a second
key while a lab rotates. Nodes sharing a key are members of one lab.

`Lab` runs `/benchsync/lab/1.0.0` (`protocol/lab.py`) over the stream adapter
once per connection, from both sides: the greeter proves each new peer
(`prove`), and the peer's own exchange is answered (`answer`); the first
verdict decides, and a member's verified proof wins over an inconclusive one.
The verdict is cached per connected peer and cleared on disconnect. Until it
is known the peer is *pending*: the adapter makes a stream wait for it
(`settle`, bounded by `MEMBERSHIP_TIMEOUT`), so a race never refuses a member.
`refusal(peer, protocol)` is the lab's part of the adapter's one admission
decision: members pass; strangers are refused everywhere (one reason, logged
once per peer, counted in `strangers_refused`), except, with `open`, heads and
blocks (and with `open_queries`, queries) served to them. We never *ask* a
stranger anything: its heads and blocks are not the lab's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from benchsync.protocol.fetch import CAR_PROTOCOL_ID
from benchsync.protocol.heads import HEAD_PROTOCOL_ID
from benchsync.protocol.lab import (
    KEY_BYTES,
    LAB_PROTOCOL_ID,
    NONCE_BYTES,
    LabChallenge,
    LabConfirm,
    LabResponse,
    LabSession,
)
from benchsync.protocol.query import QUERY_PROTOCOL_ID
from benchsync.protocol.session import REQUESTER, RESPONDER, Refusal

if TYPE_CHECKING:
    from benchsync.daemon.host import AccessPolicy
    from benchsync.daemon.streams import Channel, StreamAdapter

log = logging.getLogger(__name__)

LAB_KEY_FILENAME = "lab.key"
LAB_KEY_MODE = 0o600  # owner only: whoever reads the key is a member of the lab
KEY_HEADER = "/key/benchsync/lab/1.0.0/"  # first line of a key file (as Kubo's swarm.key)
KEY_ENCODING = "/base16/"  # second line; the third is the key in hex
MAX_KEY_FILE = 4096  # bytes read from a key file at most
PROOF_TIMEOUT = 10.0  # seconds for one whole membership exchange
MEMBERSHIP_TIMEOUT = 10.0  # seconds a stream waits for its peer's membership to be proven
MAX_LOGGED_STRANGERS = 4096  # strangers whose refusal was logged (then the log starts over)

MEMBER = "member"  # proved it holds a key we hold
STRANGER = "stranger"  # completed the exchange without such a proof
PENDING = "pending"  # connected, exchange under way

# Protocols `open = true` serves to strangers (read-only); queries need `open_queries`.
OPEN_PROTOCOLS = frozenset({HEAD_PROTOCOL_ID, CAR_PROTOCOL_ID})
OPEN_QUERY_PROTOCOLS = frozenset({QUERY_PROTOCOL_ID})


class LabKeyError(Exception):
    """A lab key file is missing, unreadable, malformed or readable by others.

    `hint` says what to try.
    """

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


# --- key files ------------------------------------------------------------------------


def home_key_path(home: Path) -> Path:
    """Where the lab key of the node with data directory `home` lives by default."""
    return Path(home) / LAB_KEY_FILENAME


def encode_key(key: bytes) -> str:
    return f"{KEY_HEADER}\n{KEY_ENCODING}\n{key.hex()}\n"


def write_new_key(path: Path) -> bytes:
    """Create `path` (mode 0600) holding a fresh random key; returns the key.

    Raises `LabKeyError` when the file exists (a key is never overwritten: the
    nodes holding it would become strangers) or cannot be written.
    """
    path = Path(path)
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, LAB_KEY_MODE)
    except FileExistsError:
        raise LabKeyError(
            f"{path} already exists; a lab key is never overwritten",
            "choose another file name, or remove the old key if no node uses it",
        ) from None
    except OSError as e:
        raise LabKeyError(f"cannot create lab key {path}: {e.strerror or e}",
                          "check that the directory exists and is writable") from e
    with os.fdopen(fd, "w") as f:
        f.write(encode_key(key))
    return key


def read_key(path: Path) -> bytes:
    """The key in `path`; raises `LabKeyError` saying what is wrong and what to try."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        with open(path, "rb") as f:
            raw = f.read(MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise LabKeyError(
            f"lab key file {path} does not exist",
            "copy the lab's key from a member's data directory (lab.key), or create one "
            f"with `benchsync lab-key new {path}`",
        ) from None
    except OSError as e:
        raise LabKeyError(f"cannot read lab key {path}: {e.strerror or e}",
                          "check the file's permissions (the node's user must read it)") from e
    if os.name != "nt" and mode & 0o077:
        raise LabKeyError(
            f"{path} is accessible by other users (mode {mode:o}); anyone who reads it "
            "joins the lab",
            f"run `chmod 600 {path}`",
        )
    lines = raw.decode("ascii", errors="replace").split()
    if lines[:2] == [KEY_HEADER, KEY_ENCODING]:
        lines = lines[2:]
    if len(raw) > MAX_KEY_FILE or len(lines) != 1 or len(lines[0]) != 2 * KEY_BYTES:
        raise LabKeyError(
            f"{path} is not a benchsync lab key ({KEY_BYTES} bytes in hex after the "
            f"lines {KEY_HEADER} and {KEY_ENCODING})",
            "copy the file again from a member, or create one with `benchsync lab-key new`",
        )
    try:
        return bytes.fromhex(lines[0])
    except ValueError:
        raise LabKeyError(f"{path}: the key is not hex", "copy the file again") from None


def ensure_home_key(home: Path) -> Path:
    """`<home>/lab.key`, created (a closed lab of one) when missing; returns its path."""
    path = home_key_path(home)
    if not path.exists():
        Path(home).mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(LabKeyError):  # created meanwhile by another process
            write_new_key(path)
    return path


def load_lab_keys(
    home: Path, lab_key: Path | str | None = None, lab_key_next: Path | str | None = None
) -> tuple[bytes, ...]:
    """The keys a node holds: `lab_key` (default `<home>/lab.key`, created if missing),
    then `lab_key_next` if set. Raises `LabKeyError`."""
    keys = [read_key(Path(lab_key) if lab_key is not None else ensure_home_key(home))]
    if lab_key_next is not None:
        nxt = read_key(Path(lab_key_next))
        if nxt != keys[0]:
            keys.append(nxt)
    return tuple(keys)


# --- membership -----------------------------------------------------------------------


@dataclass
class _Entry:
    """One connected peer's membership (a new entry per connection)."""

    state: str = PENDING
    decided: trio.Event = field(default_factory=trio.Event)
    proving: bool = False  # our own exchange with it is under way


class Lab:
    """Membership of connected peers in this node's lab (see the module docstring).

    `keys` are the keys we hold (current first); `me` our peer ID. Call
    `attach(adapter)` once to serve the membership protocol.
    """

    def __init__(
        self,
        keys: Sequence[bytes],
        *,
        me: str,
        policy: AccessPolicy,
        open: bool = False,
        open_queries: bool = False,
        proof_timeout: float = PROOF_TIMEOUT,
    ) -> None:
        self.keys = tuple(keys)
        self.me = me
        self.policy = policy
        self.open = open
        self.open_queries = open_queries
        self.proof_timeout = proof_timeout
        self._entries: dict[str, _Entry] = {}
        self._logged: set[str] = set()
        self._failures: dict[str, Exception] = {}  # peer -> why its last exchange failed
        self.strangers_refused = 0  # streams and gossip input refused because of a stranger
        self.strangers_seen = 0  # exchanges that ended with a stranger verdict
        self._adapter: StreamAdapter | None = None

    def attach(self, adapter: StreamAdapter) -> None:
        """Serve `/benchsync/lab/1.0.0` through `adapter` (the one protocol strangers may use)."""
        self._adapter = adapter
        adapter.serve_unadmitted(LAB_PROTOCOL_ID, self._new_responder, self.answer)

    # --- state ------------------------------------------------------------------------

    def state(self, peer: str) -> str | None:
        """MEMBER, STRANGER, PENDING, or None (not connected, or its exchange failed)."""
        entry = self._entries.get(peer)
        return None if entry is None else entry.state

    def states(self) -> dict[str, str]:
        return {p: e.state for p, e in self._entries.items()}

    def connected(self, peer: str) -> None:
        """A connection to `peer` opened: it is pending until proven (call before any stream)."""
        self._entries.setdefault(peer, _Entry())

    def disconnected(self, peer: str) -> None:
        """Its connection closed: forget the verdict (the next connection proves again)."""
        entry = self._entries.pop(peer, None)
        if entry is not None:
            entry.decided.set()

    def _decide(self, peer: str, entry: _Entry, member: bool | None) -> None:
        """Record an exchange's outcome: True member, False stranger, None failed."""
        if self._entries.get(peer) is not entry:
            return  # the connection it was about is gone
        if member:
            entry.state = MEMBER
        elif member is False and entry.state == PENDING:
            entry.state = STRANGER
            self.strangers_seen += 1
            self._log_once(peer, "is not a member of this node's lab (it holds another key)")
        elif member is None and entry.state == PENDING and not entry.proving:
            del self._entries[peer]  # not proven either way: the next stream tries again
        else:
            return  # still pending: another exchange is under way
        entry.decided.set()

    async def settle(self, peer: str) -> None:
        """Return once `peer`'s membership is decided, proving it ourselves if nobody is.

        The caller bounds the wait (`MEMBERSHIP_TIMEOUT`).
        """
        entry = self._entries.get(peer)
        if entry is None or (entry.state == PENDING and not entry.proving):
            await self.prove(peer)
        elif entry.state == PENDING:
            await entry.decided.wait()

    # --- the exchange -----------------------------------------------------------------

    async def prove(self, peer: str) -> str | None:
        """Run the exchange with `peer` as requester; returns its state afterwards.

        Never raises for the peer's faults (they leave it unproven, logged).
        """
        entry = self._entries.setdefault(peer, _Entry())
        if entry.proving:
            await entry.decided.wait()
            return self.state(peer)
        if entry.state != PENDING or self._adapter is None:
            return entry.state
        entry.proving = True
        session = LabSession(REQUESTER, keys=self.keys, me=self.me, peer=peer,
                             nonce=secrets.token_bytes(NONCE_BYTES))  # fmt: skip
        outcome: bool | None = None
        try:
            with trio.fail_after(self.proof_timeout):
                async with self._adapter.open_unadmitted(peer, LAB_PROTOCOL_ID, session) as ch:
                    await ch.send(session.challenge())
                    await ch.expect(LabResponse)
                    await ch.send(session.confirm())
            outcome = session.member
        except Exception as e:  # refused, timed out, no such protocol, bad bytes: unproven
            log.info("lab membership exchange with %s failed: %r", peer, e)
            if len(self._failures) >= MAX_LOGGED_STRANGERS:
                self._failures.clear()
            self._failures[peer] = e
            if session.checked:
                outcome = session.member
        finally:
            entry.proving = False
        self._decide(peer, entry, outcome)
        return self.state(peer)

    def _new_responder(self, peer: str) -> LabSession:
        return LabSession(RESPONDER, keys=self.keys, me=self.me, peer=peer,
                          nonce=secrets.token_bytes(NONCE_BYTES))  # fmt: skip

    async def answer(self, channel: Channel) -> None:
        """Serve one exchange a peer opened (as responder) and record its verdict."""
        peer = channel.peer
        session = channel.session
        assert isinstance(session, LabSession)
        reason = self.policy.ban_reason(peer)
        if reason is not None:
            await channel.send(Refusal(f"peer {peer} is temporarily banned by this node: {reason}"))
            return
        entry = self._entries.setdefault(peer, _Entry())
        outcome: bool | None = None
        try:
            with trio.fail_after(self.proof_timeout):
                await channel.expect(LabChallenge)
                await channel.send(session.respond())
                await channel.expect(LabConfirm)
            outcome = session.member
        finally:
            self._decide(peer, entry, outcome if session.checked else None)

    # --- admission --------------------------------------------------------------------

    def refusal(self, peer: str, protocol: str, *, asking: bool = False) -> str | None:
        """Why `peer` may not use `protocol` with us (`asking`: we would ask it), or None."""
        state = self.state(peer)
        if state == MEMBER:
            return None
        if state == STRANGER:
            if not asking and self.open and (
                protocol in OPEN_PROTOCOLS
                or (self.open_queries and protocol in OPEN_QUERY_PROTOCOLS)
            ):
                return None
            self.strangers_refused += 1
            self._log_once(peer, f"refused on {protocol}: not a member of this node's lab")
            return (
                f"peer {peer} is not a member of this node's lab (it holds another lab key); "
                "copy the lab's key (lab.key) to it and set lab_key"
            )
        failure = self._failures.get(peer)
        why = None if failure is None else str(failure) or type(failure).__name__
        return f"peer {peer} has not proven membership of this node's lab" + (
            f" (the last exchange failed: {why})" if why else ""
        )

    def failure(self, peer: str) -> Exception | None:
        """The error of the last exchange with an unproven peer (e.g. it is unreachable)."""
        return self._failures.get(peer) if self.state(peer) is None else None

    def may_gossip(self, peer: str) -> bool:
        """Whether a pubsub stream with `peer` is kept: a member, or any peer when `open`."""
        state = self.state(peer)
        return state == MEMBER or (state == STRANGER and self.open)

    def _log_once(self, peer: str, what: str) -> None:
        if peer in self._logged:
            return
        if len(self._logged) >= MAX_LOGGED_STRANGERS:
            self._logged.clear()
        self._logged.add(peer)
        log.warning("peer %s %s", peer, what)
