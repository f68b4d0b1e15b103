"""Bitswap's wire format and state machines, byte-exact and without I/O.

The codec is checked against the `protobuf` runtime itself: a `message.proto`
built at test time from descriptors (no protoc needed) encodes what we decode
and decodes what we encode, so our hand-written bytes are the spec's.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multiformats import CID

from benchsync.protocol.bitswap import (
    BITSWAP_100,
    BITSWAP_110,
    MAX_ENTRIES,
    WANT_BLOCK,
    WANT_HAVE,
    BitswapDecodeError,
    Block,
    Message,
    MessageDecoder,
    MessageTooLarge,
    Presence,
    WantEntry,
    cid_prefix,
    decode_message,
    encode_message,
    frame,
    key,
)
from benchsync.protocol.bitswap_ledger import (
    BLOCK,
    DONT_HAVE,
    HAVE,
    Ledger,
    NoProvider,
    WantQueue,
)
from benchsync.protocol.frames import RemoteProtocolError
from benchsync.storage.cid import DAG_PB, RAW, block_cid
from tests.fuzzing import FUZZ_SETTINGS

HELLO = block_cid(RAW, b"hello")
V0 = CID("base58btc", 0, "dag-pb", b"\x12\x20" + hashlib.sha256(b"node").digest())


def _proto_classes() -> dict[str, type]:
    """The spec's message.proto as protobuf runtime classes (built from descriptors)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="bitswap_test.proto", package="bitswap.pb",
                                             syntax="proto3")  # fmt: skip
    msg = fdp.message_type.add(name="Message")

    def add(m, name, number, ftype, label=F.LABEL_OPTIONAL, type_name=None):  # type: ignore[no-untyped-def]
        f = m.field.add(name=name, number=number, type=ftype, label=label)
        if type_name:
            f.type_name = type_name

    wl = msg.nested_type.add(name="Wantlist")
    wt = wl.enum_type.add(name="WantType")
    wt.value.add(name="Block", number=0)
    wt.value.add(name="Have", number=1)
    entry = wl.nested_type.add(name="Entry")
    add(entry, "block", 1, F.TYPE_BYTES)
    add(entry, "priority", 2, F.TYPE_INT32)
    add(entry, "cancel", 3, F.TYPE_BOOL)
    add(entry, "wantType", 4, F.TYPE_ENUM, type_name=".bitswap.pb.Message.Wantlist.WantType")
    add(entry, "sendDontHave", 5, F.TYPE_BOOL)
    add(wl, "entries", 1, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".bitswap.pb.Message.Wantlist.Entry")
    add(wl, "full", 2, F.TYPE_BOOL)
    blk = msg.nested_type.add(name="Block")
    add(blk, "prefix", 1, F.TYPE_BYTES)
    add(blk, "data", 2, F.TYPE_BYTES)
    pt = msg.enum_type.add(name="BlockPresenceType")
    pt.value.add(name="Have", number=0)
    pt.value.add(name="DontHave", number=1)
    pres = msg.nested_type.add(name="BlockPresence")
    add(pres, "cid", 1, F.TYPE_BYTES)
    add(pres, "type", 2, F.TYPE_ENUM, type_name=".bitswap.pb.Message.BlockPresenceType")
    add(msg, "wantlist", 1, F.TYPE_MESSAGE, type_name=".bitswap.pb.Message.Wantlist")
    add(msg, "blocks", 2, F.TYPE_BYTES, F.LABEL_REPEATED)
    add(msg, "payload", 3, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".bitswap.pb.Message.Block")
    add(msg, "blockPresences", 4, F.TYPE_MESSAGE, F.LABEL_REPEATED,
        ".bitswap.pb.Message.BlockPresence")  # fmt: skip
    add(msg, "pendingBytes", 5, F.TYPE_INT32)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    descriptor = pool.FindMessageTypeByName("bitswap.pb.Message")
    return {"Message": message_factory.GetMessageClass(descriptor)}


PB = _proto_classes()["Message"]


