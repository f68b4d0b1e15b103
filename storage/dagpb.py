"""The dag-pb block format and the UnixFS `Data` message inside it.

This module owns the protobuf bytes of IPFS directory and file nodes: encoding
them exactly as Kubo and ipfs-unixfs-importer do (so our CIDs equal theirs),
and decoding them back into links and UnixFS fields. It does no I/O and knows
nothing of chunking or DAG shape; `unixfs.py` builds DAGs from these nodes.

The encoding follows the dag-pb spec (https://ipld.io/specs/codecs/dag-pb/spec/):
`PBNode { repeated PBLink Links = 2; optional bytes Data = 1 }`, with the links
written *before* the data (the canonical, historical order), and
`PBLink { bytes Hash = 1; string Name = 2; uint64 Tsize = 3 }`.
The UnixFS message (https://github.com/ipfs/specs/blob/main/UNIXFS.md) is
proto2 `Data { Type = 1; Data = 2; filesize = 3; repeated blocksizes = 4 (not
packed); hashType = 5; fanout = 6; mode = 7; mtime = 8 }`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from multiformats import CID

from benchsync.storage.cid import DAG_PB, InvalidCID, decode_cid, uvarint
from benchsync.storage.errors import StorageError

# UnixFS node types (enum DataType in unixfs.proto).
TYPE_RAW = 0
TYPE_DIRECTORY = 1
TYPE_FILE = 2
TYPE_METADATA = 3
TYPE_SYMLINK = 4
TYPE_HAMT_SHARD = 5

# Protobuf wire types.
_VARINT = 0
_I64 = 1
_LEN = 2
_I32 = 5


class DagPbError(StorageError):
    """A dag-pb block or its UnixFS payload is malformed (the block's author is at fault)."""


@dataclass(frozen=True)
class Link:
    """One dag-pb link: child CID, name ("" in file nodes) and Tsize (bytes of the child DAG)."""

    cid: CID
    name: str = ""
    tsize: int = 0


@dataclass(frozen=True)
class UnixFSData:
    """The decoded UnixFS `Data` message of a dag-pb node (fields we use)."""

    type: int
    data: bytes = b""
    filesize: int | None = None
    blocksizes: list[int] = field(default_factory=list)


def _key(field_number: int, wire_type: int) -> bytes:
    return uvarint((field_number << 3) | wire_type)


def _len_field(field_number: int, payload: bytes) -> bytes:
    return _key(field_number, _LEN) + uvarint(len(payload)) + payload


def _varint_field(field_number: int, value: int) -> bytes:
    return _key(field_number, _VARINT) + uvarint(value)


def encode_unixfs(
    type_: int,
    *,
    data: bytes | None = None,
    filesize: int | None = None,
    blocksizes: list[int] | tuple[int, ...] = (),
) -> bytes:
    """Encode a UnixFS `Data` message; absent optional fields are not written (as Kubo)."""
    out = bytearray(_varint_field(1, type_))
    if data is not None:
        out += _len_field(2, data)
    if filesize is not None:
        out += _varint_field(3, filesize)
    for size in blocksizes:
        out += _varint_field(4, size)
    return bytes(out)


def encode_node(links: list[Link], data: bytes | None) -> bytes:
    """Encode a dag-pb node: links first, then the data field (canonical dag-pb order)."""
    out = bytearray()
    for link in links:
        body = (
            _len_field(1, bytes(link.cid))
            + _len_field(2, link.name.encode("utf-8"))
            + _varint_field(3, link.tsize)
        )
        out += _len_field(2, body)
    if data is not None:
        out += _len_field(1, data)
    return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise DagPbError("truncated varint in dag-pb block")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise DagPbError("varint longer than 64 bits in dag-pb block")


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Split a protobuf message into (field number, value) pairs; LEN values as bytes."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos)
            out.append((number, value))
        elif wire == _LEN:
            length, pos = _read_varint(buf, pos)
            if pos + length > len(buf):
                raise DagPbError(f"field {number} runs past the end of the dag-pb block")
            out.append((number, bytes(buf[pos : pos + length])))
            pos += length
        elif wire in (_I64, _I32):
            # Not used by dag-pb/UnixFS, but valid protobuf: skip rather than choke.
            pos += 8 if wire == _I64 else 4
            if pos > len(buf):
                raise DagPbError(f"field {number} runs past the end of the dag-pb block")
        else:
            raise DagPbError(f"unsupported protobuf wire type {wire} in dag-pb block")
    return out


def _link_cid(raw: bytes) -> CID:
    try:
        return decode_cid(raw)
    except InvalidCID as e:
        raise DagPbError(f"invalid CID in a dag-pb link: {e}") from e


def decode_node(block: bytes) -> tuple[list[Link], bytes | None]:
    """Decode a dag-pb block into (links, data). Raises DagPbError if malformed."""
    links: list[Link] = []
    data: bytes | None = None
    for number, value in _fields(block):
        if number == 2 and isinstance(value, bytes):
            cid: CID | None = None
            name = ""
            tsize = 0
            for n, v in _fields(value):
                if n == 1 and isinstance(v, bytes):
                    cid = _link_cid(v)
                elif n == 2 and isinstance(v, bytes):
                    try:
                        name = v.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise DagPbError("link name is not UTF-8") from e
                elif n == 3 and isinstance(v, int):
                    tsize = v
            if cid is None:
                raise DagPbError("dag-pb link without a Hash")
            links.append(Link(cid, name, tsize))
        elif number == 1 and isinstance(value, bytes):
            data = value
        else:
            raise DagPbError(f"unexpected field {number} in dag-pb node")
    return links, data


def decode_unixfs(data: bytes) -> UnixFSData:
    """Decode the UnixFS `Data` message carried in a dag-pb node's data field."""
    type_: int | None = None
    payload = b""
    filesize: int | None = None
    blocksizes: list[int] = []
    for number, value in _fields(data):
        if number == 1 and isinstance(value, int):
            type_ = value
        elif number == 2 and isinstance(value, bytes):
            payload = value
        elif number == 3 and isinstance(value, int):
            filesize = value
        elif number == 4:
            if isinstance(value, int):
                blocksizes.append(value)
            else:  # packed encoding: a run of varints
                pos = 0
                while pos < len(value):
                    size, pos = _read_varint(value, pos)
                    blocksizes.append(size)
    if type_ is None:
        raise DagPbError("UnixFS data without a Type")
    return UnixFSData(type_, payload, filesize, blocksizes)


def links(cid: CID, data: bytes) -> list[CID]:
    """Child CIDs of a block: dag-pb links in order; raw (and other) blocks have none."""
    if cid.codec.code != DAG_PB:
        return []
    return [link.cid for link in decode_node(data)[0]]
