"""Worker processes that run user SQL under OS limits, and who gets them when.

Every query a node runs for anyone — its own user (control API, CLI), the
local part and the merge of a network query, a peer's request — runs in a
`QuerySandbox` inside a worker process (`benchsync.storage.sandbox_worker`),
never in the node's process:

- DuckDB's `memory_limit` is its own accounting, and some operators allocate
  around it (`list_sum(range(0, 500000000))` took a node to 16 GiB). Only an
  OS limit holds whatever DuckDB does, and `RLIMIT_AS` bounds a whole process:
  the worker's idle address space (measured by the worker after a warm-up
  query, so DuckDB's per-thread reservations are in it) plus DuckDB's limit
  plus `WORKER_HEADROOM` for the Arrow data going in and out. Past it, an
  allocation fails (DuckDB answers "out of memory") or the worker dies;
  either way the caller gets `too_large` and the node's RSS never moves.
- A query past its deadline, or whose caller went away (trio cancellation:
  a peer's stream reset, the node shutting down), gets its worker killed.
  Nothing waits on DuckDB uninterruptibly, so SIGTERM stops a node at once.

Why this shape: a small pool of long-lived subprocesses speaking
length-prefixed JSON headers and Arrow IPC over their stdin/stdout, driven
from trio's async process pipes. Threads (`trio.to_thread`) cannot carry an
OS limit of their own; `multiprocessing` would fork a process holding trio,
libp2p and the main DuckDB, and hides a worker's death behind its pool; one
fresh process per query pays ~0.5 s of imports every time. A worker here is
started once, reused while it answers cleanly (it keeps the scope's tables
it last loaded), and on any trouble killed and replaced by a new one on
demand.

Who gets a worker: `FairSlots`. The node's own queries have their own slots,
so peers never starve them; peers share the peer slots, at most `per_peer`
running per peer, and waiting peers are served round robin, so one busy peer
cannot hold every slot while others wait.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import subprocess
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeAlias

import pyarrow as pa
import trio

from benchsync.storage.sandbox import DEFAULT_THREADS, QueryError, QueryTimeout, ResultTooLarge
from benchsync.storage.sandbox_worker import (
    FRAME_HEADER,
    MAX_HEADER_FRAME,
    MODULE,
    error_from_doc,
    frame,
    from_ipc,
    json_frame,
    to_ipc,
)
from benchsync.storage.scopes import ScopeInput

MiB = 1024 * 1024
WORKER_START_TIMEOUT = 60.0  # seconds for a worker to import, warm up and report ready
KILL_GRACE = 1.0  # seconds past a query's deadline before its worker is killed
WORKER_HEADROOM = 256 * MiB  # bytes of address space beyond DuckDB's limit (Arrow in/out, Python)
ANSWER_OVERHEAD = 64 * 1024  # bytes of IPC framing allowed beyond an answer's max_bytes
READ_CHUNK = 1 * MiB  # bytes per read from a worker's pipe
REAP_TIMEOUT = 5.0  # seconds to wait for a killed worker to exit
REAP_POLL = 0.01  # seconds between looks at a killed worker
MALLOC_ARENA_MAX = "2"  # glibc arenas per worker: each reserves 64 MiB of address space

Requester: TypeAlias = str | None  # a peer ID, or None for the node itself
ScopeSource: TypeAlias = ScopeInput | Callable[[], Awaitable[ScopeInput]]


class WorkerDied(Exception):
    """A worker's pipe ended: it exited or was killed."""


def size_bytes(size: int | str) -> int:
    """Bytes of a size given as a number or a DuckDB size string ("512MB", "1GiB").

    Raises ValueError for anything else.
    """
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {size!r} (e.g. 512MB, 1GiB)")
    unit = m.group(2).upper().rstrip("B")
    power = " KMGT".index(unit[:1] or " ")
    base = 1024 if unit.endswith("I") or not unit else 1000
    return int(float(m.group(1)) * (base**power))


# --- one worker --------------------------------------------------------------------------------


