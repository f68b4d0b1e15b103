"""The control API: HTTP/1.1 + JSON for the CLI and for operators.

Owns the server (h11 on trio streams) that listens on a Unix socket (mode
0600, or 0660 for the group `control_socket_group`: file permissions are the
authentication) and optionally on TCP (every
request needs `Authorization: Bearer <token>`), the `Router` that maps
(method, path) to handlers, the one error shape every route answers with, and
the synchronous `ControlClient` the CLI uses.

A handler is `async def handler(request: Request) -> tuple[int, object]`; the
object is sent as JSON, or as is when it is a `Text` (Prometheus exposition).
A handler runs while its connection is watched: when the client closes the
connection first, the handler is cancelled (a query stops instead of running
to its time limit). A client that half-closes its side while it waits for the
answer is taken as gone. A handler signals a client mistake with
`ApiError(status, code, message, hint)` (`Request.json` and `Request.query_int`
raise the 400s for a bad body or query parameter); any other exception is
logged and becomes a 500 for that request only. Every error, including 400
(bad JSON, too deeply nested JSON, a bad query parameter), 401, 404, 405,
408, 413, 500 and 503 (TCP listener full), has the body
`{"error": {"code": ..., "message": ..., "hint": ...}}`.

The TCP listener is reachable by anyone who can connect, so it costs them
little: it has its own connection limit (the Unix socket's users never wait
behind it), checks the token before reading a body, and every connection has
idle, head, body and send deadlines.

This module knows no routes of its own; `benchsync.daemon.api` builds the node's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hmac
import http.client
import json
import logging
import os
import socket
import stat
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import h11
import trio

if TYPE_CHECKING:
    # trio-typing's stubs (a libp2p dependency) shadow trio's own annotations.
    from trio_typing import TaskStatus

MAX_BODY_BYTES = 1 * 1024 * 1024  # bytes; largest request body (records come in batches)
MAX_HEADER_BYTES = 16 * 1024  # bytes; request line plus headers
IDLE_TIMEOUT = 10.0  # seconds a connection may wait before (or between) requests
HEADER_TIMEOUT = 10.0  # seconds from a request's first byte to the end of its head
BODY_TIMEOUT = 30.0  # seconds to receive a body once its head is in
SEND_TIMEOUT = 30.0  # seconds for a client to take one piece of our answer
# Each listener has its own connection limit, so that a flood of (unauthenticated)
# TCP connections never delays the local user on the Unix socket.
MAX_UNIX_CONNECTIONS = 64  # served at once on the Unix socket; more wait for a free slot
MAX_TCP_CONNECTIONS = 32  # served at once on TCP; more are answered 503 and closed at once
REFUSE_TIMEOUT = 1.0  # seconds to write the 503 to a TCP connection over the limit
RECEIVE_SIZE = 64 * 1024  # bytes per read
MAX_DRAIN_BYTES = 64 * 1024 * 1024  # bytes of a refused body we read and discard at most
# A request refused for its token gets its answer, not our reading of its body.
UNAUTHORIZED_DRAIN_BYTES = 64 * 1024  # bytes
UNAUTHORIZED_DRAIN_TIMEOUT = 1.0  # seconds
MAX_QUERY_INT = 2**63 - 1  # largest integer a query parameter may carry (DuckDB's BIGINT)
MAX_QUERY_INT_DIGITS = 19  # decimal digits of MAX_QUERY_INT
BACKLOG = 64  # pending connections per listener
SOCKET_PROBE_TIMEOUT = 1.0  # seconds to decide whether a socket file has a live server
MAX_UNIX_PATH = 107  # bytes; sun_path holds 108 including the terminating NUL
SOCKET_MODE = 0o600  # only the node's user may talk to it
GROUP_SOCKET_MODE = 0o660  # with a socket group (setting control_socket_group): its members too
SOCKET_DIR_MODE = 0o700  # for a directory we create to hold the socket
CLIENT_TIMEOUT = 60.0  # seconds a ControlClient waits for an answer
SERVER_NAME = b"benchsync"
JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain; charset=utf-8"

log = logging.getLogger(__name__)


# --- errors ------------------------------------------------------------------


class ApiError(Exception):
    """Raised by a handler (or the server) to answer with an error status.

    `code` is a stable machine-readable word (`not_found`, `bad_json`, ...),
    `message` says what happened and `hint` what the caller could try.
    """

    def __init__(self, status: int, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.hint = hint

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "hint": self.hint}}


class ControlSocketError(OSError):
    """The control API cannot listen: its Unix socket, or (`ControlTCPError`) its TCP
    address (our environment's fault, not a client's).

    `message` says what happened, naming the socket or setting, and `hint` what to try.
    """

    def __init__(self, path: Path, message: str, hint: str, *, where: str | None = None) -> None:
        where = where or f"control socket {path}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.message = f"{where}: {message}"
        self.hint = hint


class ControlTCPError(ControlSocketError):
    """The control API's TCP address (setting `control_tcp`) cannot be listened on,
    e.g. the port is in use."""

    def __init__(self, path: Path, address: tuple[str, int], message: str, hint: str) -> None:
        super().__init__(path, message, hint, where=f"control_tcp {address[0]}:{address[1]}")
        self.address = address


class ControlSocketInUse(ControlSocketError):
    """Another process (most likely another node) is serving on the socket path."""


class ControlAPIError(Exception):
    """The control API answered with an error (or, as `ControlUnavailable`, not at all).

    Carries the server's error shape: `status`, `code`, `message`, `hint`.
    """

    def __init__(
        self, status: int | None, code: str, message: str, hint: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.hint = hint


class ControlUnavailable(ControlAPIError):
    """No node answers at the address (not running, stale socket, or no permission)."""


# --- requests, responses, routing --------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    """One HTTP request as a handler sees it."""

    method: str
    path: str  # without the query string, percent-decoded
    query: Mapping[str, str]  # last value wins for a repeated key
    headers: Mapping[str, str]  # names in lower case
    body: bytes
    params: Mapping[str, str] = dataclasses.field(default_factory=dict)  # from {name} segments
    transport: str = "unix"  # "unix" or "tcp"

    def json(self) -> Any:
        """The body decoded as JSON (None for an empty body); ApiError 400 if it is not JSON
        or is nested too deeply for the decoder."""
        if not self.body:
            return None
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(
                400, "bad_json", f"request body is not valid JSON: {e}",
                "send a JSON document with Content-Type: application/json",
            ) from None  # fmt: skip
        except RecursionError:
            raise ApiError(
                400, "bad_json", "request body is nested too deeply to decode",
                "send a JSON document with at most a few levels of arrays and objects",
            ) from None  # fmt: skip

    def query_int(
        self, name: str, default: int | None = None, *, minimum: int = 0,
        maximum: int = MAX_QUERY_INT,
    ) -> int | None:
        """The query parameter `name` as an integer (`default` when absent or empty).

        Raises ApiError 400 `bad_query` when it is not a decimal integer from
        `minimum` to `maximum`.
        """  # fmt: skip
        text = self.query.get(name)
        if text is None or text == "":
            return default
        stripped = text.strip()
        digits = stripped[1:] if stripped[:1] in ("-", "+") else stripped
        value: int | None = None
        if digits.isascii() and digits.isdigit() and len(digits) <= MAX_QUERY_INT_DIGITS:
            value = int(stripped)
        if value is None or not minimum <= value <= maximum:
            shown = text if len(text) <= 40 else text[:40] + "..."
            raise ApiError(
                400, "bad_query",
                f"query parameter {name}={shown!r} is not an integer from {minimum} to {maximum}",
                f"give {name} as a whole number, e.g. ?{name}={max(minimum, 10)}",
            )  # fmt: skip
        return value


@dataclasses.dataclass(frozen=True)
class Text:
    """A non-JSON response body, e.g. Prometheus text exposition."""

    body: bytes | str
    content_type: str = TEXT_TYPE


Handler = Callable[[Request], Awaitable[tuple[int, Any]]]


class Router:
    """Maps (method, path) to handlers; `{name}` path segments become `request.params`."""

    def __init__(self) -> None:
        self._routes: list[tuple[tuple[str, ...], str, Handler]] = []

    def add(self, method: str, path: str, handler: Handler) -> None:
        """Register `handler` for `method` on `path` (e.g. "/v1/replicas/{peer}")."""
        pattern = _segments(path)
        method = method.upper()
        for existing, m, _ in self._routes:
            if existing == pattern and m == method:
                raise ValueError(f"route {method} {path} is already registered")
        self._routes.append((pattern, method, handler))

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """The handler and path parameters; ApiError 404 (no such path) or 405 (wrong method)."""
        segments = _segments(path)
        allowed: list[str] = []
        for pattern, m, handler in self._routes:
            params = _match(pattern, segments)
            if params is None:
                continue
            if m == method.upper():
                return handler, params
            allowed.append(m)
        if allowed:
            raise ApiError(
                405, "method_not_allowed", f"{method} is not allowed on {path}",
                f"use {' or '.join(sorted(set(allowed)))}",
            )  # fmt: skip
        known = ", ".join(f"{m} {p}" for m, p in self.routes())
        raise ApiError(404, "not_found", f"no route {path}", f"known routes: {known}")

    def routes(self) -> list[tuple[str, str]]:
        """(method, path) of every route, in registration order."""
        return [(m, "/" + "/".join(p)) for p, m, _ in self._routes]


def _segments(path: str) -> tuple[str, ...]:
    return tuple(s for s in path.split("/") if s)


def _match(pattern: tuple[str, ...], segments: tuple[str, ...]) -> dict[str, str] | None:
    if len(pattern) != len(segments):
        return None
    params: dict[str, str] = {}
    for p, s in zip(pattern, segments, strict=True):
        if p.startswith("{") and p.endswith("}"):
            params[p[1:-1]] = s
        elif p != s:
            return None
    return params


# --- the server --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ControlEndpoints:
    """Where a started server listens (TCP port resolved when 0 was asked for)."""

    socket_path: Path
    tcp_address: tuple[str, int] | None


@dataclasses.dataclass
class ControlServer:
    """Serves a `Router` on a Unix socket and, if `tcp` is set, on TCP with a bearer token.

    Each listener has its own connection limit: Unix-socket connections over
    the limit wait for a slot, TCP ones are answered 503 at once. On TCP the
    token is checked as soon as the request head is in, before any body is read.

    A server answering with other bodies (the dashboard, `benchsync.daemon.web`)
    keeps this serving loop and overrides `connection` and `refuse_busy`.
    """

    name: ClassVar[str] = "control API"  # what the log calls it

    router: Router
    socket_path: Path
    tcp: tuple[str, int] | None = None
    token: str | None = None
    socket_group: str | None = None  # group owning the socket (then GROUP_SOCKET_MODE)
    max_body_bytes: int = MAX_BODY_BYTES
    idle_timeout: float = IDLE_TIMEOUT
    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    send_timeout: float = SEND_TIMEOUT
    max_unix_connections: int = MAX_UNIX_CONNECTIONS
    max_tcp_connections: int = MAX_TCP_CONNECTIONS

    def __post_init__(self) -> None:
        self.socket_path = Path(self.socket_path)
        if self.tcp is not None and not self.token:
            raise ValueError("a TCP control listener needs a token")
        self._limiters = {
            "unix": trio.CapacityLimiter(self.max_unix_connections),
            "tcp": trio.CapacityLimiter(self.max_tcp_connections),
        }

    @classmethod
    def from_config(cls, router: Router, config: Any) -> ControlServer:
        """A server for a `benchsync.daemon.config.Config`."""
        return cls(router, config.control_socket, config.control_tcp_address, config.control_token,
                   socket_group=config.control_socket_group)

    async def run(
        self, *, task_status: TaskStatus[ControlEndpoints] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until cancelled; removes the socket file on the way out.

        `task_status.started()` gets the `ControlEndpoints`. Raises
        `ControlSocketInUse` if a live server owns the socket path,
        `ControlSocketError` if the socket cannot be created and
        `ControlTCPError` if the TCP address cannot be listened on; all three
        before anything is served.
        """
        unix_listener = await _open_unix_listener(self.socket_path, self.socket_group)
        ino = os.stat(self.socket_path).st_ino
        try:
            tcp_listeners = (
                await _open_tcp_listeners(self.socket_path, self.tcp) if self.tcp else []
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    trio.serve_listeners, partial(self._serve, transport="unix"), [unix_listener]
                )
                tcp_address = None
                if tcp_listeners:
                    sockname = tcp_listeners[0].socket.getsockname()
                    tcp_address = (sockname[0], sockname[1])
                    await nursery.start(
                        trio.serve_listeners, partial(self._serve, transport="tcp"), tcp_listeners
                    )
                log.info("control API on %s%s", self.socket_path,
                         f" and http://{tcp_address[0]}:{tcp_address[1]}" if tcp_address else "")
                task_status.started(ControlEndpoints(self.socket_path, tcp_address))
        finally:
            # Remove the socket only if it is still ours (a successor may have replaced it).
            with contextlib.suppress(OSError):
                if os.stat(self.socket_path).st_ino == ino:
                    os.unlink(self.socket_path)
            unix_listener.socket.close()  # synchronous: we may be cancelled already

    async def _serve(self, stream: trio.abc.Stream, *, transport: str) -> None:
        limiter = self._limiters[transport]
        try:
            if transport == "tcp":
                try:
                    limiter.acquire_nowait()
                except trio.WouldBlock:
                    await self.refuse_busy(stream)
                    return
            else:
                await limiter.acquire()
            try:
                await self.connection(stream, transport).serve()
            except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
                pass  # the client went away; nothing to answer
            except Exception:  # never let one connection take the server down
                log.exception("%s connection failed", self.name)
            finally:
                limiter.release()
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()

    def connection(self, stream: trio.abc.Stream, transport: str) -> Connection:
        """The `Connection` that serves one accepted `stream`."""
        return Connection(self, stream, transport)

    async def refuse_busy(self, stream: trio.abc.Stream) -> None:
        """Answer 503 on a TCP connection over the limit, without reading its request."""
        await _refuse_busy(stream, self.max_tcp_connections)

    async def dispatch(self, request: Request) -> tuple[int, Any]:
        """Route one request: (status, body) where body is JSON-able or `Text`."""
        try:
            if request.transport == "tcp":
                self.authorize(request.headers)
            handler, params = self.router.resolve(request.method, request.path)
            request = dataclasses.replace(request, params=params)
            status, body = await handler(request)
            return status, body
        except ApiError as e:
            return e.status, e
        except Exception:
            log.exception("control API handler for %s %s failed", request.method, request.path)
            return 500, ApiError(
                500, "internal", f"internal error while handling {request.method} {request.path}",
                "the node's log has the details; please report it",
            )  # fmt: skip

    def authorize(self, headers: Mapping[str, str]) -> None:
        """Check a TCP request's bearer token; ApiError 401 when it is missing or wrong."""
        given = headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        expected = (self.token or "").encode()
        # compare_digest takes time independent of where the tokens differ.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode("utf-8", "surrogateescape"), expected
        ):
            raise ApiError(
                401, "unauthorized",
                "missing or wrong bearer token" if given else "this listener needs a bearer token",
                "send Authorization: Bearer <control_token>, or use the Unix socket",
            )  # fmt: skip


