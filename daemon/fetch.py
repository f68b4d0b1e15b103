"""`/benchsync/car/1.0.0` on both sides: serving blocks, and fetching a DAG from providers.

This module owns block transfer between nodes. `BlockProvider` answers fetch
requests from the local blockstore (access policy, network name and a
per-peer concurrency limit checked first). `Fetcher` completes a DAG: it asks
in rounds for exactly the blocks it lacks (see `benchsync.protocol.fetch` for
the design), verifies every block against its CID (the CAR decoder, then
`put(verify=True)`), stores verified blocks as they arrive so a broken
transfer keeps them, and moves on to the next provider when one fails.

Durability of a transfer: a fetch's received blocks go into one blockstore
batch, shared by its rounds and synced once per `DURABLE_BATCH_BYTES` or
`DURABLE_BATCH_SECONDS` and before the DAG is reported complete, never per
block (an fsync per 256 KiB block made the disk, not the network, set the
pace: bench/bench_replica.py). The batch makes its data durable before any
block gets its name, so a crash loses at most the unsynced tail and never
leaves a torn block under a CID; the blocks verified before a broken or
refused response are committed all the same. A fetch marks its root in the store while it runs
(`Blockstore.begin_transfer`); the first fetch after a crash re-hashes what an
interrupted transfer wrote (`recover_transfers`) before trusting any of it,
then resumes: only the blocks still missing are asked for. A
provider that sends a block not matching its CID, an unsolicited block or
garbage is banned (`AccessPolicy.ban`) and disconnected; a provider that merely
dies or stalls is not blamed.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from multiformats import CID

from benchsync.daemon.config import SETTINGS_BY_NAME
from benchsync.daemon.host import AccessPolicy
from benchsync.daemon.streams import Channel, StreamAdapter
from benchsync.protocol.fetch import (
    CAR_PROTOCOL_ID,
    MAX_WANT,
    Block,
    EndOfResponse,
    FetchRequest,
    FetchSession,
    FetchStatus,
    missing_blocks,
    plan_response,
)
from benchsync.protocol.frames import Interrupted, RemoteProtocolError
from benchsync.protocol.session import NEED_DATA, REQUESTER, RESPONDER, EndOfStream, Refusal
from benchsync.storage import car
from benchsync.storage.blockstore import BlockNotFound, Blockstore, FilePlacement, WriteBatch
from benchsync.storage.errors import StorageError

log = logging.getLogger(__name__)

MAX_FETCHES_PER_PEER: int = SETTINGS_BY_NAME["max_concurrent_fetches_per_peer"].default  # streams
MAX_BLOCK: int = SETTINGS_BY_NAME["max_block_bytes"].default  # bytes
MAX_RESPONSE: int = SETTINGS_BY_NAME["max_response_bytes"].default  # bytes
REQUEST_TIMEOUT = 10.0  # seconds to open a stream and receive a request or status frame
STALL_TIMEOUT = 10.0  # seconds without a byte before a transfer counts as broken
IO_BATCH = 1024 * 1024  # bytes of blocks read or stored per worker-thread call
RECEIVE_QUEUE = 8  # batches of IO_BATCH bytes buffered ahead of the store thread
SEND_QUEUE = 2  # batches of encoded sections read ahead of the network by the provider
# Received bytes made durable by one sync (0: every block synced on its own, as
# before batching; kept for the benchmark's baseline). A crash loses at most this.
DURABLE_BATCH_BYTES = 16 * 1024 * 1024  # bytes
DURABLE_BATCH_SECONDS = 1.0  # seconds: a slow transfer still syncs this often

# Tests' fault injection: called with a point's name ("written": a batch of
# blocks is written, not yet synced; "synced": it was committed). Never set in
# production; a crash test sets it to kill the process at that point.
FAULT_HOOK: Callable[[str], None] | None = None


@dataclass(frozen=True)
class FetchLimits:
    """Named limits of the fetch protocol (both sides)."""

    max_block: int = MAX_BLOCK  # bytes: largest block accepted
    max_response: int = MAX_RESPONSE  # bytes: largest sum of blocks in one response
    max_fetches_per_peer: int = MAX_FETCHES_PER_PEER  # concurrent requests served per peer
    max_want: int = MAX_WANT  # blocks asked for per round

    @property
    def max_section(self) -> int:
        return self.max_block + car.MAX_CID_BYTES


class FetchFailed(Exception):
    """No provider could complete the DAG; `errors` says what each one did."""

    def __init__(self, root: CID, missing: int, errors: dict[str, str]) -> None:
        detail = "; ".join(f"{p}: {e}" for p, e in errors.items()) or "no provider was available"
        super().__init__(f"could not fetch {root}: {missing}+ blocks missing ({detail})")
        self.root = root
        self.missing = missing
        self.errors = errors


@dataclass
class TransferStats:
    """Counters of what moved, for status output and the benchmarks."""

    blocks: int = 0  # blocks received and stored
    block_bytes: int = 0  # bytes of those blocks
    wire_in: int = 0  # bytes read from fetch streams (frames + CAR)
    wire_out: int = 0  # bytes written to fetch streams
    rounds: int = 0  # request/response exchanges


@dataclass
class FetchResult:
    """What one `Fetcher.fetch` call did; the DAG under `root` is complete when it returns."""

    root: CID
    stats: TransferStats = field(default_factory=TransferStats)
    providers_used: list[str] = field(default_factory=list)


def _batches(items: Sequence[CID], sizes: dict[CID, int], limit: int) -> list[list[CID]]:
    out: list[list[CID]] = []
    cur: list[CID] = []
    total = 0
    for cid in items:
        if cur and total + sizes[cid] > limit:
            out.append(cur)
            cur, total = [], 0
        cur.append(cid)
        total += sizes[cid]
    if cur:
        out.append(cur)
    return out


class BlockProvider:
    """Answers `/benchsync/car/1.0.0` from a blockstore (registered through the stream
    adapter, which has checked the peer and the network)."""

    def __init__(self, store: Blockstore, *, limits: FetchLimits | None = None) -> None:
        self.store = store
        self.limits = limits or FetchLimits()
        self.active: dict[str, int] = {}  # peer -> requests being served
        self.served = TransferStats()

    def new_session(self) -> FetchSession:
        return FetchSession(RESPONDER, max_block=self.limits.max_block)

    async def answer(self, channel: Channel, request: object) -> None:
        """Answer one admitted fetch request: a busy refusal, or the status and the blocks."""
        assert isinstance(request, FetchRequest)
        peer = channel.peer
        if self.active.get(peer, 0) >= self.limits.max_fetches_per_peer:
            await channel.send(
                Refusal(
                    f"busy: already serving {self.limits.max_fetches_per_peer} fetches to peer "
                    f"{peer} (max_fetches_per_peer); retry when one finishes"
                )
            )
            return
        self.active[peer] = self.active.get(peer, 0) + 1
        try:
            await self._serve(channel, request)
        finally:
            self.active[peer] -= 1
            if not self.active[peer]:
                del self.active[peer]

    async def _serve(self, channel: Channel, request: FetchRequest) -> None:
        store = self.store
        session = channel.session

        def sizes() -> dict[CID, int]:
            held: dict[CID, int] = {}
            for c in request.want:
                with contextlib.suppress(BlockNotFound):  # one lookup, not has() then size()
                    held[c] = store.size(c)
            return held

        held = await trio.to_thread.run_sync(sizes)
        send, status = plan_response(
            request.want,
            held.get,
            max_response=self.limits.max_response,
            requester_limit=request.max_bytes,
        )
        before = channel.wire_out
        await channel.send(status)
        self.served.wire_out += channel.wire_out - before
        self.served.rounds += 1
        sections, produced = trio.open_memory_channel[tuple[bytes, int, int]](SEND_QUEUE)

        def encode(batch: list[CID]) -> tuple[bytes, int, int]:
            # The session checks each block is the next one announced (worker thread:
            # the trio side only writes the bytes this returns).
            blocks = [store.get(c) for c in batch]
            wire = b"".join(session.send(Block(c, d)) for c, d in zip(batch, blocks, strict=True))
            return wire, len(blocks), sum(len(d) for d in blocks)

        async def read_ahead() -> None:
            # Disk reads overlap the network writes of the previous batch.
            async with sections:
                for batch in _batches(send, held, IO_BATCH):
                    await sections.send(await trio.to_thread.run_sync(encode, batch))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_ahead)
            async with produced:
                async for wire, nblocks, nbytes in produced:
                    await channel.write(wire)
                    self.served.wire_out += len(wire)
                    self.served.blocks += nblocks
                    self.served.block_bytes += nbytes
        await channel.send(EndOfResponse())


class Fetcher:
    """Completes DAGs in the local blockstore from providers."""

    def __init__(
        self,
        host: IHost,
        store: Blockstore,
        *,
        network: str,
        policy: AccessPolicy,
        streams: StreamAdapter,
        limits: FetchLimits | None = None,
    ) -> None:
        self.host = host
        self.store = store
        self.network = network
        self.policy = policy
        self.streams = streams
        self.limits = limits or FetchLimits()
        self.stats = TransferStats()  # totals over every fetch of this node
        self._recovery = trio.Lock()
        self._recovered = False  # whether interrupted transfers were checked (once a process)

    async def missing(self, root: CID, limit: int | None = None) -> list[CID]:
        """Blocks of the DAG under `root` not yet held (empty: complete and verified)."""
        store = self.store
        return await trio.to_thread.run_sync(
            lambda: missing_blocks(
                root, store.has, store.get, limit=limit or self.limits.max_want
            )
        )

    async def fetch(
        self, root: CID, providers: Sequence[str], *, place: FilePlacement | None = None
    ) -> FetchResult:
        """Make the whole DAG under `root` present, asking `providers` in order.

        Returns once every block is stored and verified. A provider that fails
        is dropped for the rest of this call, and banned when the failure is a
        `RemoteProtocolError` (it broke the protocol or sent a block not
        matching its CID); refusals, interruptions and oversized answers of an
        older node cost it nothing else. Raises `FetchFailed` when none is left
        while blocks are still missing. Verified blocks stay stored either way.
        A provider whose lab membership is still being proven is waited for
        (at most the adapter's `membership_timeout`), then skipped if `admit`
        refuses it.
        Raises `StorageError` when the local store fails (a full disk): no
        provider can fix that.

        With `place`, the leaves of the DAG's files it names are written once,
        into those files, and kept as references (`FilePlacement`); call its
        `finish()` after this returns.
        """
        await self.recover()
        result = FetchResult(root)
        # One batch for the whole fetch: a small round (the root, an inner level)
        # costs no sync of its own; the batch commits every DURABLE_BATCH_BYTES
        # or DURABLE_BATCH_SECONDS, and here, before the DAG is reported complete.
        durable = _Durability(self.store, place)
        try:
            await self._fetch(root, providers, durable, result)
        finally:
            with trio.CancelScope(shield=True):
                await self._settle(durable, result.stats)
                await trio.to_thread.run_sync(self.store.end_transfer, root)
        return result

    async def _settle(self, durable: _Durability, stats: TransferStats) -> None:
        """Commit (or, after a store failure, drop) what `durable` holds; count it."""
        before = (durable.committed, durable.committed_bytes)
        try:
            await trio.to_thread.run_sync(durable.close)
        finally:
            self._count(stats, blocks=durable.committed - before[0],
                        block_bytes=durable.committed_bytes - before[1])  # fmt: skip

    async def recover(self) -> list[CID]:
        """Once per process, before the first transfer: re-hash what transfers a crash
        interrupted wrote, drop what fails (it is fetched again); returns the dropped CIDs."""
        async with self._recovery:
            if self._recovered:
                return []
            bad = await trio.to_thread.run_sync(self.store.recover_transfers)
            self._recovered = True
        if bad:
            log.warning("%d blocks written by a transfer a crash cut short failed "
                        "verification; dropped, to be fetched again", len(bad))  # fmt: skip
        return bad

    async def _fetch(
        self, root: CID, providers: Sequence[str], durable: _Durability, result: FetchResult
    ) -> None:
        me = self.host.get_id().to_base58()
        candidates = [p for p in dict.fromkeys(providers) if p != me]
        errors: dict[str, str] = {}
        marked = False
        store = self.store
        limit = self.limits.max_want

        def missing() -> list[CID]:
            with durable.joined():  # the fetch's blocks not yet committed count as held
                return missing_blocks(root, store.has, store.get, limit=limit)

        while True:
            # Recomputed after every exchange: a broken transfer's verified
            # blocks are kept, so the next provider is asked only for the rest.
            want = await trio.to_thread.run_sync(missing)
            if not want:
                return
            if not marked:
                # Before the first block arrives: a crash from here on is noticed.
                await trio.to_thread.run_sync(self.store.begin_transfer, root)
                marked = True
            if not candidates:
                raise FetchFailed(root, len(want), errors)
            peer = candidates[0]
            # A provider still proving its lab membership (it connected just
            # now) is waited for, not skipped; the adapter bounds the wait.
            await self.streams.settle(peer)
            reason = self.streams.admit(peer, CAR_PROTOCOL_ID, asking=True)
            if reason is not None:
                errors[peer] = reason
                candidates.remove(peer)
                continue
            try:
                got = await self.fetch_round(
                    ID.from_base58(peer), root, want, result.stats, durable=durable
                )
            except StorageError:
                raise
            except Exception as e:  # dial errors, refusals, broken transfers, protocol errors
                candidates.remove(peer)
                if isinstance(e, RemoteProtocolError):
                    errors[peer] = f"misbehaved: {e}"
                    await self.penalise(peer, str(e))
                else:
                    errors[peer] = f"{type(e).__name__}: {e}"
                continue
            if got and peer not in result.providers_used:
                result.providers_used.append(peer)
            if got == 0:
                # It holds none of what we still lack; others may.
                errors[peer] = "does not hold the missing blocks"
                candidates.remove(peer)

    async def penalise(self, peer: str, reason: str) -> None:
        """Ban `peer` and drop our connection to it."""
        self.policy.ban(peer, reason)
        with trio.move_on_after(2):
            try:
                await self.host.disconnect(ID.from_base58(peer))
            except Exception as e:  # the connection may already be gone
                log.debug("disconnecting %s: %r", peer, e)

    async def fetch_round(
        self,
        peer: ID,
        root: CID,
        want: Sequence[CID],
        stats: TransferStats | None = None,
        *,
        durable: _Durability | None = None,
    ) -> int:
        """One request/response exchange with `peer`; returns the blocks received.

        Raises `RemoteProtocolError` (the provider is to blame: ban it),
        `Refused`, `Interrupted`, `ResponseTooLarge` (an older provider ignoring
        our limit), `trio.TooSlowError` or a libp2p error when the stream
        cannot be opened. Blocks verified before a failure are stored all the
        same: durably when this returns or raises, or, inside `fetch`, in its
        batch (`durable`), which the fetch commits.
        """
        request = FetchRequest(
            self.network,
            root,
            tuple(want[: self.limits.max_want]),
            # The provider keeps each response within our limit (the session checks it).
            max_bytes=self.limits.max_response,
        )
        local = stats or TransferStats()
        session = FetchSession(
            REQUESTER, max_response=self.limits.max_response, max_block=self.limits.max_block
        )
        async with self.streams.open(str(peer), CAR_PROTOCOL_ID, session) as channel:
            await channel.send(request)
            self._count(local, wire_out=channel.wire_out)
            with trio.fail_after(REQUEST_TIMEOUT):
                status = await channel.expect(FetchStatus)
            assert isinstance(status, FetchStatus)
            self._count(local, wire_in=channel.wire_in, rounds=1)
            if durable is not None:
                return await self._receive(channel, status, local, durable)
            durable = _Durability(self.store)
            try:
                return await self._receive(channel, status, local, durable)
            finally:
                with trio.CancelScope(shield=True):
                    await self._settle(durable, local)

    def _count(self, local: TransferStats, **deltas: int) -> None:
        for name, value in deltas.items():
            setattr(local, name, getattr(local, name) + value)
            if local is not self.stats:
                setattr(self.stats, name, getattr(self.stats, name) + value)

    async def _receive(
        self, channel: Channel, status: FetchStatus, local: TransferStats, durable: _Durability
    ) -> int:
        sink = _BlockSink(durable, channel.session)
        if not status.count:
            sink.feed(())  # the session's EndOfResponse; nothing to store
            return 0
        send, recv = trio.open_memory_channel[list[bytes]](RECEIVE_QUEUE)
        with _single_error():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._verify_and_store, recv, sink, local)
                await self._pump(channel, send, sink, local)
        return sink.received

    async def _pump(
        self,
        channel: Channel,
        send: trio.MemorySendChannel[list[bytes]],
        sink: _BlockSink,
        local: TransferStats,
    ) -> None:
        async with send:
            # The trio thread only moves bytes; decoding, hashing and disk
            # writes happen in a worker thread, so the network never waits
            # on them (and Yamux window updates go out promptly). Reads
            # (~64 KiB each) are gathered into IO_BATCH batches here: one
            # thread hop per read cost as much CPU as Noise itself. A batch
            # goes as its list of reads: joining them is the worker's copy.
            batch: list[bytes] = []
            size = 0
            while True:
                with trio.move_on_after(STALL_TIMEOUT) as stall:
                    data = await channel.read()
                if stall.cancelled_caught:
                    sink.stalled = True
                    break
                if not data:
                    break
                self._count(local, wire_in=len(data))
                batch.append(data)
                size += len(data)
                if size >= IO_BATCH:
                    await send.send(batch)
                    batch, size = [], 0
            if batch:
                # Whatever came before the end or the stall: its complete blocks are kept.
                await send.send(batch)

    async def _verify_and_store(
        self, recv: trio.MemoryReceiveChannel[list[bytes]], sink: _BlockSink, local: TransferStats
    ) -> None:
        durable = sink.durable

        async def in_thread(fn: Callable[..., None], *args: list[bytes]) -> None:
            before = (durable.committed, durable.committed_bytes)
            try:
                await trio.to_thread.run_sync(fn, *args)
            finally:
                self._count(
                    local,
                    blocks=durable.committed - before[0],
                    block_bytes=durable.committed_bytes - before[1],
                )

        def sync_deadline() -> float:
            # when the pending blocks' time slice ends, on the trio clock
            return trio.current_time() + DURABLE_BATCH_SECONDS if durable.pending else math.inf

        sync_at = sync_deadline()
        async with recv:
            while True:
                batch = None
                with trio.move_on_at(sync_at):
                    try:
                        batch = await recv.receive()
                    except trio.EndOfChannel:
                        break
                if batch is None:
                    await in_thread(durable.commit)  # a slow transfer's time slice is over
                else:
                    await in_thread(sink.feed, batch)
                if not durable.pending:
                    sync_at = math.inf
                elif sync_at == math.inf:
                    sync_at = sync_deadline()
        await in_thread(sink.close)


@contextlib.contextmanager
def _single_error() -> Iterator[None]:
    """Re-raise a nursery's lone exception bare, so callers can catch it by type."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


class _Durability:
    """One fetch's blockstore batch, shared by its rounds, and what it holds not yet durable.

    `commit` makes the pending blocks durable with one sync; `put` commits
    nothing itself (the callers commit every `DURABLE_BATCH_BYTES`, when the
    time slice is over, and at the end). With `DURABLE_BATCH_BYTES` = 0 each
    block is made durable on its own, as before batching. Used from worker
    threads, one at a time.
    """

    def __init__(self, store: Blockstore, place: FilePlacement | None = None) -> None:
        self.store = store
        self.place = place  # leaves written into their files, kept as references
        self.batch: WriteBatch | None = store.begin_batch() if DURABLE_BATCH_BYTES > 0 else None
        self.failed = False  # the store failed: the batch is dropped, not committed
        self.pending = 0  # blocks written into the batch, not yet durable
        self.pending_bytes = 0
        self.committed = 0  # blocks made durable so far
        self.committed_bytes = 0

    def joined(self) -> contextlib.AbstractContextManager[None]:
        """The calling thread's puts (and reads) go to the batch for the `with` body."""
        return contextlib.nullcontext() if self.batch is None else self.store.joined(self.batch)

    def put(self, cid: CID, data: bytes) -> None:
        """Store a verified block (inside `joined()`)."""
        try:
            # The CAR decoder verified it against its CID; hashing again
            # would cost a second pass per byte.
            if self.place is None:
                self.store.put(cid, data, verify=False)
            else:
                self.place.put(cid, data, verify=False)
        except StorageError:
            self.failed = True
            raise
        if self.batch is None:
            self.committed += 1  # durable on its own (no batching)
            self.committed_bytes += len(data)
        else:
            self.pending += 1
            self.pending_bytes += len(data)

    def commit(self) -> None:
        """Make the pending blocks durable (one sync) and count them committed."""
        if self.batch is None or not self.pending or self.failed:
            return
        _fault("written")
        pending, pending_bytes = self.pending, self.pending_bytes
        self.pending = self.pending_bytes = 0
        try:
            self.store.commit_batch(self.batch)
        except StorageError:
            self.failed = True  # commit_batch kept none of them
            raise
        self.committed += pending
        self.committed_bytes += pending_bytes
        _fault("synced")

    def close(self) -> None:
        """The fetch is over, however it ended: commit its verified blocks (or drop them
        if the store failed). Raises BlockWriteError if they cannot be made durable."""
        batch = self.batch
        if batch is None:
            return
        try:
            if self.failed:
                self.store.abort_batch(batch)
            else:
                self.commit()
        finally:
            self.batch = None


class _BlockSink:
    """Worker-thread side of one response: the session decodes and checks, this stores.

    The requester's `FetchSession` turns the CAR bytes into `Block` events
    (each verified against its CID, the expected one, in order) and raises
    `RemoteProtocolError` or `Interrupted`; blocks that passed before an
    error are stored. Blocks go into the fetch's batch (`durable`), committed
    by `feed` once `DURABLE_BATCH_BYTES` are pending. Each call may run on a
    different worker thread, never two at once.
    """

    def __init__(self, durable: _Durability, session: object) -> None:
        assert isinstance(session, FetchSession)
        self.durable = durable
        self.session = session
        self.received = 0  # blocks of this response stored (durable or pending)
        self.stalled = False

    def feed(self, chunks: Sequence[bytes]) -> None:
        """Bytes of the body, in order (none: nothing new); stores every block they complete."""
        with self.durable.joined():
            for data in chunks:
                if data:
                    self.session.receive_data(data)
            self._drain()
        if self.durable.pending_bytes >= DURABLE_BATCH_BYTES:
            self.durable.commit()

    def _drain(self) -> None:
        while True:
            event = self.session.next_event()
            if event is NEED_DATA or isinstance(event, EndOfStream):
                return
            if isinstance(event, Block):
                self.durable.put(event.cid, event.data)
                self.received += 1

    def close(self) -> None:
        """End of stream: a complete, exact response, or an interruption."""
        if self.stalled:
            raise Interrupted(f"no data for {STALL_TIMEOUT} s")
        with self.durable.joined():
            self.session.receive_data(b"")
            self._drain()


def _fault(point: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(point)
