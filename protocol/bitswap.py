"""Bitswap's wire format, sans-IO: the `message.proto` of the spec, length-prefixed.

This module owns the bytes of `/ipfs/bitswap/1.2.0` (and 1.1.0, 1.0.0) as
IPFS implementations (boxo, Helia) write them: every message is an unsigned
varint length followed by a protobuf `Message`
(https://specs.ipfs.tech/bitswap-protocol/):

    message Message {
      message Wantlist {
        enum WantType { Block = 0; Have = 1; }
        message Entry { bytes block = 1; int32 priority = 2; bool cancel = 3;
                        WantType wantType = 4; bool sendDontHave = 5; }
        repeated Entry entries = 1; bool full = 2;
      }
      message Block { bytes prefix = 1; bytes data = 2; }
      enum BlockPresenceType { Have = 0; DontHave = 1; }
      message BlockPresence { bytes cid = 1; BlockPresenceType type = 2; }
      Wantlist wantlist = 1;
      repeated bytes blocks = 2;          // 1.0.0: CIDv0 implied
      repeated Block payload = 3;         // 1.1.0+: the CID prefix travels along
      repeated BlockPresence blockPresences = 4;  // 1.2.0
      int32 pendingBytes = 5;
    }

Why hand-written rather than a module generated for the `protobuf` runtime:
the runtime parses a whole message into objects before we could count its
entries (a 4 MiB message of tiny entries is ~100,000 objects), a generated
module is tied to the protoc release that wrote it (none is installed here,
and py-libp2p pins `protobuf<7`), and the format is five small messages, the
same wire rules `storage/dagpb.py` already writes by hand. Decoding here keeps
at most `MAX_ENTRIES` wantlist entries and `MAX_PRESENCES` presences of a
message (the rest are counted, never built), checks every length against the
bytes that remain, and raises only `BitswapDecodeError` (a
`RemoteProtocolError`) for malformed input.

A received block's CID is computed here from its prefix and its bytes, so a
`Block` that comes out of the decoder is verified by construction: a peer
cannot send bytes under a CID they do not hash to. Hash functions other than
sha2-256 (and identity) cannot be verified: such blocks are dropped and
counted (`Message.unverifiable`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from multiformats import CID

from benchsync.protocol.frames import RemoteProtocolError
from benchsync.storage.cid import (
    DAG_PB,
    IDENTITY,
    SHA2_256,
    SHA2_256_SIZE,
    InvalidCID,
    cid_bytes_v1,
    decode_cid,
    make_cid,
    read_uvarint,
    uvarint,
)
from benchsync.storage.limits import MAX_BLOCK_SIZE, MAX_CID_BYTES

BITSWAP_120 = "/ipfs/bitswap/1.2.0"
BITSWAP_110 = "/ipfs/bitswap/1.1.0"
BITSWAP_100 = "/ipfs/bitswap/1.0.0"
BITSWAP_PROTOCOLS = (BITSWAP_120, BITSWAP_110, BITSWAP_100)  # preferred first

# boxo's network.MessageSizeMax: a message is at most 4 MiB, so one block
# (at most MAX_BLOCK_SIZE, 2 MiB) always fits with room for presences.
MAX_MESSAGE = 4 * 1024 * 1024  # bytes
MAX_ENTRIES = 4096  # wantlist entries kept from one message (the rest are counted)
MAX_PRESENCES = 4096  # block presences kept from one message (the rest are counted)
MAX_PREFIX_BYTES = 4 * 9  # four varints of at most 9 bytes each

WANT_BLOCK = 0  # Wantlist.WantType.Block
WANT_HAVE = 1  # Wantlist.WantType.Have
HAVE = 0  # BlockPresenceType.Have
DONT_HAVE = 1  # BlockPresenceType.DontHave

# Protobuf wire types.
_VARINT = 0
_I64 = 1
_LEN = 2
_I32 = 5


class BitswapDecodeError(RemoteProtocolError):
    """Bytes a peer sent are not a Bitswap message within our limits (the peer is at fault)."""


class MessageTooLarge(BitswapDecodeError):
    """A message's length prefix exceeds `MAX_MESSAGE` (checked before buffering it)."""

    def __init__(self, *, limit: int, got: int) -> None:
        super().__init__(f"Bitswap message too large: {got} bytes, limit {limit}")
        self.limit = limit
        self.got = got


@dataclass(frozen=True)
class WantEntry:
    """One wantlist entry: want (or cancel) `cid`, as a block or only its presence."""

    cid: CID
    want_type: int = WANT_BLOCK
    send_dont_have: bool = False
    cancel: bool = False
    priority: int = 1


