"""CARv1 streams: writing them, and decoding them with limits and verification.

This module owns the CAR (Content Addressable aRchive) v1 format
(https://ipld.io/specs/transport/car/carv1/): a varint-prefixed dag-cbor
header `{"roots": [CID, ...], "version": 1}` followed by sections of
`varint(len(cid) + len(block)) | cid | block`.

Writing: `encode_header` / `encode_section` give the bytes (the network side
streams them without a file); `CarWriter` and `write_car` put them on a
binary stream. The header is canonical dag-cbor (map keys sorted length-first,
CIDs as tag 42 with the 0x00 prefix), so `ipfs dag import` and ipfs-car read it.

Reading: `CarDecoder` is sans-IO (like h11): feed it bytes as they arrive, get
back verified (CID, block) pairs. Every length prefix has a limit, every block
is hashed against its CID before it is handed out, and each way a stream can
be wrong has its own `CarError` subclass. `read_car` drives it from a stream.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

from multiformats import CID, multibase, multihash

from benchsync.storage.blockstore import UnsupportedHash, verify_block
from benchsync.storage.cid import (
    IDENTITY,
    SHA2_256,
    InvalidCID,
    decode_cid,
    make_cid,
    parse_cid,
    read_uvarint,
    uvarint,
)
from benchsync.storage.errors import CorruptBlock, StorageError, TooLarge
from benchsync.storage.limits import MAX_BLOCK_SIZE, MAX_CID_BYTES

DEFAULT_MAX_SECTION = MAX_BLOCK_SIZE + MAX_CID_BYTES  # bytes: CID + block
DEFAULT_MAX_HEADER = 64 * 1024  # bytes; ~1700 roots
READ_SIZE = 64 * 1024  # bytes per read() in read_car
MAX_CBOR_DEPTH = 8  # nesting levels accepted in a header (a valid one needs 3)

CAR_VERSION = 1
CID_TAG = 42  # CBOR tag of an IPLD link

# Codecs a CAR may carry: UnixFS's (raw, dag-pb) and the IPLD data codecs IPFS
# tools write into CARs. Anything else is refused rather than stored as an
# opaque block: a peer sending it is not speaking our protocol.
KNOWN_CODECS = {
    0x55: "raw",
    0x70: "dag-pb",
    0x71: "dag-cbor",
    0x0129: "dag-json",
}
VERIFIABLE_HASHES = (IDENTITY, SHA2_256)  # multihash codes verify_block can check

_BASE32 = multibase.get("base32")


class CarError(StorageError):
    """A CAR stream is malformed, truncated, oversized or carries a block that fails verification.

    The sender of the stream is at fault; whatever was decoded before the error is good.
    """


class CarTruncated(CarError):
    """The stream ended before the header or a section was complete."""


class CarBadVarint(CarError):
    """A length prefix is not a valid unsigned varint (too long or not minimally encoded)."""


class CarBadHeader(CarError):
    """The header is not a dag-cbor map with version 1 and a list of root CIDs."""


class CarBadSection(CarError):
    """A section is empty or does not start with a valid CID."""


class CarUnknownCodec(CarError):
    """A block's CID names a codec we do not accept (see KNOWN_CODECS)."""


class CarUnsupportedHash(CarError, UnsupportedHash):
    """A block's CID uses a hash function we cannot verify."""

    def __init__(self, cid: object, code: int) -> None:
        # Not UnsupportedHash.__init__: it names the code through multiformats, which
        # raises MultihashValueError (not KeyError) for a code like 0x02 that is a
        # multicodec but no hash function -- a traceback instead of this error.
        Exception.__init__(
            self,
            f"cannot verify block {cid}: hash function {_hash_name(code)} is not supported "
            "(only sha2-256 and identity)",
        )
        self.cid = cid
        self.code = code


def _hash_name(code: int) -> str:
    """`0x13 (sha2-512)` for a known multihash code, `0x2` for anything else."""
    try:
        return f"0x{code:x} ({multihash.get(code=code).name})"
    except (KeyError, ValueError):
        return f"0x{code:x}"


class CarBlockMismatch(CarError, CorruptBlock):
    """A block's bytes do not hash to the CID it was sent under."""