# --- wire format ------------------------------------------------------------------------


def test_want_have_entry_bytes_are_exact() -> None:
    body = encode_message(Message(entries=(WantEntry(HELLO, WANT_HAVE, send_dont_have=True),)))
    entry = b"\x0a\x24" + bytes(HELLO) + b"\x10\x01" + b"\x20\x01" + b"\x28\x01"
    assert body == b"\x0a" + bytes([len(entry) + 2]) + b"\x0a" + bytes([len(entry)]) + entry


def test_our_bytes_parse_in_the_protobuf_runtime_as_the_spec_says() -> None:
    msg = Message(
        entries=(WantEntry(HELLO, WANT_HAVE, True), WantEntry(V0, cancel=True, priority=-5)),
        full=True,
        blocks=(Block(HELLO, b"hello"),),
        presences=(Presence(V0, False), Presence(HELLO, True)),
        pending_bytes=1234,
    )
    pb = PB()
    pb.ParseFromString(encode_message(msg))
    assert pb.wantlist.full
    e0, e1 = pb.wantlist.entries
    assert (e0.block, e0.wantType, e0.sendDontHave, e0.priority) == (bytes(HELLO), 1, True, 1)
    # a CIDv0 travels as its bare multihash
    assert (e1.block, e1.cancel, e1.priority) == (bytes(V0.digest), True, -5)
    (payload,) = pb.payload
    assert payload.prefix == b"\x01\x55\x12\x20" and payload.data == b"hello"
    presences = [(p.cid, p.type) for p in pb.blockPresences]
    assert presences == [(bytes(V0.digest), 1), (bytes(HELLO), 0)]
    assert pb.pendingBytes == 1234
    assert decode_message(encode_message(msg)) == msg


def test_runtime_bytes_decode_with_blocks_verified_by_their_prefix() -> None:
    leaf = b"some leaf"
    node = b"\x0a\x02\x08\x01"  # any bytes: a CIDv0 prefix says dag-pb
    pb = PB()
    e = pb.wantlist.entries.add()
    e.block, e.wantType, e.sendDontHave, e.priority = bytes(HELLO), 0, True, 2**31 - 1
    pb.payload.add(prefix=b"\x01\x55\x12\x20", data=leaf)
    pb.payload.add(prefix=b"\x00\x70\x12\x20", data=node)
    pb.blocks.append(node)  # 1.0.0: CIDv0 implied
    pb.blockPresences.add(cid=bytes(HELLO), type=1)
    msg = decode_message(pb.SerializeToString())
    assert msg.entries == (WantEntry(HELLO, WANT_BLOCK, True, False, 2**31 - 1),)
    v0 = CID("base58btc", 0, "dag-pb", b"\x12\x20" + hashlib.sha256(node).digest())
    # the runtime writes fields in number order: `blocks` (2) before `payload` (3)
    assert [b.cid for b in msg.blocks] == [v0, block_cid(RAW, leaf), v0]
    assert msg.presences == (Presence(HELLO, False),)


def test_old_protocols_leave_out_what_they_do_not_know() -> None:
    msg = Message(entries=(WantEntry(HELLO, WANT_HAVE, True),), blocks=(Block(V0, b"node"),),
                  presences=(Presence(HELLO, True),))  # fmt: skip
    pb = PB()
    pb.ParseFromString(encode_message(msg, BITSWAP_100))
    assert list(pb.blocks) == [b"node"] and not pb.payload and not pb.blockPresences
    assert not pb.wantlist.entries[0].sendDontHave
    pb.ParseFromString(encode_message(msg, BITSWAP_110))
    assert pb.payload[0].prefix == cid_prefix(V0) == b"\x00\x70\x12\x20" and not pb.blockPresences


def test_decoder_frames_split_and_joined_messages() -> None:
    a = frame(encode_message(Message(blocks=(Block(HELLO, b"hello"),))))
    b = frame(encode_message(Message(presences=(Presence(V0, False),))))
    d = MessageDecoder()
    got = []
    for i in range(len(a + b)):
        got += d.feed((a + b)[i : i + 1])
    assert [m.blocks for m in got] == [(Block(HELLO, b"hello"),), ()]
    assert d.feed(a + b) and d.buffered == 0


