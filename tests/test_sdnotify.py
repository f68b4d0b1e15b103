"""sd_notify against a real datagram socket the test listens on."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from benchsync.daemon.sdnotify import Notifier, run_watchdog


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's notify socket (a path)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.setblocking(False)
    yield sock, path
    sock.close()


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on `sock`, decoded."""
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_ready_status_stopping_reach_the_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("serving on /ip4/127.0.0.1/tcp/4001")
    assert n.status("3 peers")
    assert n.stopping()
    assert received(sock) == [
        "READY=1\nSTATUS=serving on /ip4/127.0.0.1/tcp/4001",
        "STATUS=3 peers",
        "STOPPING=1",
    ]


def test_abstract_socket() -> None:
    name = f"benchsync-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setblocking(False)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert received(sock) == ["READY=1"]
    finally:
        sock.close()


def test_no_notify_socket_is_a_no_op(listener: tuple[socket.socket, str]) -> None:
    sock, _ = listener
    n = Notifier({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert n.ready() is False and n.watchdog() is False
    assert n.watchdog_interval is None  # no manager to ping, even with a watchdog set
    assert received(sock) == []


def test_a_vanished_manager_does_not_raise(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.ready() is False


def test_multiline_values_are_refused(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    with pytest.raises(ValueError, match="one line"):
        Notifier({"NOTIFY_SOCKET": path}).status("two\nlines")
    assert received(sock) == []


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "10000000"}, 5.0),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}, 5.0),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    listener: tuple[socket.socket, str], env: dict[str, str], interval: float | None
) -> None:
    _, path = listener
    assert Notifier({"NOTIFY_SOCKET": path, **env}).watchdog_interval == interval


async def test_watchdog_pings_at_half_the_timeout(
    listener: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock
) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000"})  # 10 s watchdog
    async with trio.open_nursery() as nursery:
        await nursery.start(run_watchdog, n)
        start = trio.current_time()
        seen: list[tuple[float, int]] = []
        for t in (0.0, 4.999, 5.001, 9.999, 10.001, 25.001):
            await trio.sleep_until(start + t)
            seen.append((t, len(received(sock))))
        nursery.cancel_scope.cancel()
    # One ping on start, then one every 5 s (virtual time).
    assert seen == [(0.0, 1), (4.999, 0), (5.001, 1), (9.999, 0), (10.001, 1), (25.001, 3)]


async def test_watchdog_without_watchdog_returns(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_watchdog, Notifier({"NOTIFY_SOCKET": path}))
    assert received(sock) == []
