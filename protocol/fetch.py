"""`/benchsync/car/1.0.0`: block fetch messages and the requester's round planner, sans-IO.

Design (chosen for incremental and resumable sync): the requester asks in
*rounds* for exactly the blocks it is missing. It walks the DAG from the root
over what it already holds: a held dag-pb node is opened and its children are
examined, a held raw leaf is done, an absent block is *wanted*
(`missing_blocks`). It sends `{network, root, want: [cid, ...]}`; the provider
answers with one status frame and a CARv1 stream of the wanted blocks it holds,
in want order. Newly received inner nodes reveal the next level, so a fresh
fetch of a Kubo-style DAG takes one round per tree level (4-5), and an
incremental fetch moves only the blocks the requester lacks: unchanged leaves
are never requested because the requester sees their CIDs in the new parents
and finds them in its own store. A broken transfer keeps every verified block;
the next round, from any provider, wants only the remainder.

Wire format of one exchange (one stream per request):

    requester -> provider: frame(JSON {"network", "root", "want": [CID strings],
                                      "max_bytes": n})
    provider  -> requester: frame(JSON {"status": "ok", "count": n, "bytes": b,
                                       "missing": [CID strings]})
                            CAR header (roots = [root]) + n sections
    or provider -> requester: frame(JSON {"status": "refused", "reason": ...})

The n blocks sent are the first n of `want` minus `missing` (in order); the
rest of the want list was deferred to keep the response under the provider's
`max_response` and the requester's `max_bytes`, and is simply asked for again.
`max_bytes` (the requester's `max_response_bytes`) is optional: a request
without it, from an older node, gets responses up to the provider's own limit.
The requester checks that every block is the next one it expects (so a
provider cannot push unsolicited data), that the bytes match the announced
total, and the CAR decoder checks every block against its CID.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from multiformats import CID

from benchsync.protocol.frames import (
    Interrupted,
    LocalProtocolError,
    RemoteProtocolError,
    encode_json_frame,
    parse_cid,
)
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
from benchsync.storage import car, unixfs

# Pure CID text conversion (no I/O): the fast paths multiformats lacks.
from benchsync.storage.cid import cid_from_text, cid_text
from benchsync.storage.limits import MAX_BLOCK_SIZE, MAX_CID_BYTES

CAR_PROTOCOL_ID = "/benchsync/car/1.0.0"
MAX_WANT = 1024  # CIDs per request: ~62 KiB of JSON, one 256 MiB response of full chunks
MAX_FETCH_FRAME = 128 * 1024  # bytes: largest request or status frame
MAX_REQUESTED_BYTES = 2**63 - 1  # bytes: largest `max_bytes` a request may name
RAW = "raw"  # UnixFS leaves


class FetchProtocolError(RemoteProtocolError):
    """A provider's response broke the fetch protocol (wrong block, bad status, short stream)."""


class ResponseTooLarge(Exception):
    """A provider announced more block bytes than our limit (before sending any block).

    Not a protocol error of either side: a provider that predates `max_bytes`
    in requests fills responses up to its own limit, honestly; the requester
    should go elsewhere, not blame it.
    """

    def __init__(self, *, limit: int, got: int) -> None:
        super().__init__(f"provider announced {got} bytes, our limit is {limit}")
        self.limit = limit
        self.got = got


def _cid(value: object, what: str) -> CID:
    # Want lists carry up to MAX_WANT CIDs; the fast path parses our canonical ones.
    cid = cid_from_text(value) if isinstance(value, str) else None
    return cid if cid is not None else parse_cid(value, what, FetchProtocolError)


def _cid_list(value: object, what: str, limit: int) -> tuple[CID, ...]:
    if not isinstance(value, list):
        raise FetchProtocolError(f"{what} must be a list of CID strings")
    if len(value) > limit:
        raise FetchProtocolError(f"{what} has {len(value)} entries, limit {limit}")
    return tuple(_cid(v, what) for v in value)