def test_oversized_message_is_refused_before_it_is_buffered() -> None:
    d = MessageDecoder(max_message=1000)
    with pytest.raises(MessageTooLarge) as e:
        d.feed(b"\xe9\x07")  # 1001
    assert (e.value.limit, e.value.got) == (1000, 1001)
    assert isinstance(e.value, RemoteProtocolError)


def test_oversized_block_is_a_decode_error() -> None:
    pb = PB()
    pb.payload.add(prefix=b"\x01\x55\x12\x20", data=b"x" * 101)
    with pytest.raises(BitswapDecodeError, match="101-byte block"):
        decode_message(pb.SerializeToString(), max_block=100)


def test_entries_beyond_the_limit_are_counted_not_built() -> None:
    pb = PB()
    for i in range(MAX_ENTRIES + 10):
        pb.wantlist.entries.add(block=bytes(block_cid(RAW, str(i).encode())))
    msg = decode_message(pb.SerializeToString())
    assert len(msg.entries) == MAX_ENTRIES and msg.dropped_entries == 10


def test_unverifiable_hash_is_dropped_and_counted() -> None:
    pb = PB()
    pb.payload.add(prefix=b"\x01\x55\x13\x40", data=b"sha2-512 claimed")  # sha2-512
    msg = decode_message(pb.SerializeToString())
    assert msg.blocks == () and msg.unverifiable == 1


@pytest.mark.parametrize(
    "body",
    [
        b"\x0a\x05\x0a\x03\x0a\x01",  # entry claims more bytes than remain
        b"\x1a\x02\x12\x00",  # payload without a prefix
        b"\x1a\x06\x0a\x04\x02\x55\x12\x20",  # CID version 2 prefix
        b"\x1a\x06\x0a\x04\x01\x55\x12\x10",  # sha2-256 with a 16-byte digest
        b"\x22\x03\x0a\x01\x01",  # presence CID of one byte
        b"\x0a\x06\x0a\x04\x20\x07\x0a\x00",  # wantType 7
        b"\x0b",  # group wire type
        b"\x28" + b"\xff" * 10 + b"\x01",  # varint over 10 bytes
    ],
)
def test_malformed_messages_are_decode_errors(body: bytes) -> None:
    with pytest.raises(BitswapDecodeError):
        decode_message(body)


def test_stream_cut_inside_a_message_is_an_error() -> None:
    d = MessageDecoder()
    d.feed(frame(encode_message(Message(blocks=(Block(HELLO, b"hello"),))))[:-1])
    with pytest.raises(BitswapDecodeError, match="ended inside"):
        d.close()


QUICK_CASES = 1_500  # decoder inputs in the default run
FULL_CASES = 10_000  # ... under `-m fuzz`
SEED_MESSAGE = frame(encode_message(Message(
    entries=(WantEntry(HELLO, WANT_HAVE, True), WantEntry(V0, cancel=True, priority=-3)),
    full=True, blocks=(Block(V0, b"node"), Block(HELLO, b"hello")),
    presences=(Presence(HELLO, False), Presence(V0, True)), pending_bytes=77,
)))  # fmt: skip


@st.composite
def hostile_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes, or a real framed message with bytes flipped, cut or inserted."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=400))
    data = bytearray(SEED_MESSAGE)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at:]
            if not data:
                break
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def decode_outcome(data: bytes) -> str:
    d = MessageDecoder(max_message=4096)
    try:
        msgs = d.feed(data)
        d.close()
    except BitswapDecodeError as e:
        return type(e).__name__
    for msg in msgs:  # whatever decoded, its blocks hash to their CIDs
        for b in msg.blocks:
            assert b.cid.digest[2:] == hashlib.sha256(b.data).digest()
    return "ok"


