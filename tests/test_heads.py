"""Head messages and their validation rules (pure, no network)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multiformats import CID, multihash

from benchsync.protocol.heads import (
    MAX_HEAD_MESSAGE,
    NEW,
    REPEAT,
    Head,
    HeadBook,
    InvalidHead,
    check_announcement,
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

    from benchsync.protocol.heads import HeadRequest, HeadResponse, HeadSession
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
