"""UnixFS DAGs: turning files and directories into blocks, and reading them back.

This module owns the *shape* of our IPFS DAGs. It builds them with the
parameters of Kubo's `ipfs add --cid-version=1` (CIDv1, sha2-256, raw leaves,
fixed 256 KiB chunks, balanced DAG of at most 174 links per node, directories
without mode/mtime and links sorted by name), so a snapshot's CIDs equal what
any IPFS tool computes for the same bytes. Blocks leave through a `put`
callback and come back through a `get` callback, so the module holds no
storage of its own and never holds a whole file in memory: a file is read one
chunk at a time and only the links of unfinished tree nodes are kept.

The protobuf bytes of each node are `dagpb.py`'s business.
"""

from __future__ import annotations

import io
import os
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Literal

from multiformats import CID

from benchsync.storage import dagpb
from benchsync.storage.cid import DAG_PB, RAW, block_cid
from benchsync.storage.dagpb import Link, links
from benchsync.storage.errors import NotFound, StorageError, TooLarge

__all__ = [
    "BREADTH_FIRST",
    "CHUNK_SIZE",
    "DEPTH_FIRST",
    "MAX_DAG_DEPTH",
    "MAX_LINKS",
    "add_bytes",
    "add_directory",
    "add_file",
    "add_path",
    "cat",
    "distinct_bytes",
    "frontier",
    "list_directory",
    "resolve",
    "walk",
]

CHUNK_SIZE = 256 * 1024  # bytes per leaf (Kubo's size-262144 chunker)
MAX_LINKS = 174  # links per file node (Kubo/go-unixfs balanced layout)
# Kubo turns a directory into a HAMT shard once the estimated size of its links
# (name + CID bytes) exceeds this; we do not build shards, so we refuse instead
# of silently computing a CID that no IPFS tool would agree with.
HAMT_SHARDING_THRESHOLD = 256 * 1024  # bytes
# Levels of file nodes `cat` follows. Kubo's balanced 174-ary tree of 256 KiB leaves
# holds more than an exabyte in 7 levels, and trickle DAGs (deeper) stay far below
# this for any file a disk can hold: deeper is a hand-made DAG.
MAX_DAG_DEPTH = 32

# `walk` orders
WalkOrder = Literal["depth", "breadth"]
DEPTH_FIRST: WalkOrder = "depth"  # parents before children, links in order (CAR order)
BREADTH_FIRST: WalkOrder = "breadth"  # level by level

PutBlock = Callable[[CID, bytes], None]
GetBlock = Callable[[CID], bytes]


class UnixFSError(StorageError):
    """A UnixFS DAG is not what the caller asked for (not a directory, not a file, ...)."""


class PathNotFound(UnixFSError, NotFound):
    """A path inside a UnixFS directory does not exist."""


class FileTooLarge(UnixFSError, TooLarge):
    """A file DAG expands (or claims to expand) past the size its reader expected."""


class DirectoryTooLarge(UnixFSError, TooLarge):
    """A directory needs HAMT sharding, which this builder does not implement."""


