"""The query protocol's session driven with bytes alone (no stream, no node)."""

from __future__ import annotations

import json

import pytest
from multiformats import varint

from benchsync.protocol.frames import (
    FrameTooLarge,
    Interrupted,
    LocalProtocolError,
    RemoteProtocolError,
    encode_frame,
    encode_json_frame,
)
from benchsync.protocol.query import (
    MAX_HELLO_FRAME,
    MAX_REQUEST_FRAME,
    MAX_RESULT_BYTES,
    MAX_ROWS,
    MAX_TIMEOUT,
    QueryMessageError,
    QueryOpen,
    QueryRequest,
    QueryResponse,
    QuerySession,
    response_frame_limit,
)
from benchsync.protocol.session import DONE, NEED_DATA, REQUESTER, RESPONDER, Refusal

NETWORK = "lab"
REQUEST = QueryRequest("SELECT count(*) AS n FROM models WHERE x = ?", [1], timeout_s=5,
                       max_rows=10, max_bytes=4096)  # fmt: skip
OPEN = QueryOpen(NETWORK, REQUEST)
OK = QueryResponse("ok", arrow_ipc=b"\x01" * 1000)


def feed(session: QuerySession, data: bytes, step: int) -> object:
    """Feed `data` in pieces of `step` bytes (all at once for 0); the event it completes."""
    for i in range(0, len(data), step or len(data) or 1):
        assert session.next_event() is NEED_DATA
        session.receive_data(data[i : i + (step or len(data))])
    return session.next_event()


@pytest.mark.parametrize("step", [0, 1, 7])
def test_request_and_response_cross_intact_in_any_chunking(step: int) -> None:
    client, server = QuerySession(REQUESTER), QuerySession(RESPONDER)
    assert feed(server, client.send(OPEN), step) == OPEN
    assert feed(client, server.send(OK), step) == OK
    assert client.state == server.state == DONE
    client.receive_data(b"")
    assert type(client.next_event()).__name__ == "EndOfStream"


def test_a_refusal_is_an_event_before_or_after_the_request() -> None:
    early = QuerySession(RESPONDER)  # refused before reading (access policy)
    client = QuerySession(REQUESTER)
    client.send(OPEN)
    assert feed(client, early.send(Refusal("not in trusted_peers")), 0) == (
        Refusal("not in trusted_peers"))  # fmt: skip
    late = QuerySession(RESPONDER)  # refused after reading (another network)
    client = QuerySession(REQUESTER)
    feed(late, client.send(OPEN), 0)
    assert feed(client, late.send(Refusal("wrong network")), 3) == Refusal("wrong network")
    assert late.state == client.state == DONE


def test_the_hello_names_the_network_the_adapter_checks() -> None:
    server = QuerySession(RESPONDER)
    event = feed(server, QuerySession(REQUESTER).send(QueryOpen("elsewhere", REQUEST)), 0)
    assert isinstance(event, QueryOpen) and event.network == "elsewhere"


@pytest.mark.parametrize("data, error", [
    (varint.encode(MAX_HELLO_FRAME + 1) + b"{", FrameTooLarge),
    (encode_json_frame({"network": NETWORK}) + varint.encode(MAX_REQUEST_FRAME + 1),
     FrameTooLarge),
    (encode_frame(b"\xff\xfe"), RemoteProtocolError),
    (encode_json_frame({"net": NETWORK}), RemoteProtocolError),
    (encode_json_frame({"network": NETWORK}) + encode_frame(b"BSQ1garbage"), RemoteProtocolError),
    (encode_json_frame({"network": NETWORK}) + encode_frame(b"EVIL\x00\x00\x00\x02{}"),
     RemoteProtocolError),
])  # fmt: skip
def test_a_broken_request_is_the_peers_fault(data: bytes, error: type[Exception]) -> None:
    server = QuerySession(RESPONDER)
    server.receive_data(data)
    with pytest.raises(error):
        server.next_event()