class Connection:
    """One HTTP/1.1 connection: read a request, answer it, repeat while keep-alive holds.

    Reading a request has three deadlines: `idle_timeout` until its first byte
    (an idle connection is then closed without an answer), `header_timeout`
    from there to the end of its head, `body_timeout` for the body (408 when
    either passes). A client that takes no part of our answer for
    `send_timeout` is disconnected.
    """

    def __init__(self, server: ControlServer, stream: trio.abc.Stream, transport: str) -> None:
        self.server = server
        self.stream = stream
        self.transport = transport
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self._phase = "idle"  # idle | head | body: what we are waiting for
        self._deadline = trio.CancelScope()

    async def serve(self) -> None:
        while True:
            request: Request | None = None
            error: ApiError | None = None
            self._phase = "idle"
            with trio.CancelScope(
                deadline=trio.current_time() + self.server.idle_timeout
            ) as self._deadline:
                try:
                    request = await self._read_request()
                except ApiError as e:
                    error = e
                except h11.RemoteProtocolError as e:
                    error = ApiError(
                        e.error_status_hint, "bad_request", f"malformed HTTP request: {e}",
                        "send HTTP/1.1",
                    )  # fmt: skip
            if self._deadline.cancelled_caught:
                if self._phase == "idle":
                    return  # an idle (keep-alive) connection: close quietly
                limit = (
                    self.server.header_timeout if self._phase == "head"
                    else self.server.body_timeout
                )  # fmt: skip
                error = ApiError(
                    408, "request_timeout",
                    f"request {'head' if self._phase == 'head' else 'body'} not received "
                    f"within {limit:g} s",
                    "send the whole request at once",
                )  # fmt: skip
            if error is not None:
                await self._respond(error.status, error, close=True)
                if error.status == 413:
                    await self._drain(MAX_DRAIN_BYTES, self.server.body_timeout)
                elif error.status == 401:
                    await self._drain(UNAUTHORIZED_DRAIN_BYTES, UNAUTHORIZED_DRAIN_TIMEOUT)
                return
            if request is None:
                return  # the client closed the connection
            answer = await self._dispatch_while_connected(request)
            if answer is None:
                return  # the client went away: its handler was cancelled
            status, body = answer
            await self._respond(status, body)
            if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is not h11.DONE:
                return
            self.conn.start_next_cycle()

    async def _dispatch_while_connected(self, request: Request) -> tuple[int, Any] | None:
        """Run the request's handler while watching the connection; (status, body), or
        None when the client closed the connection first and the handler was cancelled
        (a local query then stops, and its sandbox worker is killed, at once instead of
        at its time limit)."""
        answer: tuple[int, Any] | None = None

        async def handle() -> None:
            nonlocal answer
            answer = await self.server.dispatch(request)
            nursery.cancel_scope.cancel()  # stop watching

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_peer, request, nursery.cancel_scope)
            nursery.start_soon(handle)
        return answer

    async def _watch_peer(self, request: Request, handler_scope: trio.CancelScope) -> None:
        """Cancel `handler_scope` when the client closes its side of the connection.

        A client that sends more (a pipelined request) is still there: its bytes go
        to h11 for the next cycle, and the watch ends.
        """
        try:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if data:
            self.conn.receive_data(data)
            return
        log.info("control API client went away during %s %s: cancelling its handler",
                 request.method, request.path)  # fmt: skip
        handler_scope.cancel()

    def _enter(self, phase: str, timeout: float) -> None:
        self._phase = phase
        self._deadline.deadline = trio.current_time() + timeout

    async def _drain(self, max_bytes: int, timeout: float) -> None:
        """Read and discard the rest of a refused body, so that the client reads our
        answer instead of failing with a broken pipe while it still writes."""
        discarded = 0
        with trio.move_on_after(timeout):
            while discarded < max_bytes:
                try:
                    event = await self._next_event()
                except h11.RemoteProtocolError:
                    return
                if not isinstance(event, h11.Data):
                    return  # end of the body, or the client closed
                discarded += len(event.data)

    async def _next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.conn.they_are_waiting_for_100_continue:
                await self._send(h11.InformationalResponse(status_code=100, headers=[]))
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if data and self._phase == "idle":
                self._enter("head", self.server.header_timeout)
            self.conn.receive_data(data)

    async def _read_request(self) -> Request | None:
        event = await self._next_event()
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request)
        head = event
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
        if self.transport == "tcp":
            self.server.authorize(headers)  # before any of the body is read
        limit = self.server.max_body_bytes
        length = headers.get("content-length")
        if length is not None and int(length) > limit:
            raise _too_large(limit, int(length))
        self._enter("body", self.server.body_timeout)
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.EndOfMessage):
                break
            if isinstance(event, h11.ConnectionClosed):
                return None
            assert isinstance(event, h11.Data)
            size += len(event.data)
            if size > limit:
                raise _too_large(limit, size)
            chunks.append(bytes(event.data))
        target = urllib.parse.urlsplit(head.target.decode("latin-1"))
        return Request(
            method=head.method.decode("ascii").upper(),
            path=urllib.parse.unquote(target.path) or "/",
            query=dict(urllib.parse.parse_qsl(target.query, keep_blank_values=True)),
            headers=headers,
            body=b"".join(chunks),
            transport=self.transport,
        )

    async def _respond(self, status: int, body: Any, *, close: bool = False) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # h11 will not let us answer (e.g. we already did); just close
        if isinstance(body, ApiError):
            body = body.body()
        if isinstance(body, Text):
            payload = body.body.encode() if isinstance(body.body, str) else body.body
            content_type = body.content_type
        else:
            try:
                payload = (json.dumps(body, ensure_ascii=False) + "\n").encode()
            except (TypeError, ValueError):
                log.exception("control API handler returned a body that is not JSON-able")
                status = 500
                payload = (json.dumps(ApiError(
                    500, "internal", "the handler returned a body that is not JSON-able",
                    "the node's log has the details; please report it",
                ).body()) + "\n").encode()  # fmt: skip
            content_type = JSON_TYPE
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(payload))),
            ("Server", SERVER_NAME.decode()),
        ]
        if status == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="benchsync"'))
        if close:
            headers.append(("Connection", "close"))
        await self._send(h11.Response(status_code=status, headers=headers))
        await self._send(h11.Data(data=payload))
        await self._send(h11.EndOfMessage())

    async def _send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            # A client that does not read its answer must not hold its slot forever.
            with trio.move_on_after(self.server.send_timeout) as scope:
                await self.stream.send_all(data)
            if scope.cancelled_caught:
                raise trio.BrokenResourceError("the client does not read its answer")