@dataclass(frozen=True)
class FetchRequest:
    """Ask a provider for exactly `want` (blocks of the DAG under `root`).

    `max_bytes` is the most block bytes the requester accepts in one
    response (its `max_response_bytes`); None leaves it to the provider.
    """

    network: str
    root: CID
    want: tuple[CID, ...]
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if not 0 < len(self.want) <= MAX_WANT:
            raise ValueError(f"a fetch request wants 1..{MAX_WANT} blocks, not {len(self.want)}")
        if len(set(self.want)) != len(self.want):
            raise ValueError("a fetch request must not want the same block twice")
        if self.max_bytes is not None and (
            type(self.max_bytes) is not int or not 0 < self.max_bytes <= MAX_REQUESTED_BYTES
        ):
            raise ValueError(
                f"max_bytes must be an integer in 1..{MAX_REQUESTED_BYTES}, got {self.max_bytes!r}"
            )

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "network": self.network,
            "root": cid_text(self.root),
            "want": [cid_text(c) for c in self.want],
        }
        if self.max_bytes is not None:
            doc["max_bytes"] = self.max_bytes
        return doc

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> FetchRequest:
        """Parse a request; raises `FetchProtocolError` when malformed.

        The network it names is not checked here: the stream adapter refuses
        another network for every protocol in one place.
        """
        network = obj.get("network")
        if not isinstance(network, str):
            raise FetchProtocolError(f"network must be a string, got {type(network).__name__}")
        root = _cid(obj.get("root"), "root")
        want = _cid_list(obj.get("want"), "want", MAX_WANT)
        try:
            return cls(network=network, root=root, want=want, max_bytes=obj.get("max_bytes"))
        except ValueError as e:
            raise FetchProtocolError(str(e)) from None


