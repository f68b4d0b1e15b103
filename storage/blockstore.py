"""Content-addressed block storage: the interface, a filesystem store and an in-memory one.

This module owns where verified blocks live. `Blockstore` is the small
interface the rest of benchsync uses (has/get/put/delete, listing, sizes,
garbage collection); `FsBlockstore` keeps one file per block in sharded
directories, `MemoryBlockstore` keeps a dict (tests, scratch work). Both
verify a block against its CID before storing it unless told not to.

Keys: a block is stored under its CIDv1 in base32 (a CIDv0 is stored as the
equivalent CIDv1, dag-pb + sha2-256), so the codec survives a round trip and
`cids()` can list real CIDs. On disk, files are sharded Kubo-flatfs style by
the two characters before the last one of that string, which are uniformly
distributed (the multihash's tail), unlike the fixed `bafkrei`/`bafybei` prefix.

Durability: a lone `put` fsyncs its block before renaming it into place. Inside
`with store.batch():` (per calling thread) puts skip that fsync, and the batch's
exit makes every block durable with one `syncfs` of the store's filesystem,
*then* renames them all into place, then makes the renames durable. A block is
never visible under its key before its bytes are on disk: `put` skips keys that
exist, so a renamed-but-unsynced block that a crash emptied would be trusted
forever. Without syncfs(2) (not Linux) the batch fsyncs each temp file, then
each touched shard directory. While a batch runs, a helper thread starts the
disk writeback of each finished temp file (sync_file_range), so the disk can
work while the caller hashes the next chunk. `gc` deletes temp files older than
its `temp_grace`: a running node passes TEMP_GRACE, so open batches keep theirs.

A batch is a handle, not only a `with` block: `begin_batch()` returns one,
`joined(batch)` routes the calling thread's puts into it (one thread at a time,
any thread), `commit_batch`/`abort_batch` end it. A fetch receives a response
across many worker-thread calls and commits every few MiB, not per block.

Transfer marks: `begin_transfer(root)` durably notes that blocks of `root` are
arriving, `end_transfer(root)` clears it; `interrupted_transfers()` lists the
roots whose transfer a crash cut short, and `recover_transfers()` re-hashes
every block written since such a mark (`verify`) before the fetcher trusts
any of it, whatever the filesystem did with its syncs.

File references (Kubo's filestore, `--nocopy`): `put_ref(cid, path, offset,
length)` stores a block as a pointer into a file already on disk (a Parquet
segment), so its bytes are not written twice. Reading one re-hashes the range
and raises `FileRefChanged` if the file no longer holds those bytes. `get`,
`size`, `cids`, `gc` and `total_bytes` treat a reference like any block (the
bytes served and their CID are identical); `disk_bytes` counts what the store
itself holds, so a reference costs only its small record. Hand-written: no
Python library offers a content-addressed store with file references.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from multiformats import CID, multihash

from benchsync.storage import dagpb, unixfs
from benchsync.storage.cid import IDENTITY, RAW, cid_bytes_v1
from benchsync.storage.errors import CorruptBlock, NotFound, StorageError

SHARD_CHARS = 2  # characters of the key per shard directory (32**2 = 1024 directories)
TMP_PREFIX = ".tmp-"  # in-flight writes; never a valid key (keys are base32 CIDs)
REF_SUFFIX = ".ref"  # a file-reference block's record, beside where its block file would be
TRANSFERS_DIR = ".transfers"  # marks of transfers in progress (never a shard: shards are base32)

_SHA2_256_PREFIX = b"\x12\x20"  # multihash header: sha2-256, 32 bytes
# sync_file_range(2) flag: start writeback of the range now, do not wait for it.
_SYNC_FILE_RANGE_WRITE = 2
# Written-but-unflushed temp files a batch's flusher thread may hold open: bounds the
# open descriptors (and lets the writer run at most this far ahead of the disk).
FLUSH_QUEUE_BLOCKS = 32  # files (32 x 256 KiB chunks = 8 MiB)
# A temp file older than this is a crashed put's leftover, not a write in progress.
TEMP_GRACE = 3600.0  # seconds
# Recovery re-hashes blocks written up to this long before an interrupted transfer's
# mark: a clock stepped back a little must not hide a block it wrote.
RECOVERY_CLOCK_SLACK = 300.0  # seconds


def _libc_function(name: str) -> Callable[..., int] | None:
    """A libc function with errno capture, or None where libc lacks it (not Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    return fn


_syncfs = _libc_function("syncfs")
if _syncfs is not None:
    _syncfs.argtypes = [ctypes.c_int]  # type: ignore[attr-defined]
_sync_file_range = _libc_function("sync_file_range")
if _sync_file_range is not None:
    _sync_file_range.argtypes = [  # type: ignore[attr-defined]
        ctypes.c_int,
        ctypes.c_longlong,
        ctypes.c_longlong,
        ctypes.c_uint,
    ]


class UnsupportedHash(StorageError):
    """A CID uses a hash function we cannot verify (only sha2-256 and identity are supported)."""

    def __init__(self, cid: object, code: int) -> None:
        try:
            name = f"0x{code:x} ({multihash.get(code=code).name})"
        except KeyError:
            name = f"0x{code:x}"
        super().__init__(
            f"cannot verify block {cid}: hash function {name} is not supported "
            "(only sha2-256 and identity)"
        )
        self.cid = cid
        self.code = code


class BlockNotFound(NotFound):
    """The block is not in this blockstore."""


class BlockWriteError(StorageError):
    """Storing a block failed on disk (disk full, permissions, ...); nothing was stored."""


class FileRefChanged(CorruptBlock):
    """A file-reference block's file no longer holds the block's bytes (changed, cut or gone)."""

    def __init__(self, cid: object, ref: FileRef, detail: str) -> None:
        StorageError.__init__(
            self,
            f"block {cid} is stored as a reference to {ref.path} (bytes {ref.offset}.."
            f"{ref.offset + ref.length}) and {detail}: the file changed after it was added "
            "(add the file again, or run gc and fetch the block again)",
        )
        self.cid = cid
        self.ref = ref


@dataclass(frozen=True)
class FileRef:
    """Where a file-reference block's bytes are: `length` bytes at `offset` of `path`."""

    path: Path  # absolute
    offset: int  # bytes
    length: int  # bytes

    def to_bytes(self) -> bytes:
        doc = {"path": str(self.path), "offset": self.offset, "length": self.length}
        return json.dumps(doc, separators=(",", ":")).encode()

    @staticmethod
    def group_bytes(path: Path, refs: dict[str, FileRef]) -> bytes:
        """One record for several blocks' references into the file `path`, by key."""
        doc = {"path": str(path), "refs": {k: [r.offset, r.length] for k, r in refs.items()}}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, key: str | None = None) -> FileRef:
        """The reference a record holds: the record of one block, or the entry for `key`
        in a group record (`group_bytes`). Raises ValueError, KeyError or TypeError."""
        doc = json.loads(raw)
        if "refs" in doc:
            offset, length = doc["refs"][key]
            return cls(Path(doc["path"]), int(offset), int(length))
        return cls(Path(doc["path"]), int(doc["offset"]), int(doc["length"]))

    def read(self, cid: CID) -> bytes:
        """The referenced bytes, verified against `cid`. Raises FileRefChanged."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileRefChanged(cid, self, "that file is gone") from None
        try:
            data = os.pread(fd, self.length, self.offset)
        finally:
            os.close(fd)
        if len(data) != self.length:
            raise FileRefChanged(cid, self, f"that file now ends {len(data)} bytes into the range")
        try:
            verify_block(cid, data)
        except CorruptBlock:
            raise FileRefChanged(cid, self, "those bytes no longer hash to it") from None
        return data


def verify_block(cid: CID, data: bytes) -> None:
    """Check that `data` hashes to `cid`.

    Raises CorruptBlock on a mismatch and UnsupportedHash for a hash function
    other than sha2-256 or identity.
    """
    mh = cid.digest  # the multihash: varint code, varint length, digest
    if mh[:2] == _SHA2_256_PREFIX:
        if hashlib.sha256(data).digest() != mh[2:]:
            raise CorruptBlock(cid, f"sha2-256 of {len(data)} bytes differs")
        return
    code = cid.hashfun.code
    if code == IDENTITY:
        if bytes(data) != bytes(cid.raw_digest):
            raise CorruptBlock(cid, "identity digest differs from the data")
    else:
        raise UnsupportedHash(cid, code)


def block_key(cid: CID) -> str:
    """The storage key of a block: its CIDv1 in base32 ("bafk...")."""
    raw = cid_bytes_v1(cid)
    # base64's encoder is ~20x faster than multiformats' multibase for this.
    return "b" + base64.b32encode(raw).decode("ascii").lower().rstrip("=")


class WriteBatch:
    """Puts that become durable together (`Blockstore.begin_batch`); the stores subclass it."""


class Blockstore(abc.ABC):
    """A content-addressed store of blocks, keyed by CID (CIDv0 and v1 of a block are one key).

    Subclasses implement the key-level primitives (`_lookup`, `_size`,
    `_store`, `_remove`, `_keys`, the batch and transfer-mark hooks);
    verification, CID handling, file references and GC live here once.
    """

    _local: threading.local  # .batch: the WriteBatch this thread's puts go to, if any

    @abc.abstractmethod
    def _lookup(self, key: str) -> bytes | FileRef | None:
        """The bytes under `key`, its file reference, or None if absent."""

    @abc.abstractmethod
    def _size(self, key: str) -> int | None:
        """The size in bytes of the block under `key`, or None if absent."""

    def _exists(self, key: str) -> bool:
        """Whether a block is stored under `key` (a store may answer without reading it)."""
        return self._size(key) is not None

    @abc.abstractmethod
    def _store(self, key: str, data: bytes | FileRef) -> bool:
        """Store `data` (bytes, or a file reference) under `key` unless present; True if new."""

    @abc.abstractmethod
    def _remove(self, key: str) -> int:
        """Remove the block under `key`; return the bytes of this store's disk freed."""

    @abc.abstractmethod
    def _keys(self) -> Iterator[str]:
        """Every stored key."""

    @abc.abstractmethod
    def _new_batch(self) -> WriteBatch: ...

    @abc.abstractmethod
    def _commit_batch(self, batch: WriteBatch) -> None: ...

    @abc.abstractmethod
    def _abort_batch(self, batch: WriteBatch) -> None: ...

    @abc.abstractmethod
    def disk_bytes(self) -> int:
        """Bytes this store holds on its own medium: blocks' bytes, and only the small
        record of a file reference (the referenced file is its owner's)."""

    @abc.abstractmethod
    def begin_transfer(self, root: CID) -> None:
        """Durably note that blocks of `root` are arriving (see `interrupted_transfers`)."""

    @abc.abstractmethod
    def end_transfer(self, root: CID) -> None:
        """Clear `begin_transfer`'s mark: the transfer ended (completed or failed cleanly)."""

    @abc.abstractmethod
    def interrupted_transfers(self) -> list[CID]:
        """Roots whose transfer began and never ended: a crash cut it short."""

    @abc.abstractmethod
    def recover_transfers(self) -> list[CID]:
        """After a crash: re-hash every block an interrupted transfer may have written,
        drop the ones that fail (`verify`), clear the marks; returns the dropped CIDs."""

    def _missing(self, cid: CID) -> BlockNotFound:
        return BlockNotFound(f"block {cid} is not in {self}")

    def _current(self) -> WriteBatch | None:
        return getattr(self._local, "batch", None)

    def has(self, cid: CID) -> bool:
        """Whether the block is stored."""
        return self._exists(block_key(cid))

    def get(self, cid: CID) -> bytes:
        """The block's bytes. Raises BlockNotFound if absent, FileRefChanged if it is a
        file reference whose file no longer holds its bytes."""
        found = self._lookup(block_key(cid))
        if found is None:
            raise self._missing(cid)
        if isinstance(found, FileRef):
            return found.read(cid)
        return found

    def size(self, cid: CID) -> int:
        """The block's size in bytes. Raises BlockNotFound if absent."""
        size = self._size(block_key(cid))
        if size is None:
            raise self._missing(cid)
        return size

    def put(self, cid: CID, data: bytes, *, verify: bool = True) -> bool:
        """Store a block; True if it was not stored before.

        With `verify` (the default) raises CorruptBlock / UnsupportedHash before
        storing anything if `data` does not hash to `cid`. The filesystem store
        raises BlockWriteError if the disk is full (no partial block is left).
        """
        if verify:
            verify_block(cid, data)
        return self._store(block_key(cid), data)

    def put_ref(
        self, cid: CID, path: Path | str, offset: int, length: int, *, verify: bool = True
    ) -> bool:
        """Store a block as a reference to `length` bytes at `offset` of the file `path`.

        The file must stay as it is while the block is kept: every read
        re-hashes the range (FileRefChanged if it changed). With `verify` (the
        default) the range is read and checked now, raising FileRefChanged
        before storing anything. A block already stored (either way) is kept
        as it is: returns False. Batches, `delete` and `gc` treat a reference
        like a block; deleting one never touches the file.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"a file reference needs offset >= 0 and length >= 0, "
                             f"got offset={offset} length={length}")  # fmt: skip
        ref = FileRef(Path(os.path.abspath(path)), offset, length)
        if verify:
            ref.read(cid)
        return self._store(block_key(cid), ref)

    def put_into_file(
        self, cid: CID, data: bytes, path: Path | str, offset: int, *, verify: bool = True
    ) -> bool:
        """Write a block's bytes at `offset` of the file `path` (created if absent) and
        store the block as a reference to them: a replica's leaf lands once, in the
        segment file it belongs to, instead of in a block file and then a copy.

        The bytes are written whether or not the block was stored before (the
        file needs them); returns True if the block was not stored before. The
        file's bytes are durable before the reference is: at once outside a
        batch, by the batch's sync inside one. With `verify` (the default)
        raises CorruptBlock / UnsupportedHash before writing anything; raises
        BlockWriteError if the file cannot be written.
        """
        if verify:
            verify_block(cid, data)
        if offset < 0:
            raise ValueError(f"a file offset must be >= 0, got {offset}")
        target = Path(os.path.abspath(path))
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                view = memoryview(data)
                at = offset
                while view:
                    n = os.pwrite(fd, view, at)
                    view, at = view[n:], at + n
                self._wrote_file(fd, target)
            finally:
                os.close(fd)
        except OSError as e:
            raise _write_error(f"write block {cid} into {target}", target.parent, e,
                               "no reference to it was stored") from e  # fmt: skip
        return self._store(block_key(cid), FileRef(target, offset, len(data)))

    @abc.abstractmethod
    def _wrote_file(self, fd: int, path: Path) -> None:
        """`put_into_file` wrote `path` (open as `fd`): make it durable, now or with the batch."""

    def file_ref(self, cid: CID) -> FileRef | None:
        """Where a file-reference block's bytes are; None for a block stored as bytes.
        Raises BlockNotFound if absent."""
        found = self._lookup(block_key(cid))
        if found is None:
            raise self._missing(cid)
        return found if isinstance(found, FileRef) else None

    def delete(self, cid: CID) -> None:
        """Remove a block; removing an absent block is not an error."""
        self._remove(block_key(cid))

    def begin_batch(self) -> WriteBatch:
        """A new batch: puts made inside `joined(batch)` become durable at `commit_batch`.

        For work spread over several calls or worker threads (a fetch
        receiving a response); `batch()` is the one-block-of-code form. One
        thread at a time may be joined to a batch. Blocks of an open batch are
        readable only from inside `joined(batch)`.
        """
        return self._new_batch()

    @contextlib.contextmanager
    def joined(self, batch: WriteBatch) -> Iterator[None]:
        """Route this thread's puts (and reads of them) into `batch` for the `with` body.

        Raises RuntimeError if this thread is already joined to another batch.
        """
        current = self._current()
        if current is batch:
            yield
            return
        if current is not None:
            raise RuntimeError("this thread is already writing into another batch")
        self._local.batch = batch
        try:
            yield
        finally:
            self._local.batch = None

    def commit_batch(self, batch: WriteBatch) -> None:
        """Make every block of `batch` durable, then visible to all; the batch is then empty
        and may take more puts. Raises BlockWriteError (then none of them is stored)."""
        self._commit_batch(batch)

    def abort_batch(self, batch: WriteBatch) -> None:
        """Drop every block of `batch` not yet committed."""
        self._abort_batch(batch)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group this thread's puts so they become durable together, on exit.

        Blocks put inside the batch are readable (`has`/`get`/`size`) by this
        thread at once and by everyone after the batch commits; `cids()` lists
        committed blocks only. If the body raises, none of the batch's new
        blocks is kept. A nested batch joins the outer one. Other threads' puts
        are unaffected. Raises BlockWriteError on exit if the blocks could not
        be made durable (then none of them is stored).
        """
        if self._current() is not None:
            yield  # nested: the outermost batch commits
            return
        batch = self.begin_batch()
        try:
            with self.joined(batch):
                yield
        except BaseException:
            self.abort_batch(batch)
            raise
        self.commit_batch(batch)

    def verify(self, cids: Iterable[CID] | None = None) -> list[CID]:
        """Re-hash the stored blocks among `cids` (every block when None); delete the ones
        whose bytes do not match their CID (a torn write, a changed referenced file) and
        return them. Absent blocks are skipped; a fetch gets the deleted ones again."""
        bad: list[CID] = []
        for cid in self.cids() if cids is None else cids:
            key = block_key(cid)
            try:
                found = self._lookup(key)
                if found is None:
                    continue
                if isinstance(found, FileRef):
                    found.read(cid)
                else:
                    verify_block(cid, found)
            except CorruptBlock:
                bad.append(cid)
                self._remove(key)
        return bad

    def cids(self) -> Iterator[CID]:
        """Every stored block's CID (as CIDv1, base32), in no particular order."""
        for key in self._keys():
            yield CID.decode(key)

    def total_bytes(self) -> int:
        """Sum of the sizes of all stored blocks, in bytes (a file reference counts its
        length: what serving it sends; see `disk_bytes` for what the store holds)."""
        return sum(self._size(key) or 0 for key in self._keys())

    def reachable(self, roots: Iterable[CID]) -> set[CID]:
        """The held blocks reachable from `roots` by dag-pb links.

        Absent roots or children (a DAG still being fetched) are skipped, and
        what is present of their DAG counts. Raw leaves are never read (they
        link nowhere), so the cost is one stat per leaf and one read per node.
        A malformed block links nowhere but counts, since a root named it.
        """
        def get(cid: CID) -> bytes:
            return b"" if cid.codec.code == RAW else self.get(cid)

        # storage's one DAG walk
        return {cid for cid, _ in unixfs.walk(
            get, *roots, has=self.has, malformed_as_leaf=True)}  # fmt: skip

    def gc(self, keep: Iterable[CID], *, keep_blocks: Iterable[CID] = ()) -> tuple[int, int]:
        """Delete every block not reachable from the roots in `keep`, nor in `keep_blocks`.

        `keep_blocks` are kept themselves, without what they link to (a thinned
        version's root: its manifest stays, its tables go). Reachability is
        `reachable`'s. Blocks stored after the collection starts are never
        deleted (the candidates are listed first), but a block whose parent
        arrives during the collection may be: a fetch then fetches it again.
        The caller must not put blocks it needs kept without naming them.
        A file reference is deleted like a block; its file is never touched.
        Returns (blocks removed, bytes of this store's disk freed).
        """
        candidates = list(self._keys())  # first: later puts are not candidates
        live = {block_key(cid) for cid in self.reachable(keep)}
        live.update(block_key(cid) for cid in keep_blocks)
        removed = freed = 0
        for key in candidates:
            if key not in live:
                freed += self._remove(key)
                removed += 1
        return removed, freed


