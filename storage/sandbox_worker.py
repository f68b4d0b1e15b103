"""The process side of a query sandbox: one `QuerySandbox` serving requests over pipes.

The daemon starts this module as its own process
(`python -m benchsync.storage.sandbox_worker --memory-limit BYTES --threads N`)
and bounds it from outside: `RLIMIT_AS` (set by the parent with `prlimit`
once the worker reported its idle address space), a kill at the query's
deadline, a kill when the caller goes away. Everything here is synchronous
and knows nothing of trio; `benchsync.daemon.query_pool` is the other side.

The worker runs in a fresh, empty, private working directory with `HOME`
pointing at it, so that nothing DuckDB reports (its `allowed_paths` name the
working directory) says where the node lives.

Wire format, both directions: frames of an 8-byte big-endian length and a
body. A request is a JSON header frame, then as many Arrow IPC stream frames
as its `tables` names:

    {"op": "load", "key": K, "tables": [NAME, ...], "origin": ID|null,
     "replicas": [{"dataset": ID, "tables": {NAME: PATH}}]}   -> {"ok": true}
    {"op": "query", "sql": S, "params": [...]|{...}|null, "timeout_s": F,
     "max_rows": N, "max_bytes": N}             -> {"ok": true} + one IPC frame
    any failure                                 -> {"ok": false, "kind": K, "message": M}

The first frame the worker writes is {"ready": true, "address_space": BYTES}.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
from collections.abc import Mapping
from typing import IO, Any

import pyarrow as pa
import pyarrow.ipc  # noqa: F401  (registers pa.ipc)

from benchsync.storage.sandbox import (
    DEFAULT_THREADS,
    InvalidSQL,
    QueryError,
    QueryLimits,
    QueryRefused,
    QuerySandbox,
    QueryTimeout,
    ResultTooLarge,
)
from benchsync.storage.scopes import ReplicaTables, ScopeInput, scope_tables

FRAME_HEADER = struct.Struct(">Q")  # body length, bytes
WARM_UP_LIMITS = QueryLimits(timeout_s=60.0, max_rows=1, max_bytes=1024 * 1024)  # one tiny sum
MAX_HEADER_FRAME = 1024 * 1024  # bytes of one JSON header (SQL is <= 64 KiB)
MODULE = "benchsync.storage.sandbox_worker"


class WorkerProtocolError(Exception):
    """The other side of the pipe sent something that is not a frame we expect."""


# --- frames ------------------------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    """One frame: length prefix + body."""
    return FRAME_HEADER.pack(len(body)) + body


def json_frame(doc: Mapping[str, Any]) -> bytes:
    return frame(json.dumps(doc).encode())


def read_frame(stream: IO[bytes], max_size: int) -> bytes | None:
    """Read one frame; None at a clean end of stream. Raises WorkerProtocolError."""
    head = stream.read(FRAME_HEADER.size)
    if not head:
        return None
    if len(head) != FRAME_HEADER.size:
        raise WorkerProtocolError("stream ended inside a frame header")
    (size,) = FRAME_HEADER.unpack(head)
    if size > max_size:
        raise WorkerProtocolError(f"frame of {size} bytes exceeds {max_size}")
    body = stream.read(size)
    if len(body) != size:
        raise WorkerProtocolError("stream ended inside a frame")
    return body


def to_ipc(table: pa.Table) -> bytes:
    """An Arrow table as the bytes of one IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def from_ipc(data: bytes) -> pa.Table:
    """Read an Arrow IPC stream; raises pyarrow.ArrowInvalid on malformed bytes."""
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


# --- errors across the pipe --------------------------------------------------------------------


def error_doc(e: QueryError) -> dict[str, Any]:
    """A QueryError as the JSON of a failure answer."""
    return {"ok": False, "kind": e.kind, "message": str(e),
            "timeout_s": getattr(e, "timeout_s", None)}  # fmt: skip


