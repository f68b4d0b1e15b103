"""A client that goes away cancels its request (issue 17): a slow local query whose
client disconnects stops at once, and its sandbox worker process is killed, instead
of running to the query time limit. Over a real node's Unix socket."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import psutil
import trio
from test_node import call, make_node

from benchsync.daemon.control import ControlClient

QUERY_TIMEOUT = 300.0  # seconds: the node's own limit, far beyond the test's deadlines
# Minutes of work for DuckDB: the query must still run when the client leaves.
SLOW_SQL = "SELECT count(*) FROM range(100000000) a, range(100000) b WHERE a.range + b.range = -1"
STARTED_WITHIN = 60.0  # seconds for the query to reach a sandbox worker
GONE_WITHIN = 20.0  # seconds for the worker to be killed once the client left


def busy_workers(me: psutil.Process) -> set[int]:
    """Our child processes using the CPU now (a sandbox worker running a query)."""
    busy = set()
    for child in me.children(recursive=True):
        try:
            if child.cpu_percent(interval=0.2) > 20:
                busy.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return busy


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_a_query_whose_client_leaves_is_cancelled_and_its_worker_killed(
    tmp_path: Path,
) -> None:
    node = make_node(tmp_path / "a", query_timeout=QUERY_TIMEOUT)
    me = psutil.Process()
    async with trio.open_nursery() as nursery:
        ep = await nursery.start(node.run)
        with trio.fail_after(STARTED_WITHIN):  # prestarted workers done starting up
            while await trio.to_thread.run_sync(busy_workers, me):
                await trio.sleep(0.1)
        body = json.dumps({"sql": SLOW_SQL, "scope": "local"}).encode()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(ep.socket_path))
        client.sendall(
            b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        with trio.fail_after(STARTED_WITHIN):  # the query runs in a worker now
            while not (workers := await trio.to_thread.run_sync(busy_workers, me)):
                await trio.sleep(0.1)
        client.close()  # the user pressed Ctrl-C
        # On a loaded machine another child (a worker still starting) may also look busy;
        # the query's worker is the one that stays busy, so wait for one of them to go.
        with trio.fail_after(GONE_WITHIN):
            while all(alive(pid) for pid in workers):
                await trio.sleep(0.1)
        # The node serves on, with a fresh worker for the next query.
        ok = await call(ControlClient(socket_path=ep.socket_path), "POST", "/v1/query",
                        {"sql": "SELECT 42"})  # fmt: skip
        assert ok["rows"] == [[42]]
        nursery.cancel_scope.cancel()
