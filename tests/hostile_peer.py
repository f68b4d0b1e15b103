"""A scripted hostile libp2p peer, the real node it attacks, and an honest peer beside it.

`tests/test_hostile_peer.py` (issue 17, "Keep it fixed") drives these three:

- `VictimNode`: a real `benchsync up` process on 127.0.0.1 whose data directory
  sits inside a *sentinel* directory that is also its working directory, so
  that anything it writes outside its home (a `../` link name, an absolute
  path, a DuckDB `COPY ... TO 'relative'`) lands where the test looks. Its
  damage is capped from outside: RLIMIT_FSIZE bounds every file it writes
  (CPython ignores SIGXFSZ, so a write past the cap fails with EFBIG instead
  of killing it), and `RssWatch` kills it if its memory runs away.
- `HostilePeer`: a libp2p peer built from the node's own pieces
  (`P2PNode`, hence `new_benchsync_host` and the project's encoders) that
  speaks every benchsync protocol wrongly on purpose: snapshots with hostile
  link names or a diamond DAG, raw GossipSub RPCs with any `from`, key and
  signature, garbage and oversized frames, idle streams.
- `HonestPeer`: a peer with a real dataset (real DuckDB, real snapshots) that
  checks the victim still serves honest peers: it syncs the honest peer's
  newest snapshot and answers its query.

Nothing here sends traffic anywhere but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import trio
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX
from multiformats import CID

from benchsync.daemon.control import ControlAPIError, ControlClient
from benchsync.daemon.coordinator import exchange
from benchsync.daemon.demo import NodeProcess, free_port
from benchsync.daemon.lab import encode_key
from benchsync.daemon.network import P2PNode
from benchsync.daemon.node import head_of
from benchsync.protocol.frames import encode_frame, encode_json_frame
from benchsync.protocol.heads import Head, encode_head, topic_for
from benchsync.protocol.query import (
    MAX_REQUEST_FRAME,
    QUERY_PROTOCOL_ID,
    QueryRequest,
    QueryResponse,
)
from benchsync.storage import dagpb, schema, unixfs
from benchsync.storage.blockstore import MemoryBlockstore
from benchsync.storage.cid import DAG_PB, RAW, block_cid
from benchsync.storage.dataset import LocalDataset
from benchsync.storage.snapshot import FORMAT, MANIFEST_NAME, TABLES_DIR

NETWORK = "hostile"
LAB_KEY = bytes(range(100, 132))  # the victim's lab; attackers are members unless told
FSIZE_LIMIT = 64 * 1024 * 1024  # bytes: largest file the victim may write (caps a DAG bomb)
RSS_KILL = 3 * 1024**3  # bytes of RSS growth (node + children) at which RssWatch kills the victim
RSS_SAMPLE = 0.02  # seconds between RSS samples
POLL = 0.05  # seconds between polls of the victim's control API
CONTROL_TIMEOUT = 30.0  # seconds for one control API call
HONEST_TIMEOUT = 25.0  # seconds for the victim to install an honest snapshot
HONEST_QUERY_TIMEOUT = 10.0  # seconds the honest peer's query may take
CHUNK = unixfs.CHUNK_SIZE  # bytes per UnixFS leaf
GOSSIP_BATCH = 50  # messages per raw GossipSub RPC

PERF = {"model_name": "bert-base-uncased", "hardware_type": "cuda", "device_name": "A100",
        "batch_size": 8, "throughput": 812.5, "latency_avg": 9.8}  # fmt: skip


# --- the victim: a real `benchsync up` process ---------------------------------------------------


class VictimDied(AssertionError):
    """The victim node's process exited while the test was still using it."""


