"""Default listening and the addresses a node shows (issue 11, observations 1 and 2).

Everything here stays on 127.0.0.1 / ::1 in the host's namespace; the wildcard
listener on real separate machines is tests/test_netlab.py's.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from pathlib import Path

import pytest
import trio
from multiaddr import Multiaddr

from benchsync.daemon import host as host_mod
from benchsync.daemon.config import SETTINGS_BY_NAME, load_config
from benchsync.daemon.host import (
    DEFAULT_PORT,
    NODE_LISTEN,
    ListenError,
    check_listening,
    dialable_addrs,
    interface_addrs,
)
from benchsync.daemon.network import P2PNode
from benchsync.storage.blockstore import MemoryBlockstore

WILDCARDS = ("/ip4/0.0.0.0/", "/ip6/::/")


def test_default_is_every_interface_on_our_own_port(tmp_path: Path) -> None:
    assert DEFAULT_PORT == 4816 and DEFAULT_PORT != 4001  # Kubo's
    assert NODE_LISTEN == ["/ip4/0.0.0.0/tcp/4816", "/ip6/::/tcp/4816"]
    # config.py keeps a literal copy (it must not import libp2p): they agree.
    assert list(SETTINGS_BY_NAME["listen"].default) == NODE_LISTEN
    assert load_config(tmp_path, env={}).listen == tuple(NODE_LISTEN)
    c = load_config(tmp_path, env={"BENCHSYNC_ANNOUNCE": "/dns4/lab1.example.org/tcp/4816"})
    assert c.announce == ("/dns4/lab1.example.org/tcp/4816",)


def test_wildcards_become_interface_addresses_loopback_last() -> None:
    v4, v6 = interface_addrs()
    assert "127.0.0.1" in v4 and v4[-1] == "127.0.0.1"
    got = [str(a) for a in dialable_addrs(
        [Multiaddr("/ip4/0.0.0.0/tcp/4816"), Multiaddr("/ip6/::/tcp/4816"),
         Multiaddr("/ip4/127.0.0.1/tcp/9")],
        [Multiaddr("/dns4/lab1.example.org/tcp/4816")],
    )]  # fmt: skip
    assert not any(w in a for a in got for w in WILDCARDS)
    routable4 = [f"/ip4/{ip}/tcp/4816" for ip in v4 if ip != "127.0.0.1"]
    assert got[: len(routable4)] == routable4  # IPv4 first: users copy the first address
    announced = got.index("/dns4/lab1.example.org/tcp/4816")
    assert all(a.startswith(("/ip4/127.", "/ip6/::1/")) for a in got[announced + 1 :])
    assert got[-3:] == ["/ip4/127.0.0.1/tcp/4816", "/ip4/127.0.0.1/tcp/9", "/ip6/::1/tcp/4816"]
    assert len(got) == len(set(got))
    for ip in v6:  # link-local ones carry their zone
        assert any(a.endswith(f"/ip6/{ip.split('%')[0]}/tcp/4816") for a in got)


def test_link_local_only_when_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = [("127.0.0.1", "lo"), ("::1", "lo"), ("169.254.3.4", "eth0"), ("fe80::1", "eth0")]
    monkeypatch.setattr(host_mod, "_ifaddr_addrs", lambda: raw)
    assert interface_addrs() == (["169.254.3.4", "127.0.0.1"], ["fe80::1%eth0", "::1"])
    got = [str(a) for a in dialable_addrs([Multiaddr("/ip6/::/tcp/1")])]
    assert got == ["/ip6zone/eth0/ip6/fe80::1/tcp/1", "/ip6/::1/tcp/1"]
    raw += [("10.1.2.3", "eth1"), ("fd00::5", "eth1")]
    assert interface_addrs() == (["10.1.2.3", "127.0.0.1"], ["fd00::5", "::1"])


def test_interfaces_without_netlink_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd's RestrictAddressFamilies (no AF_NETLINK) makes getifaddrs fail: the
    ioctl + /proc fallback finds the same addresses."""
    expected = interface_addrs()

    def no_netlink() -> list[tuple[str, str]]:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    monkeypatch.setattr(host_mod, "_ifaddr_addrs", no_netlink)
    v4, v6 = interface_addrs()
    assert v4 == expected[0]
    assert {ipaddress.ip_address(a.split("%")[0]) for a in v6} == {
        ipaddress.ip_address(a.split("%")[0]) for a in expected[1]
    }


def _node(tmp_path: Path, listen: list[str], announce: list[str] | None = None) -> P2PNode:
    return P2PNode(tmp_path, network="lab", blockstore=MemoryBlockstore(), listen=listen,
                   announce=announce)  # fmt: skip


async def test_addrs_and_announce_of_a_running_node(tmp_path: Path) -> None:
    node = _node(tmp_path, ["/ip4/127.0.0.1/tcp/0"], ["/dns4/lab1.example.org/tcp/4816"])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            check_listening(node.host, node.listen)
            addrs = node.addrs
            assert addrs[0] == f"/dns4/lab1.example.org/tcp/4816/p2p/{node.peer_id}"
            assert addrs[1].startswith("/ip4/127.0.0.1/tcp/") and len(addrs) == 2
            node.stop()


def _no_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sockets as on a kernel without IPv6: AF_INET6 is not supported."""
    real = trio.socket.socket

    def socket_(family: int = socket.AF_INET, *args: object, **kw: object) -> object:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(family, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(trio.socket, "socket", socket_)


@pytest.mark.parametrize("best_effort", [True, False])
async def test_ipv6_default_is_best_effort_explicit_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, best_effort: bool
) -> None:
    _no_ipv6(monkeypatch)
    v6 = "/ip6/::1/tcp/0"
    node = _node(tmp_path, ["/ip4/127.0.0.1/tcp/0", v6])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            if best_effort:  # as the default's /ip6/::/tcp/4816 is
                check_listening(node.host, node.listen, best_effort={v6})
                assert all("/ip4/127.0.0.1/" in a for a in node.addrs)
            else:
                with pytest.raises(ListenError, match="not supported"):
                    check_listening(node.host, node.listen)
            node.stop()


async def test_nothing_bound_is_an_error_even_if_best_effort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_ipv6(monkeypatch)
    v6 = "/ip6/::1/tcp/0"
    node = _node(tmp_path, [v6])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            with pytest.raises(ListenError):
                check_listening(node.host, node.listen, best_effort={v6})
            node.stop()