def _too_large(limit: int, got: int) -> ApiError:
    return ApiError(
        413, "too_large", f"request body too large: {got} bytes, limit {limit}",
        "send fewer records per request",
    )  # fmt: skip


async def _refuse_busy(stream: trio.abc.Stream, limit: int) -> None:
    """Answer 503 on a TCP connection over the limit, without reading its request."""
    error = ApiError(
        503, "busy", f"the control API's TCP listener serves at most {limit} connections at once",
        "retry in a moment, close idle connections, or use the Unix socket",
    )  # fmt: skip
    payload = (json.dumps(error.body()) + "\n").encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        f"Content-Type: {JSON_TYPE}\r\nContent-Length: {len(payload)}\r\n"
        f"Server: {SERVER_NAME.decode()}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    with trio.move_on_after(REFUSE_TIMEOUT), contextlib.suppress(trio.BrokenResourceError,
                                                                 trio.ClosedResourceError):
        await stream.send_all(head.encode("ascii") + payload)


async def open_tcp_listeners(
    address: tuple[str, int],
    failed: Callable[[str, str], Exception],
    *,
    other_port: str,
    other_address: str,
) -> list[trio.SocketListener]:
    """Listeners on `address` (host, port), for this server and the dashboard's.

    When it cannot be listened on, raises `failed(reason, hint)`; the hint ends
    with `other_port` (how to pick another port) when the port is in use, else
    it is `other_address` (how to pick an address of this machine).
    """
    host, port = address
    try:
        return list(await trio.open_tcp_listeners(port, host=host, backlog=BACKLOG))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            reason = "the port is in use"
            hint = f"stop the program using it (`ss -ltnp` shows it), or {other_port}"
        else:
            reason, hint = f"cannot listen: {e.strerror or e}", other_address
        raise failed(reason, hint) from e


