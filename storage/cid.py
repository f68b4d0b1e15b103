"""Making and parsing the CIDs of blocks, fast.

This module owns the binary CID work on benchsync's hot paths: the CID of a
block we just hashed, the binary form of a CID, and parsing a binary CID out of
a dag-pb link or a CAR section. The results are ordinary `multiformats.CID`
objects (base32 for CIDv1), equal to what multiformats itself builds.

Why not just call multiformats: its public constructors type-check every
argument (~90-200 us per CID, more than hashing a 256 KiB chunk), and the
try/except inside that checking leaves reference cycles that keep recent
chunks alive until the cyclic GC runs. Parts we build or have parsed ourselves
are already valid, so we go through the constructor's unchecked half
(guarded: if a multiformats release changes it, we fall back to the public API).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
from collections.abc import Callable

from multiformats import CID, multibase, multicodec, multihash, varint

from benchsync.storage.errors import StorageError

RAW = 0x55  # multicodec: raw bytes (UnixFS leaves)
DAG_PB = 0x70  # multicodec: dag-pb (UnixFS nodes)
IDENTITY = 0x00  # multihash code: the "digest" is the data itself
SHA2_256 = 0x12  # multihash code
SHA2_256_SIZE = 32  # bytes of a sha2-256 digest
CIDV0_SIZE = 34  # bytes: a bare sha2-256 multihash
MAX_VARINT_BYTES = 9  # the unsigned-varint spec caps varints at 9 bytes (63 bits)

Buffer = bytes | bytearray | memoryview

_BASE32 = multibase.get("base32")
_CODECS: dict[int, multicodec.Multicodec] = {}
_HASHES: dict[int, multihash.Multihash] = {}


class InvalidCID(StorageError, ValueError):
    """Bytes that are not a binary CID (truncated, bad varint, unknown version or code)."""


def uvarint(n: int) -> bytes:
    """Unsigned LEB128 varint, as protobuf and multiformats use.

    multiformats' `varint.encode` type-checks each call (~10 us); a 174-link
    dag-pb node needs ~700 varints, so hot paths use this.
    """
    if n < 0x80:
        return bytes((n,))
    return varint.encode(n)


def read_uvarint(buf: Buffer, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None if `buf` ends inside the varint.

    Raises InvalidCID for a varint longer than 9 bytes or not minimally encoded
    (the multiformats spec forbids both; accepting them would give one CID two
    binary forms).
    """
    value = 0
    for i in range(MAX_VARINT_BYTES):
        if pos + i >= len(buf):
            return None
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise InvalidCID(f"non-minimal varint at byte {pos}")
            return value, pos + i + 1
    raise InvalidCID(f"varint at byte {pos} is longer than {MAX_VARINT_BYTES} bytes")


def _public_cid(codec: multicodec.Multicodec, hashfun: multihash.Multihash, mh: bytes) -> CID:
    return CID(_BASE32, 1, codec, mh)


def _unchecked_cid(codec: multicodec.Multicodec, hashfun: multihash.Multihash, mh: bytes) -> CID:
    return CID._new_instance(CID, _BASE32, 1, codec, hashfun, mh)


def _pick_constructor() -> Callable[[multicodec.Multicodec, multihash.Multihash, bytes], CID]:
    """The unchecked constructor if it still exists and agrees with the public one."""
    probe = (multicodec.get(code=RAW), multihash.get(code=SHA2_256), b"\x12\x20" + bytes(32))
    try:
        fast = _unchecked_cid(*probe)
        slow = _public_cid(*probe)
        if fast == slow and bytes(fast) == bytes(slow) and str(fast) == str(slow):
            return _unchecked_cid
    except Exception:  # a newer multiformats changed its internals: stay on the public API
        pass
    return _public_cid


_new_cid = _pick_constructor()


def make_cid(codec: int, hash_code: int, digest: bytes) -> CID:
    """A CIDv1 (base32) from a multicodec code, a multihash code and the raw digest.

    Raises InvalidCID for codes multiformats does not know, and for a hash code
    that names a multicodec which is not a hash function (0x02 is "cidv2"):
    multiformats raises KeyError for the first and MultihashValueError (a
    ValueError) for the second. Whether the digest length suits the hash
    function is the caller's to check.
    """
    codec_obj = _CODECS.get(codec)
    hash_obj = _HASHES.get(hash_code)
    if codec_obj is None or hash_obj is None:
        try:
            codec_obj = _CODECS.setdefault(codec, multicodec.get(code=codec))
            hash_obj = _HASHES.setdefault(hash_code, multihash.get(code=hash_code))
        except (KeyError, ValueError) as e:
            raise InvalidCID(f"unknown multicodec or multihash code: {e}") from e
    mh = uvarint(hash_code) + uvarint(len(digest)) + digest
    return _new_cid(codec_obj, hash_obj, mh)


