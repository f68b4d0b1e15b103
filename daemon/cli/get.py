"""`benchsync get CID [-o PATH] [--peer MULTIADDR ...]`: any IPFS file or directory, by CID.

Fetching goes through the node running on the data directory when there is
one (`POST /v1/get`: lab members over `/benchsync/car`, any IPFS peer such as
Kubo over Bitswap, every block verified before it is stored); without one, the
command runs a short-lived libp2p client of its own on the data directory's
identity and lab key (`P2PNode(client_only=True)`), dialing `--peer` and the
`bootstrap` setting's peers; like `up`, it makes the data directory (mode
0700, identity, lab key) when there is none. Blocks already held are not fetched again, so an
interrupted `get` resumes where it stopped.

Writing is done here, from the blockstore, as `ipfs get` writes: a file
becomes PATH (default: the CID), a directory a directory PATH with its
entries, a symlink a symlink. Names come from outside: each is checked (no
`/`, no NUL, not `.` or `..`, not empty) before it reaches the file system,
files are created exclusively and without following links, and the whole
tree is written under a `.PATH.partial` name and renamed into place at the
end, so PATH never holds half a DAG. Without a node, a writer thread follows
the fetch (`_Arrivals`: it waits for each block it needs until the fetch has
stored it), so the file is written while the blocks arrive, not read back after
the last one (~1.5 s for 100 MiB on a loaded machine). Fetched DAGs are kept
from the node's block GC for an hour; `benchsync pin add CID` keeps them for good.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from multiformats import CID

from benchsync.daemon.cli.common import (
    CLIError,
    add_node_arguments,
    call_node,
    data_dir,
    node_client,
    require_home,
)
from benchsync.daemon.cli.progress import Progress
from benchsync.storage import dagpb, unixfs
from benchsync.storage.blockstore import BlockNotFound, FsBlockstore
from benchsync.storage.cid import DAG_PB, RAW, parse_cid_text
from benchsync.storage.errors import StorageError

POLL_INTERVAL = 0.2  # seconds between progress polls of the node
ARRIVAL_POLL = 0.2  # seconds a writer waits for a block before looking again (CAR fetches
# store many blocks before they report progress)
GET_TIMEOUT = 3600.0  # seconds the node may take for one get (a big DAG over a slow link)
MAX_NAME_BYTES = 255  # bytes of one path component (NAME_MAX on Linux)

GetBlock = Callable[[CID], bytes]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "get", help="fetch any IPFS file or directory by CID (from lab peers, Kubo, ...) and "
        "write it, as `ipfs get` does",
    )  # fmt: skip
    add_node_arguments(p)
    p.add_argument("cid", help="CIDv0 (Qm...) or CIDv1 (bafy...) of a UnixFS file or directory")
    p.add_argument("-o", "--output", metavar="PATH", help="where to write it (default: the CID)")
    p.add_argument(
        "--peer", action="append", default=[], metavar="MULTIADDR",
        help="dial this peer first (/ip4/.../tcp/.../p2p/<peer id>); repeatable",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=run_get)


def home_blockstore(home: Path) -> FsBlockstore:
    """The data directory's blockstore, as `LocalDataset` opens it (`<home>/blocks`),
    without loading DuckDB and Arrow (a second of a command's start on a loaded machine).
    Raises CLIError for a directory that is no data directory."""
    require_home(home)
    return FsBlockstore(home / "blocks")


def run_get(args: argparse.Namespace) -> int:
    try:
        root = parse_cid_text(args.cid)
    except (ValueError, KeyError) as e:
        raise CLIError(f"{args.cid!r} is not a CID ({e})",
                       "give a CIDv0 (Qm...) or a CIDv1 (bafy...)") from None  # fmt: skip
    out = Path(args.output or str(root))
    if out.exists() or out.is_symlink():
        raise CLIError(f"{out} already exists", "choose another path with -o, or remove it")
    progress = Progress(f"get {str(root)[:16]}...", None, enabled=not args.json)
    client = node_client(args)
    try:
        if client is not None:
            doc = _through_node(client, args, root, progress)
            written = _write_out(home_blockstore(data_dir(getattr(args, "home", None))).get,
                                 root, out)  # fmt: skip
        else:
            doc, written = _offline(args, root, out, progress)
    finally:
        progress.close()
    doc |= {"path": str(out), "written_bytes": written}
    print(json.dumps(doc) if args.json else out)
    return 0


def _write_out(get: GetBlock, root: CID, out: Path) -> int:
    """`write_dag`, its storage and file-system failures as CLIError."""
    try:
        return write_dag(get, root, out)
    except (StorageError, OSError) as e:
        raise CLIError(f"cannot write {root} to {out}: {e}",
                       "check the path; the fetched blocks are kept, run the command "
                       "again") from e  # fmt: skip


class _Arrivals:
    """The blockstore as a writer thread sees it while a fetch fills it: `get` waits for
    a block not stored yet, until the fetch has `stored` more or is `finish`ed."""

    def __init__(self, store: FsBlockstore) -> None:
        self.store = store
        self._cond = threading.Condition()
        self._generation = 0  # batches stored so far: a wake-up not to miss
        self._done = False

    def stored(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def finish(self) -> None:
        """The fetch ended (done or failed): a block still missing will not come."""
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def get(self, cid: CID) -> bytes:
        while True:
            with self._cond:
                generation, done = self._generation, self._done
            try:
                return self.store.get(cid)
            except BlockNotFound:
                if done:
                    raise
            with self._cond:
                if self._generation == generation and not self._done:
                    self._cond.wait(ARRIVAL_POLL)


class _Writer:
    """`write_dag` in a thread of its own, following a fetch through `_Arrivals`."""

    def __init__(self, arrivals: _Arrivals, root: CID, out: Path) -> None:
        self.written: int | None = None
        self.error: BaseException | None = None
        self._args = (arrivals, root, out)
        self._thread = threading.Thread(target=self._run, name="get-writer", daemon=True)

    def _run(self) -> None:
        arrivals, root, out = self._args
        try:
            self.written = _write_out(arrivals.get, root, out)
        except BaseException as e:  # handed to the command's thread
            self.error = e

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()


def _through_node(client: Any, args: argparse.Namespace, root: CID, progress: Progress) -> Any:
    """POST /v1/get on the running node; meanwhile poll its progress for the bar."""
    from benchsync.daemon.control import ControlClient

    done = threading.Event()
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["doc"] = call_node(client, "POST", "/v1/get",
                                      {"cid": str(root), "peers": list(args.peer)})  # fmt: skip
        except BaseException as e:  # handed to the main thread
            result["error"] = e
        finally:
            done.set()

    client.timeout = max(getattr(client, "timeout", 0) or 0, GET_TIMEOUT)
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    poller = ControlClient(socket_path=client.socket_path, url=client.url, token=client.token,
                           timeout=10.0) if progress.enabled else None  # fmt: skip
    seen = 0
    while not done.wait(POLL_INTERVAL):
        if poller is None:
            continue
        try:
            gets = poller.get("/v1/get")["gets"]
        except Exception:  # progress is best effort; the call itself reports failures
            continue
        now = sum(g["bytes"] for g in gets if g.get("cid") == str(root))
        if now > seen:
            progress.update(now - seen)
            seen = now
    worker.join()
    if "error" in result:
        raise result["error"]
    doc = result["doc"]
    if isinstance(doc.get("bytes"), int) and doc["bytes"] > seen:
        progress.update(doc["bytes"] - seen)  # the last stretch, between two polls
    return doc


def _offline(
    args: argparse.Namespace, root: CID, out: Path, progress: Progress
) -> tuple[dict[str, Any], int]:
    """No node runs here: a short-lived libp2p client on this data directory fetches it,
    while a `_Writer` writes it to `out`; (the fetch's result, file bytes written)."""
    import logging

    import trio

    from benchsync.daemon.cli.init import make_private_home
    from benchsync.daemon.config import ConfigError, load_config
    from benchsync.daemon.host import HostConfigError
    from benchsync.daemon.lab import LabKeyError, load_lab_keys
    from benchsync.daemon.network import GetFailed, P2PNode

    home = data_dir(getattr(args, "home", None))
    make_private_home(home)  # as `up` does: a first `get` on a machine makes its home
    try:
        config = load_config(home, None)
        keys = load_lab_keys(home, config.lab_key, config.lab_key_next)
    except ConfigError as e:
        raise CLIError(e.message, e.hint or "fix the setting named above") from e
    except LabKeyError as e:
        raise CLIError(e.message, e.hint) from e
    lab = {"lab_key": keys[0], "lab_key_next": keys[1] if len(keys) > 1 else None,
           "open": config.open, "open_queries": config.open_queries}  # fmt: skip
    dial = list(dict.fromkeys([*args.peer, *config.bootstrap]))
    if not dial:
        raise CLIError("no node runs on this data directory and no peer was given",
                       "start the node (`benchsync up`), or name a peer holding the CID "
                       "with --peer /ip4/.../tcp/.../p2p/<peer id>")  # fmt: skip

    # A peer of another lab is expected here (Kubo, a lab serving all): not worth a warning.
    logging.getLogger("benchsync.daemon.lab").setLevel(logging.ERROR)
    # py-libp2p logs a peer refusing a protocol (Kubo answering `na` to the lab proof) at
    # ERROR, seven lines each; what fails the command comes out as Error:/Try: anyway.
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)

    store = home_blockstore(home)
    arrivals = _Arrivals(store)
    writer = _Writer(arrivals, root, out)

    def stored(nbytes: int) -> None:
        progress.update(nbytes)
        arrivals.stored()

    async def fetch() -> dict[str, Any]:
        node = P2PNode(home, network=config.network, blockstore=store, **lab,
                       bitswap_serve=config.bitswap_serve, client_only=True)  # fmt: skip
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            writer.start()
            try:
                got = await node.get(root, dial=dial, progress=stored)
            finally:
                nursery.cancel_scope.cancel()
        return got.to_json()

    try:
        try:
            doc = trio.run(fetch)
        finally:
            arrivals.finish()  # a writer waiting for a block that will not come stops
            writer.join()
    except HostConfigError as e:
        raise CLIError(str(e), "give each --peer as /ip4/HOST/tcp/PORT/p2p/PEER_ID (`ipfs id` "
                       "or `benchsync status` on that machine shows it)") from e  # fmt: skip
    except GetFailed as e:
        raise CLIError(str(e), "name a peer that holds it with --peer MULTIADDR; blocks "
                       "fetched so far are kept") from e  # fmt: skip
    if writer.error is not None:
        raise writer.error
    assert writer.written is not None  # the writer either wrote or failed
    return doc, writer.written


# --- writing a DAG as `ipfs get` does ----------------------------------------------------------


def check_name(name: str, parent: CID) -> str:
    """`name` if it is safe as one path component, else raises CLIError."""
    if (not name or name in (".", "..") or "/" in name or "\0" in name
            or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES):  # fmt: skip
        raise CLIError(f"directory {parent} has an entry named {name!r}, which is not a safe "
                       "file name", "this DAG cannot be written as files; `benchsync export` "
                       "a CAR of it instead")  # fmt: skip
    return name


def _kind(get: GetBlock, cid: CID) -> tuple[str, bytes]:
    """("file" | "dir" | "symlink", the symlink's target) of a UnixFS node."""
    if cid.codec.code == RAW:
        return "file", b""
    if cid.codec.code != DAG_PB:
        raise CLIError(f"{cid} has codec {cid.codec.name}: not UnixFS", "give a UnixFS CID")
    fs = dagpb.decode_unixfs(dagpb.decode_node(get(cid))[1] or b"")
    if fs.type in (dagpb.TYPE_FILE, dagpb.TYPE_RAW):
        return "file", b""
    if fs.type == dagpb.TYPE_DIRECTORY:
        return "dir", b""
    if fs.type == dagpb.TYPE_SYMLINK:
        return "symlink", fs.data
    if fs.type == dagpb.TYPE_HAMT_SHARD:
        raise CLIError(f"{cid} is a HAMT-sharded directory; writing those is not supported yet",
                       "fetch a sub-directory's CID instead")  # fmt: skip
    raise CLIError(f"{cid} is a UnixFS node of type {fs.type}, not a file or directory",
                   "give the CID of a file or directory")  # fmt: skip


def write_dag(get: GetBlock, root: CID, out: Path) -> int:
    """Write the UnixFS DAG under `root` to `out` (which must not exist); file bytes written.

    Raises CLIError (an unsafe name, an unsupported node), StorageError (a
    malformed or incomplete DAG), OSError.
    """
    partial = out.with_name(f".{out.name}.partial")
    if partial.is_dir() and not partial.is_symlink():
        shutil.rmtree(partial)  # ours, from an interrupted run
    elif partial.exists() or partial.is_symlink():
        partial.unlink()
    try:
        written = _write(get, root, partial)
        os.replace(partial, out)
    except BaseException:
        if partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial, ignore_errors=True)
        elif partial.exists() or partial.is_symlink():
            partial.unlink()
        raise
    return written


def _write(get: GetBlock, cid: CID, path: Path) -> int:
    kind, target = _kind(get, cid)
    if kind == "symlink":
        os.symlink(os.fsdecode(target), path)
        return 0
    if kind == "file":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        total = 0
        with os.fdopen(fd, "wb") as f:
            for chunk in unixfs.cat(get, cid):
                f.write(chunk)
                total += len(chunk)
        return total
    path.mkdir(mode=0o755)
    total = 0
    for name, child, _tsize in unixfs.list_directory(get, cid):
        total += _write(get, child, path / check_name(name, cid))
    return total