def add_file_by_reference(
    store: Blockstore,
    path: Path | str,
    *,
    chunk_size: int = unixfs.CHUNK_SIZE,
    max_links: int = unixfs.MAX_LINKS,
) -> tuple[CID, int, int]:
    """Add the file at `path` as a UnixFS DAG whose leaves are references into it.

    The DAG and its CID are exactly `unixfs.add_file`'s (Kubo's); only the
    inner nodes are written to the store, so a file already on disk is not
    copied. The file must not change while its blocks are kept. Done in one
    batch. Returns (root CID, file size, Tsize) like `unixfs.add_file`.
    """
    path = Path(os.path.abspath(path))
    offset = 0

    def put(cid: CID, data: bytes) -> None:
        nonlocal offset
        if cid.codec.code == RAW:
            # add_file emits the leaves in file order, each chunk once.
            store.put_ref(cid, path, offset, len(data), verify=False)  # just hashed from it
            offset += len(data)
        else:
            store.put(cid, data, verify=False)  # built here from verified children

    with path.open("rb") as stream, store.batch():
        return unixfs.add_file(stream, put, chunk_size=chunk_size, max_links=max_links)


class FilePlacement:
    """Where the leaves of a DAG's files go on disk while the DAG is fetched.

    `target(path)` names the file on disk for the UnixFS file at `path` in the
    DAG ("tables/runs/part-0000.parquet"), or None to keep that file's leaves
    as blocks; it must validate `path` (names come from the DAG's writer) and
    name a file that does not exist yet, in a directory that does. A received
    leaf is then written once, at its offset in that file, and kept as a
    reference (`Blockstore.put_into_file`); `finish()` writes in the leaves that were not
    received (held before the fetch, or repeated in the file) and syncs the
    files. The leaf -> (file, offset) map is built from the directory and file
    nodes held so far, again after new inner nodes were stored (`stale`): a
    leaf's parents always arrive in an earlier round than the leaf. Offsets come
    from the file nodes' block sizes; a leaf whose size differs is kept as a
    block. Used by one fetch's worker thread at a time.
    """

    def __init__(
        self, store: Blockstore, root: CID, target: Callable[[str], Path | None]
    ) -> None:
        self.store = store
        self.root = root
        self.target = target
        self.files: dict[Path, CID] = {}  # target file -> the UnixFS file it holds
        self._spots: dict[CID, list[tuple[Path, int, int]]] = {}  # leaf -> (file, offset, size)
        self._stale = True
        # What `put` wrote into the files: `finish` and `size` need not ask the store.
        self._written: set[tuple[CID, Path, int, int]] = set()  # (leaf, file, offset, size)
        self._sizes: dict[CID, int] = {}

    def stale(self) -> None:
        """An inner node was stored: the next unknown leaf rebuilds the map."""
        self._stale = True

    def __call__(self, cid: CID, size: int) -> tuple[Path, int] | None:
        """The (file, offset) where the leaf `cid` of `size` bytes goes, or None."""
        if cid.codec.code != RAW:
            return None
        if cid not in self._spots and self._stale:
            self._build()
        for path, offset, expected in self._spots.get(cid, ()):
            if expected == size:
                return path, offset
        return None

    def put(self, cid: CID, data: bytes, *, verify: bool = True) -> bool:
        """Store a block: a leaf this placement has a spot for is written into its file
        (`Blockstore.put_into_file`), anything else stored as bytes. Returns whether
        the block was new, as `Blockstore.put` does."""
        spot = self(cid, len(data))
        if spot is None:
            new = self.store.put(cid, data, verify=verify)
            if cid.codec.code != RAW:
                self.stale()  # an inner node: it may place the next leaves
            return new
        new = self.store.put_into_file(cid, data, spot[0], spot[1], verify=verify)
        self._written.add((cid, spot[0], spot[1], len(data)))
        self._sizes[cid] = len(data)
        return new

    def size(self, cid: CID) -> int:
        """`Blockstore.size`, without a lookup for a leaf this placement wrote."""
        size = self._sizes.get(cid)
        return self.store.size(cid) if size is None else size

    def finish(self) -> list[Path]:
        """Write into every target file the leaves it lacks (from the store), create the
        empty ones, sync them; returns the files. Call once the DAG is complete. A
        file whose layout cannot be placed (a node with inline data) is not among
        them: write it from the DAG (`unixfs.cat`)."""
        self._build()
        for path in self.files:
            with path.open("ab"):
                pass  # an empty file has no leaf to create it
        for cid, spots in self._spots.items():
            for path, offset, size in spots:
                if (cid, path, offset, size) in self._written:
                    continue  # received into place by this placement
                if self.store.file_ref(cid) == FileRef(path, offset, size):
                    continue  # received into place before (an interrupted fetch)
                data = self.store.get(cid)
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.pwrite(fd, data, offset)
                finally:
                    os.close(fd)
        for path in self.files:
            fsync_path(path)
        return list(self.files)

    def _build(self) -> None:
        self._stale = False
        self._spots = {}
        self.files = {}
        self._directory(self.root, "")

    def _node(self, cid: CID) -> tuple[list[dagpb.Link], dagpb.UnixFSData] | None:
        if not self.store.has(cid):
            return None
        try:
            links, data = dagpb.decode_node(self.store.get(cid))
            return links, dagpb.decode_unixfs(data or b"")
        except dagpb.DagPbError:
            return None  # not UnixFS: nothing of it is placed

    def _directory(self, cid: CID, prefix: str) -> None:
        node = self._node(cid)
        if node is None or node[1].type != dagpb.TYPE_DIRECTORY:
            return
        for link in node[0]:
            path = prefix + link.name
            if link.cid.codec.code == RAW:  # a one-leaf file
                self._file(link.cid, path, link.tsize)
                continue
            child = self._node(link.cid)
            if child is None:
                continue
            if child[1].type == dagpb.TYPE_DIRECTORY:
                self._directory(link.cid, path + "/")
            elif child[1].type == dagpb.TYPE_FILE:
                self._file(link.cid, path, None)

    def _file(self, cid: CID, path: str, size: int | None) -> None:
        dest = self.target(path)
        if dest is None:
            return
        self.files[dest] = cid
        if not self._leaves(cid, dest, 0, size, set()):
            # Not a layout we can place: the file is not ours to complete.
            del self.files[dest]
            for spots in self._spots.values():
                spots[:] = [s for s in spots if s[0] != dest]

    def _leaves(
        self, cid: CID, dest: Path, offset: int, size: int | None, seen: set[CID]
    ) -> bool:
        """Note where the leaves under `cid` go; False if the layout cannot be placed.

        An inner node met twice in one file is not placed: a DAG that reuses its
        subtrees (a diamond of n nodes spells 2^n leaves) would make this walk, and
        the map, exponential. Such a file is written from the DAG instead, under the
        declared-size and chunk-reuse bounds of a copying install."""
        if cid.codec.code == RAW:
            if size is None:
                return False
            self._spots.setdefault(cid, []).append((dest, offset, size))
            return True
        if cid in seen:
            return False
        seen.add(cid)
        node = self._node(cid)
        if node is None:
            return True  # not here yet: placed once it arrives
        links, fs = node
        if fs.type not in (dagpb.TYPE_FILE, dagpb.TYPE_RAW) or len(fs.blocksizes) != len(links):
            return False
        if fs.data:
            return False  # inline bytes ahead of the children (not ours, nor Kubo's raw leaves)
        for link, blocksize in zip(links, fs.blocksizes, strict=True):
            if not self._leaves(link.cid, dest, offset, blocksize, seen):
                return False
            offset += blocksize
        return True


