"""The fetch protocol without a network: messages, the provider's plan, the
requester's checks, and whole incremental syncs over an in-memory link that
runs the exact bytes one side sends through the other side's decoders."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multiformats import CID, multihash

from benchsync.protocol.fetch import (
    BlockSequence,
    FetchProtocolError,
    FetchRequest,
    FetchStatus,
    expected_blocks,
    missing_blocks,
    plan_response,
)
from benchsync.protocol.frames import FrameDecoder, Refused, decode_json, encode_json_frame
from benchsync.storage import car, unixfs
from benchsync.storage.blockstore import Blockstore, MemoryBlockstore
from benchsync.storage.dagpb import links

CHUNK = 256 * 1024


def make_dag(store: Blockstore, payload: bytes) -> CID:
    fcid, _, ftsize = unixfs.add_bytes(payload, store.put)
    tables, ttsize = unixfs.add_directory([("results.parquet", fcid, ftsize)], store.put)
    mcid, _, mtsize = unixfs.add_bytes(b'{"m": 1}', store.put)
    root, _ = unixfs.add_directory(
        [("manifest.json", mcid, mtsize), ("tables", tables, ttsize)], store.put
    )
    return root


def serve(provider: Blockstore, request_wire: bytes, network: str, max_response: int) -> bytes:
    """The provider side, sans I/O: request bytes in, response bytes out."""
    (body,) = FrameDecoder().feed(request_wire)
    try:
        req = FetchRequest.from_json(decode_json(body), network)
    except Refused as e:
        return encode_json_frame({"status": "refused", "reason": e.reason})
    size_of = lambda c: provider.size(c) if provider.has(c) else None  # noqa: E731
    send, status = plan_response(req.want, size_of, max_response=max_response)
    out = encode_json_frame(status.to_json()) + car.encode_header([req.root])
    return out + b"".join(car.encode_section(c, provider.get(c)) for c in send)


def one_round(
    requester: Blockstore, provider: Blockstore, root: CID, *, max_response: int = 1 << 30
) -> tuple[int, int]:
    """One exchange over the in-memory link; returns (blocks stored, response bytes)."""
    want = missing_blocks(root, requester.has, requester.get, links)
    req = FetchRequest("lab", root, tuple(want))
    response = serve(provider, encode_json_frame(req.to_json()), "lab", max_response)
    frames = FrameDecoder()
    (status_body,) = frames.feed(response, max_frames=1)
    status = FetchStatus.from_json(decode_json(status_body))
    seq = BlockSequence(expected_blocks(req, status), status.bytes, max_response=max_response)
    dec = car.CarDecoder()
    stored = 0
    for cid, data in dec.feed(frames.take_buffer()):
        seq.check(cid, data)
        requester.put(cid, data, verify=True)
        stored += 1
    dec.close()
    seq.finish()
    return stored, len(response)


def sync(requester: Blockstore, provider: Blockstore, root: CID, **kw: int) -> tuple[int, int]:
    rounds = wire = 0
    while missing_blocks(root, requester.has, requester.get, links):
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
    want = missing_blocks(root, requester.has, requester.get, links)
    assert len(want) == 4  # the leaves
    # The leaf round is cut after 2 blocks (and half of the third).
    req = FetchRequest("lab", root, tuple(want))
    resp = serve(provider, encode_json_frame(req.to_json()), "lab", 1 << 30)
    frames = FrameDecoder()
    frames.feed(resp, max_frames=1)
    car_bytes = frames.take_buffer()
    cut = car_bytes[: len(car.encode_header([root])) + 2 * (CHUNK + 40) + CHUNK // 2]
    dec = car.CarDecoder()
    for cid, data in dec.feed(cut):
        requester.put(cid, data)
    assert len(missing_blocks(root, requester.has, requester.get, links)) == 2


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
    seq = BlockSequence([a], 5, max_response=100)
    with pytest.raises(FetchProtocolError, match="expected"):
        seq.check(b, b"x")
    with pytest.raises(FetchProtocolError, match="more than"):
        BlockSequence([a], 5, max_response=100).check(a, b"123456")
    with pytest.raises(FetchProtocolError, match="our limit"):
        BlockSequence([a], 500, max_response=100)
    short = BlockSequence([a, b], 10, max_response=100)
    short.check(a, b"12345")
    with pytest.raises(FetchProtocolError, match="after 1 of 2"):
        short.finish()


def test_request_validation() -> None:
    root = CID.decode("bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq")
    good = FetchRequest("lab", root, (root,)).to_json()
    assert FetchRequest.from_json(good, "lab").want == (root,)
    with pytest.raises(Refused, match="wrong network"):
        FetchRequest.from_json(good, "prod")
    with pytest.raises(FetchProtocolError):
        FetchRequest.from_json({**good, "want": []}, "lab")
    with pytest.raises(FetchProtocolError):
        FetchRequest.from_json({**good, "want": [str(root)] * 2}, "lab")
    with pytest.raises(FetchProtocolError):
        FetchRequest.from_json({**good, "want": [str(root)] * 5000}, "lab")
    with pytest.raises(FetchProtocolError, match="not a CID"):
        FetchRequest.from_json({**good, "root": "zzz"}, "lab")
    with pytest.raises(Refused, match="busy"):
        FetchStatus.from_json({"status": "refused", "reason": "busy"})


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(
    st.sampled_from(["status", "count", "bytes", "missing", "x"]),
    st.one_of(st.none(), st.integers(-5, 5000), st.text(max_size=20),
              st.lists(st.text(max_size=60), max_size=3)),
))
def test_status_parser_only_raises_protocol_errors(doc: dict[str, object]) -> None:
    with contextlib.suppress(FetchProtocolError, Refused):
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
    (body,) = FrameDecoder().feed(encode_json_frame(req.to_json()))
    got = FetchRequest.from_json(decode_json(body), "lab")
    assert got.max_bytes == 64 * MiB
    send, status = plan_response(
        got.want, lambda c: CHUNK, max_response=1024 * MiB, requester_limit=got.max_bytes
    )
    assert status.bytes == 64 * MiB and len(send) == 256
    # The requester's checks pass: no FetchProtocolError, no ban of an honest peer.
    seq = BlockSequence(expected_blocks(req, status), status.bytes, max_response=64 * MiB)
    for cid in send:
        seq.check(cid, b"\0" * CHUNK)
    seq.finish()


def test_request_without_a_response_limit_means_the_providers_own() -> None:
    want = fake_chunks(300)
    old_wire = {"network": "lab", "root": str(want[0]), "want": [str(c) for c in want]}
    assert FetchRequest("lab", want[0], want).to_json() == old_wire  # still what old nodes send
    got = FetchRequest.from_json(old_wire, "lab")
    assert got.max_bytes is None
    _, status = plan_response(
        got.want, lambda c: CHUNK, max_response=1024 * MiB, requester_limit=got.max_bytes
    )
    assert status.bytes == 75 * MiB
    for bad in [0, -1, "64", 1.5, True, 2**64]:
        with pytest.raises(FetchProtocolError, match="max_bytes"):
            FetchRequest.from_json({**old_wire, "max_bytes": bad}, "lab")


def test_requester_limit_is_never_exceeded_even_by_the_first_block() -> None:
    want = fake_chunks(3)
    send, status = plan_response(
        want, lambda c: CHUNK, max_response=CHUNK // 2, requester_limit=CHUNK // 2
    )
    assert send == [] and status.count == 0 and status.missing == ()
    # The provider's own limit still lets the first block through (progress).
    send, _ = plan_response(want, lambda c: CHUNK, max_response=CHUNK // 2)
    assert send == [want[0]]
