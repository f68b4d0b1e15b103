"""Fast catch-up (issue 11, observation 5): a late joiner is current in seconds.

A node that connects to anyone learns every dataset head that peer holds
(its head response lists them) and starts fetching at once, instead of
waiting for each writer's next announcement (up to the 30 s re-announce
interval: the late joiner took up to 26 s). Each listed head carries its
writer's signed announcement (tests/test_signed_hints.py: hearsay is ignored).
The Sybil bounds still hold: a hint starts following only within
`max_followed_datasets` and the source's rate of new datasets.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import trio

from benchsync.protocol.heads import Head, NewDatasetLimiter
from tests.test_p2p import TIMEOUT, Node, head_for, make_dag, running, wait_for

CATCH_UP = 5.0  # seconds: the aim for a late joiner to be current


def has(node: Node, dataset: str, head: Head) -> bool:
    return node.installed(dataset) == head


def has_any(node: Node, datasets: list[str]) -> bool:
    return any(node.installed(d) is not None for d in datasets)


@asynccontextmanager
async def hub_holding_heads_of_gone_writers(
    tmp_path: Path,
) -> AsyncIterator[tuple[Node, dict[str, Head]]]:
    """A running hub that replicated two writers' heads; the writers are gone.

    The hub holds each writer's signed announcement (gossiped once, when the
    hub joined); the writers then leave, so the late joiner cannot hear them.
    """
    hub = Node(tmp_path, "hub", reannounce_interval=3600)
    writers = [Node(tmp_path, f"w{i}") for i in range(2)]
    heads: dict[str, Head] = {}
    async with running(hub):
        async with running(*writers):
            for w in writers:
                head = head_for(w.p2p, 1, make_dag(w.store, os.urandom(100_000), w.home.name))
                heads[w.peer_id] = head
                await w.p2p.announce(head)  # nobody hears this one: re-announced on join
                await hub.p2p.connect(w.p2p.addrs[0])
            for peer, head in heads.items():
                await wait_for(hub, partial(has, hub, peer, head))
            with trio.fail_after(TIMEOUT):
                while any(hub.p2p.announcer.signed_head(h) is None for h in heads.values()):
                    await trio.sleep(0.05)  # polled: the gossip of a known head changes no state
        yield hub, heads


async def test_a_late_joiner_installs_every_head_its_peer_holds_at_once(tmp_path: Path) -> None:
    late = Node(tmp_path, "late")
    with trio.fail_after(TIMEOUT * 2):
        async with hub_holding_heads_of_gone_writers(tmp_path) as (hub, heads), running(late):
            started = time.monotonic()
            await late.p2p.connect(hub.p2p.addrs[0])
            with trio.fail_after(CATCH_UP):
                for peer, head in heads.items():
                    await wait_for(late, partial(has, late, peer, head))
            assert time.monotonic() - started < CATCH_UP
            # Each is its writer's word: the late joiner took (and can pass on) the signature.
            for head in heads.values():
                assert late.p2p.announcer.book.get(head.dataset) == head
                assert late.p2p.announcer.signed_head(head) is not None
            assert late.p2p.announcer.unverified_hints == 0


async def test_hints_start_following_only_within_the_sybil_bounds(tmp_path: Path) -> None:
    capped = Node(tmp_path, "capped", max_followed=1)
    slow = Node(tmp_path, "slow", limiter=NewDatasetLimiter(burst=1, per_second=0.0))
    with trio.fail_after(TIMEOUT * 2):
        async with (
            hub_holding_heads_of_gone_writers(tmp_path) as (hub, heads),
            running(capped, slow),
        ):
            for node in (capped, slow):
                await node.p2p.connect(hub.p2p.addrs[0])
                await wait_for(node, partial(has_any, node, list(heads)))
                assert len(node.p2p.replica_states()) == 1
                assert node.p2p.syncer.refused_datasets >= 1
