"""Lab membership: an HMAC challenge-response over both peer IDs, sans-IO.

Nodes holding the same lab key are members of one lab; every other peer is a
stranger. Membership is proven once per connection, on `/benchsync/lab/1.0.0`,
before any other benchsync protocol is served (the daemon's stream adapter
waits for the verdict). The exchange, with `Na`/`Nb` fresh random nonces of
`NONCE_BYTES` each and `K` every key the prover holds (the current one and,
while a lab rotates, the next):

    requester A -> responder B:  LabChallenge(Na)
    B -> A:                      LabResponse(Nb, [HMAC(K, "responder", B, A, Na, Nb) ...])
    A -> B:                      LabConfirm([HMAC(K, "requester", A, B, Na, Nb) ...])

Each side then checks the other's MACs against its own keys (`verify`): one
match under any key makes the peer a member. Why this holds:
- The key never leaves the node; a MAC says nothing about it.
- A proof is bound to the prover's and the verifier's peer IDs (which Noise
  authenticated for the connection) and to both sides' fresh nonces, so a
  proof recorded on one connection fails on any other (replay), and a proof
  obtained from a member by a man in the middle names the wrong peers (relay).
- The role is in the MAC, so a responder's proof cannot be reflected back as a
  requester's.
- Sending one MAC per held key lets a node holding current+next prove itself
  to a peer that holds either, without saying which keys it holds.

The responder proves first, but its proof is useless to anyone but the
requester, on this connection. Wire: one JSON frame per message
(`{"nonce": hex}`, `{"status": "ok", "nonce": hex, "proofs": [hex, ...]}`,
`{"proofs": [hex, ...]}`), each at most `MAX_LAB_FRAME` bytes; a responder may
answer a `Refusal` instead (e.g. a banned peer).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from benchsync.protocol.frames import RemoteProtocolError, encode_json_frame
from benchsync.protocol.session import (
    DONE,
    IDLE,
    NEED_DATA,
    REQUESTED,
    REQUESTER,
    RESPONDER,
    Refusal,
    Session,
    parse_refusal,
)

LAB_PROTOCOL_ID = "/benchsync/lab/1.0.0"
KEY_BYTES = 32  # a lab key: 256 random bits
NONCE_BYTES = 32  # each side's fresh challenge
MAC_BYTES = 32  # HMAC-SHA256
MAX_KEYS = 2  # keys a node holds at once (current and next), so MACs in one proof
MAX_LAB_FRAME = 1024  # bytes: a nonce and two MACs in hex fit many times over
DOMAIN = b"benchsync/lab/1\0"  # separates our MACs from any other use of the key

PROVED: Final = "proved"  # the responder has proven itself; the requester confirms next


class LabProofError(RemoteProtocolError):
    """A lab message is malformed (not a wrong key: that is a verdict, not an error)."""


@dataclass(frozen=True)
class LabChallenge:
    """The requester's fresh nonce."""

    nonce: bytes


@dataclass(frozen=True)
class LabResponse:
    """The responder's fresh nonce and its proofs (one MAC per key it holds)."""

    nonce: bytes
    proofs: tuple[bytes, ...]


@dataclass(frozen=True)
class LabConfirm:
    """The requester's proofs (one MAC per key it holds)."""

    proofs: tuple[bytes, ...]


def proof(
    key: bytes, *, role: str, prover: str, verifier: str, requester_nonce: bytes,
    responder_nonce: bytes,
) -> bytes:  # fmt: skip
    """The MAC by which `prover` (speaking as `role`) shows `verifier` it holds `key`."""
    if role not in (REQUESTER, RESPONDER):
        raise ValueError(f"role must be {REQUESTER!r} or {RESPONDER!r}")
    message = b"\0".join([
        DOMAIN, role.encode(), prover.encode(), verifier.encode(), requester_nonce,
        responder_nonce,
    ])  # fmt: skip
    return hmac.new(key, message, hashlib.sha256).digest()


def verify(
    keys: Sequence[bytes], proofs: Sequence[bytes], *, role: str, prover: str, verifier: str,
    requester_nonce: bytes, responder_nonce: bytes,
) -> int | None:  # fmt: skip
    """Index of our key that one of `proofs` was made with, or None (a stranger).

    Every comparison is constant-time; every pair is tried (no early exit that
    would say which key matched).
    """
    found = None
    for i, key in enumerate(keys):
        want = proof(key, role=role, prover=prover, verifier=verifier,
                     requester_nonce=requester_nonce, responder_nonce=responder_nonce)
        for got in proofs:
            if hmac.compare_digest(want, got) and found is None:
                found = i
    return found


def _hex(obj: Any, field: str, size: int) -> bytes:
    value = obj.get(field) if isinstance(obj, dict) else None
    if not isinstance(value, str) or len(value) != 2 * size:
        raise LabProofError(f"lab message: {field!r} must be {size} bytes in hex")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise LabProofError(f"lab message: {field!r} is not hex") from None