@dataclass
class _MemoryBatch(WriteBatch):
    pending: dict[str, bytes | FileRef] = field(default_factory=dict)


class MemoryBlockstore(Blockstore):
    """Blocks in a dict; nothing survives the process.

    A batch keeps its blocks in its own dict until it commits, so other
    threads see them exactly when they would in the filesystem store.
    """

    def __init__(self) -> None:
        self._blocks: dict[str, bytes | FileRef] = {}
        self._marks: set[str] = set()  # roots of transfers in progress
        self._local = threading.local()

    def __repr__(self) -> str:
        return "the in-memory blockstore"

    def _pending(self) -> dict[str, bytes | FileRef] | None:
        batch = self._current()
        return None if batch is None else batch.pending  # type: ignore[attr-defined]

    def _lookup(self, key: str) -> bytes | FileRef | None:
        pending = self._pending()
        if pending is not None and key in pending:
            return pending[key]
        return self._blocks.get(key)

    def _size(self, key: str) -> int | None:
        data = self._lookup(key)
        if data is None:
            return None
        return data.length if isinstance(data, FileRef) else len(data)

    def _store(self, key: str, data: bytes | FileRef) -> bool:
        if self._lookup(key) is not None:
            return False
        pending = self._pending()
        value = data if isinstance(data, FileRef) else bytes(data)
        (self._blocks if pending is None else pending)[key] = value
        return True

    def _remove(self, key: str) -> int:
        pending = self._pending()
        data = pending.pop(key, None) if pending is not None else None
        if data is None:
            data = self._blocks.pop(key, None)
        return len(data) if isinstance(data, bytes) else 0

    def _keys(self) -> Iterator[str]:
        return iter(list(self._blocks))

    def _new_batch(self) -> WriteBatch:
        return _MemoryBatch()

    def _commit_batch(self, batch: WriteBatch) -> None:
        assert isinstance(batch, _MemoryBatch)
        for key, data in batch.pending.items():
            self._blocks.setdefault(key, data)
        batch.pending = {}

    def _abort_batch(self, batch: WriteBatch) -> None:
        assert isinstance(batch, _MemoryBatch)
        batch.pending = {}

    def disk_bytes(self) -> int:
        return sum(len(d) for d in list(self._blocks.values()) if isinstance(d, bytes))

    def _wrote_file(self, fd: int, path: Path) -> None:
        pass  # nothing of this store outlives the process: no order of syncs to keep

    def begin_transfer(self, root: CID) -> None:
        self._marks.add(block_key(root))

    def end_transfer(self, root: CID) -> None:
        self._marks.discard(block_key(root))

    def interrupted_transfers(self) -> list[CID]:
        return [CID.decode(key) for key in sorted(self._marks)]

    def recover_transfers(self) -> list[CID]:
        # Nothing here outlives the process: no write can have been torn.
        self._marks.clear()
        return []