def test_a_malformed_request_says_what_is_wrong() -> None:
    server = QuerySession(RESPONDER)
    server.receive_data(encode_json_frame({"network": NETWORK}) + encode_frame(b"BSQ1garbage"))
    with pytest.raises(RemoteProtocolError, match="malformed query request"):
        server.next_event()


def test_end_of_stream_before_a_whole_message_is_an_interruption() -> None:
    server = QuerySession(RESPONDER)
    server.receive_data(encode_json_frame({"network": NETWORK}))
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(Interrupted):
        server.next_event()
    client = QuerySession(REQUESTER)
    client.send(OPEN)
    client.receive_data(encode_frame(OK.to_bytes())[:50])
    assert client.next_event() is NEED_DATA
    client.receive_data(b"")
    with pytest.raises(Interrupted):
        client.next_event()


def test_responder_sends_one_response_and_only_after_the_request() -> None:
    server = QuerySession(RESPONDER)
    with pytest.raises(LocalProtocolError):
        server.send(OK)
    feed(server, QuerySession(REQUESTER).send(OPEN), 0)
    too_big = QueryResponse("ok", arrow_ipc=b"\x01" * response_frame_limit(REQUEST.max_bytes))
    with pytest.raises(LocalProtocolError):
        server.send(too_big)  # the requester would refuse it
    server.send(OK)
    with pytest.raises(LocalProtocolError):
        server.send(OK)


def test_requester_sends_its_request_once() -> None:
    client = QuerySession(REQUESTER)
    client.send(OPEN)
    with pytest.raises(LocalProtocolError):
        client.send(OPEN)


def test_requester_limits_the_response_to_its_max_bytes() -> None:
    client = QuerySession(REQUESTER)
    client.send(OPEN)
    client.receive_data(varint.encode(response_frame_limit(REQUEST.max_bytes) + 1))
    with pytest.raises(FrameTooLarge):
        client.next_event()


@pytest.mark.parametrize("frame, match", [
    (encode_json_frame({"status": "ok"}), "unexpected JSON frame"),
    (encode_frame(b"BSR1" + b"\x00" * 9), "malformed query response"),
])  # fmt: skip
def test_requester_rejects_what_is_neither_response_nor_refusal(frame: bytes, match: str) -> None:
    client = QuerySession(REQUESTER)
    client.send(OPEN)
    client.receive_data(frame)
    with pytest.raises(RemoteProtocolError, match=match):
        client.next_event()


def test_request_limits_default_to_the_protocol_maxima() -> None:
    """A limit the requester leaves out is the protocol's; the server clamps to its settings."""
    request = QueryRequest("SELECT 1")
    assert (request.timeout_s, request.max_rows, request.max_bytes) == (
        MAX_TIMEOUT, MAX_ROWS, MAX_RESULT_BYTES)  # fmt: skip


def test_a_ship_request_says_so_and_an_old_peers_request_asks_for_an_answer() -> None:
    """`purpose` "ship" crosses intact; a request without the field (an old peer's, byte
    for byte what it sends) is an "answer" request; anything else is the sender's fault."""
    ship = QueryRequest("SELECT x FROM t", max_bytes=1 << 20, purpose="ship")
    assert QueryRequest.from_bytes(ship.to_bytes()) == ship
    old = REQUEST.to_bytes()
    assert b"purpose" not in old and QueryRequest.from_bytes(old).purpose == "answer"
    for bad in ("all", "", 1, None, ["ship"]):
        with pytest.raises(QueryMessageError, match="purpose"):
            QueryRequest.from_bytes(_with_header(old, purpose=bad))
        with pytest.raises(QueryMessageError, match="purpose"):
            QueryRequest("SELECT 1", purpose=bad)


def _with_header(request: bytes, **fields: object) -> bytes:
    """`request`'s bytes with `fields` added to its JSON header."""
    header = json.loads(request[8:])
    header.update(fields)
    raw = json.dumps(header).encode()
    return request[:4] + len(raw).to_bytes(4, "big") + raw