async def _open_tcp_listeners(
    socket_path: Path, address: tuple[str, int]
) -> list[trio.SocketListener]:
    """Listen on the control API's TCP address; `ControlTCPError` when it cannot."""
    return await open_tcp_listeners(
        address, partial(ControlTCPError, socket_path, address),
        other_port="set control_tcp (BENCHSYNC_CONTROL_TCP) to another port",
        other_address="set control_tcp (BENCHSYNC_CONTROL_TCP) to an address of this machine",
    )  # fmt: skip


async def _open_unix_listener(path: Path, group: str | None = None) -> trio.SocketListener:
    """Bind a Unix socket at `path` (mode 0600), replacing a stale socket file; with a
    `group`, hand the socket to that group and make it 0660 (`_share_with_group`)."""
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise ControlSocketError(
            path, f"path longer than {MAX_UNIX_PATH} bytes",
            "set control_socket (BENCHSYNC_CONTROL_SOCKET) to a shorter path",
        )  # fmt: skip
    if not path.parent.exists():
        try:
            path.parent.mkdir(parents=True, mode=SOCKET_DIR_MODE)
        except OSError as e:
            raise ControlSocketError(
                path, f"cannot create its directory: {e.strerror or e}",
                "set control_socket (BENCHSYNC_CONTROL_SOCKET) to a path in a writable directory",
            ) from e  # fmt: skip
    if path.is_symlink() or path.exists():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ControlSocketError(
                path, "exists and is not a socket",
                "move that file away, or set control_socket to another path",
            )  # fmt: skip
        if await _socket_is_live(path):
            raise ControlSocketInUse(
                path, "another node is already listening there",
                "stop that node (`systemctl stop benchsync` or Ctrl-C), or give this one "
                "another --home or --control-socket",
            )  # fmt: skip
        path.unlink()  # stale: left by a node that did not shut down cleanly
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask makes the socket 0600 from its creation: a chmod after bind
    # would leave a moment in which anyone could connect. The umask is
    # process-wide, so the bind is synchronous: no other task runs meanwhile.
    old_umask = os.umask(0o777 & ~SOCKET_MODE)
    try:
        sock.bind(os.fspath(path))
    except OSError as e:
        sock.close()
        raise ControlSocketError(
            path, f"cannot bind: {e.strerror}",
            "check that the directory exists and is writable by the node's user",
        ) from e  # fmt: skip
    finally:
        os.umask(old_umask)
    try:
        os.chmod(path, SOCKET_MODE)
        if group is not None:
            _share_with_group(path, group)
    except ControlSocketError:
        sock.close()
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    sock.listen(BACKLOG)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def _share_with_group(path: Path, group: str) -> None:
    """chgrp the (0600) socket to `group`, then chmod it 0660: in that order, so that
    no other group ever has access. `ControlSocketError` when the group does not
    exist or the node's user may not give the socket to it."""
    import grp

    try:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ControlSocketError(
            path, f"control_socket_group {group!r}: no such group",
            f"create it (`groupadd --system {group}`), or unset control_socket_group",
        ) from None  # fmt: skip
    try:
        os.chown(path, -1, gid)
        os.chmod(path, GROUP_SOCKET_MODE)
    except OSError as e:
        raise ControlSocketError(
            path, f"cannot give it to group {group!r}: {e.strerror or e}",
            f"make the node's user a member of {group} (the systemd unit: "
            f"SupplementaryGroups={group}), or unset control_socket_group",
        ) from e  # fmt: skip