class SandboxWorker:
    """One sandbox worker process and the pipes to it.

    `spawn` only starts the process (synchronous, cheap: the imports happen in
    the child), so a pool can start workers ahead of need from anywhere;
    `ready` waits for the worker's first frame and sets its `RLIMIT_AS`
    before any request is sent.
    """

    def __init__(self, process: subprocess.Popen[bytes], memory_limit: int) -> None:
        self.process = process
        self.memory_limit = memory_limit  # bytes, DuckDB's limit inside
        self.address_limit = 0  # bytes of RLIMIT_AS, once ready
        self.loaded: str | None = None  # key of the scope whose tables it holds
        assert process.stdin is not None and process.stdout is not None
        # trio streams over the pipes; the Popen's own file objects are closed.
        self._stdin = trio.lowlevel.FdStream(os.dup(process.stdin.fileno()))
        self._stdout = trio.lowlevel.FdStream(os.dup(process.stdout.fileno()))
        process.stdin.close()
        process.stdout.close()
        self._chunks: list[bytes] = []
        self._buffered = 0

    @classmethod
    def spawn(cls, memory_limit: int, threads: int = DEFAULT_THREADS) -> SandboxWorker:
        """Start a worker process (not yet bounded: call `ready` before using it)."""
        env = dict(os.environ, MALLOC_ARENA_MAX=MALLOC_ARENA_MAX)
        process = subprocess.Popen(
            [sys.executable, "-m", MODULE, "--memory-limit", str(memory_limit),
             "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )  # fmt: skip
        return cls(process, memory_limit)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    async def ready(self) -> None:
        """Wait until the worker reported ready, then bound it. Raises WorkerDied, TooSlowError."""
        if self.address_limit:
            return
        with trio.fail_after(WORKER_START_TIMEOUT):
            ready = json.loads(await self._read(MAX_HEADER_FRAME))
        limit = int(ready["address_space"]) + self.memory_limit + WORKER_HEADROOM
        # Before the first request: no query ever runs unbounded.
        resource.prlimit(self.pid, resource.RLIMIT_AS, (limit, limit))
        self.address_limit = limit

    def kill(self) -> None:
        """SIGKILL the worker (safe from any thread)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def aclose(self) -> None:
        """Kill the worker, reap it and close its pipes (shielded: safe while cancelled)."""
        self.kill()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(REAP_TIMEOUT):
                while self.process.poll() is None:
                    await trio.sleep(REAP_POLL)
            await self._stdin.aclose()
            await self._stdout.aclose()

    async def _receive(self, n: int) -> bytes:
        while self._buffered < n:
            try:
                chunk = await self._stdout.receive_some(READ_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                raise WorkerDied("the worker's output ended")
            self._chunks.append(chunk)
            self._buffered += len(chunk)
        data = b"".join(self._chunks)
        self._chunks = [data[n:]] if len(data) > n else []
        self._buffered = len(data) - n
        return data[:n]

    async def _read(self, max_size: int) -> bytes:
        (size,) = FRAME_HEADER.unpack(await self._receive(FRAME_HEADER.size))
        if size > max_size:
            raise WorkerDied(f"the worker sent a frame of {size} bytes (limit {max_size})")
        return await self._receive(size)

    async def _send(self, data: bytes) -> None:
        try:
            await self._stdin.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise WorkerDied("the worker's input is closed") from None

    async def _answer(self, max_bytes: int | None) -> bytes | None:
        doc = json.loads(await self._read(MAX_HEADER_FRAME))
        if not doc.get("ok"):
            raise error_from_doc(doc)
        if max_bytes is None:
            return None
        return await self._read(max_bytes + ANSWER_OVERHEAD)

    async def load(self, key: str, scope: ScopeInput) -> None:
        """Make the worker's sandbox hold `scope`'s tables. Raises QueryError, WorkerDied."""
        names = list(scope.own)
        header = json_frame({
            "op": "load", "key": key, "tables": names, "origin": scope.origin,
            "replicas": [r.to_json() for r in scope.replicas],
        })  # fmt: skip
        bodies = await trio.to_thread.run_sync(lambda: [frame(to_ipc(scope.own[n])) for n in names])
        self.loaded = None
        await self._send(header)
        for body in bodies:
            await self._send(body)
        await self._answer(None)
        self.loaded = key

    async def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None, *,
                    timeout_s: float, max_rows: int, max_bytes: int) -> bytes:  # fmt: skip
        """Run one query; returns the answer's Arrow IPC bytes. Raises QueryError, WorkerDied."""
        await self._send(json_frame({
            "op": "query", "sql": sql, "params": params, "timeout_s": timeout_s,
            "max_rows": max_rows, "max_bytes": max_bytes,
        }))  # fmt: skip
        answer = await self._answer(max_bytes)
        assert answer is not None
        return answer


# --- who gets one ------------------------------------------------------------------------------


class FairSlots:
    """`total` slots shared by requesters, at most `per_requester` each at a time.

    Waiting requesters are served round robin (the one served last goes to
    the back), so one requester with many queries cannot keep others out.
    """

    def __init__(self, total: int, per_requester: int) -> None:
        if total < 1 or per_requester < 1:
            raise ValueError("slots must be >= 1")
        self.total = total
        self.per_requester = per_requester
        self.running: dict[Requester, int] = {}
        self._queues: dict[Requester, deque[trio.Event]] = {}  # insertion order: whose turn

    @property
    def busy(self) -> int:
        return sum(self.running.values())

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def acquire(self, who: Requester) -> None:
        """Wait for a slot for `who` (cancellable)."""
        event = trio.Event()
        self._queues.setdefault(who, deque()).append(event)
        self._dispatch()
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                self.release(who)
            else:
                queue = self._queues[who]
                queue.remove(event)
                if not queue:
                    del self._queues[who]
            raise

    def release(self, who: Requester) -> None:
        self.running[who] -= 1
        if not self.running[who]:
            del self.running[who]
        self._dispatch()

    def _dispatch(self) -> None:
        while self.busy < self.total:
            for who in self._queues:
                if self.running.get(who, 0) < self.per_requester:
                    break
            else:
                return
            queue = self._queues.pop(who)
            event = queue.popleft()
            if queue:
                self._queues[who] = queue  # back of the line
            self.running[who] = self.running.get(who, 0) + 1
            event.set()


class SandboxPool:
    """Runs queries in sandbox worker processes: the node's own in `local_slots`,
    peers' in `peer_slots` (at most `per_peer` each)."""

    def __init__(self, *, memory_limit: int | str, threads: int = DEFAULT_THREADS,
                 local_slots: int = 2, peer_slots: int = 2, per_peer: int = 1) -> None:  # fmt: skip
        self.memory_limit = size_bytes(memory_limit)
        self.threads = threads
        self.local = FairSlots(local_slots, local_slots)
        self.peers = FairSlots(peer_slots, min(per_peer, peer_slots))
        self._idle: list[SandboxWorker] = []
        self._busy: set[SandboxWorker] = set()
        self.started = 0  # workers started (tests, metrics)
        self.replaced = 0  # workers killed after a limit, a deadline or a cancellation
        self._closed = False

    def _slots(self, who: Requester) -> FairSlots:
        return self.local if who is None else self.peers

    @property
    def workers(self) -> list[SandboxWorker]:
        """Every live worker, idle or busy."""
        return [*self._idle, *self._busy]

    async def run(
        self,
        who: Requester,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None,
        *,
        scope_key: str | None,
        scope: ScopeSource,
        deadline: float,
        timeout_s: float,
        max_rows: int,
        max_bytes: int,
    ) -> pa.Table:
        """Run `sql` over `scope`'s tables for `who` before `deadline` (trio time).

        `scope_key` names the scope's data (None: never reuse it); a worker
        that already holds it is not reloaded. `scope` is the data or an async
        callable producing it. Raises QueryRefused, InvalidSQL, QueryTimeout,
        ResultTooLarge or QueryError; Cancelled kills the worker.
        """
        if self._closed:
            raise QueryError("the query service is closed")
        slots = self._slots(who)
        with trio.move_on_at(deadline) as waiting:
            await slots.acquire(who)
        if waiting.cancelled_caught:
            raise QueryTimeout(timeout_s)
        try:
            return await self._run(sql, params, scope_key, scope, deadline, timeout_s,
                                   max_rows, max_bytes)  # fmt: skip
        finally:
            slots.release(who)

    async def _run(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None,
                   scope_key: str | None, scope: ScopeSource, deadline: float,
                   timeout_s: float, max_rows: int, max_bytes: int) -> pa.Table:  # fmt: skip
        healthy = False
        worker: SandboxWorker | None = None
        try:
            with trio.move_on_at(deadline + KILL_GRACE):
                worker = self._take(scope_key)
                await worker.ready()
                if scope_key is None or worker.loaded != scope_key:
                    data = scope if isinstance(scope, ScopeInput) else await scope()
                    await worker.load(scope_key or "", data)
                    if scope_key is None:
                        worker.loaded = None
                remaining = deadline - trio.current_time()
                if remaining <= 0:
                    healthy = True
                    raise QueryTimeout(timeout_s)
                try:
                    ipc = await worker.query(sql, params, timeout_s=remaining,
                                             max_rows=max_rows, max_bytes=max_bytes)  # fmt: skip
                except QueryTimeout:
                    healthy = True  # its own timer interrupted DuckDB: say the caller's limit
                    raise QueryTimeout(timeout_s) from None
                except QueryError:
                    healthy = True  # it answered: refused, invalid, or a limit
                    raise
                healthy = True
                return await trio.to_thread.run_sync(from_ipc, ipc)
            raise QueryTimeout(timeout_s)  # the worker did not answer in time: killed below
        except WorkerDied:
            assert worker is not None
            await worker.aclose()
            raise ResultTooLarge(
                "query memory", got="more",
                limit=f"{self.memory_limit} bytes (the query's sandbox process ended, exit "
                      f"status {worker.returncode})",
            ) from None  # fmt: skip
        finally:
            if worker is not None:
                self._busy.discard(worker)
                if healthy and not self._closed:
                    self._idle.append(worker)
                else:
                    self.replaced += 1
                    await worker.aclose()

    def _take(self, key: str | None) -> SandboxWorker:
        for worker in [w for w in self._idle if w.returncode is not None]:
            self._idle.remove(worker)  # died while idle (killed from outside): forget it
            worker.kill()
        for worker in self._idle:
            if key is not None and worker.loaded == key:
                break
        else:
            worker = self._idle[0] if self._idle else self._spawn()
        if worker in self._idle:
            self._idle.remove(worker)
        self._busy.add(worker)
        return worker

    def _spawn(self) -> SandboxWorker:
        worker = SandboxWorker.spawn(self.memory_limit, self.threads)
        self.started += 1
        return worker

    def prestart(self, count: int) -> None:
        """Start workers until `count` are idle, so that early queries find one
        ready instead of waiting for Python and DuckDB to import."""
        while not self._closed and len(self._idle) < count:
            self._idle.append(self._spawn())

    def close(self) -> None:
        """Kill every worker (safe from any thread); running queries fail."""
        self._closed = True
        for worker in self.workers:
            worker.kill()
        self._idle = []
