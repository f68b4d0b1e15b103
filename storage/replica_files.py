"""A replica's Parquet files, content-addressed and shared across its versions.

A peer's new version shares most segment files (same file CID) with the one
before, so each dataset keeps one file per file CID,
`<replicas>/<dataset>/files/<file-cid>.parquet`, and a version's folder
(`<dataset>/<version-cid>/<table>/part-NNNN.parquet`, or `<table>.parquet` in
the one-file layout) is made of hard links to them: what readers see (union
views, the query sandbox, `segments.parquet_files`) is unchanged, an
unchanged segment costs one link, and nothing is copied.

While a version is fetched, `ReplicaPlacement` names each table file's
content-addressed path to the blockstore's `FilePlacement`, so every received
leaf is written once, straight into the file it belongs to (and kept as a
file reference into it). Paths come only from the version's `tables/` entries
as `snapshot.table_files` checked them: a peer's names never reach the disk.

Hand-written because no library does it: it is the glue between our UnixFS
placement, our snapshot layout and our replica folders.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from multiformats import CID

from benchsync.storage import dagpb
from benchsync.storage.blockstore import Blockstore, FilePlacement
from benchsync.storage.cid import RAW, cid_text, parse_cid_text
from benchsync.storage.errors import NotFound, StorageError
from benchsync.storage.snapshot import (
    PARQUET_SUFFIX,
    BadSnapshot,
    IncompleteSnapshot,
    TableLink,
    Version,
    check_distinct_bytes,
    read_version,
    table_files,
    verified_getter,
)

FILES_DIR = "files"  # <dataset>/files/<file-cid>.parquet


def file_name(cid: CID) -> str:
    """The content-addressed name of a table file: its CID (base32/base58, alphanumeric)."""
    return f"{cid_text(cid)}{PARQUET_SUFFIX}"


def version_files(store: Blockstore, version: Version) -> dict[str, TableLink]:
    """The version's checked table entries (`table_files`); raises IncompleteSnapshot."""

    def get(cid: CID) -> bytes:
        try:
            return store.get(cid)
        except NotFound as e:
            raise IncompleteSnapshot(f"block {cid} is missing from the blockstore") from e

    return table_files(get, version)


def file_cids(link: TableLink) -> list[CID]:
    """The file CIDs of one table entry, in part order."""
    return [link.cid] if link.parts is None else [cid for _, cid in link.parts]


class ActiveFiles:
    """Content-addressed files a fetch is writing now: not deleted by an install's sweep."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[Path, int] = {}
        self.complete: set[Path] = set()  # written whole by a finished placement, this process

    def add(self, path: Path) -> None:
        with self._lock:
            self._files[path] = self._files.get(path, 0) + 1

    def remove(self, paths: list[Path]) -> None:
        with self._lock:
            for path in paths:
                left = self._files.get(path, 0) - 1
                if left > 0:
                    self._files[path] = left
                else:
                    self._files.pop(path, None)

    def __contains__(self, path: object) -> bool:
        with self._lock:
            return path in self._files

    def finished(self, paths: list[Path]) -> None:
        with self._lock:
            self.complete.update(paths)

    def is_complete(self, path: Path) -> bool:
        with self._lock:
            return path in self.complete

    def forget(self, path: Path) -> None:
        with self._lock:
            self.complete.discard(path)


class ReplicaPlacement:
    """Where one fetch of a peer's version writes its table files' leaves.

    `files` is the `FilePlacement` to hand to `Fetcher.fetch(place=...)`;
    `finish()` (in a worker thread, once the DAG is complete) checks every
    table's expansion bound, writes in the leaves not received and syncs the
    files; `close()` (always) releases them to the install's sweep.
    """

    def __init__(
        self, store: Blockstore, root: CID, folder: Path, active: ActiveFiles
    ) -> None:
        self.store = store
        self.root = root
        self.folder = folder  # <replicas>/<dataset>/files
        self.active = active
        self._targets: dict[str, Path] | None = None  # DAG path -> content-addressed file
        self._claimed: list[Path] = []
        self.files = FilePlacement(store, root, self._target)

    def _resolve(self) -> dict[str, Path] | None:
        """DAG path -> file, from the checked manifest and `tables/`; None until held."""
        try:
            version = read_version(self.store, self.root)
            links = version_files(self.store, version)
        except (IncompleteSnapshot, NotFound):
            return None  # not all here yet: the next rebuild asks again
        except (BadSnapshot, StorageError):
            return {}  # not a valid snapshot: nothing placed, the install refuses it
        targets: dict[str, Path] = {}
        for table, link in links.items():
            if link.parts is None:
                targets[f"tables/{table}{PARQUET_SUFFIX}"] = self.folder / file_name(link.cid)
            else:
                for name, cid in link.parts:
                    targets[f"tables/{table}/{name}"] = self.folder / file_name(cid)
        return targets

    def _target(self, path: str) -> Path | None:
        if self._targets is None:
            self._targets = self._resolve()
            if self._targets is None:
                return None
            self.folder.mkdir(parents=True, exist_ok=True)
        dest = self._targets.get(path)  # only names the validator accepted
        if dest is not None and dest not in self._claimed:
            self.active.add(dest)
            self._claimed.append(dest)
        return dest

    def finish(self) -> list[Path]:
        """Complete and sync the placed files; returns them. Raises BadSnapshot for a
        file claiming too many repeats, IncompleteSnapshot if a block is missing."""
        version = read_version(self.store, self.root)
        try:
            for table, link in version_files(self.store, version).items():
                info = version.manifest.tables[table]
                # Leaves by their stored size: verified as they arrived, not read again.
                check_distinct_bytes(verified_getter(self.store), table, link.cid, info.bytes,
                                     self.files.size)  # fmt: skip
            done = self.files.finish()
        except NotFound as e:
            raise IncompleteSnapshot(f"a block of {self.root} went missing: {e}") from e
        self.active.finished(done)
        return done

    def close(self) -> None:
        self.active.remove(self._claimed)
        self._claimed = []


def file_leaves(store: Blockstore, cid: CID) -> Iterator[tuple[CID, int, int]]:
    """(leaf, offset, size) of the file DAG `cid`, as far as its nodes are held."""
    def walk(node: CID, offset: int, size: int | None) -> Iterator[tuple[CID, int, int]]:
        if node.codec.code == RAW:
            if size is None:
                with contextlib.suppress(NotFound):
                    size = store.size(node)
            if size is not None:
                yield node, offset, size
            return
        try:
            links, data = dagpb.decode_node(store.get(node))
            fs = dagpb.decode_unixfs(data or b"")
        except (StorageError, dagpb.DagPbError):
            return
        if len(fs.blocksizes) != len(links):
            return
        for link, blocksize in zip(links, fs.blocksizes, strict=True):
            yield from walk(link.cid, offset, blocksize)
            offset += blocksize

    yield from walk(cid, 0, None)


def drop_refs_into(store: Blockstore, path: Path) -> int:
    """Delete the reference blocks pointing into `path` (a content-addressed file about to
    be removed): found from the file's own DAG, its name being its CID. Returns how many."""
    try:
        cid = parse_cid_text(path.name.removesuffix(PARQUET_SUFFIX))
    except (ValueError, KeyError):
        return 0
    target = Path(os.path.abspath(path))
    dropped = 0
    for leaf, _, _ in list(file_leaves(store, cid)):
        try:
            ref = store.file_ref(leaf)
        except NotFound:
            continue
        if ref is not None and ref.path == target:
            store.delete(leaf)
            dropped += 1
    return dropped