@pytest.mark.parametrize(
    "cases",
    [pytest.param(QUICK_CASES, id="quick"),
     pytest.param(FULL_CASES, id="full", marks=pytest.mark.fuzz)],
)  # fmt: skip
def test_hostile_bytes_raise_only_decode_errors(cases: int) -> None:
    outcomes: Counter[str] = Counter()

    @settings(FUZZ_SETTINGS, max_examples=cases)
    @given(hostile_bytes())
    def one(data: bytes) -> None:
        outcomes[decode_outcome(data)] += 1

    one()
    assert sum(outcomes.values()) >= cases * 0.9, outcomes
    # Some inputs get past the framing into every layer: ok, decode errors, cut streams.
    assert {"ok", "BitswapDecodeError"} <= set(outcomes), outcomes


# --- the server ledger --------------------------------------------------------------------


def cids(n: int, tag: str = "") -> list[CID]:
    return [block_cid(RAW, f"{tag}{i}".encode()) for i in range(n)]


def wants(cs: list[CID], **kw: object) -> Message:
    return Message(entries=tuple(WantEntry(c, **kw) for c in cs))  # type: ignore[arg-type]


def test_want_block_have_and_dont_have_are_answered_as_asked() -> None:
    led = Ledger()
    a, b, c, d = cids(4)
    led.receive(Message(entries=(
        WantEntry(a, WANT_BLOCK), WantEntry(b, WANT_HAVE), WantEntry(c, WANT_HAVE, True),
        WantEntry(d, WANT_BLOCK, False),
    )), now=0)  # fmt: skip
    assert led.to_look_up(10) == [a, b, c, d]
    assert led.to_look_up(10) == []  # handed out once
    led.looked_up(a, 100)
    led.looked_up(b, 7)
    led.looked_up(c, None)
    led.looked_up(d, None)  # not held, no DONT_HAVE asked: it waits
    assert led.next_batch() == [
        _r(BLOCK, a, 100), _r(HAVE, b), _r(DONT_HAVE, c)
    ]
    assert led.inflight == 100 and led.wants == 1
    led.sent(100)
    assert led.inflight == 0
    assert led.block_added(d) and led.to_look_up(10) == [d]


def _r(kind: str, cid: CID, size: int = 0) -> object:
    from benchsync.protocol.bitswap_ledger import Reply

    return Reply(kind, cid, size)


def test_priority_orders_lookups() -> None:
    led = Ledger()
    a, b, c = cids(3)
    led.receive(Message(entries=(WantEntry(a, priority=1), WantEntry(b, priority=9),
                                 WantEntry(c, priority=9))), now=0)  # fmt: skip
    assert led.to_look_up(2) == [b, c]


def test_cancel_removes_a_want_and_an_unsent_block() -> None:
    led = Ledger()
    a, b = cids(2)
    led.receive(wants([a, b]), now=0)
    led.to_look_up(10)
    led.looked_up(a, 10)
    led.receive(Message(entries=(WantEntry(a, cancel=True), WantEntry(b, cancel=True))), now=0)
    led.looked_up(b, 10)  # the lookup raced the cancel: nothing owed
    assert led.next_batch() == [] and led.wants == 0


def test_full_wantlist_replaces_the_previous_one() -> None:
    led = Ledger()
    a, b, c = cids(3)
    led.receive(wants([a, b]), now=0)
    led.receive(Message(entries=(WantEntry(c),), full=True), now=0)
    assert led.wanted() == [c]


def test_wantlist_limit_costs_only_the_extra_entries() -> None:
    led = Ledger(max_wants=100, burst=10_000)
    got = led.receive(wants(cids(10_000), want_type=WANT_HAVE, send_dont_have=True), now=0)
    assert (got.accepted, got.over_limit) == (100, 9_900) and led.wants == 100
    for cid in led.to_look_up(1000):
        led.looked_up(cid, None)
    assert led.wants == 100  # owed DONT_HAVEs still count until sent
    assert len(led.next_batch()) == 100 and led.wants == 0


