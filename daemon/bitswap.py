"""Bitswap on both sides: serving the node's blocks to IPFS peers, and fetching DAGs from them.

This module wires `protocol/bitswap.py` (the wire format) and
`protocol/bitswap_ledger.py` (the state machines) to py-libp2p. It is
hand-written because py-libp2p's own Bitswap writes its replies on the
requester's stream, which Helia ignores and go-bitswap never reads (see
notes/libp2p.md): in Bitswap each side only ever *writes* on streams it
opened itself. So a peer's inbound streams are read-only here (its wants,
and the blocks and presences it owes us) and every message we send goes on
one outbound stream per peer that we open (`_Peer`), serving and fetching
alike.

Serving (`/ipfs/bitswap/1.2.0`, 1.1.0, 1.0.0): any block of the node's
blockstore (own versions and replicas) to a peer the access policy admits:
the stream adapter's one decision (bans, lab membership, `trusted_peers`), and
with `bitswap_serve = all` (or `open`) strangers and plain IPFS peers too,
bans and `trusted_peers` still applying. A refused peer's wants are dropped
unread (its blocks for our own wants are still taken: they are verified by
their CIDs). Each peer has a `Ledger` (wantlist size, request rate, bytes in
flight) and one worker that looks its wants up in a worker thread and writes
the replies under `SEND_TIMEOUT`: a peer that never reads loses its stream and
its wants, nobody else waits for it. As boxo does, a block goes out in a
message of its own as soon as it is read, and the next block is read while
the previous one is written: a Kubo asking for 10 blocks gets the first one
after one disk read, not after all of them.

Fetching (`fetch_dag`): the DAG under a root is walked breadth first; blocks
already held are read, not fetched (resumable), missing ones are asked of
one peer at a time (want-block with send-DONT_HAVE, `WantQueue`), each
received block is checked against the CID we asked for (the decoder computed
its CID from its bytes) before it is stored.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from multiformats import CID

from benchsync.daemon.host import (
    AccessPolicy,
    guard_handler,
    new_stream,
    read_some,
    remote_peer,
)
from benchsync.protocol.bitswap import (
    BITSWAP_120,
    BITSWAP_PROTOCOLS,
    Block,
    Message,
    MessageDecoder,
    Presence,
    WantEntry,
    encode_message,
    frame,
    key,
)
from benchsync.protocol.bitswap_ledger import (
    BLOCK,
    HAVE,
    MAX_BATCH,
    Ledger,
    NoProvider,
    Reply,
    WantQueue,
)
from benchsync.storage.blockstore import Blockstore
from benchsync.storage.dagpb import links
from benchsync.storage.errors import StorageError

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from benchsync.daemon.streams import StreamAdapter

log = logging.getLogger(__name__)

OPEN_TIMEOUT = 10.0  # seconds to open our outbound stream to a peer
SEND_TIMEOUT = 10.0  # seconds one message may take to write: longer, the peer is not reading
IDLE_CLOSE = 10.0  # seconds our outbound stream stays open with nothing to send
LOOKUP_BATCH = 256  # wants looked up in the blockstore per worker-thread call
PIPELINE = 2  # messages loaded ahead of the one being written to a peer
# Bytes handed to the stream per write: py-libp2p's yamux cuts a write into frames of
# 64 KiB of payload plus a 12-byte header, which its Noise (at most 65519 plaintext bytes
# a message) cuts again into 65519 + 17 bytes: two encryptions and two socket writes for
# every 64 KiB. Pieces of 65519 - 12 bytes make each yamux frame exactly one Noise message.
WRITE_PIECE = 65519 - 12
STALL_TIMEOUT = 30.0  # seconds a fetch waits on a peer that sends nothing it was asked for
TICK = 1.0  # seconds between a fetch's stall checks
FETCH_QUEUE = 256  # blocks and presences buffered for one fetch before its peers' readers wait
STORE_QUEUE = 16  # batches of received blocks waiting for the disk before a fetch waits
MAX_LOGGED_REFUSALS = 4096  # peers whose refusal was logged (then the log starts over)


class BitswapFetchFailed(Exception):
    """A DAG could not be completed over Bitswap; blocks received so far stay stored."""


@dataclass
class BitswapStats:
    """What Bitswap moved, for status and metrics."""

    blocks_sent: int = 0
    bytes_sent: int = 0
    presences_sent: int = 0
    blocks_received: int = 0
    bytes_received: int = 0
    unwanted_blocks: int = 0  # verified blocks nobody asked for: dropped
    wants_dropped: int = 0  # over a peer's wantlist or rate limit
    wants_refused: int = 0  # messages of peers the access policy does not serve
    streams_reset: int = 0  # outbound streams given up (a peer not reading, or gone)


@dataclass
class _Peer:
    """Our side of one peer: its ledger, our wants for it, our one outbound stream."""

    ledger: Ledger
    wants: list[WantEntry] = field(default_factory=list)  # ours, to send
    # Blocks read while looking them up (the first one, or MAX_BATCH bytes of small ones):
    # the first reply goes out after one thread hop, not two.
    read_ahead: dict[bytes, bytes] = field(default_factory=dict)
    gone: bool = False  # its connection closed: the worker ends
    wake: trio.Event = field(default_factory=trio.Event)
    running: bool = False


@dataclass
class _Fetch:
    """One running `fetch_dag`: what it wants, and where its peers' replies go."""

    queue: WantQueue
    send: trio.MemorySendChannel[tuple[str, Block | Presence]]
    wanted: set[bytes] = field(default_factory=set)