def _proofs(obj: Any) -> tuple[bytes, ...]:
    raw = obj.get("proofs")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_KEYS:
        raise LabProofError(f"lab message: 'proofs' must list 1 to {MAX_KEYS} MACs")
    return tuple(_hex({"proof": p}, "proof", MAC_BYTES) for p in raw)


class LabSession(Session):
    """One side of `/benchsync/lab/1.0.0` between peers `me` and `peer`, holding `keys`.

    `nonce` is this side's fresh random challenge (the caller draws it: this
    module does no I/O). The requester sends `challenge()`, reads the
    `LabResponse`, sends `confirm()`; the responder reads the `LabChallenge`,
    sends `respond()`, reads the `LabConfirm`. `verdict` is set once the peer's
    proofs were read: the index of the key it shares with us, or None for a
    stranger (`member` says which).
    """

    TRANSITIONS = {
        (REQUESTER, IDLE, LabChallenge): REQUESTED,
        (RESPONDER, IDLE, Refusal): DONE,
        (RESPONDER, REQUESTED, Refusal): DONE,
        (RESPONDER, REQUESTED, LabResponse): PROVED,
        (REQUESTER, PROVED, LabConfirm): DONE,
    }

    def __init__(
        self, role: str, *, keys: Sequence[bytes], me: str, peer: str, nonce: bytes
    ) -> None:
        super().__init__(role, max_frame=MAX_LAB_FRAME)
        if not 1 <= len(keys) <= MAX_KEYS or any(len(k) != KEY_BYTES for k in keys):
            raise ValueError(f"a node holds 1 to {MAX_KEYS} lab keys of {KEY_BYTES} bytes")
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"a nonce is {NONCE_BYTES} bytes")
        self.keys = tuple(keys)
        self.me, self.peer, self.nonce = me, peer, nonce
        self.peer_nonce: bytes | None = None
        self.checked = False  # the peer's proofs were read and checked
        self.verdict: int | None = None  # index of the shared key, when a member

    @property
    def member(self) -> bool:
        return self.verdict is not None

    def _nonces(self) -> tuple[bytes, bytes]:
        assert self.peer_nonce is not None
        if self.role == REQUESTER:
            return self.nonce, self.peer_nonce
        return self.peer_nonce, self.nonce

    def _prove(self) -> tuple[bytes, ...]:
        rn, sn = self._nonces()
        return tuple(
            proof(k, role=self.role, prover=self.me, verifier=self.peer,
                  requester_nonce=rn, responder_nonce=sn)
            for k in self.keys
        )  # fmt: skip

    def _check(self, proofs: tuple[bytes, ...]) -> None:
        rn, sn = self._nonces()
        self.verdict = verify(self.keys, proofs, role=self.peer_role, prover=self.peer,
                              verifier=self.me, requester_nonce=rn, responder_nonce=sn)
        self.checked = True

    # --- the events we send --------------------------------------------------------------

    def challenge(self) -> LabChallenge:
        return LabChallenge(self.nonce)

    def respond(self) -> LabResponse:
        """Our proofs, after the peer's challenge was received."""
        if self.peer_nonce is None:
            raise ValueError("respond() before the challenge was received")
        return LabResponse(self.nonce, self._prove())

    def confirm(self) -> LabConfirm:
        """Our proofs, after the peer's response was received."""
        if self.peer_nonce is None:
            raise ValueError("confirm() before the response was received")
        return LabConfirm(self._prove())

    def _encode(self, event: object) -> bytes:
        if isinstance(event, LabChallenge):
            return encode_json_frame({"nonce": event.nonce.hex()}, max_frame=MAX_LAB_FRAME)
        if isinstance(event, LabResponse):
            body = {"status": "ok", "nonce": event.nonce.hex(),
                    "proofs": [p.hex() for p in event.proofs]}  # fmt: skip
            return encode_json_frame(body, max_frame=MAX_LAB_FRAME)
        if isinstance(event, LabConfirm):
            body = {"proofs": [p.hex() for p in event.proofs]}
            return encode_json_frame(body, max_frame=MAX_LAB_FRAME)
        return super()._encode(event)

    # --- the peer's events ---------------------------------------------------------------

    def _decode(self) -> object:
        obj = self._next_json()
        if obj is None:
            return NEED_DATA
        if self.role == RESPONDER and self.state == IDLE:
            self.peer_nonce = _hex(obj, "nonce", NONCE_BYTES)
            return LabChallenge(self.peer_nonce)
        if self.role == RESPONDER:
            if self.state != PROVED:
                raise LabProofError("lab confirm: sent before our response")
            confirm = LabConfirm(_proofs(obj))
            self._check(confirm.proofs)
            return confirm
        refused = parse_refusal(obj)
        if refused is not None:
            return refused
        if obj.get("status") != "ok":
            raise LabProofError(f"lab response: unknown status {obj.get('status')!r}")
        nonce = _hex(obj, "nonce", NONCE_BYTES)
        if nonce == self.nonce:
            raise LabProofError("lab response: the responder echoed our nonce")
        self.peer_nonce = nonce
        response = LabResponse(nonce, _proofs(obj))
        self._check(response.proofs)
        return response