def block_cid(codec: int, data: bytes) -> CID:
    """The CIDv1 (sha2-256, base32) of a block of the given multicodec (RAW, DAG_PB)."""
    return make_cid(codec, SHA2_256, hashlib.sha256(data).digest())


def cid_bytes_v1(cid: CID) -> bytes:
    """The binary CIDv1 of `cid`; a CIDv0 becomes the equivalent dag-pb CIDv1."""
    return b"\x01" + uvarint(cid.codec.code) + cid.digest


def parse_cid(buf: Buffer, pos: int = 0) -> tuple[int, int, int, bytes, int]:
    """Split the binary CID at `buf[pos:]` into (version, codec, hash code, digest, end).

    A CIDv0 (a bare sha2-256 multihash) comes back as version 0, dag-pb.
    Raises InvalidCID if the bytes end early or are not a CID.
    """
    if buf[pos : pos + 2] == b"\x12\x20":
        if len(buf) - pos < CIDV0_SIZE:
            raise InvalidCID("bytes end inside a CIDv0")
        return 0, DAG_PB, SHA2_256, bytes(buf[pos + 2 : pos + CIDV0_SIZE]), pos + CIDV0_SIZE
    fields = []
    for _ in range(4):  # version, codec, hash function, digest length
        parsed = read_uvarint(buf, pos)
        if parsed is None:
            raise InvalidCID("bytes end inside a CID")
        value, pos = parsed
        fields.append(value)
    version, codec, hash_code, size = fields
    if version != 1:
        raise InvalidCID(f"CID version {version}; only 0 and 1 exist")
    if len(buf) - pos < size:
        raise InvalidCID("bytes end inside a CID's digest")
    if hash_code == SHA2_256 and size != SHA2_256_SIZE:
        raise InvalidCID(f"a {size}-byte sha2-256 digest; it is 32 bytes")
    return 1, codec, hash_code, bytes(buf[pos : pos + size]), pos + size


def decode_cid(raw: Buffer) -> CID:
    """The CID whose binary form is exactly `raw`. Raises InvalidCID."""
    return _decode_cid(bytes(raw))


# The same links are decoded by every walk of a DAG (a fetch's rounds, the install's
# checks); building a CID through multiformats costs ~40 us, a lookup here ~0.2 us.
DECODED_CIDS_CACHED = 1 << 14  # CIDs (~250 bytes each)


@functools.lru_cache(maxsize=DECODED_CIDS_CACHED)
def _decode_cid(raw: bytes) -> CID:
    version, codec, hash_code, digest, end = parse_cid(raw)
    if end != len(raw):
        raise InvalidCID(f"{len(raw) - end} stray bytes after a CID")
    if version == 0:
        return CID.decode(bytes(raw))  # rare (old Kubo DAGs): the slow path is fine
    return make_cid(codec, hash_code, digest)


# A UnixFS block's CID as text: "b" + base32 of 0x01, codec, 0x12 0x20, 32-byte digest.
_UNIXFS_CID_PREFIXES = {bytes([1, code, SHA2_256, 32]) for code in (RAW, DAG_PB)}
_UNIXFS_CID_TEXT = 59  # characters: "b" + 58 base32 digits for 36 bytes


def cid_text(cid: CID) -> str:
    """`str(cid)`, ~10x faster for base32 CIDv1 (every CID we make).

    multiformats encodes through a type-checked alphabet (~170 us per CID); a
    1024-CID want list cost ~0.2 s per fetch round, and as much again to parse.
    """
    if cid.version == 1 and cid.base.name == "base32":
        return "b" + base64.b32encode(bytes(cid)).decode("ascii").lower().rstrip("=")
    return str(cid)


def parse_cid_text(text: str) -> CID:
    """The CID `text` spells (any base and version multiformats reads); InvalidCID for
    anything else. multiformats raises ValueError, KeyError or IndexError (for "m")
    on malformed text: callers catch one error instead of guessing.
    """
    try:
        return CID.decode(text)
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise InvalidCID(f"{text[:80]!r} is not a CID ({e or type(e).__name__})") from None


def cid_from_text(text: str) -> CID | None:
    """The CID spelled by `text` if it is the canonical text of a sha2-256 raw or
    dag-pb CIDv1 (then equal to `CID.decode(text)`); None for anything else, which
    the caller parses with multiformats (and its errors)."""
    if len(text) != _UNIXFS_CID_TEXT or text[0] != "b":
        return None
    try:
        raw = base64.b32decode(text[1:].upper() + "======")
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 36 or raw[:4] not in _UNIXFS_CID_PREFIXES:
        return None
    cid = make_cid(raw[1], SHA2_256, raw[4:])
    # Only the canonical spelling (lower case, zero padding bits) takes this path.
    return cid if cid_text(cid) == text else None
