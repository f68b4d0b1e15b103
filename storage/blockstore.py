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
"""

from __future__ import annotations

import abc
import base64
import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from multiformats import CID, multihash

from benchsync.storage import unixfs
from benchsync.storage.cid import IDENTITY, RAW, cid_bytes_v1
from benchsync.storage.errors import CorruptBlock, NotFound, StorageError

SHARD_CHARS = 2  # characters of the key per shard directory (32**2 = 1024 directories)
TMP_PREFIX = ".tmp-"  # in-flight writes; never a valid key (keys are base32 CIDs)

_SHA2_256_PREFIX = b"\x12\x20"  # multihash header: sha2-256, 32 bytes
# sync_file_range(2) flag: start writeback of the range now, do not wait for it.
_SYNC_FILE_RANGE_WRITE = 2
# Written-but-unflushed temp files a batch's flusher thread may hold open: bounds the
# open descriptors (and lets the writer run at most this far ahead of the disk).
FLUSH_QUEUE_BLOCKS = 32  # files (32 x 256 KiB chunks = 8 MiB)
# A temp file older than this is a crashed put's leftover, not a write in progress.
TEMP_GRACE = 3600.0  # seconds


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


class Blockstore(abc.ABC):
    """A content-addressed store of blocks, keyed by CID (CIDv0 and v1 of a block are one key).

    Subclasses implement the key-level primitives (`_get`, `_size`, `_store`,
    `_remove`, `_keys`); verification, CID handling and GC live here once.
    """

    @abc.abstractmethod
    def _get(self, key: str) -> bytes | None:
        """The bytes under `key`, or None if absent."""

    @abc.abstractmethod
    def _size(self, key: str) -> int | None:
        """The size in bytes of the block under `key`, or None if absent."""

    @abc.abstractmethod
    def _store(self, key: str, data: bytes) -> bool:
        """Store `data` under `key` unless present; True if newly stored."""

    @abc.abstractmethod
    def _remove(self, key: str) -> int:
        """Remove the block under `key`; return the bytes freed (0 if absent)."""

    @abc.abstractmethod
    def _keys(self) -> Iterator[str]:
        """Every stored key."""

    def _missing(self, cid: CID) -> BlockNotFound:
        return BlockNotFound(f"block {cid} is not in {self}")

    def has(self, cid: CID) -> bool:
        """Whether the block is stored."""
        return self._size(block_key(cid)) is not None

    def get(self, cid: CID) -> bytes:
        """The block's bytes. Raises BlockNotFound if absent."""
        data = self._get(block_key(cid))
        if data is None:
            raise self._missing(cid)
        return data

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

    def delete(self, cid: CID) -> None:
        """Remove a block; removing an absent block is not an error."""
        self._remove(block_key(cid))

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
        yield  # a store without a durable medium has nothing to defer; see the subclasses

    def cids(self) -> Iterator[CID]:
        """Every stored block's CID (as CIDv1, base32), in no particular order."""
        for key in self._keys():
            yield CID.decode(key)

    def total_bytes(self) -> int:
        """Sum of the sizes of all stored blocks, in bytes."""
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
        Returns (blocks removed, bytes freed).
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


class MemoryBlockstore(Blockstore):
    """Blocks in a dict; nothing survives the process.

    A batch keeps its blocks in a per-thread dict until it ends, so other
    threads see them exactly when they would in the filesystem store.
    """

    def __init__(self) -> None:
        self._blocks: dict[str, bytes] = {}
        self._local = threading.local()  # .pending: this thread's open batch, key -> bytes

    def __repr__(self) -> str:
        return "the in-memory blockstore"

    def _pending(self) -> dict[str, bytes] | None:
        return getattr(self._local, "pending", None)

    def _lookup(self, key: str) -> bytes | None:
        pending = self._pending()
        if pending is not None and key in pending:
            return pending[key]
        return self._blocks.get(key)

    def _get(self, key: str) -> bytes | None:
        return self._lookup(key)

    def _size(self, key: str) -> int | None:
        data = self._lookup(key)
        return None if data is None else len(data)

    def _store(self, key: str, data: bytes) -> bool:
        if self._lookup(key) is not None:
            return False
        pending = self._pending()
        (self._blocks if pending is None else pending)[key] = bytes(data)
        return True

    def _remove(self, key: str) -> int:
        pending = self._pending()
        data = pending.pop(key, None) if pending is not None else None
        if data is None:
            data = self._blocks.pop(key, None)
        return 0 if data is None else len(data)

    def _keys(self) -> Iterator[str]:
        return iter(list(self._blocks))

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        if self._pending() is not None:
            yield  # nested: the outermost batch commits
            return
        pending: dict[str, bytes] = {}
        self._local.pending = pending
        try:
            yield
        finally:
            self._local.pending = None
        # Reached only if the body did not raise: a failed batch keeps nothing.
        for key, data in pending.items():
            self._blocks.setdefault(key, data)

    batch.__doc__ = Blockstore.batch.__doc__


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