class _Flusher:
    """A thread that starts the disk writeback of a batch's temp files, then closes them.

    Starting writeback (sync_file_range) costs the caller about as long as
    writing the page cache did; on its own thread the disk works while the
    caller hashes the next chunk, and the batch's final sync has little left.
    It only ever hints: errors are reported by that final sync, so it ignores
    them here.
    """

    def __init__(self, start_writeback: Callable[..., int]) -> None:
        self._start_writeback = start_writeback
        self._fds: queue.Queue[int | None] = queue.Queue(maxsize=FLUSH_QUEUE_BLOCKS)
        self._thread = threading.Thread(target=self._run, name="blockstore-flusher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (fd := self._fds.get()) is not None:
            self._start_writeback(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # returns -1, never raises
            with contextlib.suppress(OSError):  # a write-back error is the final sync's to report
                os.close(fd)

    def hand_over(self, fd: int) -> None:
        """Take ownership of `fd` (a fully written temp file): flushed, then closed."""
        self._fds.put(fd)

    def close(self) -> None:
        """Wait until every handed-over file is submitted to the disk and closed."""
        self._fds.put(None)
        self._thread.join()


class _Batch(WriteBatch):
    """The blocks written into one `FsBlockstore` batch, not yet in place."""

    def __init__(self) -> None:
        # key -> name of its temp file in the key's shard directory (names, not Paths:
        # this grows with the batch, ~150 bytes per 256 KiB block)
        self.pending: dict[str, str] = {}
        # key -> file reference: written at the commit, one record per referenced file
        # linked under each key (a record file per block cost as much as the block's bytes).
        self.refs: dict[str, FileRef] = {}
        self.files: set[str] = set()  # files put_into_file wrote: synced before the renames
        self.flusher: _Flusher | None = None  # started by the first put that needs it

    def finish_writeback(self) -> None:
        if self.flusher is not None:
            self.flusher.close()
            self.flusher = None

    def clear(self) -> None:
        self.pending = {}
        self.refs = {}
        self.files = set()


def _keys_by_file(refs: dict[str, FileRef]) -> dict[Path, list[str]]:
    """The keys of `refs` grouped by the file they point into, in order."""
    by_file: dict[Path, list[str]] = {}
    for key, ref in refs.items():
        by_file.setdefault(ref.path, []).append(key)
    return by_file


def fsync_path(path: Path) -> None:
    """Make a file's bytes, or a directory's entries, durable (one fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(action: str, root: Path, e: OSError, outcome: str) -> BlockWriteError:
    """`BlockWriteError` for a failed disk operation, naming the cause and what was kept."""
    reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or str(e)
    err = BlockWriteError(
        f"could not {action} in {root}: {reason}; {outcome} "
        "(free disk space or check permissions, then retry)"
    )
    err.__cause__ = e
    return err


class FsBlockstore(Blockstore):
    """One file per block under `root/<shard>/<key>`, written atomically.

    A put writes a temporary file in the shard directory, fsyncs it (unless
    `fsync=False`) and renames it into place, so a reader, a crash or a full
    disk never leaves a partial block under a real key. Inside `batch()` the
    fsync is deferred to one filesystem sync at the batch's end, before any
    rename. Leftover temporary files from a crash are removed by `gc`. A file
    reference is a small record at `root/<shard>/<key>.ref`, written the same
    way.
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._shards: set[str] = set()  # shard directories known to exist (saves a syscall)
        self._local = threading.local()  # .batch: this thread's open _Batch, if any

    def _path(self, key: str) -> Path:
        return self.root / key[-SHARD_CHARS - 1 : -1] / key

    def _ref_path(self, key: str) -> Path:
        return self.root / key[-SHARD_CHARS - 1 : -1] / (key + REF_SUFFIX)

    def __repr__(self) -> str:
        return f"the blockstore at {self.root}"

    def _batch(self) -> _Batch | None:
        batch = self._current()
        assert batch is None or isinstance(batch, _Batch)
        return batch

    def _temp(self, key: str, name: str) -> Path:
        return self._path(key).parent / name

    def _read_ref(self, key: str, path: Path) -> FileRef:
        raw = path.read_bytes()
        try:
            return FileRef.from_bytes(raw, key)
        except (ValueError, KeyError, TypeError):
            detail = f"its file-reference record {path} is unreadable (delete it; fetch again)"
            raise CorruptBlock(key, detail) from None

    def _lookup(self, key: str) -> bytes | FileRef | None:
        batch = self._batch()
        if batch is not None:
            if key in batch.refs:
                return batch.refs[key]
            if key in batch.pending:
                return self._temp(key, batch.pending[key]).read_bytes()
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            pass
        try:
            return self._read_ref(key, self._ref_path(key))
        except FileNotFoundError:
            return None

    def _exists(self, key: str) -> bool:
        # Names only: a completeness walk asks this of every leaf of a replica, and
        # reading each file-reference record cost as much as the rest of the walk.
        batch = self._batch()
        if batch is not None and (key in batch.pending or key in batch.refs):
            return True
        return self._path(key).exists() or self._ref_path(key).exists()

    def _size(self, key: str) -> int | None:
        batch = self._batch()
        if batch is not None and key in batch.pending:
            return self._temp(key, batch.pending[key]).stat().st_size
        if batch is None or key not in batch.refs:
            try:
                return self._path(key).stat().st_size
            except FileNotFoundError:
                pass
        found = self._lookup(key)  # a file reference (or absent)
        return found.length if isinstance(found, FileRef) else None

    def _store(self, key: str, data: bytes | FileRef) -> bool:
        batch = self._batch()
        if batch is not None and (key in batch.pending or key in batch.refs):
            return False
        path = self._path(key)
        ref_path = self._ref_path(key)
        if path.is_file() or ref_path.is_file():
            return False
        if batch is not None and isinstance(data, FileRef):
            batch.refs[key] = data  # recorded at the commit, with the file's other blocks
            return True
        self._shard_dir(path)
        is_ref = isinstance(data, FileRef)
        payload = data.to_bytes() if isinstance(data, FileRef) else data
        tmp_name = f"{TMP_PREFIX}{secrets.token_hex(8)}"
        tmp = path.parent / tmp_name
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
                if batch is None and self.fsync:
                    os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            if batch is not None and self.fsync and _sync_file_range is not None:
                if batch.flusher is None:
                    batch.flusher = _Flusher(_sync_file_range)
                batch.flusher.hand_over(fd)  # it closes fd
            else:
                os.close(fd)
            if batch is not None:
                batch.pending[key] = tmp_name
                return True
            # Content-addressed: if another writer won the race, the bytes are
            # identical, so replacing is harmless.
            os.replace(tmp, ref_path if is_ref else path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _write_error(f"store block {key}", self.root, e, "nothing was stored") from e
        return True

    def _new_batch(self) -> WriteBatch:
        return _Batch()

    def _abort_batch(self, batch: WriteBatch) -> None:
        assert isinstance(batch, _Batch)
        batch.finish_writeback()
        self._discard(batch.pending.items())
        batch.clear()

    def _commit_batch(self, batch: WriteBatch) -> None:
        """Make the batch durable: its files, its blocks' temp files and one reference record
        per referenced file, synced; then the blocks renamed into place and the records
        linked under their blocks' keys; then those names synced."""
        assert isinstance(batch, _Batch)
        batch.finish_writeback()
        items = list(batch.pending.items())
        refs, files = batch.refs, batch.files
        batch.clear()  # whatever happens below, the batch starts afresh
        if not items and not refs:
            return
        groups: list[tuple[str, str, list[str]]] = []  # (key it sits beside, temp name, keys)
        try:
            for path, keys in _keys_by_file(refs).items():
                record = FileRef.group_bytes(path, {key: refs[key] for key in keys})
                groups.append((keys[0], self._write_temp(keys[0], record), keys))
        except OSError as e:
            self._discard(items + [(key, name) for key, name, _ in groups])
            raise _write_error(f"record {len(refs)} file references", self.root, e,
                               "no block of the batch was stored") from e  # fmt: skip
        temps = items + [(key, name) for key, name, _ in groups]
        if self.fsync:
            try:
                # A written file may live on another filesystem than the store's.
                for name in sorted(files):
                    fsync_path(Path(name))
                self._sync(self._temp(key, name) for key, name in temps)
            except OSError as e:
                self._discard(temps)
                raise _write_error(
                    f"make {len(items) + len(refs)} new blocks durable", self.root, e,
                    "none of them was stored",
                ) from e  # fmt: skip
        done = 0  # temp files put in place
        try:
            for key, name in items:
                os.replace(self._temp(key, name), self._path(key))
                done += 1
            for key, name, keys in groups:
                self._link_record(self._temp(key, name), keys)
                done += 1
        except OSError as e:
            # The blocks put in place so far are complete and synced: keeping them is safe.
            self._discard(temps[done:])
            raise _write_error(
                f"put block {temps[done][0]} in place", self.root, e,
                "the blocks of the batch not yet in place were not stored",
            ) from e  # fmt: skip
        if self.fsync:
            try:
                self._sync({self._path(key).parent for key in [*dict(items), *refs]})
            except OSError as e:
                # In place but maybe not durable: a crash may lose a block, never corrupt one.
                raise _write_error(
                    f"make the names of {len(items) + len(refs)} new blocks durable",
                    self.root,
                    e,
                    "they are stored but a crash may lose them",
                ) from e

    def _link_record(self, record: Path, keys: list[str]) -> None:
        """Name the reference record `record` (a synced temp file) under each key's
        record path, then drop its temp name: a block's record is one hard link."""
        for key in keys:
            dest = self._ref_path(key)
            self._shard_dir(dest)
            with contextlib.suppress(FileExistsError):  # stored meanwhile: it holds the block
                os.link(record, dest)
        record.unlink()

    def _write_temp(self, key: str, payload: bytes) -> str:
        """A new temp file in `key`'s shard directory holding `payload`; returns its name."""
        path = self._path(key)
        self._shard_dir(path)
        name = f"{TMP_PREFIX}{secrets.token_hex(8)}"
        fd = os.open(path.parent / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        return name

    def _shard_dir(self, path: Path) -> None:
        """Create `path`'s shard directory unless known to exist."""
        if path.parent.name not in self._shards:
            path.parent.mkdir(exist_ok=True)
            self._shards.add(path.parent.name)

    def _wrote_file(self, fd: int, path: Path) -> None:
        batch = self._batch()
        if batch is not None:
            batch.files.add(str(path))
        elif self.fsync:
            os.fsync(fd)

    def _sync(self, fallback: Iterable[Path]) -> None:
        """Flush the store's filesystem: one syncfs(2) where libc has it, else fsync each path."""
        if _syncfs is not None:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if _syncfs(fd) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
            return
        for path in fallback:
            fsync_path(path)

    def _discard(self, pending: Iterable[tuple[str, str]]) -> None:
        """Delete the temp files of (key, temp name) pairs of a batch that is not committed."""
        for key, name in pending:
            self._temp(key, name).unlink(missing_ok=True)

    def _remove(self, key: str) -> int:
        batch = self._batch()
        if batch is not None and key in batch.refs:
            del batch.refs[key]
            return 0
        if batch is not None and key in batch.pending:
            tmp = self._temp(key, batch.pending.pop(key))
            size = tmp.stat().st_size
            tmp.unlink()
            return size
        path = self._path(key)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            # A file reference frees only its record; the file is its owner's.
            self._ref_path(key).unlink(missing_ok=True)
            return 0
        return size

    def _entries(self) -> Iterator[os.DirEntry[str]]:
        """Every committed block file and reference record (no temp files, no marks)."""
        for shard in sorted(self.root.iterdir()):
            if shard.name.startswith(".") or not shard.is_dir():
                continue
            for entry in os.scandir(shard):
                if not entry.name.startswith(TMP_PREFIX):
                    yield entry

    def _keys(self) -> Iterator[str]:
        for entry in self._entries():
            name = entry.name
            yield name[: -len(REF_SUFFIX)] if name.endswith(REF_SUFFIX) else name

    def disk_bytes(self) -> int:
        total = 0
        for entry in self._entries():
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat()
                total += st.st_size // st.st_nlink  # a reference record is shared by its blocks
        return total

    def _marks(self) -> Path:
        return self.root / TRANSFERS_DIR

    def begin_transfer(self, root: CID) -> None:
        marks = self._marks()
        try:
            marks.mkdir(exist_ok=True)
            fd = os.open(marks / block_key(root), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if self.fsync:
                self._sync([marks])
        except OSError as e:
            raise _write_error(f"mark the transfer of {root}", self.root, e,
                               "no block of it was stored") from e  # fmt: skip

    def end_transfer(self, root: CID) -> None:
        # Not synced: a lost removal only costs one more verification after a crash.
        (self._marks() / block_key(root)).unlink(missing_ok=True)

    def interrupted_transfers(self) -> list[CID]:
        try:
            names = sorted(os.listdir(self._marks()))
        except FileNotFoundError:
            return []
        return [CID.decode(name) for name in names if not name.startswith(TMP_PREFIX)]

    def recover_transfers(self) -> list[CID]:
        # The blocks a transfer wrote are those written since its mark: a file's
        # mtime is set by its last write (a rename keeps it), so this finds them
        # without knowing the DAG, and never re-hashes older, completed replicas.
        marks = self._marks()
        try:
            entries = [e for e in os.scandir(marks) if not e.name.startswith(TMP_PREFIX)]
        except FileNotFoundError:
            return []
        if not entries:
            return []
        since = min(e.stat().st_mtime for e in entries) - RECOVERY_CLOCK_SLACK
        suspects: list[CID] = []
        for entry in self._entries():
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime >= since:
                    name = entry.name
                    key = name[: -len(REF_SUFFIX)] if name.endswith(REF_SUFFIX) else name
                    suspects.append(CID.decode(key))
        bad = self.verify(suspects)
        for entry in entries:
            Path(entry.path).unlink(missing_ok=True)
        return bad

    def gc(
        self, keep: Iterable[CID], *, keep_blocks: Iterable[CID] = (), temp_grace: float = 0.0
    ) -> tuple[int, int]:
        """As `Blockstore.gc`; also deletes temporary files older than `temp_grace` seconds.

        Temporary files are left only by a crash mid-put, or belong to a put or
        batch in progress: a running node passes a grace (TEMP_GRACE) so that
        in-flight writes keep theirs; an offline collection passes 0.
        """
        cutoff = time.time() - temp_grace
        for tmp in self.root.glob(f"*/{TMP_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                if temp_grace <= 0 or tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
        return super().gc(keep, keep_blocks=keep_blocks)
