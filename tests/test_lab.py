"""Lab membership (issue 20): the sans-IO proof with bytes alone, key files, real nodes.

Real nodes on 127.0.0.1: members (one key) replicate each other; strangers
(another key) bootstrapped to a member get no block, no head and no query
answer, and no member installs a stranger's head; `open` serves a stranger
heads and blocks but not queries; a node holding current+next keys stays in
one lab with nodes holding either.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path

import pytest
import trio

from benchsync.daemon.lab import (
    LAB_KEY_FILENAME,
    MEMBER,
    STRANGER,
    LabKeyError,
    load_lab_keys,
    read_key,
    write_new_key,
)
from benchsync.daemon.query import QueryService
from benchsync.protocol.fetch import CAR_PROTOCOL_ID
from benchsync.protocol.frames import Refused, encode_json_frame
from benchsync.protocol.heads import HEAD_PROTOCOL_ID, HeadRequest, HeadResponse, HeadSession
from benchsync.protocol.lab import (
    NONCE_BYTES,
    LabChallenge,
    LabConfirm,
    LabProofError,
    LabSession,
    proof,
)
from benchsync.protocol.query import QUERY_PROTOCOL_ID
from benchsync.protocol.session import REQUESTER, RESPONDER, Refusal
from benchsync.storage.db import BenchmarkDB
from tests.session_pair import SessionPair
from tests.test_p2p import LAB_KEY, TIMEOUT, Node, head_for, make_dag, running, wait_for

ALICE = "12D3KooWAliceAliceAliceAliceAliceAliceAliceAliceAlice"
BOB = "12D3KooWBobBobBobBobBobBobBobBobBobBobBobBobBobBobBob"
MALLORY = "12D3KooWMalloryMalloryMalloryMalloryMalloryMallory1"
K1, K2, K3 = (bytes([i]) * 32 for i in (1, 2, 3))


def exchange(
    req_keys: tuple[bytes, ...], resp_keys: tuple[bytes, ...], *, req: str = ALICE,
    resp: str = BOB,
) -> tuple[LabSession, LabSession, SessionPair, list[bytes]]:  # fmt: skip
    a = LabSession(REQUESTER, keys=req_keys, me=req, peer=resp, nonce=os.urandom(NONCE_BYTES))
    b = LabSession(RESPONDER, keys=resp_keys, me=resp, peer=req, nonce=os.urandom(NONCE_BYTES))
    pair = SessionPair(a, b)
    sent = [pair.send(REQUESTER, a.challenge())]
    pair.send(RESPONDER, b.respond())
    sent.append(pair.send(REQUESTER, a.confirm()))
    pair.check()
    return a, b, pair, sent


# --- the session, bytes alone -------------------------------------------------------------


def test_members_prove_themselves_to_each_other() -> None:
    a, b, _, _ = exchange((K1,), (K1,))
    assert a.member and b.member and a.done and b.done


def test_another_key_makes_a_stranger_on_both_sides() -> None:
    a, b, pair, _ = exchange((K1,), (K2,))
    assert not a.member and not b.member
    # The key never crosses the wire, in any encoding.
    for wire in pair.wire.values():
        for key in (K1, K2):
            assert key not in wire and key.hex().encode() not in wire


def test_rotation_either_key_proves_membership() -> None:
    assert exchange((K1, K2), (K2,))[0].member
    assert exchange((K2,), (K1, K2))[1].member
    a, b, _, _ = exchange((K1, K2), (K2, K3))
    assert a.member and b.member and a.verdict == 1 and b.verdict == 0
    assert not exchange((K1, K3), (K2,))[0].member


def test_a_replayed_proof_fails() -> None:
    """The bytes of a member's challenge and confirm, recorded on one exchange and
    replayed on a new one (the responder draws a fresh nonce), do not prove membership."""
    _, _, _, (challenge_bytes, confirm_bytes) = exchange((K1,), (K1,))
    b = LabSession(RESPONDER, keys=(K1,), me=BOB, peer=ALICE, nonce=os.urandom(NONCE_BYTES))
    b.receive_data(challenge_bytes)
    b.next_event()
    b.send(b.respond())
    b.receive_data(confirm_bytes)
    assert isinstance(b.next_event(), LabConfirm)
    assert b.checked and not b.member


def test_a_relayed_proof_fails() -> None:
    """Mallory (no key) relays Bob's challenge to Alice, a member: Alice's proof names
    Mallory, so Bob rejects it even though it is a valid MAC under the lab key."""
    bob = LabSession(RESPONDER, keys=(K1,), me=BOB, peer=MALLORY, nonce=os.urandom(NONCE_BYTES))
    m_nonce = os.urandom(NONCE_BYTES)
    bob.receive_data(encode_json_frame({"nonce": m_nonce.hex()}))
    bob.next_event()
    response = bob.respond()
    bob.send(response)
    # Alice, connected to Mallory, proves herself on Mallory's exchange with the same nonces.
    alice_mac = proof(K1, role=REQUESTER, prover=ALICE, verifier=MALLORY,
                      requester_nonce=m_nonce, responder_nonce=response.nonce)
    bob.receive_data(encode_json_frame({"proofs": [alice_mac.hex()]}))
    assert isinstance(bob.next_event(), LabConfirm)
    assert bob.checked and not bob.member


def test_reflected_responder_proof_fails() -> None:
    """Bob's own responder MAC sent back to him as a requester's confirm fails (roles differ)."""
    bob = LabSession(RESPONDER, keys=(K1,), me=BOB, peer=ALICE, nonce=os.urandom(NONCE_BYTES))
    a_nonce = os.urandom(NONCE_BYTES)
    bob.receive_data(encode_json_frame({"nonce": a_nonce.hex()}))
    assert bob.next_event() == LabChallenge(a_nonce)
    response = bob.respond()
    bob.send(response)
    bob.receive_data(encode_json_frame({"proofs": [response.proofs[0].hex()]}))
    bob.next_event()
    assert bob.checked and not bob.member


@pytest.mark.parametrize("body", [
    b'{"status": "ok", "nonce": "zz", "proofs": []}',
    b'{"status": "ok", "nonce": "' + b"00" * NONCE_BYTES + b'", "proofs": []}',
    b'{"status": "ok", "nonce": "' + b"00" * NONCE_BYTES + b'", "proofs": ["ab", "cd", "ef"]}',
    b'{"status": "what"}',
])  # fmt: skip
def test_malformed_responses_are_the_peers_fault(body: bytes) -> None:
    a = LabSession(REQUESTER, keys=(K1,), me=ALICE, peer=BOB, nonce=os.urandom(NONCE_BYTES))
    a.send(a.challenge())
    a.receive_data(encode_json_frame(json.loads(body)))
    with pytest.raises(LabProofError):
        a.next_event()
    assert not a.member


def test_a_refusal_is_an_event() -> None:
    a = LabSession(REQUESTER, keys=(K1,), me=ALICE, peer=BOB, nonce=os.urandom(NONCE_BYTES))
    b = LabSession(RESPONDER, keys=(K1,), me=BOB, peer=ALICE, nonce=os.urandom(NONCE_BYTES))
    pair = SessionPair(a, b)
    pair.send(REQUESTER, a.challenge())
    pair.send(RESPONDER, Refusal("banned"))
    pair.check()
    assert pair.received[REQUESTER] == [Refusal("banned")] and not a.checked


def test_an_echoed_nonce_is_refused() -> None:
    a = LabSession(REQUESTER, keys=(K1,), me=ALICE, peer=BOB, nonce=os.urandom(NONCE_BYTES))
    a.send(a.challenge())
    a.receive_data(encode_json_frame({"status": "ok", "nonce": a.nonce.hex(),
                                      "proofs": ["00" * 32]}))  # fmt: skip
    with pytest.raises(LabProofError):
        a.next_event()


# --- key files --------------------------------------------------------------------------


def test_key_files(tmp_path: Path) -> None:
    path = tmp_path / "lab.key"
    key = write_new_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and read_key(path) == key
    with pytest.raises(LabKeyError, match="never overwritten"):
        write_new_key(path)
    path.chmod(0o644)
    with pytest.raises(LabKeyError, match="accessible by other users"):
        read_key(path)
    path.chmod(0o600)
    path.write_text("not a key\n")
    with pytest.raises(LabKeyError, match="not a benchsync lab key"):
        read_key(path)
    with pytest.raises(LabKeyError, match="does not exist"):
        read_key(tmp_path / "missing.key")
    # A fresh home gets its own key (a closed lab of one), the same on every load.
    home = tmp_path / "home"
    keys = load_lab_keys(home)
    assert len(keys) == 1 and load_lab_keys(home) == keys
    assert stat.S_IMODE((home / LAB_KEY_FILENAME).stat().st_mode) == 0o600
    nxt = tmp_path / "next.key"
    write_new_key(nxt)
    assert load_lab_keys(home, lab_key_next=nxt) == (keys[0], read_key(nxt))


# --- real nodes -------------------------------------------------------------------------


async def _ask_head(asker: Node, peer: str) -> HeadResponse:
    """Ask `peer` for its head as `asker`, bypassing asker's own refusal to ask strangers."""
    session = HeadSession(REQUESTER, responder=peer)
    with trio.fail_after(TIMEOUT):
        async with asker.p2p.streams.open_unadmitted(peer, HEAD_PROTOCOL_ID, session) as ch:
            await ch.send(HeadRequest(asker.p2p.network))
            response = await ch.expect(HeadResponse)
    assert isinstance(response, HeadResponse)
    return response