class CarTooLarge(CarError, TooLarge):
    """The header, a section or a block exceeds its limit."""


# --- writing ------------------------------------------------------------------------------


def _cbor_head(major: int, value: int) -> bytes:
    """A CBOR initial byte plus argument, in the shortest form (dag-cbor requires it)."""
    if value < 24:
        return bytes([(major << 5) | value])
    for info, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * width):
            return bytes([(major << 5) | info]) + value.to_bytes(width, "big")
    raise ValueError(f"CBOR argument {value} does not fit in 64 bits")


def encode_header(roots: list[CID]) -> bytes:
    """The varint-prefixed dag-cbor header `{"roots": [...], "version": 1}`."""
    body = bytearray(_cbor_head(5, 2))
    # Canonical dag-cbor orders map keys by length first: "roots" (5) < "version" (7).
    body += _cbor_head(3, 5) + b"roots"
    body += _cbor_head(4, len(roots))
    for root in roots:
        link = b"\x00" + bytes(root)  # the 0x00 multibase prefix of binary CIDs in dag-cbor
        body += _cbor_head(6, CID_TAG) + _cbor_head(2, len(link)) + link
    body += _cbor_head(3, 7) + b"version" + _cbor_head(0, CAR_VERSION)
    return uvarint(len(body)) + bytes(body)


def encode_section(cid: CID, data: bytes) -> bytes:
    """One CAR section: `varint(len) | cid bytes | block bytes`."""
    raw = bytes(cid)
    return uvarint(len(raw) + len(data)) + raw + data


class CarWriter:
    """Writes a CARv1 stream: the header at construction, then one section per `write_block`.

    The caller owns `out` (opens and closes it) and decides block order; every
    block of the DAG must be written for the CAR to be complete.
    """

    def __init__(self, out: BinaryIO, roots: list[CID]) -> None:
        self.out = out
        self.bytes_written = 0
        self._write(encode_header(roots))

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.bytes_written += len(data)

    def write_block(self, cid: CID, data: bytes) -> None:
        """Append one block as a section. The block is not verified here; readers verify."""
        self._write(encode_section(cid, data))


def write_car(out: BinaryIO, roots: list[CID], blocks: Iterable[tuple[CID, bytes]]) -> int:
    """Write a whole CAR to `out`; returns the number of bytes written."""
    writer = CarWriter(out, roots)
    for cid, data in blocks:
        writer.write_block(cid, data)
    return writer.bytes_written


# --- reading ------------------------------------------------------------------------------