@dataclass(frozen=True)
class FetchStatus:
    """The provider's answer before the CAR: how many blocks and bytes follow, what it lacks."""

    count: int
    bytes: int
    missing: tuple[CID, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "count": self.count,
            "bytes": self.bytes,
            "missing": [cid_text(c) for c in self.missing],
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> FetchStatus:
        """Parse a status frame; raises `FetchProtocolError` (a refusal is the session's
        `Refusal` event, never passed here)."""
        status = obj.get("status")
        if status != "ok":
            raise FetchProtocolError(f"unknown fetch status {status!r}")
        count, nbytes = obj.get("count"), obj.get("bytes")
        if type(count) is not int or not 0 <= count <= MAX_WANT:
            raise FetchProtocolError(f"count must be an integer in 0..{MAX_WANT}, got {count!r}")
        if type(nbytes) is not int or nbytes < 0:
            raise FetchProtocolError(f"bytes must be a non-negative integer, got {nbytes!r}")
        missing = _cid_list(obj.get("missing"), "missing", MAX_WANT)
        return cls(count=count, bytes=nbytes, missing=missing)


def plan_response(
    want: Sequence[CID],
    size_of: Callable[[CID], int | None],
    *,
    max_response: int,
    requester_limit: int | None = None,
) -> tuple[list[CID], FetchStatus]:
    """Provider side: choose the blocks to send for `want`.

    `size_of(cid)` returns a held block's size or None when absent. Returns the
    blocks to send, in want order, and the status frame announcing them: held
    blocks are sent until the next would push the total past `max_response`
    (our limit: the first held block is always sent, so every round makes
    progress) or past `requester_limit` (the request's `max_bytes`: never
    exceeded, the requester would reject the whole response); the rest is
    deferred. Absent blocks are listed as missing.
    """
    send: list[CID] = []
    missing: list[CID] = []
    total = 0
    full = False
    for cid in want:
        size = size_of(cid)
        if size is None:
            missing.append(cid)
        elif (
            not full
            and (not send or total + size <= max_response)
            and (requester_limit is None or total + size <= requester_limit)
        ):
            send.append(cid)
            total += size
        else:
            full = True  # keep want order: nothing after a deferred block is sent
    return send, FetchStatus(count=len(send), bytes=total, missing=tuple(missing))


def expected_blocks(request: FetchRequest, status: FetchStatus) -> list[CID]:
    """Requester side: the exact sequence of CIDs the CAR must carry.

    Raises `FetchProtocolError` when the status is inconsistent with the
    request (it lists a block we did not want, or counts more than remain).
    """
    wanted = set(request.want)
    missing = set(status.missing)
    if not missing <= wanted:
        raise FetchProtocolError("provider reported missing blocks that were not requested")
    available = [c for c in request.want if c not in missing]
    if status.count > len(available):
        raise FetchProtocolError(
            f"provider announced {status.count} blocks but only {len(available)} were requested"
        )
    return available[: status.count]


class BlockSequence:
    """Requester side: checks that a response's blocks are exactly the expected ones.

    `check(cid, data)` raises `FetchProtocolError` for an unsolicited or
    out-of-order block or for more bytes than announced; `finish()` raises
    when blocks are missing. (The announced total is checked against our
    limit by `FetchSession` when the status arrives.)
    """

    def __init__(self, expected: Sequence[CID], announced_bytes: int) -> None:
        self._expected = list(expected)
        self._next = 0
        self.announced = announced_bytes
        self.received_bytes = 0

    def check(self, cid: CID, data: bytes) -> None:
        if self._next >= len(self._expected):
            raise FetchProtocolError(f"provider sent unsolicited block {cid}")
        if cid != self._expected[self._next]:
            raise FetchProtocolError(
                f"provider sent block {cid}, expected {self._expected[self._next]}"
            )
        self.received_bytes += len(data)
        if self.received_bytes > self.announced:
            raise FetchProtocolError(
                f"provider sent more than the {self.announced} bytes it announced"
            )
        self._next += 1

    @property
    def done(self) -> bool:
        return self._next == len(self._expected)

    def finish(self) -> None:
        if not self.done:
            raise FetchProtocolError(
                f"response ended after {self._next} of {len(self._expected)} blocks"
            )
        if self.received_bytes != self.announced:
            raise FetchProtocolError(
                f"provider announced {self.announced} bytes, sent {self.received_bytes}"
            )


def missing_blocks(
    root: CID,
    has: Callable[[CID], bool],
    get: Callable[[CID], bytes],
    *,
    limit: int = MAX_WANT,
) -> list[CID]:
    """Requester side: the blocks of the DAG under `root` that are not held, at most `limit`.

    The frontier of storage's one DAG walk (`unixfs.frontier`), breadth-first
    so that each round asks for the shallowest absent blocks: a held dag-pb
    node's links are followed, a held raw leaf ends its branch, an absent
    block is returned. An empty list means the whole DAG is present. Does no
    I/O itself; `has`/`get` are the caller's blockstore. Raises DagPbError for
    a malformed held node.
    """
    return unixfs.frontier(get, has, root, limit=limit, order=unixfs.BREADTH_FIRST)


# --- the session -------------------------------------------------------------------

BODY = "body"  # the status said blocks follow: CAR header and sections until the last one


@dataclass(frozen=True)
class Block:
    """One block of the response, in want order (verified against its CID when received)."""

    cid: CID
    data: bytes


@dataclass(frozen=True)
class EndOfResponse:
    """The last announced block has been sent or received (or none was announced)."""


class FetchSession(Session):
    """One side of `/benchsync/car/1.0.0` (see the module docstring), sans-IO.

    Requester: `send(request)`, then events `FetchStatus` or `Refusal`, then a
    `Block` per announced block (decoded from the CAR and checked: the
    expected CID, in order, within the announced bytes) and `EndOfResponse`.
    It raises `ResponseTooLarge` when the status announces more than
    `max_response` (nobody's fault), `FetchProtocolError` for anything else
    the provider got wrong, and `Interrupted` when the stream ends early.
    `max_response` is the node's `max_response_bytes` setting; the protocol
    has no default of its own (left out: the wire's largest, no limit).

    Provider: the `FetchRequest` event, then `send(status)` (with the CAR
    header when blocks follow), `send(Block(...))` for exactly the announced
    blocks in order, `send(EndOfResponse())` (or `send(Refusal(...))`).
    Sending anything else raises `LocalProtocolError`.
    """

    TRANSITIONS = {
        (REQUESTER, IDLE, FetchRequest): REQUESTED,
        (RESPONDER, IDLE, Refusal): DONE,  # refused before the request was read
        (RESPONDER, REQUESTED, Refusal): DONE,
        (RESPONDER, REQUESTED, FetchStatus): BODY,
        (RESPONDER, BODY, Block): BODY,
        (RESPONDER, BODY, EndOfResponse): DONE,
    }

    def __init__(
        self,
        role: str,
        *,
        max_response: int = MAX_REQUESTED_BYTES,
        max_block: int = MAX_BLOCK_SIZE,
    ) -> None:
        super().__init__(role, max_frame=MAX_FETCH_FRAME)
        self.max_response = max_response
        self.max_block = max_block
        self.request: FetchRequest | None = None
        self.status: FetchStatus | None = None
        self.sequence: BlockSequence | None = None  # what the body must carry, in order
        self._car: car.CarDecoder | None = None
        # Body bytes not yet given to the CAR decoder, as received: appending to a
        # bytearray copied every byte once more (a third of a receiver's decoding time).
        self._raw: list[bytes] = []
        self._raw_len = 0  # bytes in _raw
        self._blocks: list[tuple[CID, bytes]] = []  # decoded, not yet returned as events

    # --- sending ------------------------------------------------------------------

    def _encode(self, event: object) -> bytes:
        if isinstance(event, FetchRequest):
            self.request = event
            return encode_json_frame(event.to_json(), max_frame=MAX_FETCH_FRAME)
        if isinstance(event, FetchStatus):
            assert self.request is not None  # the table admits a status only after a request
            self._start_body(event)
            frame = encode_json_frame(event.to_json(), max_frame=MAX_FETCH_FRAME)
            return frame + (car.encode_header([self.request.root]) if event.count else b"")
        if isinstance(event, Block):
            assert self.sequence is not None
            try:
                self.sequence.check(event.cid, event.data)
            except FetchProtocolError as e:
                raise LocalProtocolError(f"sending a block not announced: {e}") from None
            return car.encode_section(event.cid, event.data)
        if isinstance(event, EndOfResponse):
            assert self.sequence is not None
            try:
                self.sequence.finish()
            except FetchProtocolError as e:
                raise LocalProtocolError(
                    f"ending a response before every announced block: {e}"
                ) from None
            return b""
        return super()._encode(event)

    def _start_body(self, status: FetchStatus) -> None:
        assert self.request is not None
        try:
            expected = expected_blocks(self.request, status)
        except FetchProtocolError as e:
            if self.role == REQUESTER:
                raise
            raise LocalProtocolError(f"status does not fit the request: {e}") from None
        self.status = status
        self.sequence = BlockSequence(expected, status.bytes)

    # --- receiving -----------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.state in (BODY, DONE) and self.role == REQUESTER and data:
            self._raw.append(data if isinstance(data, bytes) else bytes(data))
            self._raw_len += len(data)
            return
        super().receive_data(data)

    def next_event(self) -> object:
        if self.state == DONE and self._raw_len:
            raise FetchProtocolError(f"{self._raw_len} bytes after the end of the response")
        return super().next_event()

    def _decode(self) -> object:
        if self.state == IDLE and self.role == RESPONDER:
            obj = self._next_json()
            if obj is None:
                return NEED_DATA
            self.request = FetchRequest.from_json(obj)
            return self.request
        if self.state == REQUESTED and self.role == REQUESTER:
            return self._decode_status()
        if self.state == BODY and self.role == REQUESTER:
            return self._decode_block()
        return NEED_DATA

    def _decode_status(self) -> object:
        obj = self._next_json()
        if obj is None:
            return NEED_DATA
        refused = parse_refusal(obj)
        if refused is not None:
            return refused
        status = FetchStatus.from_json(obj)
        if status.bytes > self.max_response:
            raise ResponseTooLarge(limit=self.max_response, got=status.bytes)
        self._start_body(status)
        # Bytes after the status frame are the CAR: the rest of this read and all later ones.
        rest = self.frames.take_buffer()
        if rest:
            self._raw.append(rest)
            self._raw_len += len(rest)
        self._car = car.CarDecoder(
            max_section=self.max_block + MAX_CID_BYTES, max_block=self.max_block
        )
        return status

    def _decode_block(self) -> object:
        assert self.sequence is not None and self._car is not None and self.request is not None
        if self.sequence.done and not self._blocks:
            if self._raw_len:
                raise FetchProtocolError(f"{self._raw_len} bytes after the last announced block")
            self.sequence.finish()  # the announced byte total, exactly
            return EndOfResponse()
        if not self._blocks:
            data = self._raw[0] if len(self._raw) == 1 else b"".join(self._raw)
            self._raw, self._raw_len = [], 0
            try:
                # With no new bytes this surfaces an error kept after the last good block.
                self._blocks = self._car.feed(data)
            except car.CarError as e:
                raise FetchProtocolError(str(e)) from None
            if self._car.roots is not None and self._car.roots != [self.request.root]:
                roots = self._car.roots
                raise FetchProtocolError(f"CAR roots {roots} are not [{self.request.root}]")
            self._blocks.reverse()  # popped from the end, oldest first
        if self._blocks:
            cid, data = self._blocks.pop()
            self.sequence.check(cid, data)
            return Block(cid, data)
        if self.eof:
            raise Interrupted(
                f"stream ended after {self.sequence.received_bytes} of "
                f"{self.sequence.announced} bytes"
            )
        return NEED_DATA