def test_rate_limit_refills_with_time() -> None:
    led = Ledger(max_wants=10_000, rate=100.0, burst=50)
    assert led.receive(wants(cids(80, "a")), now=0.0).over_rate == 30
    assert led.receive(wants(cids(80, "b")), now=0.1).accepted == 10  # 10 tokens back
    assert led.receive(wants(cids(80, "c")), now=10.0).accepted == 50  # capped at the burst


def test_inflight_limit_holds_blocks_back_until_sent() -> None:
    led = Ledger(max_inflight=250)
    cs = cids(4)
    led.receive(wants(cs), now=0)
    for c in led.to_look_up(10):
        led.looked_up(c, 100)
    first = led.next_batch(max_bytes=10_000)
    assert [r.cid for r in first] == cs[:2] and led.inflight == 200
    assert led.next_batch() == []
    led.sent(200)
    assert [r.cid for r in led.next_batch()] == cs[2:]


def test_one_block_always_fits_a_batch() -> None:
    led = Ledger()
    (a,) = cids(1)
    led.receive(wants([a]), now=0)
    led.to_look_up(1)
    led.looked_up(a, 3_000_000)  # over the block limit: not served
    assert led.next_batch(max_bytes=10) == []
    led.receive(wants([a]), now=0)
    led.to_look_up(1)
    led.looked_up(a, 1000)
    assert led.next_batch(max_bytes=10) == [_r(BLOCK, a, 1000)]


# --- the client queue -----------------------------------------------------------------------


def test_want_queue_asks_one_peer_and_moves_on_dont_have() -> None:
    q = WantQueue(["p1", "p2"], window=2)
    a, b, c = cids(3)
    q.want([a, b, c])
    reqs = q.next_requests(0)
    assert {p: [e.cid for e in es] for p, es in reqs.items()} == {"p1": [a, b]}
    assert all(e.send_dont_have and e.want_type == WANT_BLOCK for e in reqs["p1"])
    q.dont_have("p1", a)
    assert [e.cid for e in q.next_requests(0)["p2"]] == [a]
    assert q.received("p1", b) and not q.received("p1", b)
    assert [e.cid for e in q.next_requests(0)["p1"]] == [c]
    q.dont_have("p2", a)
    with pytest.raises(NoProvider, match="p1, p2"):
        q.next_requests(0)


def test_want_queue_moves_a_gone_peers_wants_and_finds_stalls() -> None:
    q = WantQueue(["p1", "p2"])
    a, b = cids(2)
    q.want([a, b])
    q.next_requests(0.0)
    assert q.stalled(5.0, timeout=10.0) == [] and q.stalled(11.0, timeout=10.0) == ["p1"]
    q.received("p1", a, now=9.0)  # progress keeps its other wants fresh
    assert q.stalled(11.0, timeout=10.0) == []
    assert q.peer_gone("p1") == [b]
    assert {p: [e.cid for e in es] for p, es in q.next_requests(12.0).items()} == {"p2": [b]}
    assert q.cancels() == {"p2": [WantEntry(b, cancel=True)]}


def test_a_cidv0_and_its_cidv1_are_one_want() -> None:
    data = b"node"
    v1 = block_cid(DAG_PB, data)
    v0 = CID("base58btc", 0, "dag-pb", v1.digest)
    q = WantQueue(["p"])
    q.want([v0])
    q.next_requests(0)
    assert q.received("p", v1) and q.done


def test_holds_and_wants_block_follow_wants_and_replies() -> None:
    led = Ledger()
    a, b = cids(2)
    led.receive(Message(entries=(WantEntry(a, WANT_BLOCK), WantEntry(b, WANT_HAVE))), now=0)
    assert led.wants_block(a) and not led.wants_block(b)
    led.to_look_up(10)
    led.looked_up(a, 10)  # owed, not sent: still held
    assert led.holds(key(a)) and not led.wants_block(a)
    led.receive(Message(entries=(WantEntry(a, cancel=True),)), now=0)
    assert not led.holds(key(a)) and led.holds(key(b))
