"""The control API over its real Unix socket and TCP listener, with the real client."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from benchsync.daemon.config import load_config
from benchsync.daemon.control import (
    ApiError,
    ControlAPIError,
    ControlClient,
    ControlEndpoints,
    ControlServer,
    ControlSocketError,
    ControlSocketInUse,
    ControlUnavailable,
    Request,
    Router,
    Text,
)
from benchsync.daemon.metrics import CONTENT_TYPE, Metrics

TOKEN = "s3cret-token-0123456789"
TIMEOUT = 10  # seconds; every test is bounded by this


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 107-byte limit of a Unix socket path.
    with tempfile.TemporaryDirectory(prefix="bsc-", dir="/tmp") as d:
        yield Path(d)


def make_router() -> Router:
    router = Router()

    async def status(request: Request) -> tuple[int, Any]:
        return 200, {"ok": True, "transport": request.transport, "query": dict(request.query)}

    async def echo(request: Request) -> tuple[int, Any]:
        return 201, {"got": request.json()}

    async def replica(request: Request) -> tuple[int, Any]:
        if request.params["peer"] == "missing":
            raise ApiError(404, "no_replica", "no replica of peer missing", "run benchsync peers")
        return 200, {"peer": request.params["peer"]}

    async def boom(request: Request) -> tuple[int, Any]:
        raise RuntimeError("handler bug")

    async def text(request: Request) -> tuple[int, Any]:
        return 200, Text("plain words\n")

    async def history(request: Request) -> tuple[int, Any]:
        return 200, {"limit": request.query_int("limit", minimum=1)}

    router.add("GET", "/v1/status", status)
    router.add("POST", "/v1/echo", echo)
    router.add("GET", "/v1/replicas/{peer}", replica)
    router.add("GET", "/v1/boom", boom)
    router.add("GET", "/v1/text", text)
    router.add("GET", "/v1/history", history)
    return router


@asynccontextmanager
async def serving(sock_dir: Path, **kw: Any) -> AsyncIterator[ControlEndpoints]:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = ControlServer(kw.pop("router", None) or make_router(),
                                   sock_dir / "control.sock", **kw)
            endpoints = await nursery.start(server.run)
            yield endpoints
            nursery.cancel_scope.cancel()


async def call(client: ControlClient, method: str, *args: Any) -> Any:
    """Run the synchronous client in a thread so the server keeps serving."""
    return await trio.to_thread.run_sync(getattr(client, method), *args)


async def raw(path: Path, data: bytes) -> bytes:
    """Send raw bytes on the Unix socket; everything received until the server closes."""
    stream = await trio.open_unix_socket(os.fspath(path))
    async with stream:
        await stream.send_all(data)
        out = b""
        while chunk := await stream.receive_some(65536):
            out += chunk
        return out


async def test_json_routes_over_the_unix_socket(sock_dir: Path) -> None:
    async with serving(sock_dir) as ep:
        assert stat.S_IMODE(os.stat(ep.socket_path).st_mode) == 0o600
        client = ControlClient(socket_path=ep.socket_path)
        assert await call(client, "get", "/v1/status?x=1") == {
            "ok": True, "transport": "unix", "query": {"x": "1"},
        }  # fmt: skip
        assert await call(client, "post", "/v1/echo", {"rows": [1, 2]}) == {"got": {"rows": [1, 2]}}
        assert await call(client, "get", "/v1/replicas/QmPeer") == {"peer": "QmPeer"}
        assert await call(client, "get_text", "/v1/text") == "plain words\n"


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nope", 404, "not_found"),
        ("POST", "/v1/status", 405, "method_not_allowed"),
        ("GET", "/v1/replicas/missing", 404, "no_replica"),
        ("GET", "/v1/boom", 500, "internal"),
    ],
)
async def test_every_error_has_the_one_shape(
    sock_dir: Path, method: str, path: str, status: int, code: str
) -> None:
    async with serving(sock_dir) as ep:
        client = ControlClient(socket_path=ep.socket_path)
        with pytest.raises(ControlAPIError) as info:
            await call(client, "post" if method == "POST" else "get", path)
        assert (info.value.status, info.value.code) == (status, code)
        assert info.value.message and info.value.hint
        # The raw body is exactly the documented shape.
        got_status, ctype, body = await call(client, "request", method, path)
        assert got_status == status and ctype == "application/json"


        assert set(json.loads(body)) == {"error"}
        assert set(json.loads(body)["error"]) == {"code", "message", "hint"}


async def test_bad_json_is_a_400(sock_dir: Path) -> None:
    async with serving(sock_dir) as ep:
        reply = await raw(
            ep.socket_path,
            b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Connection: close\r\n\r\n{nope",
        )
        assert reply.startswith(b"HTTP/1.1 400 ")
        assert b'"code": "bad_json"' in reply


async def test_handler_exception_is_logged_and_server_survives(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(sock_dir) as ep:
        client = ControlClient(socket_path=ep.socket_path)
        with caplog.at_level(logging.ERROR), pytest.raises(ControlAPIError):
            await call(client, "get", "/v1/boom")
        assert "handler bug" in caplog.text
        assert (await call(client, "get", "/v1/status"))["ok"] is True


async def test_body_over_the_limit_is_a_413(sock_dir: Path) -> None:
    async with serving(sock_dir, max_body_bytes=1000) as ep:
        client = ControlClient(socket_path=ep.socket_path)
        with pytest.raises(ControlAPIError) as info:
            await call(client, "post", "/v1/echo", {"blob": "x" * 2000})
        assert info.value.status == 413 and info.value.code == "too_large"
        assert "limit 1000" in info.value.message
        # A body much larger than the socket buffers still gets the 413, not a broken pipe.
        with pytest.raises(ControlAPIError) as info:
            await call(client, "post", "/v1/echo", {"blob": "x" * 3_000_000})
        assert info.value.status == 413
        # Chunked bodies have no Content-Length; the limit still holds.
        chunk = b"x" * 800
        reply = await raw(
            ep.socket_path,
            b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (b"320\r\n" + chunk + b"\r\n") * 2 + b"0\r\n\r\n",
        )
        assert reply.startswith(b"HTTP/1.1 413 ")
        assert await call(client, "post", "/v1/echo", {"small": 1}) == {"got": {"small": 1}}


async def test_slow_request_gets_408_and_idle_connection_is_closed(sock_dir: Path) -> None:
    async with serving(sock_dir, header_timeout=0.3, idle_timeout=0.3) as ep:
        with trio.fail_after(5):
            reply = await raw(ep.socket_path, b"GET /v1/status HTTP/1.1\r\nHost:")
        assert reply.startswith(b"HTTP/1.1 408 ")
        with trio.fail_after(5):
            assert await raw(ep.socket_path, b"") == b""  # closed quietly, no answer


async def test_malformed_http_is_a_400(sock_dir: Path) -> None:
    async with serving(sock_dir) as ep:
        reply = await raw(ep.socket_path, b"this is not http\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400 ")
        assert b'"code": "bad_request"' in reply


async def test_keep_alive_serves_several_requests_on_one_connection(sock_dir: Path) -> None:
    async with serving(sock_dir) as ep:
        one = b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n"
        last = b"GET /v1/replicas/p2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        reply = await raw(ep.socket_path, one + one + last)
        assert reply.count(b"HTTP/1.1 200 ") == 3
        assert b'"peer": "p2"' in reply


async def test_metrics_route_serves_prometheus_text(sock_dir: Path) -> None:
    metrics = Metrics()
    metrics.writes.inc(5)
    router = Router()

    async def handler(request: Request) -> tuple[int, Text]:
        return 200, Text(metrics.render(), CONTENT_TYPE)

    router.add("GET", "/metrics", handler)
    async with serving(sock_dir, router=router) as ep:
        client = ControlClient(socket_path=ep.socket_path)
        status, ctype, body = await call(client, "request", "GET", "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        assert b"benchsync_records_written_total 5.0" in body


async def test_tcp_listener_requires_the_token(sock_dir: Path) -> None:
    async with serving(sock_dir, tcp=("127.0.0.1", 0), token=TOKEN) as ep:
        assert ep.tcp_address is not None
        host, port = ep.tcp_address
        url = f"http://{host}:{port}"
        for token in (None, "wrong-token-0123456789", TOKEN[:-1]):
            with pytest.raises(ControlAPIError) as info:
                await call(ControlClient(url=url, token=token), "get", "/v1/status")
            assert info.value.status == 401 and info.value.code == "unauthorized"
        ok = await call(ControlClient(url=url, token=TOKEN), "get", "/v1/status")
        assert ok["transport"] == "tcp"
        # The Unix socket needs no token: its file mode is the access control.
        assert (await call(ControlClient(socket_path=ep.socket_path), "get", "/v1/status"))["ok"]


def test_tcp_without_token_is_refused(sock_dir: Path) -> None:
    with pytest.raises(ValueError, match="token"):
        ControlServer(Router(), sock_dir / "c.sock", tcp=("127.0.0.1", 0))


async def test_stale_socket_is_replaced_and_removed_on_exit(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fspath(path))  # bound, never listening: what a crashed node leaves
    stale.close()
    client = ControlClient(socket_path=path)
    assert not await call(client, "available")
    async with serving(sock_dir):
        assert await call(client, "available")
        assert (await call(client, "get", "/v1/status"))["ok"]
    assert not path.exists()
    assert not await call(client, "available")
    with pytest.raises(ControlUnavailable) as info:
        await call(client, "get", "/v1/status")
    assert info.value.code == "unavailable" and "benchsync up" in (info.value.hint or "")


async def test_refuses_to_start_when_another_node_listens(sock_dir: Path) -> None:
    async with serving(sock_dir) as ep:
        second = ControlServer(make_router(), ep.socket_path)
        with pytest.raises(ControlSocketInUse, match="another node"):
            await second.run()
        # The first node is unharmed.
        assert (await call(ControlClient(socket_path=ep.socket_path), "get", "/v1/status"))["ok"]


async def test_refuses_to_replace_a_regular_file(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    path.write_text("precious")
    with pytest.raises(ControlSocketError, match="not a socket"):
        await ControlServer(make_router(), path).run()
    assert path.read_text() == "precious"


def test_router_rejects_duplicate_routes() -> None:
    router = make_router()
    with pytest.raises(ValueError, match="already registered"):
        router.add("GET", "/v1/status", make_router().resolve("GET", "/v1/status")[0])


async def test_server_from_config_serves_socket_and_tcp(sock_dir: Path) -> None:
    env = {
        "BENCHSYNC_CONTROL_SOCKET": str(sock_dir / "node.sock"),
        "BENCHSYNC_CONTROL_TCP": "127.0.0.1:0",
        "BENCHSYNC_CONTROL_TOKEN": TOKEN,
    }
    config = load_config(sock_dir, env=env)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            ep = await nursery.start(ControlServer.from_config(make_router(), config).run)
            assert ep.socket_path == sock_dir / "node.sock"
            assert await call(ControlClient.from_config(config), "get", "/v1/status")
            assert ep.tcp_address is not None
            url = f"http://127.0.0.1:{ep.tcp_address[1]}"
            client = ControlClient(url=url, token=config.control_token)
            got = await call(client, "get", "/v1/status")
            assert got["transport"] == "tcp"
            nursery.cancel_scope.cancel()
