"""The announcer's re-announce schedule on trio's virtual clock, at exact virtual times.

The schedule is `Announcer._reannounce_loop`; it publishes through the
announcer's pubsub, which is swapped for a recorder here (a real host, never
started: the timers are the subject, gossip is tested in test_heads).
"""

from __future__ import annotations

import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair

from benchsync.daemon.announce import JOIN_ANNOUNCE_DELAY, Announcer
from benchsync.daemon.host import AccessPolicy, new_benchsync_host
from benchsync.daemon.streams import StreamAdapter
from benchsync.protocol.heads import Head, encode_head
from benchsync.storage.cid import RAW, block_cid

NETWORK = "lab"
INTERVAL = 5.0  # seconds: the re-announce interval under test


class Recorder:
    """Stands in for the announcer's pubsub: records when each head went out."""

    def __init__(self) -> None:
        self.published: list[tuple[float, bytes]] = []

    async def publish(self, topic: str, data: bytes) -> None:
        self.published.append((trio.current_time(), data))


def announcer() -> tuple[Announcer, Recorder]:
    host = new_benchsync_host(create_new_key_pair())
    policy = AccessPolicy()

    async def on_head(head: Head, peer: str) -> None:
        pass

    a = Announcer(host, network=NETWORK, policy=policy,
                  streams=StreamAdapter(host, network=NETWORK, policy=policy),
                  on_head=on_head, reannounce_interval=INTERVAL)  # fmt: skip
    recorder = Recorder()
    a.pubsub = recorder  # type: ignore[assignment]
    return a, recorder


def head(a: Announcer, seq: int) -> Head:
    root = block_cid(RAW, f"version {seq}".encode())
    return Head(a.my_id, seq, root, root, 0.0, 1000)


async def test_reannounces_every_interval_and_restarts_it_after_a_publish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, recorder = announcer()
    start = trio.current_time()

    def times() -> list[float]:
        return [t - start for t, _ in recorder.published]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(a._reannounce_loop)
        await trio.sleep(7)
        assert times() == []  # no head yet: nothing to re-announce
        first = head(a, 1)
        a.set_local_head(first)
        await trio.sleep(4)  # to 11 s: the 10 s tick published it, not set_local_head
        assert times() == [10.0]
        second = head(a, 2)
        await a.announce(second)  # at 11 s: published now, the next tick moves to 16 s
        await trio.sleep(10.5)
        assert times() == [10.0, 11.0, 16.0, 21.0]
        a.announce_soon()  # at 21.5 s: a peer joined; once, JOIN_ANNOUNCE_DELAY later
        a.announce_soon()  # a second join in the window adds no publish
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert times() == [10.0, 11.0, 16.0, 21.0, 21.5 + JOIN_ANNOUNCE_DELAY, 26.0]
    assert [data for _, data in recorder.published] == [encode_head(first)] + [
        encode_head(second)
    ] * 5