async def _wait_state(node: Node, peer: str, state: str) -> None:
    with trio.fail_after(TIMEOUT):
        while node.p2p.lab.state(peer) != state:
            await trio.sleep(0.05)  # polled: membership has no change event of its own


async def test_members_replicate_strangers_get_nothing(tmp_path: Path) -> None:
    """Two members and two strangers (one with another key, one a fresh home with its own),
    bootstrapped to a member."""
    a = Node(tmp_path, "a")
    b = Node(tmp_path, "b")
    other = secrets.token_bytes(32)
    s1 = Node(tmp_path, "s1", lab_key=other)
    s2 = Node(tmp_path, "s2", lab_key=None)  # its home's own lab.key
    async with running(a, b, s1, s2):
        for n in (b, s1, s2):
            await n.p2p.connect(a.p2p.addrs[0])
        dag_a = make_dag(a.store, os.urandom(300_000), "a")
        dag_s = make_dag(s1.store, os.urandom(300_000), "s1")
        await a.p2p.announce(head_for(a.p2p, 1, dag_a))
        await s1.p2p.announce(head_for(s1.p2p, 1, dag_s))
        await wait_for(b, lambda: b.installed(a.peer_id) is not None)
        assert a.p2p.lab.state(b.peer_id) == MEMBER and b.p2p.lab.state(a.peer_id) == MEMBER
        # The strangers were proven strangers and hung up on.
        with trio.fail_after(TIMEOUT):
            while any(str(n.peer_id) in a.p2p.connected_peers() for n in (s1, s2)):
                await trio.sleep(0.05)
        assert a.p2p.lab.strangers_seen >= 2
        # A stranger that connects again is refused on every protocol, and gets no head.
        await s1.p2p.connect(a.p2p.addrs[0])
        await _wait_state(s1, a.peer_id, STRANGER)
        for protocol in (HEAD_PROTOCOL_ID, CAR_PROTOCOL_ID, QUERY_PROTOCOL_ID):
            # Refused, or hung up on first: either way no answer.
            with pytest.raises(Exception):  # noqa: B017
                await _refused_on(s1, a.peer_id, protocol)
        assert not s1.store.has(dag_a[0]) and not s2.store.has(dag_a[0])
        assert s1.installed(a.peer_id) is None and s2.installed(a.peer_id) is None
        assert a.installed(s1.peer_id) is None and b.installed(s1.peer_id) is None
        assert a.p2p.announcer.book.get(s1.peer_id) is None
        assert b.p2p.announcer.book.get(s1.peer_id) is None