@dataclass
class VictimNode(NodeProcess):
    """`benchsync up` with its home inside a sentinel directory (also its cwd), damage capped."""

    sentinel: Path = field(default_factory=Path)
    fsize_limit: int = FSIZE_LIMIT
    starts: int = 0

    @classmethod
    def create(cls, root: Path, *, extra_args: Sequence[str] = ()) -> VictimNode:
        sentinel = root / "outside"
        sentinel.mkdir(parents=True, exist_ok=True)
        # The attackers hold the lab key (`LAB_KEY`): their attacks reach the code they test.
        key = root / "lab.key"
        if not key.exists():
            key.write_text(encode_key(LAB_KEY))
            key.chmod(0o600)
        return cls(sentinel / "home", free_port(), NETWORK, extra_args=list(extra_args),
                   env={"PYTHONFAULTHANDLER": "1"}, sentinel=sentinel, lab_key=key)  # fmt: skip

    def start(self) -> None:
        args = [
            sys.executable, "-m", "benchsync.daemon.cli", "up",
            "--home", str(self.home), "--network", self.network,
            "--listen", f"/ip4/127.0.0.1/tcp/{self.port}",
            "--control-socket", str(self.socket_path), "--lab-key", str(self.lab_key),
            *self.extra_args,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("BENCHSYNC_")}
        env.update(self.env)
        self.log_path = self.sentinel.parent / "victim.log"  # outside the sentinel
        limit = self.fsize_limit

        def cap() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
                env=env, cwd=self.sentinel, preexec_fn=cap,
            )  # fmt: skip
        self.starts += 1

    # --- liveness and resources ------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def death(self) -> str:
        """Why the victim is gone, with the tail of its log (for assertion messages)."""
        code = None if self.proc is None else self.proc.poll()
        return f"the node process exited with code {code}; its log ends:\n{self.tail_log(40)}"

    def require_alive(self, after: str) -> None:
        if not self.alive:
            raise VictimDied(f"after {after}: {self.death()}")

    def processes(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            top = psutil.Process(self.proc.pid)
            return [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _total(self, measure: Callable[[psutil.Process], int]) -> int:
        total = 0
        for p in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += measure(p)
        return total

    def rss(self) -> int:
        """Resident bytes of the node and every process it started (sandbox workers)."""
        return self._total(lambda p: p.memory_info().rss)

    def written(self) -> int:
        """Bytes the node (and its children) passed to write() so far (/proc/PID/io wchar)."""
        return self._total(lambda p: p.io_counters().write_chars)

    def clear_outside(self) -> list[str]:
        """Remove what an earlier attack left outside the home (so each test sees its own)."""
        found = self.outside_writes()
        for p in self.sentinel.iterdir():
            if p != self.home:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        return found

    def outside_writes(self, also: Iterable[Path] = ()) -> list[str]:
        """Paths the node created outside its home: in the sentinel directory, or in `also`."""
        found = [str(p) for p in sorted(self.sentinel.iterdir()) if p != self.home]
        return found + [str(p) for p in also if p.exists() or p.is_symlink()]

    # --- control API (synchronous: call through trio.to_thread) -------------------------------

    @property
    def client(self) -> ControlClient:
        return ControlClient(socket_path=self.socket_path, timeout=CONTROL_TIMEOUT)

    async def get(self, path: str) -> Any:
        return await trio.to_thread.run_sync(self.client.get, path)

    async def post(self, path: str, body: Any) -> Any:
        return await trio.to_thread.run_sync(self.client.post, path, body)

    async def replica(self, dataset: str) -> dict[str, Any] | None:
        """The victim's replica entry for `dataset` (from GET /v1/replicas), or None."""
        for r in (await self.get("/v1/replicas"))["replicas"]:
            if r["dataset"] == dataset:
                return dict(r)
        return None

    async def wait_for(
        self, what: str, check: Callable[[], Any], timeout: float, *, fail: bool = True
    ) -> Any:
        """Poll async `check()` until it returns something truthy; returns it.

        Raises VictimDied at once if the node exits, and AssertionError naming
        `what` at the deadline (or returns None there when `fail` is False).
        """
        deadline = trio.current_time() + timeout
        while True:
            self.require_alive(f"waiting for {what}")
            try:
                got = await check()
            except ControlAPIError:
                if not self.alive:
                    raise VictimDied(f"while waiting for {what}: {self.death()}") from None
                raise
            if got:
                return got
            if trio.current_time() >= deadline:
                if fail:
                    raise AssertionError(f"{what}: not within {timeout:g} s")
                return None
            await trio.sleep(POLL)

    async def wait_outcome(self, dataset: str, seq: int, timeout: float) -> dict[str, Any] | None:
        """Wait until the victim has judged `dataset`'s head `seq`: installed it, or failed
        with an error. Returns the replica entry, or None if it never got that far."""

        async def judged() -> dict[str, Any] | None:
            r = await self.replica(dataset)
            if r is None or r["seq_seen"] != seq or r["syncing"]:
                return None
            if r["seq_installed"] == seq or r["last_error"]:
                return r
            return None

        result: dict[str, Any] | None = await self.wait_for(
            f"the victim judging head seq {seq} of {dataset}", judged, timeout, fail=False
        )
        return result


class RssWatch:
    """Samples the victim's RSS in a thread; kills it past `baseline + kill_growth` bytes.

    A query that escapes its memory limit must not take the test machine down
    with it: the watch stops it long before that and records the peak.
    """

    def __init__(self, victim: VictimNode, *, kill_growth: int = RSS_KILL) -> None:
        self.victim = victim
        self.baseline = victim.rss()
        self.limit = self.baseline + kill_growth
        self.peak = self.baseline
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-watch", daemon=True)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE):
            if not self.victim.alive:
                return
            rss = self.victim.rss()
            self.peak = max(self.peak, rss)
            if rss > self.limit:
                self.killed = True
                for p in reversed(self.victim.processes()):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        p.send_signal(signal.SIGKILL)
                return


# --- building snapshots no honest node would build -------------------------------------------


def parquet_bytes(rows: int = 3) -> bytes:
    """A small, valid Parquet file (one integer column)."""
    buf = io.BytesIO()
    pq.write_table(pa.table({"x": list(range(rows))}), buf)
    return buf.getvalue()


def raw_directory(entries: Iterable[tuple[str, CID, int]], put: Callable[[CID, bytes], Any]) -> CID:
    """A UnixFS directory with these (name, cid, tsize) links, names NOT checked.

    `unixfs.add_directory` refuses names with '/', as an honest writer must;
    a hostile one writes them anyway.
    """
    items = sorted(entries, key=lambda e: e[0].encode("utf-8"))
    block = dagpb.encode_node(
        [dagpb.Link(cid, name, tsize) for name, cid, tsize in items],
        dagpb.encode_unixfs(dagpb.TYPE_DIRECTORY),
    )
    cid = block_cid(DAG_PB, block)
    put(cid, block)
    return cid


def diamond_file(levels: int, put: Callable[[CID, bytes], Any]) -> tuple[CID, int]:
    """A UnixFS file of `levels` + 1 blocks that expands to 2**levels chunks of 256 KiB.

    Every inner node links twice to the same child (a diamond per level), and
    claims the expanded sizes consistently (filesize, blocksizes, Tsize), so
    only a bound on expanded bytes stops it. Returns (CID, expanded bytes).
    """
    leaf = b"\0" * CHUNK
    cid = block_cid(RAW, leaf)
    put(cid, leaf)
    size = CHUNK
    for _ in range(levels):
        data = dagpb.encode_unixfs(dagpb.TYPE_FILE, filesize=2 * size, blocksizes=[size, size])
        block = dagpb.encode_node([dagpb.Link(cid, "", size), dagpb.Link(cid, "", size)], data)
        cid = block_cid(DAG_PB, block)
        put(cid, block)
        size *= 2
    return cid, size


def manifest_bytes(dataset: str, seq: int, tables: dict[str, dict[str, Any]]) -> bytes:
    """A manifest.json in the snapshot format, with whatever table entries the attacker likes."""
    doc = {
        "format": FORMAT, "dataset": dataset, "seq": seq, "parent": None,
        "created_at": round(time.time(), 6), "schema_version": schema.SCHEMA_VERSION,
        "tables": tables,
    }  # fmt: skip
    return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"


# --- raw GossipSub messages ----------------------------------------------------------------------


def signed_message(key_pair: KeyPair, topic: str, data: bytes, seqno: int) -> rpc_pb2.Message:
    """A GossipSub message from `key_pair`'s peer ID, signed as StrictSign requires."""
    msg = rpc_pb2.Message(
        data=data, topicIDs=[topic], from_id=ID.from_pubkey(key_pair.public_key).to_bytes(),
        seqno=seqno.to_bytes(8, "big"),
    )  # fmt: skip
    msg.signature = key_pair.private_key.sign(
        PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString()
    )
    msg.key = key_pair.public_key.serialize()
    return msg


def malformed_key_message(topic: str, seqno: int) -> rpc_pb2.Message:
    """Finding 2: `from` is a sha2-256 peer ID (no key inlined), `key` is not a protobuf."""
    digest = hashlib.sha256(b"benchsync hostile peer %d" % seqno).digest()
    from_id = ID(b"\x12\x20" + digest)  # multihash sha2-256, as an RSA peer ID
    head = {"dataset": from_id.to_base58(), "seq": 1}
    return rpc_pb2.Message(
        data=json.dumps(head).encode(), topicIDs=[topic], from_id=from_id.to_bytes(),
        seqno=seqno.to_bytes(8, "big"), signature=b"\x01" * 64,
        key=b"\x08\x01\x12\xff\xff\xff\xff\x0f",  # field 2 claims ~4 GB, then ends
    )  # fmt: skip


def fake_head(key_pair: KeyPair, seq: int = 1, nbytes: int = 1000) -> Head:
    """A well-formed head of `key_pair`'s own dataset whose root nobody holds."""
    dataset = ID.from_pubkey(key_pair.public_key).to_base58()
    seed = dataset.encode() + seq.to_bytes(8, "big")
    root = block_cid(DAG_PB, b"root" + seed)
    tables = block_cid(DAG_PB, b"tables" + seed)
    return Head(dataset, seq, root, tables, time.time(), nbytes)


# --- stream outcomes -----------------------------------------------------------------------------


@dataclass
class StreamOutcome:
    """How the victim ended a stream we abused: what it sent back, and how the stream ended."""

    name: str
    reply: bytes = b""
    ended: str = "open"  # "eof", "reset" or "open" (still open at the deadline)
    seconds: float = 0.0

    def __str__(self) -> str:
        return f"{self.name}: {self.ended} after {self.seconds:.1f} s, reply {self.reply[:120]!r}"


async def drain(stream: INetStream, name: str, timeout: float) -> StreamOutcome:
    """Read until the victim ends the stream (or `timeout` passes)."""
    out = StreamOutcome(name)
    started = trio.current_time()
    with trio.move_on_after(timeout):
        while True:
            try:
                data = await stream.read(65536)
            except StreamError as e:
                out.ended = "reset" if "reset" in type(e).__name__.lower() else "eof"
                break
            except Exception as e:  # the muxer's own errors when the connection went away
                out.ended = f"error {type(e).__name__}"
                break
            if not data:
                out.ended = "eof"
                break
            out.reply += data
    out.seconds = trio.current_time() - started
    if out.ended == "open":
        with trio.move_on_after(1), contextlib.suppress(Exception):
            await stream.reset()
    return out


# --- peers ---------------------------------------------------------------------------------------


class _Peer:
    """A P2PNode on its own home, run in the test's nursery."""

    def __init__(self, home: Path, **p2p: Any) -> None:
        self.home = home
        p2p.setdefault("lab_key", LAB_KEY)  # a member; pass lab_key=None for a stranger
        self.p2p = P2PNode(home, network=NETWORK, **p2p)

    @property
    def peer_id(self) -> str:
        return self.p2p.peer_id

    @property
    def key_pair(self) -> KeyPair:
        return self.p2p.key_pair

    @property
    def topic(self) -> str:
        return topic_for(NETWORK)

    async def connect(self, victim: VictimNode) -> None:
        await self.p2p.connect(victim.addr)

    async def gossip(self, victim: VictimNode, messages: Sequence[rpc_pb2.Message]) -> None:
        """Write `messages` on our GossipSub stream to the victim, bypassing our own router
        (no signing, no validation, no mesh needed): what a hostile implementation can do."""
        pubsub = self.p2p.announcer.pubsub
        victim_id = ID.from_base58(victim.peer_id)
        await pubsub.wait_for_peer(victim_id, timeout=10.0)
        stream = pubsub.peers[victim_id]
        for start in range(0, len(messages), GOSSIP_BATCH):
            rpc = rpc_pb2.RPC(publish=list(messages[start : start + GOSSIP_BATCH]))
            if not await pubsub.write_msg(stream, rpc):
                raise AssertionError("the victim closed our GossipSub stream")

    async def gossip_raw(self, victim: VictimNode, payload: bytes) -> None:
        """Write raw bytes on our GossipSub stream to the victim."""
        pubsub = self.p2p.announcer.pubsub
        victim_id = ID.from_base58(victim.peer_id)
        await pubsub.wait_for_peer(victim_id, timeout=10.0)
        await pubsub.peers[victim_id].write(payload)

    async def announce_to(self, victim: VictimNode, head: Head, seqno: int) -> None:
        """Our own head, signed by us, straight onto the victim's GossipSub stream."""
        msg = signed_message(self.key_pair, self.topic, encode_head(head), seqno)
        await self.gossip(victim, [msg])

    async def open(self, victim: VictimNode, protocol: str) -> INetStream:
        with trio.fail_after(10):
            await self.connect(victim)
            return await self.p2p.host.new_stream(
                ID.from_base58(victim.peer_id), [TProtocol(protocol)]
            )

    async def query(
        self, victim: VictimNode, sql: str, *, timeout_s: float = HONEST_QUERY_TIMEOUT
    ) -> QueryResponse:
        """Ask the victim one query on /benchsync/query/1.0.0 (the honest client code)."""
        stream = await self.open(victim, QUERY_PROTOCOL_ID)
        try:
            with trio.fail_after(timeout_s + 5):
                response, _ = await exchange(
                    stream, QueryRequest(sql=sql, timeout_s=timeout_s), network=NETWORK
                )
            return response
        finally:
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await stream.reset()

    async def send_query(self, victim: VictimNode, sql: str, *, timeout_s: float) -> INetStream:
        """Open a query stream and send `sql`, without waiting for the answer."""
        stream = await self.open(victim, QUERY_PROTOCOL_ID)
        body = QueryRequest(sql=sql, timeout_s=timeout_s).to_bytes()
        hello = encode_json_frame({"network": NETWORK})
        await stream.write(hello + encode_frame(body, max_frame=MAX_REQUEST_FRAME))
        return stream


class HostilePeer(_Peer):
    """A peer that serves hostile snapshots from memory and speaks every protocol wrongly."""

    def __init__(self, home: Path, **p2p: Any) -> None:
        self.store = MemoryBlockstore()
        super().__init__(home, blockstore=self.store, reannounce_interval=1.0, **p2p)
        self._seqno = 0

    def next_seqno(self) -> int:
        self._seqno += 1
        return self._seqno

    def snapshot(
        self, tables: dict[str, bytes | tuple[CID, int]], *, seq: int = 1,
        declared: dict[str, int] | None = None,
    ) -> Head:  # fmt: skip
        """Store a snapshot whose `tables/` links are named exactly as given.

        A value is file content, or an already stored (file CID, size) pair.
        The manifest lists every link name minus ".parquet" with `declared`
        bytes (default: the true size); the head's bytes are their sum.
        Returns the head, also set as our local head (the victim asks for it).
        """
        put = self.store.put
        links, sizes = [], {}
        for name, content in tables.items():
            if isinstance(content, bytes):
                cid, size, tsize = unixfs.add_bytes(content, put)
            else:
                cid, size = content
                tsize = size
            links.append((name, cid, tsize))
            sizes[name] = (cid, size)
        tables_cid = raw_directory(links, put)
        claims = {
            name.removesuffix(".parquet"): {
                "rows": 3, "cid": str(cid),
                "bytes": (declared or {}).get(name, size),
            }
            for name, (cid, size) in sizes.items()
        }  # fmt: skip
        manifest = manifest_bytes(self.peer_id, seq, claims)
        mcid, _, mtsize = unixfs.add_bytes(manifest, put)
        total = sum(size for _, size in sizes.values())
        root = raw_directory([(MANIFEST_NAME, mcid, mtsize), (TABLES_DIR, tables_cid, total)], put)
        head = Head(self.peer_id, seq, root, tables_cid, time.time(),
                    sum(c["bytes"] for c in claims.values()))  # fmt: skip
        self.p2p.set_local_head(head)
        return head

    async def offer(self, victim: VictimNode, head: Head) -> None:
        """Make sure the victim hears of `head`: connect (it asks for our head) and gossip it."""
        await self.connect(victim)
        await self.announce_to(victim, head, self.next_seqno())


class HonestPeer(_Peer):
    """A peer with a real dataset: the victim must keep syncing it and answering it."""

    def __init__(self, home: Path, dataset: LocalDataset, victim_id: str) -> None:
        self.dataset = dataset
        # It follows only the victim: sybil heads relayed to it are none of its business.
        super().__init__(home, blockstore=dataset.blocks, trusted_peers={victim_id},
                         reannounce_interval=1.0)  # fmt: skip
        self._seqno = 1 << 40  # clear of the counter its own router uses

    async def new_snapshot(self) -> Head:
        def write_and_snapshot() -> Any:
            self.dataset.db.store_performance_result(PERF)
            return self.dataset.snapshot().version

        version = await trio.to_thread.run_sync(write_and_snapshot)
        head = head_of(version)
        self.p2p.set_local_head(head)
        return head

    async def check_served(self, victim: VictimNode, after: str) -> None:
        """The victim installs our newest snapshot and answers our query; raises otherwise."""
        victim.require_alive(after)
        try:
            await self._check_served(victim, after)
        except (AssertionError, trio.Cancelled):
            raise
        except Exception as e:  # a dial, a stream or the control API failed
            victim.require_alive(after)
            raise AssertionError(
                f"after {after}, an honest peer could not be served: {e!r}; "
                f"the node's log ends:\n{victim.tail_log(20)}"
            ) from e

    async def _check_served(self, victim: VictimNode, after: str) -> None:
        head = await self.new_snapshot()
        await self.connect(victim)
        await self.p2p.announce(head)
        self._seqno += 1
        await self.announce_to(victim, head, self._seqno)

        async def installed() -> bool:
            r = await victim.replica(self.peer_id)
            return r is not None and r["head_installed"] == str(head.root)

        await victim.wait_for(
            f"the victim installing an honest peer's snapshot seq {head.seq} after {after}",
            installed, HONEST_TIMEOUT,
        )  # fmt: skip
        response = await self.query(victim, "SELECT count(*) AS n FROM performance_results")
        assert response.status == "ok", (
            f"after {after}, the victim did not answer an honest peer's query: "
            f"{response.status}: {response.message}"
        )
        victim.require_alive(after)


def new_key_pairs(n: int) -> list[KeyPair]:
    return [create_new_key_pair() for _ in range(n)]