@dataclass(frozen=True)
class Block:
    """A block and its CID (computed from the bytes when decoded: verified)."""

    cid: CID
    data: bytes


@dataclass(frozen=True)
class Presence:
    """HAVE (`have=True`) or DONT_HAVE for `cid`."""

    cid: CID
    have: bool


@dataclass(frozen=True)
class Message:
    """One Bitswap message. `full`: the wantlist replaces the previous one.

    `dropped_entries`, `dropped_presences` and `unverifiable` count what a
    decoded message held beyond our limits or could not verify.
    """

    entries: tuple[WantEntry, ...] = ()
    full: bool = False
    blocks: tuple[Block, ...] = ()
    presences: tuple[Presence, ...] = ()
    pending_bytes: int = 0
    dropped_entries: int = 0
    dropped_presences: int = 0
    unverifiable: int = 0
    has_wantlist: bool = field(default=False, compare=False)


def key(cid: CID) -> bytes:
    """The identity of a block whatever its CID version: the binary CIDv1."""
    return cid_bytes_v1(cid)


# --- encoding -----------------------------------------------------------------------------


def _tag(number: int, wire_type: int) -> bytes:
    return uvarint(number << 3 | wire_type)


def _len_field(number: int, payload: bytes) -> bytes:
    return _tag(number, _LEN) + uvarint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    # int32/enum/bool: a negative int32 is sign-extended to 64 bits (10 bytes), as protobuf does.
    return _tag(number, _VARINT) + _varint64(value)


