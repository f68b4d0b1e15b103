"""Head messages and their validation rules (pure, no network)."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multiformats import CID, multihash

from benchsync.protocol.frames import encode_json_frame
from benchsync.protocol.heads import (
    MAX_HEAD_MESSAGE,
    MAX_HEAD_RESPONSE,
    MAX_REPLICAS_IN_RESPONSE,
    MAX_SIGNED_HEAD,
    MAX_SIGNED_HEAD_B64,
    NEW,
    REPEAT,
    Head,
    HeadBook,
    HeadRequest,
    HeadResponse,
    InvalidHead,
    check_announcement,
    check_signed_hint,
    decode_head,
    encode_head,
    head_response,
    parse_head_response,
    topic_for,
)

ALICE = "12D3KooWAliceAliceAliceAliceAliceAliceAliceAliceAlice"
BOB = "12D3KooWBobBobBobBobBobBobBobBobBobBobBobBobBobBobBob"


def cid(tag: str, codec: str = "dag-pb") -> CID:
    return CID("base32", 1, codec, multihash.digest(tag.encode(), "sha2-256"))


def head(dataset: str = ALICE, seq: int = 1, tag: str = "a") -> Head:
    return Head(dataset, seq, cid(tag), cid(tag + "t"), 1_700_000_000.5, 12345)


def test_round_trip_and_topic() -> None:
    h = head()
    assert decode_head(encode_head(h)) == h
    assert topic_for("lab") == "benchsync/lab/heads/1"
    with pytest.raises(ValueError):
        topic_for("bad/name")


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda d: d.pop("root"), "missing"),
        (lambda d: d.update(root="not-a-cid"), "not a CID"),
        (lambda d: d.update(tables=17), "CID string"),
        (lambda d: d.update(seq=-1), "seq"),
        (lambda d: d.update(seq=1.5), "seq"),
        (lambda d: d.update(seq=True), "seq"),
        (lambda d: d.update(bytes=-3), "bytes"),
        (lambda d: d.update(created_at="yesterday"), "created_at"),
        (lambda d: d.update(dataset=""), "dataset"),
    ],
)
def test_malformed_heads_are_rejected(
    mutate: Callable[[dict[str, Any]], object], reason: str
) -> None:
    doc = head().to_json()
    mutate(doc)
    with pytest.raises(InvalidHead, match=reason):
        decode_head(json.dumps(doc).encode())


def test_oversized_and_non_json_messages_are_rejected() -> None:
    with pytest.raises(InvalidHead, match="exceeds"):
        decode_head(b" " * (MAX_HEAD_MESSAGE + 1))
    with pytest.raises(InvalidHead, match="JSON"):
        decode_head(b"\x00garbage")
    with pytest.raises(InvalidHead, match="object"):
        decode_head(b"[]")


def test_only_the_owner_may_announce_its_dataset() -> None:
    book = HeadBook()
    assert check_announcement(encode_head(head(ALICE)), ALICE, book) == head(ALICE)
    with pytest.raises(InvalidHead, match="does not own"):
        check_announcement(encode_head(head(ALICE)), BOB, book)


def test_seq_must_grow_and_validation_does_not_touch_the_book() -> None:
    book = HeadBook()
    assert book.accept(head(seq=2, tag="v2"))
    check_announcement(encode_head(head(seq=3, tag="v3")), ALICE, book)
    assert book.get(ALICE) == head(seq=2, tag="v2"), "validation must not change state"
    assert book.classify(head(seq=2, tag="v2")) == REPEAT  # a re-announcement
    assert book.classify(head(seq=3, tag="v3")) == NEW
    with pytest.raises(InvalidHead, match="does not grow"):
        check_announcement(encode_head(head(seq=1, tag="v1")), ALICE, book)
    with pytest.raises(InvalidHead, match="different root"):
        book.classify(head(seq=2, tag="fork"))
    assert not book.accept(head(seq=2, tag="v2"))
    assert book.get(ALICE) == head(seq=2, tag="v2")


def test_head_response_checks_ownership_and_refusals() -> None:
    body = json.loads(json.dumps(head_response(head(ALICE), [head(BOB)])))
    parsed = parse_head_response(body, ALICE)
    assert parsed.head == head(ALICE) and parsed.replicas == (head(BOB),)
    with pytest.raises(InvalidHead, match="answered with the head"):
        parse_head_response(body, BOB)
    with pytest.raises(InvalidHead, match="status 'refused'"):  # a refusal is a session event
        parse_head_response({"status": "refused", "reason": "not trusted"}, ALICE)
    assert parse_head_response(head_response(None, []), ALICE).head is None


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=3000))
def test_decoding_garbage_only_raises_invalid_head(data: bytes) -> None:
    with contextlib.suppress(InvalidHead):
        decode_head(data)


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["dataset", "seq", "root", "tables", "created_at", "bytes", "x"]),
        st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=70), st.booleans()),
    )
)
def test_decoding_odd_objects_only_raises_invalid_head(doc: dict[str, object]) -> None:
    with contextlib.suppress(InvalidHead):
        decode_head(json.dumps(doc).encode())


def test_head_session_pair_round_trips_and_refuses() -> None:
    from session_pair import SessionPair

    from benchsync.protocol.heads import HeadSession
    from benchsync.protocol.session import REQUESTER, RESPONDER, Refusal

    pair = SessionPair(HeadSession(REQUESTER, responder=ALICE), HeadSession(RESPONDER))
    pair.send(REQUESTER, HeadRequest("lab"))
    assert pair.received[RESPONDER] == [HeadRequest("lab")]
    pair.send(RESPONDER, HeadResponse(head(ALICE), (head(BOB),)))
    pair.close(RESPONDER)
    pair.check()

    pair = SessionPair(HeadSession(REQUESTER, responder=ALICE), HeadSession(RESPONDER))
    pair.send(REQUESTER, HeadRequest("lab"))
    pair.send(RESPONDER, Refusal("not trusted"))
    pair.check()

    # A responder passing off another dataset's head as its own is at fault.
    pair = SessionPair(HeadSession(REQUESTER, responder=BOB), HeadSession(RESPONDER))
    pair.send(REQUESTER, HeadRequest("lab"))
    with pytest.raises(InvalidHead, match="answered with the head"):
        pair.send(RESPONDER, HeadResponse(head(ALICE), ()))


# --- signed replica heads ---------------------------------------------------------------


def test_head_response_carries_each_replicas_signed_envelope_as_base64() -> None:
    signed = b"\x0a\x02from\x12\x05bytes"  # opaque here: the daemon verifies it
    body = json.loads(json.dumps(head_response(head(ALICE), [head(BOB)], [signed])))
    assert body["replicas"][0]["signed"] == base64.b64encode(signed).decode()
    assert {k for k in body["replicas"][0] if k != "signed"} == set(head(BOB).to_json())
    parsed = parse_head_response(body, ALICE)
    assert parsed.replicas == (head(BOB),) and parsed.signed == (signed,)
    # No envelope: no field (an older peer's answer), parsed as None.
    body = json.loads(json.dumps(head_response(None, [head(BOB), head(ALICE)], [None, signed])))
    assert "signed" not in body["replicas"][0]
    assert parse_head_response(body, ALICE).signed == (None, signed)
    assert HeadResponse(None, (head(BOB),)).signed == (None,)
    with pytest.raises(ValueError):
        HeadResponse(None, (head(BOB),), (signed, signed))


@pytest.mark.parametrize(
    "value, reason",
    [
        (17, "base64"),
        ("", "base64"),
        ("not base64!", "not base64"),
        ("QUJD\n", "not base64"),
        ("QUJ", "not base64"),  # bad padding
        ("é", "not base64"),
        ("A" * (MAX_SIGNED_HEAD_B64 + 4), "at most"),
        (base64.b64encode(b"x" * (MAX_SIGNED_HEAD + 1)).decode()[:MAX_SIGNED_HEAD_B64], "exceeds"),
    ],
)
def test_malformed_envelopes_make_the_response_invalid(value: object, reason: str) -> None:
    entry = {**head(BOB).to_json(), "signed": value}
    with pytest.raises(InvalidHead, match=reason):
        parse_head_response({"status": "ok", "head": None, "replicas": [entry]}, ALICE)


def test_head_response_stays_within_its_size_limit() -> None:
    big = b"\xff" * MAX_SIGNED_HEAD
    reps = [head(f"12D3KooW{i:044d}", tag=str(i)) for i in range(MAX_REPLICAS_IN_RESPONSE + 5)]
    body = head_response(head(ALICE), reps, [big] * len(reps))
    frame = encode_json_frame(body, max_frame=MAX_HEAD_RESPONSE)  # raises when it would not fit
    assert len(frame) <= MAX_HEAD_RESPONSE + 8  # the body, and its varint length
    kept = len(body["replicas"])
    assert 0 < kept < MAX_REPLICAS_IN_RESPONSE  # the ones that do not fit are left out
    assert [Head.from_json(r) for r in body["replicas"]] == reps[:kept]
    # Small envelopes: every replica up to the count limit.
    small = head_response(None, reps, [b"sig"] * len(reps))
    assert len(small["replicas"]) == MAX_REPLICAS_IN_RESPONSE
    with pytest.raises(ValueError, match="exceeds"):
        head_response(None, [head(BOB)], [big + b"!"])


def test_a_requester_refuses_a_head_response_beyond_the_limit() -> None:
    from benchsync.protocol.frames import RemoteProtocolError, encode_frame
    from benchsync.protocol.heads import HeadSession
    from benchsync.protocol.session import REQUESTER

    session = HeadSession(REQUESTER, responder=ALICE)
    session.send(HeadRequest("lab"))
    too_big = encode_frame(b" " * (MAX_HEAD_RESPONSE + 1), max_frame=MAX_HEAD_RESPONSE + 1)
    with pytest.raises(RemoteProtocolError):
        session.receive_data(too_big)
        session.next_event()


def test_a_signed_hint_must_announce_that_very_head_on_our_topic() -> None:
    topic = topic_for("lab")
    data = encode_head(head(BOB))
    check_signed_hint(head(BOB), BOB, [topic], data, topic)
    with pytest.raises(InvalidHead, match="signed by"):
        check_signed_hint(head(BOB), ALICE, [topic], encode_head(head(ALICE)), topic)
    with pytest.raises(InvalidHead, match="another topic"):
        check_signed_hint(head(BOB), BOB, [topic_for("other")], data, topic)
    with pytest.raises(InvalidHead, match="another topic"):
        check_signed_hint(head(BOB), BOB, [topic, topic_for("other")], data, topic)
    with pytest.raises(InvalidHead, match="differs"):
        check_signed_hint(head(BOB, seq=2, tag="fake"), BOB, [topic], data, topic)
    with pytest.raises(InvalidHead, match="JSON"):
        check_signed_hint(head(BOB), BOB, [topic], b"\x00", topic)