async def _refused_on(asker: Node, peer: str, protocol: str) -> None:
    """Open `protocol` to `peer` (bypassing asker's admission); raises `Refused` when refused.

    A responder refuses before reading the request, with the same refusal frame on
    every protocol, so a head session reads it whatever the protocol.
    """
    session = HeadSession(REQUESTER, responder=peer)
    with trio.fail_after(TIMEOUT):
        async with asker.p2p.streams.open_unadmitted(peer, protocol, session) as ch:
            await ch.send(HeadRequest(asker.p2p.network))
            await ch.expect(HeadResponse)


async def test_open_lab_serves_strangers_heads_and_blocks_not_queries(tmp_path: Path) -> None:
    a = Node(tmp_path, "a", open=True)
    # Open too, or it would hang up on `a`, a stranger to it.
    s = Node(tmp_path, "s", lab_key=secrets.token_bytes(32), open=True)
    queries = QueryService(a.p2p, BenchmarkDB(tmp_path / "a.duckdb"))
    queries.register()
    async with running(a, s):
        dag = make_dag(a.store, os.urandom(300_000), "a")
        head = head_for(a.p2p, 1, dag)
        a.p2p.set_local_head(head)
        await s.p2p.connect(a.p2p.addrs[0])
        await _wait_state(a, s.peer_id, STRANGER)
        got = await _ask_head(s, a.peer_id)
        assert got.head == head
        assert a.p2p.streams.admit(s.peer_id, CAR_PROTOCOL_ID) is None
        assert a.p2p.streams.admit(s.peer_id, QUERY_PROTOCOL_ID) is not None
        # We never ask a stranger anything, open or not.
        assert a.p2p.streams.admit(s.peer_id, HEAD_PROTOCOL_ID, asking=True) is not None
        # Blocks: the stranger fetches through the provider directly (its own node refuses
        # to ask a stranger, so bypass its admission: it is the server we test).
        s.p2p.lab._entries[a.peer_id].state = MEMBER  # the stranger's own view only
        await s.p2p.fetcher.fetch(dag[0], [a.peer_id])
        assert not await s.p2p.fetcher.missing(dag[0])
        with pytest.raises(Refused, match="not a member"):
            await _refused_on(s, a.peer_id, QUERY_PROTOCOL_ID)
        assert a.p2p.lab.strangers_refused >= 1
        assert {p["peer_id"]: p["membership"] for p in
                (st.to_json() for st in a.p2p.peers())}[s.peer_id] == STRANGER  # fmt: skip
    queries.close()


async def test_rotation_with_overlapping_keys_converges(tmp_path: Path) -> None:
    """a holds the current key and the next; b only the current; c only the next."""
    nxt = secrets.token_bytes(32)
    a = Node(tmp_path, "a", lab_key=LAB_KEY, lab_key_next=nxt)
    b = Node(tmp_path, "b", lab_key=LAB_KEY)
    c = Node(tmp_path, "c", lab_key=nxt)
    async with running(a, b, c):
        await b.p2p.connect(a.p2p.addrs[0])
        await c.p2p.connect(a.p2p.addrs[0])
        dag_b = make_dag(b.store, os.urandom(200_000), "b")
        dag_c = make_dag(c.store, os.urandom(200_000), "c")
        await b.p2p.announce(head_for(b.p2p, 1, dag_b))
        await c.p2p.announce(head_for(c.p2p, 1, dag_c))
        await wait_for(a, lambda: a.installed(b.peer_id) is not None
                       and a.installed(c.peer_id) is not None)  # fmt: skip
        assert a.p2p.lab.state(b.peer_id) == MEMBER and a.p2p.lab.state(c.peer_id) == MEMBER
        assert c.p2p.lab.state(a.peer_id) == MEMBER
