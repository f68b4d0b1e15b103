"""Head announcements: the message a node gossips when it snapshots, and the
direct head request/response, as pure data with validation (no I/O).

A *head* names the latest snapshot of one dataset: `{dataset, seq, root,
tables, created_at, bytes}`. The dataset is the writer's peer ID, so only that
peer may announce it (checked against the signed GossipSub `from` field by the
daemon through `check_announcement`). `seq` only grows per dataset;
`HeadBook` remembers the highest accepted head of every dataset and is the
single place that decides whether an announcement is news, a harmless
re-announcement, or a lie.

Wire formats:
- GossipSub topic `benchsync/<network>/heads/1`: one UTF-8 JSON object per
  message (`encode_head` / `decode_head`), at most `MAX_HEAD_MESSAGE` bytes.
- `/benchsync/head/1.0.0`: the requester sends one JSON frame
  `{"network": ...}`; the responder answers `{"status": "ok", "head": <head or
  null>, "replicas": [<head>, ...]}` (the heads of other datasets it holds
  completely, so it can serve them) or `{"status": "refused", "reason": ...}`.
  Each replica entry also carries `"signed"`: the base64 of the GossipSub
  message in which that dataset's writer announced the head (the serialized
  protobuf, signature and key included, at most `MAX_SIGNED_HEAD` bytes). It is
  opaque here; the daemon verifies it as it verifies gossip (`daemon/gossip.py`)
  and `check_signed_hint` checks that it announces that very head on the
  network's topic. A replica head without a verifiable envelope is hearsay and
  is ignored. The responder's own head needs none: Noise authenticated the
  connection as its writer. The whole response is at most `MAX_HEAD_RESPONSE`
  bytes: the responder leaves out the replicas that do not fit.
  `HeadSession` is that exchange as a sans-IO session (`protocol/session.py`).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from multiformats import CID

from benchsync.protocol.frames import MAX_FRAME, RemoteProtocolError, encode_json_frame, parse_cid
from benchsync.protocol.names import check_network_name
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

HEAD_PROTOCOL_ID = "/benchsync/head/1.0.0"
TOPIC_TEMPLATE = "benchsync/{network}/heads/1"
MAX_HEAD_MESSAGE = 2048  # bytes: one announcement (a few CIDs and numbers)
MAX_REPLICAS_IN_RESPONSE = 256  # heads of replicated datasets in one head response
MAX_SIGNED_HEAD = 4096  # bytes: one writer-signed GossipSub message (a head, key, signature)
MAX_SIGNED_HEAD_B64 = 4 * -(-MAX_SIGNED_HEAD // 3)  # characters of its base64
MAX_HEAD_RESPONSE = 1024 * 1024  # bytes: a head response; replicas that do not fit are left out
MAX_SEQ = 2**63 - 1  # the seq is a signed 64-bit integer in the snapshot manifest
MAX_DATASET_LEN = 128  # characters: an Ed25519 peer ID in base58 is 52
NEW_DATASETS_BURST = 64  # datasets one source (a connection) may introduce at once
NEW_DATASETS_PER_SECOND = 1.0  # sustained rate of new datasets per source after the burst
MAX_RATE_SOURCES = 4096  # sources whose rate is remembered (the least recent is forgotten)
_HEAD_FIELDS = frozenset({"dataset", "seq", "root", "tables", "created_at", "bytes"})


class InvalidHead(RemoteProtocolError):
    """A head announcement or head response is malformed or not allowed."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid head: {reason}")
        self.reason = reason


def topic_for(network: str) -> str:
    """The GossipSub topic carrying the heads of `network`."""
    return TOPIC_TEMPLATE.format(network=check_network_name(network))


