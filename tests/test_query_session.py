"""The query protocol's sessions driven with bytes alone (no stream, no node)."""

from __future__ import annotations

import pytest
from multiformats import varint

from benchsync.protocol.frames import (
    FrameTooLarge,
    LocalProtocolError,
    Refused,
    RemoteProtocolError,
    TruncatedFrame,
    encode_frame,
    encode_json_frame,
)
from benchsync.protocol.query import (
    MAX_HELLO_FRAME,
    MAX_REQUEST_FRAME,
    ClientSession,
    QueryRequest,
    QueryResponse,
    RequestReceived,
    RequestRefused,
    ResponseReceived,
    ServerSession,
    response_frame_limit,
)

NETWORK = "lab"
REQUEST = QueryRequest("SELECT count(*) AS n FROM models WHERE x = ?", [1], timeout_s=5,
                       max_rows=10, max_bytes=4096)  # fmt: skip
OK = QueryResponse("ok", arrow_ipc=b"\x01" * 1000)


def request_to_server(client: ClientSession, server: ServerSession, *, step: int = 0) -> object:
    data = client.start()
    if not step:
        return server.receive_data(data)
    events = [server.receive_data(data[i : i + step]) for i in range(0, len(data), step)]
    assert all(e is None for e in events[:-1])
    return events[-1]


@pytest.mark.parametrize("step", [0, 1, 7])
def test_request_and_response_cross_intact_in_any_chunking(step: int) -> None:
    client = ClientSession(REQUEST, network=NETWORK)
    server = ServerSession(network=NETWORK)
    event = request_to_server(client, server, step=step)
    assert event == RequestReceived(REQUEST)
    frame = server.send(OK)
    chunks = [frame[i : i + (step or len(frame))] for i in range(0, len(frame), step or len(frame))]
    got = [client.receive_data(c) for c in chunks]
    assert got[-1] == ResponseReceived(OK, len(frame))
    assert all(e is None for e in got[:-1])
    assert server.receive_data(b"trailing bytes are ignored") is None


def test_wrong_network_is_answered_with_a_refused_response() -> None:
    client = ClientSession(REQUEST, network="elsewhere")
    server = ServerSession(network=NETWORK)
    event = request_to_server(client, server)
    assert isinstance(event, RequestRefused) and event.stage == "hello"
    assert event.response.status == "refused" and "wrong network" in event.response.message
    answer = client.receive_data(server.send(event.response))
    assert answer is not None and answer.response == event.response


def test_malformed_request_is_refused_naming_the_fault() -> None:
    server = ServerSession(network=NETWORK)
    data = encode_json_frame({"network": NETWORK}) + encode_frame(b"BSQ1garbage")
    event = server.receive_data(data)
    assert isinstance(event, RequestRefused) and event.stage == "request"
    assert event.response.message.startswith("malformed query request")
    assert len(server.send(event.response)) < response_frame_limit(0)


@pytest.mark.parametrize("data", [
    varint.encode(MAX_HELLO_FRAME + 1) + b"{",
    encode_json_frame({"network": NETWORK}) + varint.encode(MAX_REQUEST_FRAME + 1),
])  # fmt: skip
def test_frames_over_their_limit_break_the_session(data: bytes) -> None:
    with pytest.raises(FrameTooLarge):
        ServerSession(network=NETWORK).receive_data(data)


def test_hello_that_is_not_json_is_the_peers_fault() -> None:
    with pytest.raises(RemoteProtocolError):
        ServerSession(network=NETWORK).receive_data(encode_frame(b"\xff\xfe"))


def test_end_of_stream_before_the_request_is_truncation() -> None:
    server = ServerSession(network=NETWORK)
    server.receive_data(encode_json_frame({"network": NETWORK})[:3])
    with pytest.raises(TruncatedFrame):
        server.receive_eof()
    done = ServerSession(network=NETWORK)
    request_to_server(ClientSession(REQUEST, network=NETWORK), done)
    done.receive_eof()  # after the request: nothing is missing


def test_server_sends_only_one_response_and_only_after_the_request() -> None:
    server = ServerSession(network=NETWORK)
    with pytest.raises(LocalProtocolError):
        server.send(OK)
    request_to_server(ClientSession(REQUEST, network=NETWORK), server)
    too_big = QueryResponse("ok", arrow_ipc=b"\x01" * response_frame_limit(REQUEST.max_bytes))
    with pytest.raises(LocalProtocolError):
        server.send(too_big)  # the requester would refuse it
    server.send(OK)
    with pytest.raises(LocalProtocolError):
        server.send(OK)


def test_busy_server_answers_before_reading() -> None:
    server = ServerSession(network=NETWORK)
    busy = QueryResponse.error("refused", "busy")
    answer = ClientSession(REQUEST, network=NETWORK).receive_data(server.busy(busy))
    assert answer is not None and answer.response == busy
    with pytest.raises(LocalProtocolError):
        server.busy(busy)


def test_client_tells_a_refusal_frame_from_a_response() -> None:
    client = ClientSession(REQUEST, network=NETWORK)
    client.start()
    refusal = encode_json_frame({"status": "refused", "reason": "not in trusted_peers"})
    with pytest.raises(Refused, match="not in trusted_peers"):
        client.receive_data(refusal)
    with pytest.raises(RemoteProtocolError, match="unexpected JSON frame"):
        ClientSession(REQUEST, network=NETWORK).receive_data(encode_json_frame({"status": "ok"}))
    with pytest.raises(RemoteProtocolError, match="malformed query response"):
        ClientSession(REQUEST, network=NETWORK).receive_data(encode_frame(b"BSR1" + b"\x00" * 9))


def test_client_limits_the_response_to_its_max_bytes() -> None:
    client = ClientSession(REQUEST, network=NETWORK)
    with pytest.raises(FrameTooLarge):
        client.receive_data(varint.encode(response_frame_limit(REQUEST.max_bytes) + 1))
    cut = ClientSession(REQUEST, network=NETWORK)
    assert cut.receive_data(encode_frame(OK.to_bytes())[:50]) is None
    with pytest.raises(TruncatedFrame):
        cut.receive_eof()


def test_client_sends_its_request_once() -> None:
    client = ClientSession(REQUEST, network=NETWORK)
    client.start()
    with pytest.raises(LocalProtocolError):
        client.start()


def test_request_limits_default_to_the_protocol_maxima() -> None:
    """A limit the requester leaves out is the protocol's; the server clamps to its settings."""
    from benchsync.protocol.query import MAX_RESULT_BYTES, MAX_ROWS, MAX_TIMEOUT

    request = QueryRequest("SELECT 1")
    assert (request.timeout_s, request.max_rows, request.max_bytes) == (
        MAX_TIMEOUT, MAX_ROWS, MAX_RESULT_BYTES)  # fmt: skip