def error_from_doc(doc: Mapping[str, Any]) -> QueryError:
    """The QueryError (right subclass, same message) a failure answer describes."""
    kind, message = str(doc.get("kind", "internal")), str(doc.get("message", ""))
    error: QueryError
    if kind == QueryTimeout.kind:
        error = QueryTimeout(float(doc.get("timeout_s") or 0.0))
    elif kind == ResultTooLarge.kind:
        error = ResultTooLarge("answer", limit="?", got="?")
    else:
        cls = {c.kind: c for c in (QueryRefused, InvalidSQL)}.get(kind, QueryError)
        error = cls(message)
    error.args = (message,)
    return error


# --- the worker --------------------------------------------------------------------------------


def address_space() -> int:
    """This process's virtual memory size (bytes), from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


class Worker:
    """Serves requests from `inp` on one sandbox, answering on `out`."""

    def __init__(self, sandbox: QuerySandbox, inp: IO[bytes], out: IO[bytes]) -> None:
        self.sandbox = sandbox
        self.inp = inp
        self.out = out

    def _send(self, data: bytes) -> None:
        self.out.write(data)
        self.out.flush()

    def warm_up(self) -> None:
        """Run one tiny query end to end, so that the address space reported as
        idle already holds what every query maps (allocator arenas, timer thread)."""
        self.sandbox.load({"warm_up": pa.table({"x": list(range(1000))})})
        to_ipc(self.sandbox.execute("SELECT sum(x) AS s FROM warm_up", limits=WARM_UP_LIMITS))
        self.sandbox.load({})

    def serve(self) -> None:
        """Answer requests until the input ends."""
        self._send(json_frame({"ready": True, "address_space": address_space()}))
        while (body := read_frame(self.inp, MAX_HEADER_FRAME)) is not None:
            request = json.loads(body)
            try:
                answer = self._handle(request)
            except QueryError as e:
                self._send(json_frame(error_doc(e)))
                continue
            except MemoryError:
                too_large = ResultTooLarge("query memory", limit=self.sandbox.memory_limit,
                                           got="more")  # fmt: skip
                self._send(json_frame(error_doc(too_large)))
                continue
            self._send(json_frame({"ok": True}) + (frame(answer) if answer is not None else b""))

    def _handle(self, request: dict[str, Any]) -> bytes | None:
        if request.get("op") == "load":
            tables = {}
            for name in request["tables"]:
                body = read_frame(self.inp, sys.maxsize)
                if body is None:
                    raise WorkerProtocolError("input ended inside a load request")
                tables[name] = from_ipc(body)
            scope = ScopeInput(
                own=tables, origin=request.get("origin"),
                replicas=[ReplicaTables.from_json(r) for r in request.get("replicas", [])],
            )  # fmt: skip
            try:
                self.sandbox.load(scope_tables(scope))
            except (OSError, pa.ArrowException, ValueError) as e:
                raise QueryError(f"the scope's tables could not be loaded: {e}") from None
            return None
        if request.get("op") == "query":
            max_bytes = int(request["max_bytes"])
            limits = QueryLimits(
                timeout_s=float(request["timeout_s"]), max_rows=int(request["max_rows"]),
                max_bytes=max_bytes,
            )  # fmt: skip
            table = self.sandbox.execute(request["sql"], request.get("params"), limits=limits)
            ipc = to_ipc(table)
            if len(ipc) > max_bytes:
                raise ResultTooLarge("answer bytes (Arrow IPC)", limit=max_bytes, got=len(ipc))
            return ipc
        raise WorkerProtocolError(f"unknown request {request.get('op')!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=MODULE)
    parser.add_argument("--memory-limit", type=int, required=True, help="DuckDB's limit, bytes")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    args = parser.parse_args(argv)
    # Answers go out on a private copy of stdout; anything a library prints goes to stderr.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    with tempfile.TemporaryDirectory(prefix="benchsync-sandbox-") as private:
        os.chdir(private)
        os.environ["HOME"] = private
        sandbox = QuerySandbox(memory_limit=f"{args.memory_limit}B", threads=args.threads)
        worker = Worker(sandbox, sys.stdin.buffer, out)
        worker.warm_up()
        try:
            worker.serve()
        except (BrokenPipeError, WorkerProtocolError):
            return 1
        finally:
            sandbox.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