def _read_varint(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None if the buffer ends inside the varint."""
    try:
        return read_uvarint(buf, pos)
    except InvalidCID as e:  # the shared varint reader speaks of CIDs; here it is a length
        raise CarBadVarint(f"{e} of the CAR stream") from e


class _Cbor:
    """Just enough of a dag-cbor decoder for a CAR header; any oddity is a CarBadHeader."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise CarBadHeader("CAR header ends inside a CBOR item")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def item(self, depth: int = 0) -> Any:
        if depth > MAX_CBOR_DEPTH:
            raise CarBadHeader(f"CAR header nests deeper than {MAX_CBOR_DEPTH} levels")
        initial = self._take(1)[0]
        major, info = initial >> 5, initial & 0x1F
        if major == 7:
            simple = {20: False, 21: True, 22: None}
            if info not in simple:
                raise CarBadHeader(f"unsupported CBOR simple value/float {info} in CAR header")
            return simple[info]
        if info < 24:
            arg = info
        elif info <= 27:
            arg = int.from_bytes(self._take(1 << (info - 24)), "big")
        else:
            raise CarBadHeader("indefinite-length or reserved CBOR item in CAR header")
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major in (2, 3):
            raw = self._take(arg)
            if major == 2:
                return raw
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CarBadHeader("CBOR text in CAR header is not UTF-8") from e
        # Each element takes at least one byte: a count beyond what is left is a lie,
        # and must not make us allocate or loop for it.
        if major in (4, 5) and arg > len(self.buf) - self.pos:
            raise CarBadHeader("CBOR array/map in CAR header claims more items than bytes")
        if major == 4:
            return [self.item(depth + 1) for _ in range(arg)]
        if major == 5:
            out: dict[Any, Any] = {}
            for _ in range(arg):
                key = self.item(depth + 1)
                if not isinstance(key, str):
                    raise CarBadHeader("CAR header map key is not a string")
                out[key] = self.item(depth + 1)
            return out
        # major == 6: a tag; only CID links (42) exist in dag-cbor
        if arg != CID_TAG:
            raise CarBadHeader(f"unsupported CBOR tag {arg} in CAR header")
        raw = self.item(depth + 1)
        if not isinstance(raw, bytes) or not raw.startswith(b"\x00"):
            raise CarBadHeader("CID link in CAR header is not bytes with the 0x00 prefix")
        try:
            # Our own parser first: multiformats' CID.decode(bytes) type-checks its
            # way through a failed validation (~5 ms per header, every fetch round).
            return decode_cid(raw[1:])
        except InvalidCID:
            pass  # let multiformats give its verdict and its reason
        try:
            cid = CID.decode(raw[1:])
        except Exception as e:  # multiformats raises assorted ValueError/KeyError types
            raise CarBadHeader(f"invalid root CID in CAR header: {e}") from e
        return cid.set(base=_BASE32) if cid.version == 1 else cid


def decode_header(body: bytes) -> list[CID]:
    """The roots of a CAR header body (without its length prefix). Raises CarBadHeader."""
    parser = _Cbor(body)
    doc = parser.item()
    if parser.pos != len(body):
        raise CarBadHeader(f"{len(body) - parser.pos} stray bytes after the CAR header")
    if not isinstance(doc, dict):
        raise CarBadHeader("CAR header is not a CBOR map")
    version = doc.get("version")
    if version == 2:
        raise CarBadHeader(
            "this is a CARv2 file; only CARv1 is supported (`ipfs dag export` writes CARv1)"
        )
    if version != CAR_VERSION:
        raise CarBadHeader(f"CAR header version is {version!r}, expected 1")
    roots = doc.get("roots")
    if not isinstance(roots, list) or not all(isinstance(r, CID) for r in roots):
        raise CarBadHeader("CAR header has no list of root CIDs")
    return roots


def _decode_cid(section: memoryview, offset: int) -> tuple[CID, int]:
    """The CID at the start of a section and its length in bytes. Raises CarError subclasses."""
    try:
        version, codec, hash_code, digest, end = parse_cid(section)
    except InvalidCID as e:
        raise CarBadSection(f"the section at byte {offset} does not start with a CID: {e}") from e
    label = f"at byte {offset}"
    if codec not in KNOWN_CODECS:
        raise CarUnknownCodec(
            f"the block {label} has codec 0x{codec:x}; accepted: "
            + ", ".join(f"{name} (0x{code:x})" for code, name in KNOWN_CODECS.items())
        )
    if hash_code not in VERIFIABLE_HASHES:
        raise CarUnsupportedHash(label, hash_code)
    if version == 0:
        return CID.decode(bytes(section[:end])), end
    return make_cid(codec, hash_code, digest), end


class CarDecoder:
    """Sans-IO CARv1 decoder: `feed` bytes in any pieces, get verified blocks out.

    The header comes first; `roots` is None until it has been decoded. Each
    `feed` returns the (CID, block) pairs completed by the new bytes, every one
    already verified against its CID. Call `close()` at the end of the stream:
    it raises CarTruncated if a header or section is incomplete.

    Errors are CarError subclasses. If some blocks of a `feed` were good before
    a bad one, they are returned and the error is raised by the next `feed` or
    `close` call, so verified blocks are never lost with the broken transfer.
    After an error the decoder is finished: further calls raise it again.
    """

    def __init__(
        self,
        *,
        max_section: int = DEFAULT_MAX_SECTION,
        max_block: int = MAX_BLOCK_SIZE,
        max_header: int = DEFAULT_MAX_HEADER,
    ) -> None:
        self.max_section = max_section
        self.max_block = max_block
        self.max_header = max_header
        self.roots: list[CID] | None = None
        self.blocks_read = 0
        self.bytes_read = 0  # bytes consumed (complete header and sections)
        self._buf = bytearray()
        self._error: CarError | None = None

    def feed(self, data: bytes) -> list[tuple[CID, bytes]]:
        """Add bytes; return the blocks they complete. Raises CarError subclasses."""
        if self._error is not None:
            raise self._error
        self._buf += data
        out: list[tuple[CID, bytes]] = []
        pos = 0
        try:
            while True:
                step = self._header(pos) if self.roots is None else self._section(pos, out)
                if step is None:
                    break
                pos = step
        except CarError as e:
            self._error = e
            if not out:
                raise
        finally:
            del self._buf[:pos]
            self.bytes_read += pos
        return out

    def close(self) -> None:
        """Declare the end of the stream. Raises CarTruncated if it ended mid-item."""
        if self._error is not None:
            raise self._error
        if self.roots is None:
            what = "inside the header" if self._buf else "before the header"
            self._error = CarTruncated(f"CAR stream ended {what} ({len(self._buf)} bytes)")
        elif self._buf:
            parsed = _read_varint(self._buf, 0)
            need = f" of {parsed[0] + parsed[1]}" if parsed else ""
            self._error = CarTruncated(
                f"CAR stream ended inside section {self.blocks_read + 1} at byte "
                f"{self.bytes_read} ({len(self._buf)}{need} bytes received)"
            )
        if self._error is not None:
            raise self._error

    def _header(self, pos: int) -> int | None:
        parsed = _read_varint(self._buf, pos)
        if parsed is None:
            return None
        length, start = parsed
        if length > self.max_header:
            raise CarTooLarge("CAR header", limit=self.max_header, got=length)
        if length == 0:
            raise CarBadHeader("CAR header is empty")
        if len(self._buf) - start < length:
            return None
        self.roots = decode_header(bytes(self._buf[start : start + length]))
        return start + length

    def _section(self, pos: int, out: list[tuple[CID, bytes]]) -> int | None:
        parsed = _read_varint(self._buf, pos)
        if parsed is None:
            return None
        length, start = parsed
        offset = self.bytes_read + pos
        if length > self.max_section:
            raise CarTooLarge(f"CAR section at byte {offset}", limit=self.max_section, got=length)
        if length == 0:
            raise CarBadSection(f"empty CAR section at byte {offset}")
        end = start + length
        if len(self._buf) < end:
            return None
        section = memoryview(self._buf)[start:end]
        try:
            cid, cid_len = _decode_cid(section, offset)
            if length - cid_len > self.max_block:
                raise CarTooLarge(
                    f"block {cid} at byte {offset}", limit=self.max_block, got=length - cid_len
                )
            block = bytes(section[cid_len:])
        finally:
            section.release()  # the bytearray cannot be resized while a view is alive
        try:
            verify_block(cid, block)
        except CorruptBlock as e:
            raise CarBlockMismatch(
                cid, f"the {len(block)} bytes sent in the section at byte {offset} hash differently"
            ) from e
        out.append((cid, block))
        self.blocks_read += 1
        return end


def read_car(
    stream: BinaryIO,
    *,
    max_section: int = DEFAULT_MAX_SECTION,
    max_block: int = MAX_BLOCK_SIZE,
    max_header: int = DEFAULT_MAX_HEADER,
) -> tuple[list[CID], Iterator[tuple[CID, bytes]]]:
    """Read a CARv1 stream: (roots, iterator of verified (CID, block) pairs).

    The header is read before returning (raising CarError subclasses if it is
    bad); the iterator reads the rest lazily and raises CarError subclasses
    (CarTruncated at a premature end) after yielding every good block before
    the fault. The caller owns the stream.
    """
    decoder = CarDecoder(max_section=max_section, max_block=max_block, max_header=max_header)
    early: list[tuple[CID, bytes]] = []
    while decoder.roots is None:
        data = stream.read(READ_SIZE)
        if not data:
            decoder.close()
        early += decoder.feed(data)
    roots = decoder.roots

    def blocks() -> Iterator[tuple[CID, bytes]]:
        yield from early
        while True:
            data = stream.read(READ_SIZE)
            if not data:
                decoder.close()
                return
            yield from decoder.feed(data)

    return roots, blocks()


def car_bytes(roots: list[CID], blocks: Iterable[tuple[CID, bytes]]) -> bytes:
    """A whole CAR in memory (tests, small exports)."""
    out = io.BytesIO()
    write_car(out, roots, blocks)
    return out.getvalue()
