"""Peer exchange (issue 11, observation 4): every node reaches every other directly.

The protocol (`protocol/peers.py`) is tested with bytes alone; then real
libp2p nodes on 127.0.0.1: leaves that know only a hub connect to each other
within seconds, keep syncing when the hub is gone, remember their peers
across a restart (`peers.json`), and show (and log once) a peer they cannot
reach. The multi-machine cases are in test_netlab.py.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from session_pair import SessionPair

from benchsync.daemon.peers import PEERSTORE_FILE, PeerStore, describe_dial_error
from benchsync.protocol.frames import RemoteProtocolError, encode_json_frame
from benchsync.protocol.heads import Head
from benchsync.protocol.peers import (
    LOOPBACK,
    MAX_PEERS_IN_RESPONSE,
    ROUTABLE,
    UNUSABLE,
    PeerRecord,
    PeersRequest,
    PeersResponse,
    PeersSession,
    scope_of,
    shareable,
)
from benchsync.protocol.session import REQUESTER, RESPONDER, Refusal
from tests.test_p2p import TIMEOUT, Node, head_for, make_dag, running, wait_for

ALICE = "12D3KooWAoqwVx8Vb1hRqnGdwDAaH1GaDYLpfs8fZzgDGxhy4Kzs"
BOB = "12D3KooWBxc3qRz4QzjGJ3j7W6g7YQJhTZk4GTQk8kPHr7Xk9vVh"
REACH_TIMEOUT = 8.0  # seconds: a leaf reaches the other leaves "within seconds"
POLL = 0.05  # seconds between two looks at a condition


@pytest.mark.parametrize(
    ("addr", "scope"),
    [
        ("/ip4/10.77.0.2/tcp/4816", ROUTABLE),
        ("/ip6/fd00:77::2/tcp/4816", ROUTABLE),
        ("/dns4/lab-3.example/tcp/4816", ROUTABLE),
        ("/ip4/127.0.0.1/tcp/4816", LOOPBACK),
        ("/ip6/::1/tcp/4816", LOOPBACK),
        ("/ip6/::ffff:127.0.0.1/tcp/4816", LOOPBACK),
        ("/ip4/169.254.3.4/tcp/4816", UNUSABLE),
        ("/ip6/fe80::1/tcp/4816", UNUSABLE),
        ("/ip4/0.0.0.0/tcp/4816", UNUSABLE),
        ("/ip6/::/tcp/4816", UNUSABLE),
        ("/ip4/224.0.0.251/tcp/5353", UNUSABLE),
        ("/ip4/10.0.0.1/udp/4816", UNUSABLE),
        ("/ip4/10.0.0.1/tcp/0", UNUSABLE),
        ("/ip4/::1/tcp/1", UNUSABLE),
        ("/ip4/10.0.0.1/tcp/1/p2p/x", UNUSABLE),
        ("garbage", UNUSABLE),
    ],
)
def test_address_scopes(addr: str, scope: str) -> None:
    assert scope_of(addr) == scope


def test_loopback_travels_only_between_processes_of_one_machine() -> None:
    lo, lan = "/ip4/127.0.0.1/tcp/4816", "/ip4/10.77.0.2/tcp/4816"
    assert shareable(lan, same_machine=False) and shareable(lan, same_machine=True)
    assert shareable(lo, same_machine=True) and not shareable(lo, same_machine=False)
    record = PeerRecord(ALICE, (lo, lan, "/ip6/fe80::1/tcp/4816"))
    assert record.filtered(same_machine=False).addrs == (lan,)
    assert record.filtered(same_machine=True).addrs == (lo, lan)


def test_peers_session_round_trips_and_refuses() -> None:
    pair = SessionPair(PeersSession(REQUESTER), PeersSession(RESPONDER))
    pair.send(REQUESTER, PeersRequest("lab"))
    assert pair.received[RESPONDER] == [PeersRequest("lab")]
    answer = PeersResponse((PeerRecord(ALICE, ("/ip4/10.0.0.1/tcp/4816",)), PeerRecord(BOB, ())))
    pair.send(RESPONDER, answer)
    pair.close(RESPONDER)
    pair.check()

    pair = SessionPair(PeersSession(REQUESTER), PeersSession(RESPONDER))
    pair.send(REQUESTER, PeersRequest("lab"))
    pair.send(RESPONDER, Refusal("not a member"))
    pair.check()


@pytest.mark.parametrize(
    "body",
    [
        {"status": "ok"},
        {"status": "ok", "peers": "x"},
        {"status": "ok", "peers": [{"peer_id": "0OIl", "addrs": []}]},  # not base58
        {"status": "ok", "peers": [{"peer_id": ALICE, "addrs": ["/ip4/1.2.3.4/tcp/1"] * 9}]},
        {"status": "ok", "peers": [{"peer_id": ALICE, "addrs": ["/" + "x" * 300]}]},
        {"status": "ok", "peers": [{"peer_id": ALICE}]},
        {"status": "ok", "peers": [{"peer_id": ALICE, "addrs": []}] * (MAX_PEERS_IN_RESPONSE + 1)},
        {"status": "maybe", "peers": []},
    ],
)
def test_malformed_answers_are_the_peers_fault(body: dict[str, object]) -> None:
    session = PeersSession(REQUESTER)
    session.send(PeersRequest("lab"))
    session.receive_data(encode_json_frame(body, max_frame=1 << 20))
    with pytest.raises(RemoteProtocolError):
        session.next_event()


def test_dial_errors_are_one_short_line() -> None:
    try:
        try:
            raise OSError("connection refused\n  (errno 111)")
        except OSError as inner:
            raise RuntimeError("unable to connect to 12D3…, no addresses established") from inner
    except RuntimeError as e:
        text = describe_dial_error(e)
    assert "\n" not in text and "connection refused (errno 111)" in text
    assert describe_dial_error(trio.TooSlowError()) == "no answer within 10 s"


async def until(predicate: Callable[[], object], timeout: float = REACH_TIMEOUT) -> None:
    """Poll `predicate` (connections are not replica state: nothing signals them)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(POLL)


