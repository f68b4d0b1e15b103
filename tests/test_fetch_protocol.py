"""The fetch protocol without a network: messages, the provider's plan, the
session's checks, and whole incremental syncs between a requester and a
provider `FetchSession` joined by an in-memory link (`SessionPair`) that
checks each side decodes exactly what the other sent."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multiformats import CID, multihash
from session_pair import SessionPair

from benchsync.protocol.fetch import (
    Block,
    BlockSequence,
    EndOfResponse,
    FetchProtocolError,
    FetchRequest,
    FetchSession,
    FetchStatus,
    ResponseTooLarge,
    expected_blocks,
    missing_blocks,
    plan_response,
)
from benchsync.protocol.frames import (
    Interrupted,
    LocalProtocolError,
    ProtocolError,
    Refused,
    RemoteProtocolError,
)
from benchsync.protocol.session import REQUESTER, RESPONDER, EndOfStream, Refusal
from benchsync.storage import car, unixfs
from benchsync.storage.blockstore import Blockstore, MemoryBlockstore

CHUNK = 256 * 1024


def make_dag(store: Blockstore, payload: bytes) -> CID:
    fcid, _, ftsize = unixfs.add_bytes(payload, store.put)
    tables, ttsize = unixfs.add_directory([("results.parquet", fcid, ftsize)], store.put)
    mcid, _, mtsize = unixfs.add_bytes(b'{"m": 1}', store.put)
    root, _ = unixfs.add_directory(
        [("manifest.json", mcid, mtsize), ("tables", tables, ttsize)], store.put
    )
    return root


def exchange(
    provider: Blockstore, root: CID, want: list[CID], *, max_response: int = 1 << 30
) -> SessionPair:
    """One request and its whole response over the link (the provider then closes)."""
    pair = SessionPair(FetchSession(REQUESTER, max_response=max_response), FetchSession(RESPONDER))
    pair.send(REQUESTER, FetchRequest("lab", root, tuple(want)))
    (request,) = pair.received[RESPONDER]
    assert isinstance(request, FetchRequest)
    size_of = lambda c: provider.size(c) if provider.has(c) else None  # noqa: E731
    send, status = plan_response(
        request.want, size_of, max_response=max_response, requester_limit=request.max_bytes
    )
    pair.send(RESPONDER, status, *(Block(c, provider.get(c)) for c in send), EndOfResponse())
    pair.close(RESPONDER)
    pair.check()
    assert isinstance(pair.received[REQUESTER][-1], EndOfStream)
    return pair


def one_round(
    requester: Blockstore, provider: Blockstore, root: CID, *, max_response: int = 1 << 30
) -> tuple[int, int]:
    """One exchange over the in-memory link; returns (blocks stored, response bytes)."""
    want = missing_blocks(root, requester.has, requester.get)
    pair = exchange(provider, root, want, max_response=max_response)
    blocks = [e for e in pair.received[REQUESTER] if isinstance(e, Block)]
    for block in blocks:
        requester.put(block.cid, block.data, verify=True)
    return len(blocks), len(pair.wire[REQUESTER])


def sync(requester: Blockstore, provider: Blockstore, root: CID, **kw: int) -> tuple[int, int]:
    rounds = wire = 0
    while missing_blocks(root, requester.has, requester.get):
        stored, nbytes = one_round(requester, provider, root, **kw)
        assert stored > 0
        rounds += 1
        wire += nbytes
    return rounds, wire


def test_fresh_sync_takes_one_round_per_level_and_copies_the_dag() -> None:
    provider, requester = MemoryBlockstore(), MemoryBlockstore()
    root = make_dag(provider, os.urandom(5 * CHUNK))
    rounds, wire = sync(requester, provider, root)
    assert rounds == 4  # root, {manifest, tables}, file node, leaves
    assert {c for c, _ in unixfs.walk(requester.get, root)} == {
        c for c, _ in unixfs.walk(provider.get, root)
    }
    dag_bytes = sum(len(d) for _, d in unixfs.walk(provider.get, root))
    assert dag_bytes < wire < dag_bytes * 1.01  # framing overhead is small


def test_incremental_sync_moves_only_new_blocks() -> None:
    provider, requester = MemoryBlockstore(), MemoryBlockstore()
    payload = os.urandom(40 * CHUNK)
    v1 = make_dag(provider, payload)
    sync(requester, provider, v1)
    v2 = make_dag(provider, payload + os.urandom(len(payload) // 100))  # +1 %
    _, wire = sync(requester, provider, v2)
    new_bytes = sum(
        len(d) for c, d in unixfs.walk(provider.get, v2) if c not in set(
            c1 for c1, _ in unixfs.walk(provider.get, v1)
        )
    )
    v2_bytes = sum(len(d) for _, d in unixfs.walk(provider.get, v2))
    assert wire < new_bytes * 1.05 + 4096
    assert wire < v2_bytes * 0.05  # ~1 chunk of 40 moved


def test_response_limit_defers_the_rest_and_the_next_round_gets_it() -> None:
    provider, requester = MemoryBlockstore(), MemoryBlockstore()
    root = make_dag(provider, os.urandom(6 * CHUNK))
    rounds, _ = sync(requester, provider, root, max_response=2 * CHUNK)
    assert rounds == 3 + 3  # three inner levels, then 6 leaves two at a time


def test_resume_after_a_cut_asks_only_for_the_rest() -> None:
    provider, requester = MemoryBlockstore(), MemoryBlockstore()
    root = make_dag(provider, os.urandom(4 * CHUNK))
    for _ in range(3):
        one_round(requester, provider, root)
    want = missing_blocks(root, requester.has, requester.get)
    assert len(want) == 4  # the leaves
    # The leaf round is cut after 2 blocks (and half of the third): the session
    # hands out the two whole blocks, then says the stream ended early.
    wire = exchange(provider, root, want).wire[REQUESTER]
    status_len = len(wire) - len(car.encode_header([root])) - sum(
        len(car.encode_section(c, provider.get(c))) for c in want
    )
    cut = wire[: status_len + len(car.encode_header([root])) + 2 * (CHUNK + 40) + CHUNK // 2]
    session = FetchSession(REQUESTER)
    session.send(FetchRequest("lab", root, tuple(want)))
    session.receive_data(cut)
    session.receive_data(b"")
    with pytest.raises(Interrupted, match="stream ended after"):
        while True:
            event = session.next_event()
            if isinstance(event, Block):
                requester.put(event.cid, event.data)
    assert len(missing_blocks(root, requester.has, requester.get)) == 2


def test_requester_rejects_unsolicited_and_excess_data() -> None:
    a, b, c = (CID.decode(s) for s in [
        "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq",
        "bafkreiaxnnnb7qz2focittuqq3ya25q7rcv3bqynnczfzako47346wosmu",
        "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",
    ])
    req = FetchRequest("lab", a, (a, b))
    with pytest.raises(FetchProtocolError, match="not requested"):
        expected_blocks(req, FetchStatus(0, 0, (c,)))
    with pytest.raises(FetchProtocolError, match="announced 3"):
        expected_blocks(req, FetchStatus(3, 10, ()))
    assert expected_blocks(req, FetchStatus(1, 5, (a,))) == [b]
    seq = BlockSequence([a], 5)
    with pytest.raises(FetchProtocolError, match="expected"):
        seq.check(b, b"x")
    with pytest.raises(FetchProtocolError, match="more than"):
        BlockSequence([a], 5).check(a, b"123456")
    short = BlockSequence([a, b], 10)
    short.check(a, b"12345")
    with pytest.raises(FetchProtocolError, match="after 1 of 2"):
        short.finish()


def test_request_validation() -> None:
    root = CID.decode("bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq")
    good = FetchRequest("lab", root, (root,)).to_json()
    assert FetchRequest.from_json(good).want == (root,)
    assert FetchRequest.from_json({**good, "network": "prod"}).network == "prod"  # adapter's call
    with pytest.raises(FetchProtocolError, match="network"):
        FetchRequest.from_json({**good, "network": 7})
    with pytest.raises(FetchProtocolError):
        FetchRequest.from_json({**good, "want": []})
    with pytest.raises(FetchProtocolError):
        FetchRequest.from_json({**good, "want": [str(root)] * 2})
    with pytest.raises(FetchProtocolError):
        FetchRequest.from_json({**good, "want": [str(root)] * 5000})
    with pytest.raises(FetchProtocolError, match="not a CID"):
        FetchRequest.from_json({**good, "root": "zzz"})
    with pytest.raises(FetchProtocolError, match="refused"):  # a refusal is a session event
        FetchStatus.from_json({"status": "refused", "reason": "busy"})


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(
    st.sampled_from(["status", "count", "bytes", "missing", "x"]),
    st.one_of(st.none(), st.integers(-5, 5000), st.text(max_size=20),
              st.lists(st.text(max_size=60), max_size=3)),
))
def test_status_parser_only_raises_protocol_errors(doc: dict[str, object]) -> None:
    with contextlib.suppress(FetchProtocolError):
        FetchStatus.from_json(json.loads(json.dumps(doc)))


MiB = 1024 * 1024


def fake_chunks(n: int) -> tuple[CID, ...]:
    """`n` distinct raw-leaf CIDs (the provider below says each is a full 256 KiB chunk)."""
    return tuple(
        CID("base32", 1, "raw", multihash.digest(i.to_bytes(4, "big"), "sha2-256"))
        for i in range(n)
    )


def test_provider_honours_the_response_limit_the_requester_sends() -> None:
    # 75 MiB of wanted chunks; the provider's own limit (the 1 GiB default)
    # would send them all, the requester accepts at most 64 MiB per response.
    want = fake_chunks(300)
    req = FetchRequest("lab", want[0], want, max_bytes=64 * MiB)
    pair = SessionPair(FetchSession(REQUESTER, max_response=64 * MiB), FetchSession(RESPONDER))
    pair.send(REQUESTER, req)
    (got,) = pair.received[RESPONDER]
    assert got.max_bytes == 64 * MiB
    send, status = plan_response(
        got.want, lambda c: CHUNK, max_response=1024 * MiB, requester_limit=got.max_bytes
    )
    assert status.bytes == 64 * MiB and len(send) == 256
    # The requester's checks pass: no ResponseTooLarge, no ban of an honest peer.
    pair.send(RESPONDER, status)
    assert pair.received[REQUESTER] == [status]


def test_request_without_a_response_limit_means_the_providers_own() -> None:
    want = fake_chunks(300)
    old_wire = {"network": "lab", "root": str(want[0]), "want": [str(c) for c in want]}
    assert FetchRequest("lab", want[0], want).to_json() == old_wire  # still what old nodes send
    got = FetchRequest.from_json(old_wire)
    assert got.max_bytes is None
    _, status = plan_response(
        got.want, lambda c: CHUNK, max_response=1024 * MiB, requester_limit=got.max_bytes
    )
    assert status.bytes == 75 * MiB
    for bad in [0, -1, "64", 1.5, True, 2**64]:
        with pytest.raises(FetchProtocolError, match="max_bytes"):
            FetchRequest.from_json({**old_wire, "max_bytes": bad})


def test_requester_limit_is_never_exceeded_even_by_the_first_block() -> None:
    want = fake_chunks(3)
    send, status = plan_response(
        want, lambda c: CHUNK, max_response=CHUNK // 2, requester_limit=CHUNK // 2
    )
    assert send == [] and status.count == 0 and status.missing == ()
    # The provider's own limit still lets the first block through (progress).
    send, _ = plan_response(want, lambda c: CHUNK, max_response=CHUNK // 2)
    assert send == [want[0]]


# --- the session: who is at fault is the type ---------------------------------------


def test_errors_say_who_is_at_fault() -> None:
    for outcome in (Refused, Interrupted, ResponseTooLarge):
        assert not issubclass(outcome, ProtocolError)  # nobody is banned for these
    assert issubclass(FetchProtocolError, RemoteProtocolError)


def leaf_dag() -> tuple[MemoryBlockstore, CID, list[CID]]:
    provider = MemoryBlockstore()
    root = make_dag(provider, os.urandom(2 * CHUNK))
    leaves = [c for c, _ in unixfs.walk(provider.get, root) if c.codec.name == "raw"]
    return provider, root, leaves


def test_refusal_is_an_event_before_or_after_the_request_is_read() -> None:
    _, root, leaves = leaf_dag()
    for read_first in (True, False):
        pair = SessionPair(FetchSession(REQUESTER), FetchSession(RESPONDER))
        request = FetchRequest("lab", root, tuple(leaves))
        if read_first:
            pair.send(REQUESTER, request)
            pair.send(RESPONDER, Refusal("busy"))
        else:  # an untrusted peer is refused before a byte of its request is read
            wire = pair.sides[REQUESTER].send(request)
            pair.send(RESPONDER, Refusal("busy"))
            assert pair.sides[RESPONDER].done and wire
            pair.sent[REQUESTER].append(request)
            pair.received[RESPONDER].append(request)
        assert pair.received[REQUESTER] == [Refusal("busy")]
        pair.check()


def test_a_wrong_block_is_the_providers_fault_a_short_stream_is_nobodys() -> None:
    provider, root, leaves = leaf_dag()
    status = FetchStatus(count=2, bytes=2 * CHUNK, missing=())
    pair = SessionPair(FetchSession(REQUESTER), FetchSession(RESPONDER))
    pair.send(REQUESTER, FetchRequest("lab", root, tuple(leaves)))
    pair.send(RESPONDER, status)
    # Swapped order: the CAR verifies, the sequence does not.
    section = car.encode_section(leaves[1], provider.get(leaves[1]))
    with pytest.raises(FetchProtocolError, match="expected"):
        pair.deliver(REQUESTER, section)

    pair = SessionPair(FetchSession(REQUESTER), FetchSession(RESPONDER))
    pair.send(REQUESTER, FetchRequest("lab", root, tuple(leaves)))
    pair.send(RESPONDER, status, Block(leaves[0], provider.get(leaves[0])))
    got = len(provider.get(leaves[0]))
    with pytest.raises(Interrupted, match=f"after {got} of {2 * CHUNK} bytes"):
        pair.close(RESPONDER)

    pair = SessionPair(FetchSession(REQUESTER), FetchSession(RESPONDER))
    pair.send(REQUESTER, FetchRequest("lab", root, tuple(leaves[:1])))
    block = Block(leaves[0], provider.get(leaves[0]))
    pair.send(RESPONDER, FetchStatus(1, len(block.data), ()), block)
    with pytest.raises(FetchProtocolError, match="after the end of the response"):
        pair.deliver(REQUESTER, b"\0")


def test_an_oversized_answer_is_unsuitable_not_misbehaviour() -> None:
    _, root, leaves = leaf_dag()
    pair = SessionPair(FetchSession(REQUESTER, max_response=CHUNK), FetchSession(RESPONDER))
    pair.send(REQUESTER, FetchRequest("lab", root, tuple(leaves)))
    with pytest.raises(ResponseTooLarge) as e:
        pair.send(RESPONDER, FetchStatus(count=2, bytes=2 * CHUNK, missing=()))
    assert (e.value.limit, e.value.got) == (CHUNK, 2 * CHUNK)


def test_sending_out_of_turn_is_our_fault() -> None:
    provider, root, leaves = leaf_dag()
    requester, responder = FetchSession(REQUESTER), FetchSession(RESPONDER)
    with pytest.raises(LocalProtocolError):
        responder.send(FetchStatus(0, 0, ()))  # no request yet
    request = FetchRequest("lab", root, tuple(leaves))
    responder.receive_data(requester.send(request))
    assert responder.next_event() == request
    with pytest.raises(LocalProtocolError):
        requester.send(request)  # one request per stream
    first = provider.get(leaves[0])
    responder.send(FetchStatus(count=1, bytes=len(first), missing=(leaves[1],)))
    with pytest.raises(LocalProtocolError, match="not announced"):
        responder.send(Block(leaves[1], provider.get(leaves[1])))
    with pytest.raises(LocalProtocolError, match="before every announced block"):
        responder.send(EndOfResponse())
    responder.send(Block(leaves[0], first))
    assert responder.send(EndOfResponse()) == b"" and responder.done


def test_a_request_for_nothing_held_ends_with_the_status() -> None:
    _, root, leaves = leaf_dag()
    pair = SessionPair(FetchSession(REQUESTER), FetchSession(RESPONDER))
    pair.send(REQUESTER, FetchRequest("lab", root, tuple(leaves)))
    pair.send(RESPONDER, FetchStatus(0, 0, tuple(leaves)), EndOfResponse())
    pair.close(RESPONDER)
    pair.check()
    assert isinstance(pair.received[REQUESTER][-1], EndOfStream)