class _Batch:
    """The blocks one thread has written inside `FsBlockstore.batch()`, not yet in place."""

    def __init__(self) -> None:
        # key -> name of its temp file in the key's shard directory (names, not Paths:
        # this grows with the batch, ~150 bytes per 256 KiB block)
        self.pending: dict[str, str] = {}
        self.flusher: _Flusher | None = None  # started by the first put that needs it

    def finish_writeback(self) -> None:
        if self.flusher is not None:
            self.flusher.close()
            self.flusher = None


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
    rename. Leftover temporary files from a crash are removed by `gc`.
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._shards: set[str] = set()  # shard directories known to exist (saves a syscall)
        self._local = threading.local()  # .batch: this thread's open _Batch, if any

    def _path(self, key: str) -> Path:
        return self.root / key[-SHARD_CHARS - 1 : -1] / key

    def __repr__(self) -> str:
        return f"the blockstore at {self.root}"

    def _batch(self) -> _Batch | None:
        return getattr(self._local, "batch", None)

    def _readable(self, key: str) -> Path:
        """Where this thread reads `key`: its batch's temp file if pending, else the block."""
        batch = self._batch()
        if batch is not None and key in batch.pending:
            return self._temp(key, batch.pending[key])
        return self._path(key)

    def _temp(self, key: str, name: str) -> Path:
        return self._path(key).parent / name

    def _get(self, key: str) -> bytes | None:
        try:
            return self._readable(key).read_bytes()
        except FileNotFoundError:
            return None

    def _size(self, key: str) -> int | None:
        try:
            return self._readable(key).stat().st_size
        except FileNotFoundError:
            return None

    def _store(self, key: str, data: bytes) -> bool:
        batch = self._batch()
        if batch is not None and key in batch.pending:
            return False
        path = self._path(key)
        if path.is_file():
            return False
        if path.parent.name not in self._shards:
            path.parent.mkdir(exist_ok=True)
            self._shards.add(path.parent.name)
        tmp_name = f"{TMP_PREFIX}{secrets.token_hex(8)}"
        tmp = path.parent / tmp_name
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
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
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _write_error(f"store block {key}", self.root, e, "nothing was stored") from e
        return True

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        if self._batch() is not None:
            yield  # nested: the outermost batch commits
            return
        batch = _Batch()
        self._local.batch = batch
        try:
            yield
        except BaseException:
            self._local.batch = None
            batch.finish_writeback()
            self._discard(batch.pending.items())
            raise
        self._local.batch = None
        self._commit(batch)

    batch.__doc__ = Blockstore.batch.__doc__

    def _commit(self, batch: _Batch) -> None:
        """Make the batch's temp files durable, rename them into place, make that durable."""
        batch.finish_writeback()
        items = list(batch.pending.items())
        if not items:
            return
        if self.fsync:
            try:
                self._sync(self._temp(key, name) for key, name in items)
            except OSError as e:
                self._discard(items)
                raise _write_error(
                    f"make {len(items)} new blocks durable", self.root, e, "none of them was stored"
                ) from e
        for i, (key, name) in enumerate(items):
            path = self._path(key)
            try:
                os.replace(path.parent / name, path)
            except OSError as e:
                # The blocks renamed so far are complete and synced: keeping them is safe.
                self._discard(items[i:])
                raise _write_error(
                    f"rename block {key} into place",
                    self.root,
                    e,
                    f"{len(items) - i} blocks of the batch were not stored",
                ) from e
        if self.fsync:
            try:
                self._sync({self._path(key).parent for key, _ in items})
            except OSError as e:
                # Renamed but maybe not durable: a crash may lose a block, never corrupt one.
                raise _write_error(
                    f"make the names of {len(items)} new blocks durable",
                    self.root,
                    e,
                    "they are stored but a crash may lose them",
                ) from e

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
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _discard(self, pending: Iterable[tuple[str, str]]) -> None:
        """Delete the temp files of (key, temp name) pairs of a batch that is not committed."""
        for key, name in pending:
            self._temp(key, name).unlink(missing_ok=True)

    def _remove(self, key: str) -> int:
        batch = self._batch()
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
            return 0
        return size

    def _keys(self) -> Iterator[str]:
        for shard in sorted(self.root.iterdir()):
            if not shard.is_dir():
                continue
            for entry in os.scandir(shard):
                if not entry.name.startswith(TMP_PREFIX):
                    yield entry.name

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
