"""`benchsync get`, pins of what it fetched, and `restore` from the network: real processes.

Two `benchsync up` nodes on 127.0.0.1 in different labs (strangers: between
them blocks move only over Bitswap), the serving one with `bitswap_serve =
all`. The CLI runs as a child process, through the running node or, with no
node on its data directory, as its own short-lived client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from multiformats import CID

from benchsync.daemon.control import ControlAPIError
from benchsync.daemon.demo import NodeProcess, free_port, lab_key_file
from benchsync.storage import unixfs
from benchsync.storage.dataset import LocalDataset
from benchsync.storage.snapshot import missing_blocks
from tests.waiting import wait_for

pytestmark = pytest.mark.slow  # real node processes and CLI commands

CLI_TIMEOUT = 120.0  # seconds for one CLI command on a loaded machine
NETWORK = "lab"


def cli(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCHSYNC_")}
    r = subprocess.run(
        [sys.executable, "-m", "benchsync.daemon.cli", *args, "--home", str(home)],
        env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT,
    )  # fmt: skip
    if check:
        assert r.returncode == 0, f"benchsync {' '.join(args)} failed:\n{r.stderr}"
    return r


def cli_on_tty(home: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """`cli` with stderr on a pseudo-terminal (where progress bars are drawn); and what
    the terminal showed."""
    import pty

    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCHSYNC_")}
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchsync.daemon.cli", *args, "--home", str(home)],
            env=env, stdout=subprocess.PIPE, stderr=follower, text=True,
        )  # fmt: skip
        os.close(follower)
        shown = bytearray()
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        out, _ = proc.communicate(timeout=CLI_TIMEOUT)
    finally:
        os.close(leader)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
    return r, shown.decode(errors="replace")


def make_tree(path: Path) -> Path:
    """A directory as a user would `ipfs add -r`: a multi-chunk file, a nested small one."""
    (path / "sub").mkdir(parents=True)
    (path / "weights.bin").write_bytes(os.urandom(3 * 256 * 1024 + 777))
    (path / "sub" / "README").write_text("hello from another lab\n")
    return path


def same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*"))
    files_b = sorted(p.relative_to(b) for p in b.rglob("*"))
    return files_a == files_b and all(
        (a / p).read_bytes() == (b / p).read_bytes() for p in files_a if (a / p).is_file()
    )


def node(tmp: Path, name: str, lab: str, *extra: str, bootstrap: list[str] | None = None
         ) -> NodeProcess:  # fmt: skip
    return NodeProcess(
        home=tmp / name, port=free_port(), network=NETWORK, lab_key=lab_key_file(tmp / lab),
        bootstrap=bootstrap or [],
        extra_args=["--snapshot-after-writes", "0", "--snapshot-interval", "0", *extra],
    )  # fmt: skip


@pytest.fixture
def nodes() -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    yield started
    for n in started:
        n.stop()


def start(nodes: list[NodeProcess], *new: NodeProcess) -> None:
    for n in new:
        n.start()
        nodes.append(n)
    for n in new:
        n.wait_ready()


def held(home: Path, peer_id: str, root: CID) -> bool:
    with LocalDataset(home, peer_id) as ds:
        return ds.blocks.has(root) and not missing_blocks(ds.blocks, root)


def serving_node(tmp: Path, src: Path) -> tuple[NodeProcess, CID]:
    """Node A of lab-a, serving all over Bitswap, holding (pinned) what `ipfs add -r src`
    would have made."""
    a = node(tmp, "a", "lab-a", "--bitswap-serve", "all")
    with LocalDataset(a.home, a.peer_id) as ds:
        root = unixfs.add_path(src, ds.blocks.put)
        ds.pin(root)  # else A's own GC could collect it
    return a, root


def test_get_through_the_node_writes_a_directory_only_another_lab_holds(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    src = make_tree(tmp_path / "src")
    a, root = serving_node(tmp_path, src)
    b = node(tmp_path, "b", "lab-b")
    start(nodes, a, b)
    out = tmp_path / "out"
    r, terminal = cli_on_tty(b.home, "get", str(root), "-o", str(out), "--peer", a.addr)
    assert r.returncode == 0 and r.stdout.strip() == str(out), terminal
    assert same_tree(src, out)
    # The bar on a terminal ends with what the node fetched: every block of the DAG.
    with LocalDataset(a.home, a.peer_id) as ds:
        dag_bytes = sum(len(data) for _, data in unixfs.walk(ds.blocks.get, root))
    last = terminal.replace("\r", "\n").strip().splitlines()[-1]
    assert f"get {str(root)[:16]}... {dag_bytes / 1e6:.1f} MB " in last, terminal
    again = cli(b.home, "get", str(root), "-o", str(tmp_path / "out2"), "--json")
    doc = json.loads(again.stdout)
    assert doc["already_present"] and doc["blocks"] == 0  # resumable: nothing fetched twice
    assert doc["path"] == str(tmp_path / "out2") and doc["written_bytes"] == 3 * 256 * 1024 + 800
    assert same_tree(src, tmp_path / "out2")
    r = cli(b.home, "get", str(root), "-o", str(out), check=False)
    assert r.returncode == 1 and "already exists" in r.stderr and "Try:" in r.stderr
    # The running node pins any complete DAG, not only its versions.
    assert cli(b.home, "pin", "add", str(root)).stdout.strip() == str(root)


def test_get_without_a_node_and_pins_keep_what_it_fetched_through_gc(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    src = make_tree(tmp_path / "src")
    a, root = serving_node(tmp_path, src)
    start(nodes, a)
    # No node on C's data directory: get runs its own client, with the home's lab key.
    c = tmp_path / "c"
    subprocess.run([sys.executable, "-m", "benchsync.daemon.cli", "init", "--home", str(c)],
                   capture_output=True, check=True, timeout=CLI_TIMEOUT)  # fmt: skip
    cli(c, "get", str(root), "-o", str(tmp_path / "out"), "--peer", a.addr)
    assert same_tree(src, tmp_path / "out")
    c_id = _peer_id(c)
    # A pin keeps a fetched DAG through gc; unpinned, gc collects it.
    assert cli(c, "pin", "add", str(root)).stdout.strip() == str(root)
    assert str(root) in cli(c, "pin", "ls").stdout
    cli(c, "gc")
    assert held(c, c_id, root)
    cli(c, "pin", "rm", str(root))
    cli(c, "gc")
    assert not held(c, c_id, root)


def _peer_id(home: Path) -> str:
    from benchsync.daemon.identity import load_or_create_identity, peer_id_of

    return peer_id_of(load_or_create_identity(home))


def test_get_of_a_cid_nobody_holds_says_what_to_try(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    a = node(tmp_path, "a", "lab-a", "--bitswap-serve", "all")
    b = node(tmp_path, "b", "lab-b")
    start(nodes, a, b)
    nobody = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
    r = cli(b.home, "get", nobody, "--peer", a.addr, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "Error:" in r.stderr and "no peer has block" in r.stderr and "Try:" in r.stderr
    r = cli(b.home, "get", "not-a-cid", check=False)
    assert r.returncode == 1 and "is not a CID" in r.stderr and "Try:" in r.stderr
    with pytest.raises(ControlAPIError) as e:  # a bounded number of dials per request
        b.client.post("/v1/get", {"cid": nobody, "peers": [a.addr] * 65})
    assert (e.value.status, e.value.code) == (400, "bad_request")
    for home in (b.home, tmp_path / "no-node"):  # through the node, and its own client
        r = cli(home, "get", nobody, "--peer", "/ip4/127.0.0.1/tcp/1", check=False)
        assert r.returncode == 1 and "/p2p/" in r.stderr and "Try:" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def snapshot_node(tmp: Path, nodes: list[NodeProcess]) -> tuple[NodeProcess, str]:
    """Node A of lab-a, serving all over Bitswap, with one snapshot of 3 results; its CID."""
    a = node(tmp, "a", "lab-a", "--bitswap-serve", "all")
    start(nodes, a)
    results = tmp / "results.jsonl"
    results.write_text("".join(
        json.dumps({"model_name": f"m{i}", "hardware_type": "cuda", "throughput": 100 + i})
        + "\n" for i in range(3)))  # fmt: skip
    cli(a.home, "record", "perf", "--from", str(results))
    return a, cli(a.home, "snapshot").stdout.strip()


def test_restore_fetches_a_snapshot_this_node_never_had(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    a, snap = snapshot_node(tmp_path, nodes)
    # B is in another lab (it never replicates A), serving all so it keeps A connected.
    b = node(tmp_path, "b", "lab-b", "--bitswap-serve", "all", bootstrap=[a.addr])
    start(nodes, b)
    wait_for("B connected to A",
             lambda: any(p["peer_id"] == a.peer_id for p in b.status()["peers"]))  # fmt: skip
    assert not held(b.home, b.peer_id, CID.decode(snap))

    r = cli(b.home, "restore", snap, "--json")
    restored = json.loads(r.stdout)
    rows = json.loads(cli(b.home, "query", "SELECT model_name FROM performance_results p "
                          "JOIN models m USING (model_id) ORDER BY 1", "--format",
                          "json").stdout)  # fmt: skip
    assert [row["model_name"] for row in rows] == ["m0", "m1", "m2"]
    assert restored["seq"] >= 1 and held(b.home, b.peer_id, CID.decode(snap))


def test_restore_without_a_node_says_how_and_get_then_restore_works(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    a, snap = snapshot_node(tmp_path, nodes)
    c = tmp_path / "c"
    subprocess.run([sys.executable, "-m", "benchsync.daemon.cli", "init", "--home", str(c)],
                   capture_output=True, check=True, timeout=CLI_TIMEOUT)  # fmt: skip
    r = cli(c, "restore", snap, check=False)
    assert r.returncode == 1 and "benchsync get CID --peer" in r.stderr, r.stderr
    cli(c, "get", snap, "-o", str(tmp_path / "snap"), "--peer", a.addr)
    cli(c, "restore", snap)
    n = json.loads(cli(c, "query", "SELECT count(*) AS n FROM performance_results",
                       "--format", "json").stdout)[0]["n"]  # fmt: skip
    assert n == 3