@dataclass
class FetchProgress:
    """What one `fetch_dag` call did."""

    blocks: int = 0  # received and stored
    bytes: int = 0
    present: int = 0  # blocks already held (not fetched)
    peers: list[str] = field(default_factory=list)  # peers that sent blocks


class BitswapService:
    """Bitswap server and client of one node (see the module docstring).

    Start it with `nursery.start(service.run)`; `register()` installs the
    stream handlers. `serve_all`: serve any peer not banned and allowed by
    `trusted_peers` (the `bitswap_serve = all` setting, or `open`).
    """

    def __init__(
        self,
        host: IHost,
        store: Blockstore,
        *,
        streams: StreamAdapter,
        policy: AccessPolicy,
        serve_all: bool = False,
        ledger_factory: Callable[[float], Ledger] | None = None,
        send_timeout: float = SEND_TIMEOUT,
        stall_timeout: float = STALL_TIMEOUT,
    ) -> None:
        self.host = host
        self.store = store
        self.streams = streams
        self.policy = policy
        self.serve_all = serve_all
        self.new_ledger = ledger_factory or (lambda now: Ledger(now=now))
        self.send_timeout = send_timeout
        self.stall_timeout = stall_timeout
        self.stats = BitswapStats()
        self._peers: dict[str, _Peer] = {}
        self._fetches: list[_Fetch] = []
        self._nursery: trio.Nursery | None = None
        self._logged: set[str] = set()

    # --- lifecycle --------------------------------------------------------------------

    def register(self) -> None:
        """Serve every Bitswap version (each read-only; replies go on our own streams)."""
        for proto in BITSWAP_PROTOCOLS:
            self.host.set_stream_handler(TProtocol(proto), guard_handler(proto, self._inbound))

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the per-peer workers until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def refusal(self, peer: str) -> str | None:
        """Why we do not serve `peer` over Bitswap, or None when we do."""
        reason = self.streams.admit(peer, BITSWAP_120)
        if reason is None or not self.serve_all:
            return reason
        return self.policy.refusal(peer)  # serving all: bans and trusted_peers only

    def disconnected(self, peer: str) -> None:
        """`peer`'s last connection closed: forget its wants (a want left waiting for a
        block we may never hold would otherwise stay), and move our fetches' wants on."""
        state = self._peers.pop(peer, None)
        if state is not None:
            state.ledger.clear()
            state.wants.clear()
            state.read_ahead.clear()
            state.gone = True
            state.wake.set()  # an idle worker ends now
        for fetch in self._fetches:
            fetch.queue.peer_gone(peer)

    def peer_state(self, peer: str) -> dict[str, int]:
        """One peer's ledger, for tests and status: wants held, bytes in flight."""
        p = self._peers.get(peer)
        if p is None:
            return {"wants": 0, "inflight": 0}
        return {"wants": p.ledger.wants, "inflight": p.ledger.inflight}

    # --- inbound: a peer's wants, and what it owes us ----------------------------------

    async def _inbound(self, stream: INetStream) -> None:
        peer = str(remote_peer(stream))
        # Membership decides whether its wants are served: settled at its first want, not
        # for a stream that only brings blocks we asked for (a Kubo, which cannot prove
        # membership, is not asked again on every stream); serving all, it never matters.
        settled = self.serve_all
        decoder = MessageDecoder()
        while True:
            data = await read_some(stream)
            if not data:
                decoder.close()  # a message cut short: BitswapDecodeError, the stream reset
                return
            for msg in decoder.feed(data):
                if not settled and (msg.entries or msg.full):
                    await self.streams.settle(peer)
                    settled = True
                await self._handle(peer, msg)

    async def _handle(self, peer: str, msg: Message) -> None:
        if msg.entries or msg.full:
            reason = self.refusal(peer)
            if reason is not None:
                self.stats.wants_refused += 1
                self._log_once(peer, f"Bitswap wants ignored: {reason}")
            else:
                state = self._peer(peer)
                got = state.ledger.receive(msg, trio.current_time())
                self.stats.wants_dropped += got.over_limit + got.over_rate
                self._kick(peer, state)
        if msg.blocks or msg.presences:
            for item in (*msg.blocks, *msg.presences):
                await self._deliver(peer, item)

    async def _deliver(self, peer: str, item: Block | Presence) -> None:
        k = key(item.cid)
        for fetch in self._fetches:
            if k in fetch.wanted:
                # Waits when that fetch is behind: backpressure on this peer's stream only.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await fetch.send.send((peer, item))
                return
        if isinstance(item, Block):
            self.stats.unwanted_blocks += 1

    def _log_once(self, peer: str, what: str) -> None:
        if peer in self._logged:
            return
        if len(self._logged) >= MAX_LOGGED_REFUSALS:
            self._logged.clear()
        self._logged.add(peer)
        log.info("peer %s: %s", peer, what)

    # --- outbound: one worker and one stream per peer ----------------------------------

    def _peer(self, peer: str) -> _Peer:
        state = self._peers.get(peer)
        if state is None:
            state = self._peers[peer] = _Peer(self.new_ledger(trio.current_time()))
        return state

    def _kick(self, peer: str, state: _Peer) -> None:
        state.wake.set()
        if not state.running and self._nursery is not None:
            state.running = True
            self._nursery.start_soon(self._worker, peer, state)

    async def _worker(self, peer: str, state: _Peer) -> None:
        """Look up, load and send what `peer` is owed and what we want of it, until idle.

        Two tasks, so that reading the next block from disk overlaps writing the
        previous one: `_produce` looks wants up and loads replies, one message at a
        time (a block is sent as soon as it is read, not after a batch of them),
        `_write` writes them on our stream. At most `PIPELINE` messages wait between
        them (and the ledger's in-flight limit bounds their bytes).
        """
        box: list[INetStream] = []  # our outbound stream, once `_write` opened it
        ok = False
        try:
            send, recv = trio.open_memory_channel[tuple[Message, int]](PIPELINE)
            with _single_error():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write, peer, state, recv, box)
                    async with send:
                        await self._produce(state, send)
            ok = True  # idle, or its connection closed
        except Exception as e:  # not reading (timeout), gone, refused our stream
            log.info("Bitswap stream to %s given up: %r", peer, e)
            self.stats.streams_reset += 1
            self.stats.wants_dropped += state.ledger.clear()
            state.read_ahead.clear()
            for fetch in self._fetches:
                fetch.queue.peer_gone(peer)
        finally:
            state.running = False
            state.read_ahead.clear()
            if not ok:
                state.wants.clear()
            if self._peers.get(peer) is state and not state.ledger.wants and not state.wants:
                del self._peers[peer]  # nothing held for it: no state kept
            elif ok and not state.gone and self._peers.get(peer) is state and (
                state.wants or state.ledger.lookups_pending or state.ledger.replies_pending
            ):
                self._kick(peer, state)  # arrived while the last messages were written
            if box:
                with trio.move_on_after(1), contextlib.suppress(Exception):
                    await (box[0].close() if ok else box[0].reset())

    async def _produce(
        self, state: _Peer, send: trio.MemorySendChannel[tuple[Message, int]]
    ) -> None:
        """Hand `_write` one message at a time (with its block bytes), until idle."""
        while not state.gone:
            state.wake = trio.Event()
            await self._look_up(state)
            replies = state.ledger.next_batch(MAX_BATCH)
            wants, state.wants = state.wants, []
            if not replies and not wants:
                if state.ledger.lookups_pending:
                    continue
                with trio.move_on_after(IDLE_CLOSE):
                    await state.wake.wait()
                if state.wake.is_set():
                    continue
                return
            blocks, presences, nbytes = await self._load(state, replies)
            for k in [k for k in state.read_ahead if not state.ledger.holds(k)]:
                del state.read_ahead[k]  # cancelled after it was read
            msg = Message(entries=tuple(wants), blocks=blocks, presences=presences)
            await send.send((msg, nbytes))

    async def _write(
        self,
        peer: str,
        state: _Peer,
        recv: trio.MemoryReceiveChannel[tuple[Message, int]],
        box: list[INetStream],
    ) -> None:
        """Write `_produce`'s messages on our stream to `peer` (opened at the first)."""
        protocol = BITSWAP_120
        async with recv:
            async for msg, nbytes in recv:
                if state.gone:
                    continue  # its connection closed: what was loaded for it is dropped
                if not box:
                    box.append(await new_stream(
                        self.host, ID.from_base58(peer), BITSWAP_PROTOCOLS, OPEN_TIMEOUT
                    ))  # fmt: skip
                    protocol = str(box[0].get_protocol() or BITSWAP_120)
                data = frame(encode_message(msg, protocol))
                with trio.fail_after(self.send_timeout):
                    for i in range(0, len(data), WRITE_PIECE):
                        await box[0].write(data[i : i + WRITE_PIECE])
                state.ledger.sent(nbytes)
                self.stats.blocks_sent += len(msg.blocks)
                self.stats.bytes_sent += nbytes
                self.stats.presences_sent += len(msg.presences)

    async def _look_up(self, state: _Peer) -> None:
        """Look a batch of the peer's wants up in the blockstore (worker thread); the
        first MAX_BATCH bytes of wanted blocks (at least one block) are read at once,
        for `_load`."""
        ledger = state.ledger
        cids = ledger.to_look_up(LOOKUP_BATCH)
        if not cids:
            return
        store = self.store
        blocks = [ledger.wants_block(c) for c in cids]
        cache = state.read_ahead
        budget = MAX_BATCH - sum(len(d) for d in cache.values())

        def sizes() -> list[int | None]:
            nonlocal budget
            out: list[int | None] = []
            for cid, block in zip(cids, blocks, strict=True):
                try:
                    if not store.has(cid):
                        out.append(None)
                    elif block and budget > 0:
                        data = store.get(cid)
                        cache[key(cid)] = data
                        budget -= len(data)
                        out.append(len(data))
                    else:
                        out.append(store.size(cid))
                except StorageError:  # a block we cannot read is one we do not have
                    out.append(None)
            return out

        for cid, size in zip(cids, await trio.to_thread.run_sync(sizes), strict=True):
            ledger.looked_up(cid, size)

    async def _load(
        self, state: _Peer, replies: Sequence[Reply]
    ) -> tuple[tuple[Block, ...], tuple[Presence, ...], int]:
        """The blocks and presences of `replies` (blocks not read ahead are read in a
        worker thread); the block bytes handed out (a block collected meanwhile becomes a
        DONT_HAVE)."""
        wanted = [r for r in replies if r.kind == BLOCK]
        presences = tuple(Presence(r.cid, r.kind == HAVE) for r in replies if r.kind != BLOCK)
        handed = sum(r.size for r in wanted)
        if not wanted:
            return (), presences, 0
        store = self.store
        cached = [state.read_ahead.pop(key(r.cid), None) for r in wanted]

        def load() -> list[Block | None]:
            out: list[Block | None] = []
            for r, data in zip(wanted, cached, strict=True):
                try:
                    out.append(Block(r.cid, data if data is not None else store.get(r.cid)))
                except StorageError:  # collected meanwhile
                    out.append(None)
            return out

        if all(d is not None for d in cached):
            loaded: list[Block | None] = [
                Block(r.cid, d) for r, d in zip(wanted, cached, strict=True) if d is not None
            ]
        else:
            loaded = await trio.to_thread.run_sync(load)
        blocks = tuple(b for b in loaded if b is not None)
        gone = tuple(
            Presence(r.cid, False) for r, b in zip(wanted, loaded, strict=True) if b is None
        )
        return blocks, presences + gone, handed

    def _send_wants(self, peer: str, entries: list[WantEntry]) -> None:
        state = self._peer(peer)
        state.wants.extend(entries)
        self._kick(peer, state)

    # --- the client ------------------------------------------------------------------

    async def fetch_dag(
        self,
        root: CID,
        peers: Sequence[str],
        *,
        progress: Callable[[int], None] | None = None,
    ) -> FetchProgress:
        """Make the whole DAG under `root` present, asking `peers` over Bitswap.

        Returns what was fetched. Raises `BitswapFetchFailed` when no peer has
        a block (every one said DONT_HAVE, went away or stalled for
        `stall_timeout`), `StorageError` when storing fails. Blocks stored
        before a failure stay (a later call fetches only the rest).
        """
        me = self.host.get_id().to_base58()
        asked = [p for p in dict.fromkeys(peers) if p != me and not self.policy.is_banned(p)]
        send, recv = trio.open_memory_channel[tuple[str, Block | Presence]](FETCH_QUEUE)
        fetch = _Fetch(WantQueue(list(asked)), send)
        result = FetchProgress()
        self._fetches.append(fetch)
        try:
            await self._walk(root, fetch, recv, result, progress)
        except NoProvider as e:
            raise BitswapFetchFailed(f"could not fetch {root} over Bitswap: {e}") from None
        finally:
            self._fetches.remove(fetch)
            for peer, entries in fetch.queue.cancels().items():
                if self._nursery is not None:
                    self._send_wants(peer, entries)
            send.close()
            recv.close()
        return result

    async def _walk(
        self,
        root: CID,
        fetch: _Fetch,
        recv: trio.MemoryReceiveChannel[tuple[str, Block | Presence]],
        result: FetchProgress,
        progress: Callable[[int], None] | None,
    ) -> None:
        """Walk and fetch; received blocks are stored by a task of their own, so that new
        wants go out while the disk syncs (a filesystem sync can take a while on a busy
        disk). Returns once every block is stored."""
        send, stored = trio.open_memory_channel[list[Block]](STORE_QUEUE)
        failed: list[Exception] = []
        with _single_error():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._storer, stored, result, progress)
                async with send:
                    try:
                        await self._walk_loop(root, fetch, recv, result, send)
                    except Exception as e:  # NoProvider: what came before it is stored first
                        failed.append(e)
        if failed:
            raise failed[0]

    async def _storer(
        self,
        stored: trio.MemoryReceiveChannel[list[Block]],
        result: FetchProgress,
        progress: Callable[[int], None] | None,
    ) -> None:
        async with stored:
            async for batch in stored:
                while True:  # everything already waiting goes in the same sync
                    try:
                        batch = batch + stored.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await trio.to_thread.run_sync(_store_blocks, self.store, batch)
                nbytes = sum(len(b.data) for b in batch)
                result.blocks += len(batch)
                result.bytes += nbytes
                self.stats.blocks_received += len(batch)
                self.stats.bytes_received += nbytes
                if progress is not None:
                    progress(nbytes)

    async def _walk_loop(
        self,
        root: CID,
        fetch: _Fetch,
        recv: trio.MemoryReceiveChannel[tuple[str, Block | Presence]],
        result: FetchProgress,
        store_send: trio.MemorySendChannel[list[Block]],
    ) -> None:
        store = self.store
        queue = fetch.queue
        to_check: deque[tuple[CID, bytes | None]] = deque([(root, None)])
        seen: set[bytes] = {key(root)}

        def expand(batch: list[tuple[CID, bytes | None]]) -> tuple[list[CID], list[CID], int]:
            """Children of blocks in hand or held; returns (missing, children, held count)."""
            missing: list[CID] = []
            children: list[CID] = []
            held = 0
            for cid, data in batch:
                if data is None:
                    if not store.has(cid):
                        missing.append(cid)
                        continue
                    data = store.get(cid)
                    held += 1
                children.extend(links(cid, data))
            return missing, children, held

        while True:
            if to_check:
                batch = [to_check.popleft() for _ in range(min(len(to_check), LOOKUP_BATCH))]
                missing, children, held = await trio.to_thread.run_sync(expand, batch)
                result.present += held
                for child in children:
                    k = key(child)
                    if k not in seen:
                        seen.add(k)
                        to_check.append((child, None))
                fetch.wanted.update(key(c) for c in missing)
                queue.want(missing)
            for peer, entries in queue.next_requests(trio.current_time()).items():
                self._send_wants(peer, entries)
            if queue.done and not to_check:
                return
            if to_check and queue.in_flight >= queue.window:
                pass  # enough asked: wait for answers before walking further
            elif to_check:
                continue
            got: list[tuple[str, Block | Presence]] = []
            with trio.move_on_after(TICK):
                got.append(await recv.receive())
                while True:
                    try:
                        got.append(recv.receive_nowait())
                    except trio.WouldBlock:
                        break
            now = trio.current_time()
            blocks: list[Block] = []
            for peer, item in got:
                if isinstance(item, Presence):
                    if not item.have:
                        queue.dont_have(peer, item.cid)
                elif queue.received(peer, item.cid, now):
                    fetch.wanted.discard(key(item.cid))
                    blocks.append(item)
                    if peer not in result.peers:
                        result.peers.append(peer)
            if blocks:
                await store_send.send(blocks)  # waits only when the disk is far behind
                to_check.extend((b.cid, b.data) for b in blocks)
            for peer in queue.stalled(now, self.stall_timeout):
                log.info("Bitswap peer %s sent nothing asked for %.0f s", peer, self.stall_timeout)
                queue.peer_gone(peer)


def _store_blocks(store: Blockstore, blocks: Sequence[Block]) -> None:
    """Store received blocks durably (worker thread). The decoder computed each CID from
    the bytes and it is one we asked for: verified, so not hashed a second time."""
    with store.batch():
        for b in blocks:
            store.put(b.cid, b.data, verify=False)


@contextlib.contextmanager
def _single_error() -> Iterator[None]:
    """Re-raise a nursery's lone exception bare (NoProvider, StorageError), so callers
    catch it by type."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = []
        pending: list[BaseException] = [group]
        while pending:
            e = pending.pop()
            if isinstance(e, BaseExceptionGroup):
                pending.extend(e.exceptions)
            else:
                leaves.append(e)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise
