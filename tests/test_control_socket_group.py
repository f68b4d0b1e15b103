"""Lab users are not root (issue 11): with `control_socket_group` the node hands its
control socket to that group, mode 0660, after bind and before it serves; the
systemd unit sets it to `benchsync`. A real `benchsync up` on a temporary socket.
"""

from __future__ import annotations

import grp
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchsync.daemon.config import load_config
from benchsync.daemon.control import GROUP_SOCKET_MODE
from benchsync.daemon.demo import NodeProcess, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
UP_TIMEOUT = 60.0  # seconds for a refused `benchsync up` to exit


def a_group_of_ours() -> grp.struct_group:
    """A group this process may give a file to, other than its own primary group when
    it can (root: any group; others: a supplementary group), so the chgrp shows."""
    primary = os.getgid()
    if os.geteuid() == 0:
        others = [g for g in grp.getgrall() if g.gr_gid != primary]
        if others:
            return others[0]
    for gid in os.getgroups():
        if gid != primary:
            return grp.getgrgid(gid)
    return grp.getgrgid(primary)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bsg-", dir="/tmp") as d:
        yield Path(d)


def test_the_socket_belongs_to_the_group_mode_0660(short_dir: Path) -> None:
    group = a_group_of_ours()
    node = NodeProcess(short_dir / "n", free_port(), "group",
                       extra_args=["--no-mdns", "--control-socket-group", group.gr_name])
    node.start()
    try:
        node.wait_ready()
        st = os.stat(node.socket_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == GROUP_SOCKET_MODE == 0o660
        assert st.st_gid == group.gr_gid and st.st_uid == os.geteuid()
        assert node.status()["peer_id"] == node.peer_id  # and it serves
    finally:
        node.stop()
    assert not node.socket_path.exists()


def test_a_group_that_does_not_exist_stops_the_node_before_ready(short_dir: Path) -> None:
    home, sock = short_dir / "n", short_dir / "c.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCHSYNC_")}
    env["BENCHSYNC_CONTROL_SOCKET_GROUP"] = "no-such-group-bsync"
    r = subprocess.run(
        [sys.executable, "-m", "benchsync.daemon.cli", "up", "--home", str(home),
         "--network", "group", "--listen", f"/ip4/127.0.0.1/tcp/{free_port()}", "--no-mdns",
         "--control-socket", str(sock)],
        capture_output=True, text=True, timeout=UP_TIMEOUT, env=env,
    )  # fmt: skip
    assert r.returncode == 1 and "ready" not in r.stdout, (r.stdout, r.stderr)
    assert "Error: " in r.stderr and "no-such-group-bsync" in r.stderr
    assert "no such group" in r.stderr and "Try: " in r.stderr and "groupadd" in r.stderr
    assert "Traceback" not in r.stderr
    assert not sock.exists()  # no half-shared socket left behind


def test_the_systemd_unit_shares_the_socket_with_group_benchsync() -> None:
    unit = (REPO / "systemd" / "benchsync.service").read_text().splitlines()
    assert "SupplementaryGroups=benchsync" in unit
    assert "RuntimeDirectoryMode=0711" in unit  # traverse only; the socket's mode decides
    assert "PrivateUsers=yes" not in unit  # it maps no group but the unit's own
    env = [line.split("=", 1)[1] for line in unit if line.startswith("Environment=")]
    setting = dict(e.split("=", 1) for e in env)
    config = load_config(Path("/nonexistent-home"), env=setting)
    assert config.control_socket_group == "benchsync"
    sysusers = (REPO / "systemd" / "benchsync.sysusers").read_text().splitlines()
    assert "g benchsync -" in sysusers