@dataclass(frozen=True)
class Head:
    """The latest snapshot of one dataset, as announced by its writer.

    `created_at` is Unix time in seconds; `bytes` is the snapshot's total
    DAG size in bytes (what a full fetch moves).
    """

    dataset: str
    seq: int
    root: CID
    tables: CID
    created_at: float
    bytes: int

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not 0 < len(self.dataset) <= MAX_DATASET_LEN:
            raise InvalidHead(f"dataset must be a peer ID string, got {self.dataset!r}")
        if type(self.seq) is not int or not 0 <= self.seq <= MAX_SEQ:
            raise InvalidHead(f"seq must be an integer in 0..{MAX_SEQ}, got {self.seq!r}")
        if type(self.bytes) is not int or self.bytes < 0:
            raise InvalidHead(f"bytes must be a non-negative integer, got {self.bytes!r}")
        if (
            type(self.created_at) not in (int, float)
            or not math.isfinite(self.created_at)
            or self.created_at < 0
        ):
            raise InvalidHead(f"created_at must be Unix seconds, got {self.created_at!r}")
        for name in ("root", "tables"):
            if not isinstance(getattr(self, name), CID):
                raise InvalidHead(f"{name} must be a CID")

    def to_json(self) -> dict[str, Any]:
        """The head as a JSON-ready dict (CIDs as strings)."""
        return {
            "dataset": self.dataset,
            "seq": self.seq,
            "root": str(self.root),
            "tables": str(self.tables),
            "created_at": float(self.created_at),
            "bytes": self.bytes,
        }

    @classmethod
    def from_json(cls, obj: object) -> Head:
        """Build a head from a decoded JSON object; raises `InvalidHead`."""
        if not isinstance(obj, Mapping):
            raise InvalidHead("a head must be a JSON object")
        missing = _HEAD_FIELDS - obj.keys()
        if missing:
            raise InvalidHead(f"missing field(s) {sorted(missing)}")
        return cls(
            dataset=obj["dataset"],
            seq=obj["seq"],
            root=parse_cid(obj["root"], "root", InvalidHead),
            tables=parse_cid(obj["tables"], "tables", InvalidHead),
            created_at=obj["created_at"],
            bytes=obj["bytes"],
        )


def encode_head(head: Head) -> bytes:
    """The GossipSub message body announcing `head`."""
    data = json.dumps(head.to_json(), separators=(",", ":"), sort_keys=True).encode()
    assert len(data) <= MAX_HEAD_MESSAGE, "a well-formed head always fits"
    return data


def decode_head(data: bytes) -> Head:
    """Parse a GossipSub message body; raises `InvalidHead` (size, JSON, fields, CIDs)."""
    if len(data) > MAX_HEAD_MESSAGE:
        raise InvalidHead(f"message of {len(data)} bytes exceeds {MAX_HEAD_MESSAGE}")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, huge ints, deep nesting
        raise InvalidHead(f"not UTF-8 JSON: {e}") from None
    return Head.from_json(obj)


# --- seq bookkeeping ---------------------------------------------------------

NEW = "new"  # a higher seq than anything seen: follow it
REPEAT = "repeat"  # the same head again (periodic re-announcement): accept, no change


@dataclass
class HeadBook:
    """The highest accepted head per dataset; decides what an announcement means.

    `classify(head)` returns `NEW` or `REPEAT`, or raises `InvalidHead` for a
    seq that went backwards or a second, different head with the same seq
    (the writer forked its history). It never changes the book; `accept(head)`
    does, so a rejected message touches no state.
    """

    heads: dict[str, Head] = field(default_factory=dict)

    def classify(self, head: Head) -> str:
        known = self.heads.get(head.dataset)
        if known is None or head.seq > known.seq:
            return NEW
        if head.seq == known.seq and head == known:
            return REPEAT
        if head.seq == known.seq:
            raise InvalidHead(
                f"dataset {head.dataset} announced a different root for seq {head.seq}"
            )
        raise InvalidHead(
            f"seq {head.seq} for dataset {head.dataset} does not grow (known: {known.seq})"
        )

    def accept(self, head: Head) -> bool:
        """Record `head` if it is new; return True when it changed the book."""
        if self.classify(head) == NEW:
            self.heads[head.dataset] = head
            return True
        return False

    def get(self, dataset: str) -> Head | None:
        return self.heads.get(dataset)


def check_announcement(data: bytes, signer: str, book: HeadBook) -> Head:
    """Validate a GossipSub announcement signed by peer `signer`.

    Returns the head; raises `InvalidHead` when the message is oversized or
    malformed, announces a dataset that is not `signer`'s own, or carries a seq
    that does not grow. Does not modify `book`.
    """
    head = decode_head(data)
    if head.dataset != signer:
        raise InvalidHead(f"peer {signer} announced dataset {head.dataset}, which it does not own")
    book.classify(head)
    return head