def connected(a: Node, b: Node) -> bool:
    return b.peer_id in a.p2p.connected_peers()


def disconnected(a: Node, b: Node) -> bool:
    return not connected(a, b)


def has(node: Node, dataset: str, head: Head) -> bool:
    return node.installed(dataset) == head


async def test_leaves_that_know_only_a_hub_reach_each_other_and_outlive_it(
    tmp_path: Path,
) -> None:
    hub = Node(tmp_path, "hub")
    leaves = [Node(tmp_path, f"leaf{i}", reannounce_interval=1.0) for i in range(3)]
    with trio.fail_after(TIMEOUT * 2):
        async with trio.open_nursery() as outer:
            hub_scope = trio.CancelScope()

            async def run_hub(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                with hub_scope:
                    await hub.p2p.run(task_status=task_status)

            await outer.start(run_hub)
            async with running(*leaves):
                hub_addr = hub.p2p.addrs[0]
                for leaf in leaves:
                    await leaf.p2p.connect(hub_addr)
                started = time.monotonic()
                for a in leaves:
                    for b in leaves:
                        if a is not b:
                            await until(partial(connected, a, b))
                took = time.monotonic() - started
                assert took < REACH_TIMEOUT, took

                # The first node is gone for good: the leaves still sync with each other.
                hub_scope.cancel()
                for leaf in leaves[1:]:
                    await until(partial(disconnected, leaf, hub))
                first = leaves[0]
                head = head_for(first.p2p, 1, make_dag(first.store, os.urandom(50_000), "after"))
                await first.p2p.announce(head)
                for leaf in leaves[1:]:
                    await wait_for(leaf, partial(has, leaf, first.peer_id, head))
                # The hub is known, unreachable, and shown so.
                await until(lambda: leaves[1].p2p.dial_states() != [])
                states = {d["peer_id"]: d for d in leaves[1].p2p.dial_states()}
                assert hub.peer_id in states

    # Each leaf remembered the others (a file in its home, written atomically).
    saved = json.loads((leaves[0].home / PEERSTORE_FILE).read_text())
    remembered = {p["peer_id"] for p in saved["peers"]}
    assert {leaves[1].peer_id, leaves[2].peer_id, hub.peer_id} <= remembered
    assert not list(leaves[0].home.glob(".*.tmp"))


async def test_a_restarted_node_reconnects_to_the_peers_it_remembers(tmp_path: Path) -> None:
    a, b = Node(tmp_path, "a"), Node(tmp_path, "b")
    with trio.fail_after(TIMEOUT):
        async with running(b):
            async with running(a):
                await a.p2p.connect(b.p2p.addrs[0])
                await until(lambda: b.peer_id in a.p2p.peer_exchange.book)
                await until(lambda: a.p2p.peer_exchange.book[b.peer_id].addrs != [])
            assert b.peer_id in {p.peer_id for p in PeerStore(a.home / PEERSTORE_FILE).load()}
            again = Node(tmp_path, "a")  # same home, no bootstrap, nobody dials it
            async with running(again):
                await until(lambda: connected(again, b))


async def test_an_unreachable_bootstrap_is_shown_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ghost = Node(tmp_path, "ghost")  # an identity whose node never runs
    with trio.socket.socket() as s:  # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    boot = f"/ip4/127.0.0.1/tcp/{port}/p2p/{ghost.peer_id}"
    node = Node(tmp_path, "n", bootstrap=[boot])
    caplog.set_level(logging.INFO, logger="benchsync.daemon.peers")
    with trio.fail_after(TIMEOUT):
        async with running(node):

            def failed_thrice() -> bool:
                states = node.p2p.dial_states()
                return bool(states) and states[0]["failures"] >= 3

            await until(failed_thrice, TIMEOUT)
            (state,) = node.p2p.dial_states()
            assert state["bootstrap"] and state["peer_id"] == ghost.peer_id
            assert state["last_error"] and 0 <= state["next_retry_seconds"] <= 15
    lines = [r for r in caplog.records if "cannot reach" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "bootstrap peer" in lines[0].getMessage()
