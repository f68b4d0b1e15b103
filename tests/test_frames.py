"""The length-prefixed frame codec: round trips, limits, truncation, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchsync.protocol.frames import (
    FrameDecoder,
    FrameTooLarge,
    LocalProtocolError,
    Refused,
    RemoteProtocolError,
    TruncatedFrame,
    check_network,
    decode_json,
    encode_frame,
    encode_json_frame,
)


def test_frames_split_anywhere_decode_identically() -> None:
    bodies = [b"", b"a", b"x" * 300, b"\x00\xff" * 1000]
    wire = b"".join(encode_frame(b) for b in bodies)
    for step in (1, 2, 7, 64, len(wire)):
        dec = FrameDecoder()
        out: list[bytes] = []
        for i in range(0, len(wire), step):
            out += dec.feed(wire[i : i + step])
        dec.close()
        assert out == bodies


def test_oversized_prefix_is_refused_before_the_body_arrives() -> None:
    dec = FrameDecoder(max_frame=100)
    with pytest.raises(FrameTooLarge) as e:
        dec.feed(encode_frame(b"x" * 101, max_frame=1000)[:3])
    assert (e.value.limit, e.value.got) == (100, 101)
    assert isinstance(e.value, RemoteProtocolError)


def test_sending_an_oversized_frame_is_our_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(b"x" * 11, max_frame=10)


def test_truncated_frame_is_reported_at_close() -> None:
    dec = FrameDecoder()
    assert dec.feed(encode_frame(b"hello")[:-1]) == []
    with pytest.raises(TruncatedFrame):
        dec.close()


def test_garbage_varint_is_a_remote_error() -> None:
    with pytest.raises(RemoteProtocolError):
        FrameDecoder().feed(b"\xff" * 11)


def test_raw_bytes_after_a_frame_are_handed_back() -> None:
    dec = FrameDecoder()
    assert dec.feed(encode_frame(b"status") + b"CAR-BYTES", max_frames=1) == [b"status"]
    assert dec.take_buffer() == b"CAR-BYTES"


def test_json_frames_and_network_check() -> None:
    (body,) = FrameDecoder().feed(encode_json_frame({"network": "lab", "n": 1}))
    assert decode_json(body) == {"network": "lab", "n": 1}
    with pytest.raises(RemoteProtocolError):
        decode_json(b"[1, 2]")
    with pytest.raises(RemoteProtocolError):
        decode_json(b"\xff\xfe")
    check_network({"network": "lab"}, "lab")
    with pytest.raises(Refused, match="wrong network.*'lab'.*'other'"):
        check_network({"network": "other"}, "lab")


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=2000), st.integers(min_value=1, max_value=50))
def test_decoder_never_crashes_on_garbage(data: bytes, step: int) -> None:
    dec = FrameDecoder(max_frame=512)
    try:
        for i in range(0, len(data), step):
            for body in dec.feed(data[i : i + step]):
                assert len(body) <= 512
        dec.close()
    except RemoteProtocolError:
        pass


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=600), max_size=8), st.integers(min_value=1, max_value=97))
def test_round_trip_property(bodies: list[bytes], step: int) -> None:
    wire = b"".join(encode_frame(b) for b in bodies)
    dec = FrameDecoder(max_frame=600)
    out: list[bytes] = []
    for i in range(0, len(wire), step):
        out += dec.feed(wire[i : i + step])
    dec.close()
    assert out == bodies