# --- /benchsync/head/1.0.0 -----------------------------------------------------


def head_request(network: str) -> dict[str, Any]:
    """The head request body."""
    return {"network": check_network_name(network)}


def head_response(
    head: Head | None, replicas: Iterable[Head], signed: Iterable[bytes | None] = ()
) -> dict[str, Any]:
    """The head response body: our own head (or null) and the replicas we hold.

    `signed` holds, in the order of `replicas`, each replica's signed
    announcement (or None: the entry then has no `signed` field). At most
    `MAX_REPLICAS_IN_RESPONSE` replicas are listed, and only as many as fit
    in `MAX_HEAD_RESPONSE` bytes once encoded.
    """
    reps = list(replicas)[:MAX_REPLICAS_IN_RESPONSE]
    envelopes = list(signed)
    envelopes += [None] * (len(reps) - len(envelopes))
    own = None if head is None else head.to_json()
    budget = MAX_HEAD_RESPONSE - 256 - len(_compact({"head": own}))  # framing, status, keys
    entries: list[dict[str, Any]] = []
    for rep, envelope in zip(reps, envelopes, strict=False):
        entry = rep.to_json()
        if envelope is not None:
            if len(envelope) > MAX_SIGNED_HEAD:
                raise ValueError(f"signed head of {len(envelope)} bytes exceeds {MAX_SIGNED_HEAD}")
            entry["signed"] = base64.b64encode(envelope).decode("ascii")
        budget -= len(_compact(entry)) + 1
        if budget < 0:
            break
        entries.append(entry)
    return {"status": "ok", "head": own, "replicas": entries}


