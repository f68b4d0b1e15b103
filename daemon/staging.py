"""Staged bulk writes: `benchsync record KIND --from FILE.jsonl` of any size through
the running node, still all or nothing.

The CLI parses and validates the file itself, then

    POST   /v1/record/{kind}/batches               -> {"batch": ID, ...}   open a batch
    POST   /v1/record/{kind}/batches/{id}          {"records": [...]}      append (repeat)
    POST   /v1/record/{kind}/batches/{id}/commit   -> {"stored": N}        write them all
    DELETE /v1/record/{kind}/batches/{id}          -> {"dropped": N}       give up

Every append is an ordinary request within the control API's body limit
(`control.MAX_BODY_BYTES`). Nothing is written before the commit, which
stores every staged record in ONE transaction through the node's single
writer (`Node.record_many`): the first invalid record fails the commit and
nothing of the batch is written. A batch is gone after its commit, failed or
not.

Why staged batches rather than one streamed (chunked) request body: the
control server reads and bounds a body before it knows the route, and its
body limit and body deadline protect every route, including the TCP listener
open to the lab; a streamed body would need a per-route exception to both.
Batches keep those limits as they are, give the CLI a natural progress step,
and a client that dies mid-way leaves only a batch that expires.

Staging is bounded: `STAGING_MAX_BYTES` of request bodies over all open
batches (an append beyond it is answered 413 `staging_full`, naming the
limit), at most `STAGING_MAX_BATCHES` open at once (503 `staging_busy`), and
a batch not touched for `STAGING_TIMEOUT` seconds is dropped (checked on every
staging request). The bodies are kept as received (bytes, as counted) and
decoded again only at the commit.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from benchsync.daemon.control import ApiError, Request, Router

if TYPE_CHECKING:
    from benchsync.daemon.node import Node

STAGING_MAX_BYTES = 256 * 1024 * 1024  # bytes of staged request bodies, all open batches
STAGING_MAX_BATCHES = 16  # batches open at once
STAGING_TIMEOUT = 600.0  # seconds a batch may go untouched before it is dropped


@dataclass
class Batch:
    """The staged records of one bulk write, as the bodies that brought them."""

    id: str
    kind: str
    touched: float
    bodies: list[bytes] = field(default_factory=list)
    records: int = 0
    size: int = 0  # bytes of `bodies`

    def decoded(self) -> list[Any]:
        """Every staged record, in the order appended (in a worker thread: big)."""
        out: list[Any] = []
        for body in self.bodies:
            out.extend(json.loads(body)["records"])
        return out


@dataclass
class RecordStaging:
    """The open batches of one node, bounded in bytes, count and age."""

    max_bytes: int = STAGING_MAX_BYTES
    max_batches: int = STAGING_MAX_BATCHES
    timeout: float = STAGING_TIMEOUT
    clock: Callable[[], float] = time.monotonic
    batches: dict[str, Batch] = field(default_factory=dict)

    @property
    def staged_bytes(self) -> int:
        return sum(b.size for b in self.batches.values())

    def expire(self) -> None:
        now = self.clock()
        for batch_id in [i for i, b in self.batches.items() if now - b.touched > self.timeout]:
            del self.batches[batch_id]

    def open(self, kind: str) -> Batch:
        self.expire()
        if len(self.batches) >= self.max_batches:
            raise ApiError(
                503, "staging_busy",
                f"{len(self.batches)} bulk records are staged already "
                f"(STAGING_MAX_BATCHES {self.max_batches})",
                "retry once they are committed, or in "
                f"{self.timeout:g} s when abandoned ones expire",
            )  # fmt: skip
        batch = Batch(secrets.token_hex(8), kind, self.clock())
        self.batches[batch.id] = batch
        return batch

    def get(self, kind: str, batch_id: str) -> Batch:
        self.expire()
        batch = self.batches.get(batch_id)
        if batch is None or batch.kind != kind:
            raise ApiError(
                404, "no_batch",
                f"no staged {kind} batch {batch_id!r} (committed, dropped, or expired after "
                f"{self.timeout:g} s untouched)",
                "send the records again: `benchsync record KIND --from FILE` starts a new batch",
            )  # fmt: skip
        batch.touched = self.clock()
        return batch

    def append(self, batch: Batch, body: bytes, records: int) -> None:
        staged = self.staged_bytes
        if staged + len(body) > self.max_bytes:
            raise ApiError(
                413, "staging_full",
                f"staging {len(body)} more bytes would exceed STAGING_MAX_BYTES "
                f"({self.max_bytes} bytes over all open batches; {staged} staged now)",
                "record the file in parts (each part is all or nothing), or retry when "
                "other bulk records are committed",
            )  # fmt: skip
        batch.bodies.append(body)
        batch.records += records
        batch.size += len(body)

    def pop(self, kind: str, batch_id: str) -> Batch:
        batch = self.get(kind, batch_id)
        del self.batches[batch.id]
        return batch


class StagingRoutes:
    """The staging routes of one node's control API."""

    def __init__(self, node: Node, kinds: tuple[str, ...],
                 staging: RecordStaging | None = None) -> None:  # fmt: skip
        self.node = node
        self.kinds = kinds
        self.staging = staging or RecordStaging()

    def add_to(self, router: Router) -> None:
        router.add("POST", "/v1/record/{kind}/batches", self.open)
        router.add("POST", "/v1/record/{kind}/batches/{batch}", self.append)
        router.add("POST", "/v1/record/{kind}/batches/{batch}/commit", self.commit)
        router.add("DELETE", "/v1/record/{kind}/batches/{batch}", self.drop)

    def _kind(self, request: Request) -> str:
        kind = request.params["kind"]
        if kind not in self.kinds:
            raise ApiError(404, "unknown_kind", f"no record kind {kind!r}",
                           f"use one of {', '.join(self.kinds)}")  # fmt: skip
        return kind

    def _answer(self, batch: Batch) -> dict[str, Any]:
        return {"batch": batch.id, "kind": batch.kind, "staged": batch.records,
                "bytes": batch.size, "max_bytes": self.staging.max_bytes,
                "expires_after": self.staging.timeout}  # fmt: skip

    async def open(self, request: Request) -> tuple[int, Any]:
        return 201, self._answer(self.staging.open(self._kind(request)))

    async def append(self, request: Request) -> tuple[int, Any]:
        kind = self._kind(request)
        batch = self.staging.get(kind, request.params["batch"])
        body = request.json()
        records = body.get("records") if isinstance(body, dict) else None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ApiError(400, "bad_request", 'expected {"records": [{...}, ...]}',
                           "see `benchsync record --help` for the field names")  # fmt: skip
        self.staging.append(batch, request.body, len(records))
        return 200, self._answer(batch)

    async def commit(self, request: Request) -> tuple[int, Any]:
        from benchsync.daemon.api import WRITE_FAILED, answering

        kind = self._kind(request)
        batch = self.staging.pop(kind, request.params["batch"])  # gone, whatever happens now
        if not batch.records:
            raise ApiError(400, "empty_batch", f"batch {batch.id} holds no records",
                           "append records before the commit")  # fmt: skip
        records = await trio.to_thread.run_sync(batch.decoded)
        try:
            with answering(WRITE_FAILED):
                stored = await self.node.record_many(kind, records)
        except (TypeError, ValueError) as e:  # a value the record rules could not even check
            raise ApiError(422, "invalid_record", str(e), "nothing was written") from e
        return 200, {"batch": batch.id, "stored": stored}

    async def drop(self, request: Request) -> tuple[int, Any]:
        batch = self.staging.pop(self._kind(request), request.params["batch"])
        return 200, {"batch": batch.id, "dropped": batch.records}