def _chunks(stream: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    """Fixed-size chunks of a stream; only the last one may be short. Empty stream -> one b""."""
    while True:
        chunk = stream.read(chunk_size)
        # A pipe or socket may return short reads before EOF; a chunk boundary
        # must not depend on that, or the CID would.
        while chunk and len(chunk) < chunk_size:
            more = stream.read(chunk_size - len(chunk))
            if not more:
                break
            chunk += more
        if not chunk:
            return
        yield chunk
        if len(chunk) < chunk_size:
            return


class _BalancedBuilder:
    """Kubo's balanced layout, built bottom-up while the leaves stream in.

    `levels[k]` holds the finished, not yet parented nodes of height k as
    (cid, tsize, filesize). When a level reaches `max_links` entries they become
    one parent. At the end every partial level is wrapped into a parent too,
    except a lone top node, which is the root: this gives exactly Kubo's tree,
    where the leftmost subtrees are full and a leftover leaf still sits at the
    full depth (174*k+1 leaves).
    """

    def __init__(self, put: PutBlock, max_links: int) -> None:
        if max_links < 2:
            raise ValueError(f"max_links must be at least 2, got {max_links}")
        self.put = put
        self.max_links = max_links
        self.levels: list[list[tuple[CID, int, int]]] = [[]]

    def add_leaf(self, chunk: bytes) -> None:
        cid = block_cid(RAW, chunk)
        self.put(cid, chunk)
        self._push(0, (cid, len(chunk), len(chunk)))

    def _push(self, level: int, entry: tuple[CID, int, int]) -> None:
        if level == len(self.levels):
            self.levels.append([])
        self.levels[level].append(entry)
        if len(self.levels[level]) == self.max_links:
            self._push(level + 1, self._parent(self.levels[level]))
            self.levels[level] = []

    def _parent(self, children: list[tuple[CID, int, int]]) -> tuple[CID, int, int]:
        filesize = sum(c[2] for c in children)
        data = dagpb.encode_unixfs(
            dagpb.TYPE_FILE, filesize=filesize, blocksizes=[c[2] for c in children]
        )
        block = dagpb.encode_node([Link(c[0], "", c[1]) for c in children], data)
        cid = block_cid(DAG_PB, block)
        self.put(cid, block)
        return cid, len(block) + sum(c[1] for c in children), filesize

    def finish(self) -> tuple[CID, int, int]:
        for level, pending in enumerate(self.levels):
            higher = any(self.levels[level + 1 :])
            if len(pending) == 1 and not higher:
                return pending[0]
            if pending:
                self._push(level + 1, self._parent(pending))
                self.levels[level] = []
        raise AssertionError("unreachable: finish() always ends at a lone root")


def add_file(
    stream: BinaryIO,
    put: PutBlock,
    *,
    chunk_size: int = CHUNK_SIZE,
    max_links: int = MAX_LINKS,
) -> tuple[CID, int, int]:
    """Chunk, hash and store a file's bytes as a UnixFS DAG.

    `put(cid, block)` is called once per block, leaves first, each parent after
    its children. Memory stays at about one chunk plus one level of links per
    tree level, whatever the file size.
    Returns (root CID, file size in bytes, Tsize = total encoded bytes of the DAG).
    A file of at most one chunk is a single raw block (the empty file too).
    """
    builder = _BalancedBuilder(put, max_links)
    empty = True
    for chunk in _chunks(stream, chunk_size):
        builder.add_leaf(chunk)
        empty = False
    if empty:  # Kubo stores an empty file as one empty raw leaf
        builder.add_leaf(b"")
    cid, tsize, size = builder.finish()
    return cid, size, tsize


def add_bytes(
    data: bytes,
    put: PutBlock,
    *,
    chunk_size: int = CHUNK_SIZE,
    max_links: int = MAX_LINKS,
) -> tuple[CID, int, int]:
    """`add_file` for bytes already in memory. Returns (root CID, size, Tsize)."""
    return add_file(io.BytesIO(data), put, chunk_size=chunk_size, max_links=max_links)


def add_directory(entries: Iterable[tuple[str, CID, int]], put: PutBlock) -> tuple[CID, int]:
    """Store a UnixFS directory node linking (name, cid, tsize) entries, sorted by name.

    Children must already be stored (this writes only the directory block).
    Returns (directory CID, its Tsize). Raises UnixFSError for an empty, duplicate
    or slash-containing name, and DirectoryTooLarge where Kubo would shard.
    """
    items = sorted(entries, key=lambda e: e[0].encode("utf-8"))
    names = [e[0] for e in items]
    for name in names:
        if not name or "/" in name:
            raise UnixFSError(f"invalid directory entry name {name!r}: empty or contains '/'")
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise UnixFSError(f"duplicate directory entry names: {sorted(dupes)}")
    estimate = sum(len(name.encode("utf-8")) + len(bytes(cid)) for name, cid, _ in items)
    if estimate > HAMT_SHARDING_THRESHOLD:
        raise DirectoryTooLarge(
            "directory (needs HAMT sharding, not supported)",
            limit=HAMT_SHARDING_THRESHOLD,
            got=estimate,
        )
    block = dagpb.encode_node(
        [Link(cid, name, tsize) for name, cid, tsize in items],
        dagpb.encode_unixfs(dagpb.TYPE_DIRECTORY),
    )
    cid = block_cid(DAG_PB, block)
    put(cid, block)
    return cid, len(block) + sum(e[2] for e in items)


def _add_path(
    path: Path, put: PutBlock, hidden: bool, chunk_size: int, max_links: int
) -> tuple[CID, int]:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        # Like `ipfs add` without --dereference-symlinks: store the link itself.
        target = os.fsencode(os.readlink(path))
        block = dagpb.encode_node([], dagpb.encode_unixfs(dagpb.TYPE_SYMLINK, data=target))
        cid = block_cid(DAG_PB, block)
        put(cid, block)
        return cid, len(block)
    if stat.S_ISREG(st.st_mode):
        with path.open("rb") as f:
            cid, _, tsize = add_file(f, put, chunk_size=chunk_size, max_links=max_links)
        return cid, tsize
    if stat.S_ISDIR(st.st_mode):
        entries = []
        for child in sorted(path.iterdir(), key=lambda p: os.fsencode(p.name)):
            if child.name.startswith(".") and not hidden:
                continue  # Kubo skips dotfiles unless --hidden
            cid, tsize = _add_path(child, put, hidden, chunk_size, max_links)
            entries.append((child.name, cid, tsize))
        return add_directory(entries, put)
    raise UnixFSError(f"{path} is neither a file, a directory nor a symlink; cannot add it")


def add_path(
    path: Path,
    put: PutBlock,
    *,
    hidden: bool = False,
    chunk_size: int = CHUNK_SIZE,
    max_links: int = MAX_LINKS,
) -> CID:
    """Add a file, symlink or directory tree (recursively) and return its root CID.

    Dotfiles inside directories are skipped unless `hidden` (Kubo's `--hidden`).
    Raises OSError for unreadable paths and UnixFSError for special files.
    """
    return _add_path(Path(path), put, hidden, chunk_size, max_links)[0]


def walk(
    get: GetBlock,
    *roots: CID,
    has: Callable[[CID], bool] | None = None,
    missing: list[CID] | None = None,
    limit: int | None = None,
    order: WalkOrder = DEPTH_FIRST,
    malformed_as_leaf: bool = False,
    read_leaves: bool = True,
) -> Iterator[tuple[CID, bytes]]:
    """Every block of the DAGs under `roots` once, as (CID, bytes).

    This is the one DAG walk of the code base. `order` is DEPTH_FIRST
    (parents before children, links in order: CAR order) or BREADTH_FIRST
    (level by level: a fetch asks for the shallowest missing blocks first).
    A block reachable from several roots or parents is visited once.

    Without `has`, every block is read, and whatever `get` raises for a
    missing block propagates. With `has`, a block for which `has(cid)` is
    false is not read: it is appended to `missing` (the frontier of what is
    held) and its subtree is skipped; the walk ends once `limit` blocks are
    missing. Raises DagPbError for a malformed node, unless
    `malformed_as_leaf`: then its bytes are yielded and it links nowhere.
    With `has` and not `read_leaves`, a held raw leaf is neither read nor
    yielded: it links nowhere, so only its presence matters (`frontier`).
    """
    assert read_leaves or has is not None, "without `has` a leaf's presence is its read"
    seen: set[CID] = set()
    queue = deque(roots)
    take = queue.popleft if order == BREADTH_FIRST else queue.pop
    if order != BREADTH_FIRST:
        queue.reverse()  # the first root is walked first
    lacking = 0
    if limit is not None and limit <= 0 and has is not None:
        return  # nothing may be found missing: nothing to learn
    while queue:
        cid = take()
        if cid in seen:
            continue
        seen.add(cid)
        if has is not None and not has(cid):
            if missing is not None:
                missing.append(cid)
            lacking += 1
            if limit is not None and lacking >= limit:
                return
            continue
        if not read_leaves and cid.codec.code == RAW:
            continue  # held (`has` said so), and a raw block has no links to follow
        data = get(cid)
        yield cid, data
        try:
            children = links(cid, data)
        except dagpb.DagPbError:
            if not malformed_as_leaf:
                raise
            continue
        queue.extend(children if order == BREADTH_FIRST else reversed(children))


def frontier(
    get: GetBlock,
    has: Callable[[CID], bool],
    root: CID,
    *,
    limit: int | None = None,
    order: WalkOrder = DEPTH_FIRST,
) -> list[CID]:
    """The blocks under `root` that `has` lacks and whose parents it holds, in walk
    order (`walk`'s `order`), at most `limit` of them. Empty: the DAG is whole.
    Held raw leaves are not read: the walk of a 100 MiB file costs its inner
    nodes, not a second read and hash of every leaf.
    Raises DagPbError for a malformed held node, and whatever `get` raises."""
    missing: list[CID] = []
    for _ in walk(
        get, root, has=has, missing=missing, limit=limit, order=order, read_leaves=False
    ):
        pass
    return missing


def distinct_bytes(
    get: GetBlock, root: CID, size: Callable[[CID], int] | None = None
) -> int:
    """File bytes held by the distinct blocks under `root`, each block counted once.

    What a DAG really stores, as opposed to what it expands to when leaves repeat.
    With `size` (a store's block sizes), raw leaves are measured, not read: a
    file just received is not read and hashed again. Raises DagPbError for a
    malformed node, and whatever `get` or `size` raises.
    """
    total = 0
    leaves: set[CID] = {root} if root.codec.code == RAW else set()
    held = None if size is None else (lambda _: True)
    for cid, block in walk(get, root, has=held, read_leaves=size is None):
        if cid.codec.code == RAW:
            total += len(block)
        elif cid.codec.code == DAG_PB:
            links, data = dagpb.decode_node(block)
            total += len(dagpb.decode_unixfs(data or b"").data)
            leaves.update(link.cid for link in links if link.cid.codec.code == RAW)
    if size is not None:
        total += sum(size(leaf) for leaf in leaves)
    return total


def _directory_links(get: GetBlock, cid: CID) -> list[Link]:
    if cid.codec.code != DAG_PB:
        raise UnixFSError(f"{cid} is a raw block, not a directory")
    node_links, data = dagpb.decode_node(get(cid))
    fs = dagpb.decode_unixfs(data or b"")
    if fs.type == dagpb.TYPE_HAMT_SHARD:
        raise UnixFSError(f"{cid} is a HAMT-sharded directory; reading shards is not supported")
    if fs.type != dagpb.TYPE_DIRECTORY:
        raise UnixFSError(f"{cid} is not a directory (UnixFS type {fs.type})")
    return node_links


def list_directory(get: GetBlock, cid: CID) -> list[tuple[str, CID, int]]:
    """The entries of a UnixFS directory as (name, cid, tsize), in stored (sorted) order.

    Raises UnixFSError if `cid` is not a (non-sharded) directory.
    """
    return [(link.name, link.cid, link.tsize) for link in _directory_links(get, cid)]


def resolve(get: GetBlock, root: CID, path: str) -> CID:
    """The CID at a slash-separated path under a directory, e.g. "tables/models.parquet".

    Raises PathNotFound if a component is missing, UnixFSError if a non-final
    component is not a directory.
    """
    cid = root
    walked: list[str] = []
    for part in (p for p in path.split("/") if p):
        for link in _directory_links(get, cid):
            if link.name == part:
                cid = link.cid
                break
        else:
            where = "/".join(walked) or "the root"
            raise PathNotFound(f"no entry {part!r} in {where} of {root}")
        walked.append(part)
    return cid


def cat(get: GetBlock, cid: CID, size: int | None = None) -> Iterator[bytes]:
    """Stream the bytes of a UnixFS file, chunk by chunk, holding the DAG to its size claims.

    `size` is the byte size the caller expects (a manifest's `bytes`, say): the
    file must be exactly that long. FileTooLarge is raised before the first byte
    past `size` is yielded, or as soon as the root claims more; UnixFSError if
    the file ends short, if a node's `filesize`/`blocksizes` disagree with each
    other or with its children's data, if a node links an empty child, or if the
    DAG is deeper than MAX_DAG_DEPTH. Without `size` the root's own claim is the
    bound: pass `size` for every DAG that came from outside.

    Identical chunks may share one leaf block, so links may repeat: it is the
    bytes that are bounded, and since every linked child must hold at least one
    byte, the blocks visited are at most `size * MAX_DAG_DEPTH`.
    Raises whatever `get` raises for a missing block.
    """
    if size is not None and size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    limit = size
    produced = 0
    # (cid, bytes the parent claims for it or None at the root, depth)
    stack: list[tuple[CID, int | None, int]] = [(cid, size, 0)]
    while stack:
        current, claimed, depth = stack.pop()
        if depth > MAX_DAG_DEPTH:
            raise UnixFSError(f"{cid}: file DAG is deeper than {MAX_DAG_DEPTH} levels")
        block = get(current)
        if current.codec.code == RAW:
            chunk = block
        elif current.codec.code == DAG_PB:
            node_links, data = dagpb.decode_node(block)
            fs = dagpb.decode_unixfs(data or b"")
            if fs.type not in (dagpb.TYPE_FILE, dagpb.TYPE_RAW):
                raise UnixFSError(f"{current} is not a file (UnixFS type {fs.type})")
            total = _node_size(current, node_links, fs)
            if depth == 0 and limit is not None and total > limit:
                raise FileTooLarge(f"file {cid} (its root's claim)", limit=limit, got=total)
            if claimed is not None and total != claimed:
                raise UnixFSError(f"{current} holds {total} bytes, its parent claims {claimed}")
            if limit is None:
                limit = total
            chunk = fs.data
            stack.extend(
                (link.cid, blocksize, depth + 1)
                for link, blocksize in reversed(list(zip(node_links, fs.blocksizes, strict=True)))
            )
        else:
            raise UnixFSError(f"{current} has codec {current.codec.name}, not a UnixFS file")
        if limit is not None and produced + len(chunk) > limit:
            raise FileTooLarge(f"file {cid}", limit=limit, got=produced + len(chunk))
        if current.codec.code == RAW:
            if claimed is not None and len(block) != claimed:
                raise UnixFSError(
                    f"{current} holds {len(block)} bytes, its parent claims {claimed}"
                )
            if limit is None:
                limit = len(block)
        if chunk:
            produced += len(chunk)
            yield chunk
    if limit is not None and produced != limit:
        raise UnixFSError(f"file {cid} ends after {produced} bytes, expected {limit}")


def _node_size(cid: CID, node_links: list[Link], fs: dagpb.UnixFSData) -> int:
    """The bytes a file node claims, after checking its claims agree with each other."""
    if len(fs.blocksizes) != len(node_links):
        raise UnixFSError(
            f"{cid} has {len(node_links)} links but {len(fs.blocksizes)} blocksizes"
        )
    if any(b == 0 for b in fs.blocksizes):
        raise UnixFSError(f"{cid} links an empty child (blocksize 0)")
    total = len(fs.data) + sum(fs.blocksizes)
    if fs.filesize is not None and fs.filesize != total:
        raise UnixFSError(
            f"{cid} claims filesize {fs.filesize} but its data and blocksizes add up to {total}"
        )
    return total