def _compact(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class HeadRequest:
    """ "What is your head?" for `network` (any JSON value a peer sent: the adapter checks it)."""

    network: object


@dataclass(frozen=True)
class HeadResponse:
    """A head response: the responder's own head and the heads it replicates.

    `signed[i]` is the serialized GossipSub message in which the writer of
    `replicas[i]` announced it (None when the entry had none); it is empty
    (all None) when not given.
    """

    head: Head | None
    replicas: tuple[Head, ...]
    signed: tuple[bytes | None, ...] = ()

    def __post_init__(self) -> None:
        if not self.signed:
            object.__setattr__(self, "signed", (None,) * len(self.replicas))
        if len(self.signed) != len(self.replicas):
            raise ValueError("signed must hold one entry (or None) per replica")


def parse_signed(entry: Mapping[str, Any]) -> bytes | None:
    """The signed announcement of a replica entry (None when absent); raises `InvalidHead`."""
    raw = entry.get("signed")
    if raw is None:
        return None
    if not isinstance(raw, str) or not 0 < len(raw) <= MAX_SIGNED_HEAD_B64:
        raise InvalidHead(f"signed must be base64 of at most {MAX_SIGNED_HEAD} bytes")
    try:
        blob = base64.b64decode(raw.encode("ascii"), validate=True)
    except (ValueError, binascii.Error):  # non-ASCII, bad alphabet or padding
        raise InvalidHead("signed is not base64") from None
    if len(blob) > MAX_SIGNED_HEAD:
        raise InvalidHead(f"signed head of {len(blob)} bytes exceeds {MAX_SIGNED_HEAD}")
    return blob


def parse_head_response(obj: Mapping[str, Any], responder: str) -> HeadResponse:
    """Check a head response from peer `responder`.

    Raises `InvalidHead` when it is malformed (a refusal is the session's
    `Refusal` event, never passed here), or when `head` is not the
    responder's own dataset (a replica must never be passed off as the
    writer's head). The replicas' signed envelopes are only decoded here:
    `check_signed_hint` and the daemon's signature check judge them.
    """
    status = obj.get("status")
    if status != "ok":
        raise InvalidHead(f"unknown head response status {status!r}")
    raw_head = obj.get("head")
    head = None if raw_head is None else Head.from_json(raw_head)
    if head is not None and head.dataset != responder:
        raise InvalidHead(f"peer {responder} answered with the head of dataset {head.dataset}")
    raw_reps = obj.get("replicas", [])
    if not isinstance(raw_reps, list) or len(raw_reps) > MAX_REPLICAS_IN_RESPONSE:
        raise InvalidHead(f"replicas must be a list of at most {MAX_REPLICAS_IN_RESPONSE} heads")
    replicas = tuple(Head.from_json(r) for r in raw_reps)  # each one a Mapping from here on
    return HeadResponse(head, replicas, tuple(parse_signed(r) for r in raw_reps))


def check_signed_hint(
    head: Head, signer: str, topics: Iterable[str], data: bytes, topic: str
) -> None:
    """Check that a signed message (signature already verified) announces replica `head`.

    `signer` is the message's verified `from`, `topics` its topic IDs and
    `data` its body. Raises `InvalidHead` unless the signer is the head's
    dataset (its writer), the message was published on `topic` only, and its
    body decodes to exactly `head`.
    """
    if signer != head.dataset:
        raise InvalidHead(f"replica head of {head.dataset} comes with a message signed by {signer}")
    if list(topics) != [topic]:
        raise InvalidHead(f"replica head of {head.dataset} was signed for another topic")
    if decode_head(data) != head:
        raise InvalidHead(f"replica head of {head.dataset} differs from what its writer signed")


class HeadSession(Session):
    """One side of `/benchsync/head/1.0.0`: `HeadRequest`, then `HeadResponse` or `Refusal`.

    The requester passes `responder` (the peer it asks): a response whose
    own head is another dataset is a `RemoteProtocolError` (`InvalidHead`).
    """

    TRANSITIONS = {
        (REQUESTER, IDLE, HeadRequest): REQUESTED,
        (RESPONDER, IDLE, Refusal): DONE,  # refused before the request was read
        (RESPONDER, REQUESTED, Refusal): DONE,
        (RESPONDER, REQUESTED, HeadResponse): DONE,
    }

    def __init__(self, role: str, *, responder: str = "") -> None:
        super().__init__(role, max_frame=MAX_HEAD_RESPONSE if role == REQUESTER else MAX_FRAME)
        if role == REQUESTER and not responder:
            raise ValueError("a head requester must name the responder it asks")
        self.responder = responder

    def _encode(self, event: object) -> bytes:
        if isinstance(event, HeadRequest):
            return encode_json_frame(head_request(str(event.network)))
        if isinstance(event, HeadResponse):
            body = head_response(event.head, event.replicas, event.signed)
            return encode_json_frame(body, max_frame=MAX_HEAD_RESPONSE)
        return super()._encode(event)

    def _decode(self) -> object:
        obj = self._next_json()
        if obj is None:
            return NEED_DATA
        if self.role == RESPONDER:
            return HeadRequest(network=obj.get("network"))
        return parse_refusal(obj) or parse_head_response(obj, self.responder)


# --- Sybil defence ---------------------------------------------------------------


class NewDatasetLimiter:
    """Rate of *new* datasets per source: a token bucket per connection, time passed in.

    Anyone can make identities, so a peer can sign heads for thousands of
    datasets of its own; `allow(source, now)` admits at most `burst` new
    datasets from one source (the peer that delivered the head) at once and
    `per_second` after that. Relays are sources like any other: a hub
    forwarding a lab's heads needs one token per dataset, once. Only the most
    recent `max_sources` sources are remembered, so the limiter's own memory
    is bounded too.
    """

    def __init__(
        self,
        *,
        burst: int = NEW_DATASETS_BURST,
        per_second: float = NEW_DATASETS_PER_SECOND,
        max_sources: int = MAX_RATE_SOURCES,
    ) -> None:
        if burst < 1 or per_second < 0 or max_sources < 1:
            raise ValueError("burst and max_sources must be >= 1, per_second >= 0")
        self.burst = burst
        self.per_second = per_second
        self.max_sources = max_sources
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, at time)

    def allow(self, source: str, now: float) -> bool:
        """Take one token of `source` at time `now` (seconds); False when it has none."""
        tokens, then = self._buckets.pop(source, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - then) * self.per_second)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[source] = (tokens, now)  # re-inserted: dicts keep recency order
        while len(self._buckets) > self.max_sources:
            del self._buckets[next(iter(self._buckets))]
        return allowed