def _varint64(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def cid_prefix(cid: CID) -> bytes:
    """The 1.1.0 payload prefix: version, codec, multihash code, digest length (varints)."""
    mh = cid.digest
    code, pos = read_uvarint(mh, 0) or (0, 0)
    size, _ = read_uvarint(mh, pos) or (0, 0)
    return uvarint(cid.version) + uvarint(cid.codec.code) + uvarint(code) + uvarint(size)


def _cid_wire(cid: CID) -> bytes:
    """A CID as Bitswap carries it: a CIDv0 as its bare multihash, a CIDv1 in binary."""
    return bytes(cid) if cid.version == 1 else bytes(cid.digest)


def encode_message(msg: Message, protocol: str = BITSWAP_120) -> bytes:
    """The protobuf bytes of `msg` (no length prefix) for a peer speaking `protocol`.

    For 1.0.0 blocks go in `blocks` (the receiver assumes CIDv0) and presences
    are left out (1.0.0 has none); 1.1.0 has no presences either.
    """
    out = bytearray()
    if msg.entries or msg.full or msg.has_wantlist:
        wl = bytearray()
        for e in msg.entries:
            entry = _len_field(1, _cid_wire(e.cid))
            if e.priority:
                entry += _int_field(2, e.priority)
            if e.cancel:
                entry += _int_field(3, 1)
            if e.want_type != WANT_BLOCK and protocol == BITSWAP_120:
                entry += _int_field(4, e.want_type)
            if e.send_dont_have and protocol == BITSWAP_120:
                entry += _int_field(5, 1)
            wl += _len_field(1, entry)
        if msg.full:
            wl += _int_field(2, 1)
        out += _len_field(1, bytes(wl))
    for b in msg.blocks:
        if protocol == BITSWAP_100:
            out += _len_field(2, b.data)
        else:
            out += _len_field(3, _len_field(1, cid_prefix(b.cid)) + _len_field(2, b.data))
    if protocol == BITSWAP_120:
        for p in msg.presences:
            body = _len_field(1, _cid_wire(p.cid))
            if not p.have:
                body += _int_field(2, DONT_HAVE)
            out += _len_field(4, body)
    if msg.pending_bytes:
        out += _int_field(5, msg.pending_bytes)
    return bytes(out)


def frame(body: bytes) -> bytes:
    """`body` with its unsigned varint length prefix."""
    return uvarint(len(body)) + body


def block_wire_size(cid: CID, size: int) -> int:
    """Bytes a block of `size` bytes adds to an encoded 1.1.0+ message (an upper bound)."""
    return size + len(cid_prefix(cid)) + 3 * 10


# --- decoding -----------------------------------------------------------------------------


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """A protobuf varint (up to 10 bytes, 64 bits) at `pos`; (value, next position)."""
    value = 0
    for i in range(10):
        if pos >= len(buf):
            raise BitswapDecodeError("message ends inside a varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if value >= 1 << 64:
                raise BitswapDecodeError("varint exceeds 64 bits")
            return value, pos
    raise BitswapDecodeError("varint longer than 10 bytes")


def _fields(buf: memoryview) -> list[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field of one protobuf message.

    Unknown fields are skipped by their wire type (forward compatibility);
    groups (wire types 3 and 4) are refused: no Bitswap message has them.
    """
    out: list[tuple[int, int, int | memoryview]] = []
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise BitswapDecodeError("field number 0")
        if wire_type == _VARINT:
            value, pos = _varint(buf, pos)
            out.append((number, wire_type, value))
        elif wire_type == _LEN:
            size, pos = _varint(buf, pos)
            if size > len(buf) - pos:
                left = len(buf) - pos
                raise BitswapDecodeError(f"field {number} claims {size} bytes, {left} left")
            out.append((number, wire_type, buf[pos : pos + size]))
            pos += size
        elif wire_type in (_I64, _I32):
            width = 8 if wire_type == _I64 else 4
            if width > len(buf) - pos:
                raise BitswapDecodeError(f"message ends inside fixed-width field {number}")
            pos += width
        else:
            raise BitswapDecodeError(f"unsupported wire type {wire_type} in field {number}")
    return out


def _int32(value: int) -> int:
    """A decoded varint as protobuf's int32 (the low 32 bits, two's complement)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _cid(raw: memoryview, what: str) -> CID:
    if len(raw) > MAX_CID_BYTES:
        raise BitswapDecodeError(f"{what}: a {len(raw)}-byte CID (limit {MAX_CID_BYTES})")
    try:
        return decode_cid(bytes(raw))
    except (InvalidCID, ValueError, KeyError) as e:
        raise BitswapDecodeError(f"{what}: not a CID ({e})") from None


def _bytes(value: int | memoryview, what: str) -> memoryview:
    if not isinstance(value, memoryview):
        raise BitswapDecodeError(f"{what} must be length-delimited")
    return value


def _number(value: int | memoryview, what: str) -> int:
    if isinstance(value, memoryview):
        raise BitswapDecodeError(f"{what} must be a varint")
    return value


def _entry(raw: memoryview) -> WantEntry:
    cid: CID | None = None
    priority, cancel, want_type, dont_have = 1, False, WANT_BLOCK, False
    for number, _, value in _fields(raw):
        if number == 1:
            cid = _cid(_bytes(value, "entry.block"), "wantlist entry")
        elif number == 2:
            priority = _int32(_number(value, "entry.priority"))
        elif number == 3:
            cancel = bool(_number(value, "entry.cancel"))
        elif number == 4:
            want_type = _number(value, "entry.wantType")
            if want_type not in (WANT_BLOCK, WANT_HAVE):
                raise BitswapDecodeError(f"unknown wantType {want_type}")
        elif number == 5:
            dont_have = bool(_number(value, "entry.sendDontHave"))
    if cid is None:
        raise BitswapDecodeError("wantlist entry without a CID")
    return WantEntry(cid, want_type, dont_have, cancel, priority)


def _uvarint(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int] | None:
    """`read_uvarint` with its errors as the peer's (`BitswapDecodeError`)."""
    try:
        return read_uvarint(buf, pos)
    except InvalidCID as e:
        raise BitswapDecodeError(str(e)) from None


def _prefix_cid(prefix: memoryview, data: bytes) -> CID | None:
    """The CID of `data` under a 1.1.0 prefix; None when its hash cannot be verified."""
    if len(prefix) > MAX_PREFIX_BYTES:
        raise BitswapDecodeError(f"a {len(prefix)}-byte CID prefix")
    values = []
    pos = 0
    for _ in range(4):
        got = _uvarint(prefix, pos)
        if got is None:
            raise BitswapDecodeError("CID prefix ends early")
        value, pos = got
        values.append(value)
    version, codec, hash_code, size = values
    if pos != len(prefix):
        raise BitswapDecodeError("stray bytes after a CID prefix")
    if version not in (0, 1) or (version == 0 and codec != DAG_PB):
        raise BitswapDecodeError(f"CID prefix with version {version}, codec 0x{codec:x}")
    if hash_code == SHA2_256:
        if size != SHA2_256_SIZE:
            raise BitswapDecodeError(f"sha2-256 prefix with digest length {size}")
        digest = hashlib.sha256(data).digest()
    elif hash_code == IDENTITY:
        if size != len(data):
            raise BitswapDecodeError("identity prefix whose length is not the block's")
        digest = data
    else:
        return None
    try:
        cid = make_cid(codec, hash_code, digest)
    except InvalidCID as e:
        raise BitswapDecodeError(f"CID prefix: {e}") from None
    return cid if version == 1 else CID("base58btc", 0, "dag-pb", cid.digest)


def _v0_block(data: bytes) -> CID:
    return CID("base58btc", 0, "dag-pb", b"\x12\x20" + hashlib.sha256(data).digest())


def decode_message(body: bytes | memoryview, *, max_block: int = MAX_BLOCK_SIZE) -> Message:
    """Parse one message body (no length prefix). Raises `BitswapDecodeError`."""
    view = memoryview(body)
    entries: list[WantEntry] = []
    blocks: list[Block] = []
    presences: list[Presence] = []
    full = has_wantlist = False
    pending = dropped_entries = dropped_presences = unverifiable = 0
    for number, _, value in _fields(view):
        if number == 1:
            has_wantlist = True
            for n, _, v in _fields(_bytes(value, "wantlist")):
                if n == 1:
                    raw = _bytes(v, "wantlist.entries")
                    if len(entries) >= MAX_ENTRIES:
                        dropped_entries += 1
                    else:
                        entries.append(_entry(raw))
                elif n == 2:
                    full = bool(_number(v, "wantlist.full"))
        elif number in (2, 3):
            if number == 2:
                data = bytes(_bytes(value, "blocks"))
                cid: CID | None = _v0_block(data) if len(data) <= max_block else None
            else:
                prefix: memoryview | None = None
                payload = b""
                for n, _, v in _fields(_bytes(value, "payload")):
                    if n == 1:
                        prefix = _bytes(v, "payload.prefix")
                    elif n == 2:
                        payload = bytes(_bytes(v, "payload.data"))
                if prefix is None:
                    raise BitswapDecodeError("payload block without a CID prefix")
                data = payload
                cid = _prefix_cid(prefix, data) if len(data) <= max_block else None
            if len(data) > max_block:
                raise BitswapDecodeError(f"a {len(data)}-byte block (limit {max_block})")
            if cid is None:
                unverifiable += 1
            else:
                blocks.append(Block(cid, data))
        elif number == 4:
            raw_presence = _bytes(value, "blockPresences")
            if len(presences) >= MAX_PRESENCES:
                dropped_presences += 1
                continue
            pcid: CID | None = None
            kind = HAVE
            for n, _, v in _fields(raw_presence):
                if n == 1:
                    pcid = _cid(_bytes(v, "presence.cid"), "block presence")
                elif n == 2:
                    kind = _number(v, "presence.type")
            if pcid is None:
                raise BitswapDecodeError("block presence without a CID")
            if kind not in (HAVE, DONT_HAVE):
                raise BitswapDecodeError(f"unknown block presence type {kind}")
            presences.append(Presence(pcid, kind == HAVE))
        elif number == 5:
            pending = _int32(_number(value, "pendingBytes"))
    return Message(
        tuple(entries), full, tuple(blocks), tuple(presences), pending,
        dropped_entries, dropped_presences, unverifiable, has_wantlist,
    )  # fmt: skip


class MessageDecoder:
    """Turns a stream's bytes into Bitswap messages; `feed` returns the ones completed.

    A length prefix over `max_message` raises `MessageTooLarge` before the body
    is buffered; at most one message's worth of bytes is ever held.
    """

    def __init__(self, *, max_message: int = MAX_MESSAGE, max_block: int = MAX_BLOCK_SIZE) -> None:
        self.max_message = max_message
        self.max_block = max_block
        self._buf = bytearray()

    def feed(self, data: bytes, *, max_messages: int | None = None) -> list[Message]:
        """Add `data`; return the messages it completes (at most `max_messages`).

        Raises `BitswapDecodeError` (the peer's fault: drop its stream).
        """
        self._buf += data
        out: list[Message] = []
        while max_messages is None or len(out) < max_messages:
            got = _uvarint(self._buf, 0)
            if got is None:
                break
            size, start = got
            if size > self.max_message:
                raise MessageTooLarge(limit=self.max_message, got=size)
            if len(self._buf) - start < size:
                break
            body = bytes(self._buf[start : start + size])
            del self._buf[: start + size]
            out.append(decode_message(body, max_block=self.max_block))
        return out

    @property
    def buffered(self) -> int:
        """Bytes held of a message not yet complete."""
        return len(self._buf)

    def close(self) -> None:
        """End of stream: raises `BitswapDecodeError` if it cut a message short."""
        if self._buf:
            raise BitswapDecodeError(f"stream ended inside a message ({len(self._buf)} bytes)")