async def _socket_is_live(path: Path) -> bool:
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.move_on_after(SOCKET_PROBE_TIMEOUT):
            await probe.connect(os.fspath(path))
            return True
        return True  # it accepted the connection attempt without completing: busy, not stale
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise ControlSocketError(
            path, f"cannot check whether a node is listening: {e.strerror}",
            "check the socket file's permissions",
        ) from e  # fmt: skip
    finally:
        probe.close()


# --- the client --------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class ControlClient:
    """Synchronous client of a node's control API, for the CLI.

    Give `socket_path` (the Unix socket) or `url` (`http://host:port` of the
    TCP listener, with `token`). `get`/`post` return the decoded JSON answer
    or raise `ControlAPIError` with the server's error shape;
    `ControlUnavailable` when no node answers.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        url: str | None = None,
        token: str | None = None,
        timeout: float = CLIENT_TIMEOUT,
    ) -> None:
        if (socket_path is None) == (url is None):
            raise ValueError("give exactly one of socket_path and url")
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.url = url
        self.token = token
        self.timeout = timeout
        if url is not None:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"control URL must look like http://HOST:PORT, got {url!r}")
            self._host, self._port = parts.hostname, parts.port or 80
            self._prefix = parts.path.rstrip("/")

    @classmethod
    def from_config(cls, config: Any, timeout: float = CLIENT_TIMEOUT) -> ControlClient:
        """A client for the node configured by a `Config` (always over its Unix socket)."""
        return cls(socket_path=config.control_socket, timeout=timeout)

    @property
    def where(self) -> str:
        return str(self.socket_path) if self.socket_path is not None else str(self.url)

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.socket_path is not None:
            return _UnixHTTPConnection(os.fspath(self.socket_path), timeout)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def available(self) -> bool:
        """Whether a node accepts connections at the address (no request is sent)."""
        conn = self._connection(min(self.timeout, SOCKET_PROBE_TIMEOUT))
        try:
            conn.connect()
            return True
        except OSError:
            return False
        finally:
            conn.close()

    def request(
        self, method: str, path: str, body: Any = None
    ) -> tuple[int, str, bytes]:
        """Send one request; (status, content type, body). Raises `ControlUnavailable`."""
        headers = {"Accept": JSON_TYPE}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = JSON_TYPE
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.url is not None:
            path = self._prefix + path
        conn = self._connection(self.timeout)
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
            return response.status, response.getheader("Content-Type", ""), data
        except (OSError, http.client.HTTPException) as e:
            raise ControlUnavailable(
                None, "unavailable", f"no answer from the node at {self.where}: {e}",
                "start the node with `benchsync up`, or check --home / the control address",
            ) from e  # fmt: skip
        finally:
            conn.close()

    def get(self, path: str) -> Any:
        """GET `path`; the decoded JSON answer."""
        return self._json(*self.request("GET", path))

    def post(self, path: str, json: Any = None) -> Any:
        """POST `json` to `path`; the decoded JSON answer."""
        return self._json(*self.request("POST", path, json))

    def get_text(self, path: str) -> str:
        """GET a text route (e.g. /metrics)."""
        status, content_type, data = self.request("GET", path)
        if status >= 400:
            self._json(status, content_type, data)  # raises with the error shape
        return data.decode("utf-8", "replace")

    def _json(self, status: int, content_type: str, data: bytes) -> Any:
        try:
            decoded = json.loads(data) if data else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ControlAPIError(
                status, "bad_response", f"the node answered {status} with a non-JSON body",
                "check that the address is a benchsync control API",
            ) from None  # fmt: skip
        if status >= 400:
            err = decoded.get("error") if isinstance(decoded, dict) else None
            if not isinstance(err, dict):
                raise ControlAPIError(status, "http_error", f"HTTP {status}")
            raise ControlAPIError(
                status, str(err.get("code", "error")), str(err.get("message", f"HTTP {status}")),
                err.get("hint"),
            )  # fmt: skip
        return decoded
