"""Fuzzing every decoder a peer or a file can reach: each input ends in success or a typed error.

A peer, a CAR file or a snapshot is hostile input; whatever bytes arrive, the
decoder that reads them must either return a value or raise the error class
that names the sender as at fault (STYLE items 9 and 13). Anything else -- a
KeyError from multiformats, a RecursionError from json, an OSError from a
path built out of a link name -- escapes the handlers that turn errors into
"Error: ..." or a rejected stream, and ends a CLI command with a traceback or
a node's task with a crash.

"Typed error" per decoder (TYPED below):
- CAR (storage/car.py): `CarError` subclasses.
- dag-pb / UnixFS messages (storage/dagpb.py): `DagPbError`.
- UnixFS DAG reading (storage/unixfs.py over a hostile blockstore): `StorageError`
  (`UnixFSError`, `DagPbError`, `BlockNotFound`).
- binary and text CIDs (storage/cid.py): `InvalidCID`; text CIDs in messages
  (protocol/frames.py `parse_cid`): the caller's `RemoteProtocolError`.
- snapshot manifest (storage/snapshot.py `Manifest.from_bytes`): `BadSnapshot`.
- frames (protocol/frames.py): `RemoteProtocolError` (`FrameTooLarge`, `TruncatedFrame`).
- head messages (protocol/heads.py): `RemoteProtocolError` (`InvalidHead`).
- fetch frames (protocol/fetch.py): `RemoteProtocolError` (`FetchProtocolError`).
- query frames (protocol/query.py): `QueryMessageError`.
- `import` then `restore` of a CAR into a real LocalDataset: `StorageError`, the
  class the CLI turns into "Error: ..." (CarImportError, RestoreError, BadSnapshot, ...).

Inputs are mutations of good fixtures (tests/fixtures/car, tests/fixtures/fuzz,
and messages our own encoders write): flipped and set bytes, truncations,
deletions, insertions, splices between fixtures, bad varints, huge length
prefixes, wrong hash and codec codes; plus structure-aware generators that edit
a field of a JSON message or a link of a dag-pb node and re-hash the DAG up to
its root, so the result passes CID verification and reaches the code behind it.

Hypothesis runs derandomized (a fixed seed): the default run tries QUICK_CASES
inputs per decoder; `pytest -m fuzz tests/test_fuzz.py` runs FULL_CASES.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fuzzing import FUZZ_SETTINGS
from hypothesis import given, settings
from hypothesis import strategies as st
from multiformats import CID

from benchsync.protocol import fetch, frames, heads, query
from benchsync.protocol.frames import RemoteProtocolError
from benchsync.storage import car, dagpb, unixfs
from benchsync.storage.blockstore import BlockNotFound, verify_block
from benchsync.storage.cid import (
    DAG_PB,
    IDENTITY,
    RAW,
    InvalidCID,
    block_cid,
    cid_from_text,
    decode_cid,
    make_cid,
    parse_cid,
    uvarint,
)
from benchsync.storage.dataset import LocalDataset
from benchsync.storage.errors import StorageError
from benchsync.storage.snapshot import BadSnapshot, Manifest

QUICK_CASES = 1_500  # inputs per decoder in the default run (~40 s in all on 2 loaded cores)
FULL_CASES = 10_000  # inputs per decoder under `-m fuzz`
E2E_QUICK_CASES = 100  # mutated CARs imported (and restored) in the default run
E2E_FULL_CASES = 1_500  # ... under `-m fuzz`: each costs a fresh data directory and DuckDB
MAX_CAT_BYTES = 16 * 1024 * 1024  # bytes; the fixtures expand to ~10 KB, so this is a bomb

FIXTURES = Path(__file__).parent / "fixtures"
NETWORK = "fuzzlab"
DATASET = "12D3KooWFuzzFixtureAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"


TYPED: dict[str, tuple[type[BaseException], ...]] = {
    "car": (car.CarError,),
    "dagpb": (dagpb.DagPbError,),
    "unixfs": (StorageError,),
    "cid": (InvalidCID, RemoteProtocolError),
    "manifest": (BadSnapshot,),
    "frames": (RemoteProtocolError,),
    "heads": (RemoteProtocolError,),
    "fetch": (RemoteProtocolError,),
    "query": (query.QueryMessageError,),
    "import_restore": (StorageError,),
}


# --- good fixtures -------------------------------------------------------------------------


def _read_car(data: bytes) -> tuple[list[CID], list[tuple[CID, bytes]]]:
    roots, blocks = car.read_car(io.BytesIO(data))
    return roots, list(blocks)


def _file_dag_car() -> bytes:
    """A chunked UnixFS file (inner dag-pb file nodes, blocksizes) as a CAR."""
    blocks: dict[CID, bytes] = {}

    def put(cid: CID, data: bytes) -> None:
        blocks[cid] = data

    content = bytes(range(256)) * 24  # 6 KiB: 12 leaves of 512 bytes, 3 levels of 3 links
    root, _, _ = unixfs.add_bytes(content, put, chunk_size=512, max_links=3)
    return car.car_bytes([root], blocks.items())


SNAPSHOT_CAR = (FIXTURES / "fuzz" / "snapshot.car").read_bytes()
FILE_DAG_CAR = _file_dag_car()
GOOD_CARS = [
    SNAPSHOT_CAR,
    FILE_DAG_CAR,
    (FIXTURES / "car" / "good-hello-ipfscar.car").read_bytes(),
    (FIXTURES / "car" / "good-dir-ipfscar.car").read_bytes(),
]
CAR_SEEDS = GOOD_CARS + [p.read_bytes() for p in sorted((FIXTURES / "car").glob("broken-*.car"))]
_PARSED = {data: _read_car(data) for data in GOOD_CARS}
GOOD_BLOCKS = [pair for data in GOOD_CARS for pair in _PARSED[data][1]]
DAG_PB_BLOCKS = [data for cid, data in GOOD_BLOCKS if cid.codec.code == DAG_PB]
UNIXFS_DATA = [dagpb.decode_node(b)[1] or b"" for b in DAG_PB_BLOCKS]
CIDS = [cid for cid, _ in GOOD_BLOCKS] + [
    make_cid(RAW, IDENTITY, b"hi"),
    CID.decode("QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n"),
]
CID_BYTES = [bytes(c) for c in CIDS]
CID_TEXTS = [str(c) for c in CIDS] + [
    "QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n",
    "zb2rhe5P4gXftAwvA4eXQ5HJwsER2owDyS9sKaQRRVQPn93bA",
    "f01551220" + "ab" * 32,
]
MANIFEST_BYTES = next(d for c, d in GOOD_BLOCKS if d.startswith(b'{\n "created_at"'))
GOOD_MANIFEST = json.loads(MANIFEST_BYTES)

ROOT, TABLES = CIDS[0], CIDS[2]
GOOD_HEAD = heads.Head(
    dataset=DATASET, seq=3, root=ROOT, tables=TABLES, created_at=1.7e9, bytes=9742
)
GOOD_FETCH_REQUEST = fetch.FetchRequest(network=NETWORK, root=ROOT, want=tuple(CIDS[:4]))
GOOD_FETCH_STATUS = fetch.FetchStatus(count=2, bytes=1399, missing=(CIDS[2],))
JSON_TEMPLATES: list[dict[str, Any]] = [
    GOOD_HEAD.to_json(),
    heads.head_response(GOOD_HEAD, [GOOD_HEAD]),
    heads.head_request(NETWORK),
    GOOD_FETCH_REQUEST.to_json(),
    GOOD_FETCH_STATUS.to_json(),
    frames.refusal("busy"),
]
GOOD_QUERY_REQUEST = query.QueryRequest(sql="SELECT 1 WHERE ? > 0", params=[1, "x", None, 2.5])
GOOD_QUERY_RESPONSES = [
    query.QueryResponse(status="ok", arrow_ipc=b"\xff\xff\xff\xff" + bytes(60)),
    query.QueryResponse.error("timeout", "query took longer than 10 s"),
]


# --- mutation operators --------------------------------------------------------------------

HASH_CODES = [0x00, 0x01, 0x02, 0x11, 0x13, 0x14, 0x1E, 0x55, 0x70, 0x99, 0xB220, 0x1012, 2**40]
CODEC_CODES = [0x00, 0x12, 0x50, 0x55, 0x70, 0x71, 0x72, 0x0129, 0x99, 0x0200, 2**40]
INTERESTING_BYTES = [0x00, 0x01, 0x12, 0x20, 0x7F, 0x80, 0xFF]
BAD_VARINTS = [
    b"\xff" * 10,  # too long
    b"\x80" * 9 + b"\x01",  # ten bytes
    b"\x80\x00",  # not minimal
    b"\xff\xff\xff\xff\xff\xff\xff\xff\x7f",  # 2**63 - 1
    b"\x80",  # cut short
]
HUGE_LENGTHS = [
    2**7,
    2**14,
    car.DEFAULT_MAX_HEADER + 1,
    car.DEFAULT_MAX_SECTION + 1,
    frames.MAX_FRAME + 1,
    64 << 20,
    2**31,
    2**32 + 5,
    2**63 - 1,
]


@st.composite
def mutated(draw: st.DrawFn, seeds: Sequence[bytes], max_ops: int = 3) -> bytes:
    """One of `seeds` with 1..max_ops byte-level mutations applied."""
    data = bytearray(_pick(draw, seeds))
    for _ in range(draw(st.integers(1, max_ops))):
        data = _mutate_once(draw, data, seeds)
    return bytes(data)


def _mutate_once(draw: st.DrawFn, data: bytearray, seeds: Sequence[bytes]) -> bytearray:
    op = draw(st.integers(0, 10))
    pos = draw(st.integers(0, len(data)))
    if op == 0 and data:  # flip bits of one byte
        i = min(pos, len(data) - 1)
        data[i] ^= draw(st.integers(1, 255))
    elif op == 1 and data:  # set one byte to a boundary value
        data[min(pos, len(data) - 1)] = _pick(draw, INTERESTING_BYTES)
    elif op == 2:  # truncate
        del data[pos:]
    elif op == 3:  # delete a run
        del data[pos : pos + draw(st.integers(1, 64))]
    elif op == 4:  # insert random bytes
        data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    elif op == 5:  # splice a slice of another fixture in, replacing or inserting
        src = _pick(draw, seeds)
        a = draw(st.integers(0, len(src)))
        piece = src[a : a + draw(st.integers(1, 256))]
        end = pos + (len(piece) if draw(st.booleans()) else 0)
        data[pos:end] = piece
    elif op == 6:  # duplicate a run
        data[pos:pos] = data[pos : pos + draw(st.integers(1, 128))]
    elif op == 7:  # a bad varint
        data[pos:pos] = _pick(draw, BAD_VARINTS)
    elif op == 8:  # a huge length prefix, inserted or replacing the byte there
        end = pos + draw(st.integers(0, 1))
        data[pos:end] = uvarint(_pick(draw, HUGE_LENGTHS))
    elif op == 9:  # a wrong hash code in a sha2-256 multihash
        hits = _find_all(data, b"\x12\x20")
        if hits:
            i = _pick(draw, hits)
            data[i : i + 1] = uvarint(_pick(draw, HASH_CODES))
    else:  # a wrong codec in a CIDv1
        hits = _find_all(data, b"\x01\x55\x12") + _find_all(data, b"\x01\x70\x12")
        if hits:
            i = _pick(draw, hits) + 1
            data[i : i + 1] = uvarint(_pick(draw, CODEC_CODES))
    return data


def _pick(draw: st.DrawFn, items: Sequence[Any]) -> Any:
    """One of `items`: an index draw is much cheaper than a fresh `sampled_from` per call."""
    return items[draw(st.integers(0, len(items) - 1))]


def _find_all(data: bytes | bytearray, needle: bytes) -> list[int]:
    out: list[int] = []
    i = data.find(needle)
    while i >= 0 and len(out) < 64:
        out.append(i)
        i = data.find(needle, i + 1)
    return out


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` cut into the pieces a network read might deliver."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# --- structure-aware JSON ------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text spliced in verbatim (values json.dumps would not write)."""

    text: str


HOSTILE_VALUES: list[Any] = [  # the nastiest first: Hypothesis draws low indices more often
    Raw("1e999"), Raw("-1e999"), Raw("NaN"), Raw("Infinity"), Raw("1" * 4400),
    Raw("[" * 1000 + "]" * 1000), Raw('{"a":' * 990 + "1" + "}" * 990), Raw('"\\ud800"'),
    Raw('"a\\u0000b"'), None, True, False, 0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64,
    -(2**63) - 1, 0.5, -0.0, 1e308, "", " ", "x" * 300, "..", "é", [], {}, [1, 2], {"a": 1},
    "refused", "ok", NETWORK, DATASET, "SELECT 1", *CID_TEXTS,
    [str(c) for c in CIDS], [CID_TEXTS[0]] * 3, [1] * 300,
]  # fmt: skip


EXTRA_KEYS = ["status", "x", "head", "replicas", "", "want", "network", "count"]


def _dump(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{_dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dump(v) for v in value) + "]"
    return json.dumps(value)


@st.composite
def hostile_json(draw: st.DrawFn, templates: Sequence[dict[str, Any]]) -> bytes:
    """A good message with fields removed, replaced by hostile values or added; sometimes
    the whole document replaced, sometimes the text byte-mutated afterwards."""
    doc: Any = dict(_pick(draw, templates))
    for _ in range(draw(st.integers(0, 3))):
        keys = sorted(doc) if isinstance(doc, dict) else []
        action = draw(st.integers(0, 5))
        if action <= 2 and keys:
            doc[_pick(draw, keys)] = _pick(draw, HOSTILE_VALUES)
        elif action == 3 and keys:
            del doc[_pick(draw, keys)]
        elif action == 4 and isinstance(doc, dict):
            doc[_pick(draw, EXTRA_KEYS)] = _pick(draw, HOSTILE_VALUES)
        else:
            doc = _pick(draw, HOSTILE_VALUES)
            doc = dict(doc) if isinstance(doc, dict) else doc  # never edit the shared pool
    # nested heads (head responses) get hostile fields too
    if (
        isinstance(doc, dict)
        and isinstance(doc.get("head"), dict)
        and doc["head"]
        and draw(st.booleans())
    ):
        head = dict(doc["head"])
        head[_pick(draw, sorted(head))] = _pick(draw, HOSTILE_VALUES)
        doc["head"] = head
    text = _dump(doc).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 3)) == 0:
        text = bytes(_mutate_once(draw, bytearray(text), [text]))
    return text


# --- structure-aware DAGs: edit one block, re-hash up to the root ---------------------------

# No "/" in a name: this fuzzer may run as root, and must not write outside its tmp dir.
HOSTILE_NAMES = [
    "", ".", "..", ".parquet", "x.parquet", "models.parquet", "manifest.json", "tables",
    "a\x00b.parquet", "é.parquet", "a b.parquet", 'q"uote.parquet', "x" * 300 + ".parquet",
    "performance_results", "PERFORMANCE_RESULTS.parquet", "\\..\\x.parquet",
]  # fmt: skip


def _relink(
    blocks: list[tuple[CID, bytes]], old: CID, new: CID, new_data: bytes
) -> tuple[list[tuple[CID, bytes]], dict[CID, CID]]:
    """Replace block `old` by (new, new_data) and re-hash every dag-pb ancestor that links it;
    returns the new blocks and the CIDs that changed (old -> new)."""
    renamed = {old: new}
    out: list[tuple[CID, bytes]] = []
    for cid, data in reversed(blocks):  # CAR order is parents first: children come back first
        if cid == old:
            out.append((new, new_data))
            continue
        if cid.codec.code == DAG_PB:
            try:
                node_links, payload = dagpb.decode_node(data)
            except dagpb.DagPbError:  # an earlier edit broke it: it links nothing now
                node_links, payload = [], None
            if any(link.cid in renamed for link in node_links):
                node_links = [
                    dagpb.Link(renamed.get(link.cid, link.cid), link.name, link.tsize)
                    for link in node_links
                ]
                data = dagpb.encode_node(node_links, payload)
                renamed[cid] = block_cid(DAG_PB, data)
                cid = renamed[cid]
        out.append((cid, data))
    out.reverse()
    return out, renamed


@st.composite
def hostile_dag(draw: st.DrawFn, car_seeds: Sequence[bytes]) -> tuple[list[CID], list]:
    """(roots, blocks) of a good DAG with one block edited and its ancestors re-hashed:
    every block verifies, so the edit reaches the code that gives blocks meaning."""
    roots, blocks = _PARSED[_pick(draw, car_seeds)]
    blocks = list(blocks)
    for _ in range(draw(st.integers(1, 2))):
        i = draw(st.integers(0, len(blocks) - 1))
        cid, data = blocks[i]
        new_cid, new_data = _edit_block(draw, cid, data, [c for c, _ in blocks])
        blocks, renamed = _relink(blocks, cid, new_cid, new_data)
        roots = [renamed.get(r, r) for r in roots]
    # the section list itself: drop, duplicate or reorder a block, add a root
    action = draw(st.integers(0, 9))
    j = draw(st.integers(0, len(blocks) - 1))
    if action == 0:
        del blocks[j]
    elif action == 1:
        blocks.insert(draw(st.integers(0, len(blocks))), blocks[j])
    elif action == 2:
        blocks.append(blocks.pop(j))
    elif action == 3:
        roots = [*roots, _pick(draw, CIDS)]
    return roots, blocks


@st.composite
def hostile_manifest(draw: st.DrawFn) -> bytes:
    """The fixture's manifest.json with a top-level or per-table field made hostile,
    or a table renamed; sometimes byte-mutated afterwards."""
    doc = dict(GOOD_MANIFEST)
    for _ in range(draw(st.integers(1, 2))):
        field = _pick(draw, ["tables.rows", "tables.bytes", "tables.cid", "tables", *sorted(doc)])
        value = _pick(draw, HOSTILE_VALUES)
        tables_ok = isinstance(doc["tables"], dict) and doc["tables"]
        if field.startswith("tables.") and tables_ok:
            tables = {k: dict(v) if isinstance(v, dict) else {} for k, v in doc["tables"].items()}
            name = _pick(draw, sorted(tables))
            tables[name][field.split(".")[1]] = value
            if draw(st.booleans()):
                tables[_pick(draw, HOSTILE_NAMES)] = tables.pop(name)
            doc["tables"] = tables
        else:
            doc[field.split(".")[0]] = value
    text = _dump(doc).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 4)) == 0:
        text = bytes(_mutate_once(draw, bytearray(text), [text]))
    return text


def _edit_block(draw: st.DrawFn, cid: CID, data: bytes, others: list[CID]) -> tuple[CID, bytes]:
    codec = cid.codec.code
    kind = draw(st.integers(0, 5))
    if kind == 0:  # same codec, mutated bytes
        new = bytes(_mutate_once(draw, bytearray(data), [data]))
        return block_cid(codec, new), new
    if kind == 1:  # another codec or an identity hash for the same bytes
        new_codec = _pick(draw, [RAW, DAG_PB, 0x71])
        if draw(st.booleans()) and len(data) < 2048:
            return make_cid(new_codec, IDENTITY, data), data
        return block_cid(new_codec, data), data
    if codec == RAW and data.startswith(b"{"):  # the manifest: hostile JSON fields
        new = draw(hostile_manifest())
        return block_cid(RAW, new), new
    if codec != DAG_PB:
        new = bytes(_mutate_once(draw, bytearray(data), [data]))
        return block_cid(codec, new), new
    try:
        node_links, payload = dagpb.decode_node(data)
        fs = dagpb.decode_unixfs(payload or b"")
    except dagpb.DagPbError:  # an earlier edit broke it: mutate its bytes again
        new = bytes(_mutate_once(draw, bytearray(data), [data]))
        return block_cid(codec, new), new
    links = list(node_links)
    if kind == 2 and links:  # rename a link (names go to the filesystem and SQL)
        k = draw(st.integers(0, len(links) - 1))
        links[k] = dagpb.Link(links[k].cid, _pick(draw, HOSTILE_NAMES), links[k].tsize)
    elif kind == 3 and links:  # repeat, drop or retarget a link; lie about its size
        k = draw(st.integers(0, len(links) - 1))
        edit = draw(st.integers(0, 3))
        if edit == 0:
            links[k:k] = [links[k]] * draw(st.integers(1, 3))
        elif edit == 1:
            del links[k]
        elif edit == 2:
            links[k] = dagpb.Link(_pick(draw, others), links[k].name, links[k].tsize)
        else:
            links[k] = dagpb.Link(links[k].cid, links[k].name, _pick(draw, HUGE_LENGTHS))
    else:  # the UnixFS Data: another type, lying sizes, or none at all
        choice = draw(st.integers(0, 3))
        if choice == 0:
            payload = None
        else:
            payload = dagpb.encode_unixfs(
                _pick(draw, [0, 1, 2, 3, 4, 5, 6, 99]) if choice == 1 else fs.type,
                data=fs.data or None,
                filesize=_pick(draw, [0, 1, *HUGE_LENGTHS]) if choice == 2 else None,
                blocksizes=[_pick(draw, [0, 1, *HUGE_LENGTHS])] * len(links),
            )
    new = dagpb.encode_node(links, payload)
    return block_cid(DAG_PB, new), new


@st.composite
def hostile_car(draw: st.DrawFn, car_seeds: Sequence[bytes]) -> bytes:
    """A CAR that is either byte-mutated or a re-hashed hostile DAG (sometimes both)."""
    if draw(st.integers(0, 2)) == 0:
        return draw(mutated(car_seeds))
    roots, blocks = draw(hostile_dag([s for s in car_seeds if s in _PARSED]))
    data = car.car_bytes(roots, blocks)
    if draw(st.integers(0, 4)) == 0:
        data = bytes(_mutate_once(draw, bytearray(data), [data]))
    return data


# --- the targets: run one input, return its outcome ----------------------------------------


def _decode_car(args: tuple[bytes, list[bytes]]) -> None:
    data, pieces = args
    dec = car.CarDecoder(max_section=64 * 1024, max_block=32 * 1024, max_header=4096)
    for piece in pieces:
        for cid, block in dec.feed(piece):
            verify_block(cid, block)  # whatever the decoder hands out is verified
    dec.close()
    roots, blocks = car.read_car(io.BytesIO(data))
    for cid, block in blocks:
        verify_block(cid, block)


def _decode_dagpb(data: bytes) -> None:
    node_links, payload = dagpb.decode_node(data)
    for link in node_links:
        assert isinstance(link.cid, CID) and isinstance(link.name, str)
    dagpb.decode_unixfs(payload if payload is not None else data)
    dagpb.links(block_cid(DAG_PB, data), data)


def _read_dag(dag: tuple[list[CID], list[tuple[CID, bytes]]]) -> None:
    roots, pairs = dag
    store = dict(pairs)

    def get(cid: CID) -> bytes:
        try:
            return store[cid]
        except KeyError:
            raise BlockNotFound(f"block {cid} is not in the fuzzed DAG") from None

    root = roots[0]
    list(unixfs.walk(get, root))
    if (
        root.codec.code == DAG_PB
        and dagpb.decode_unixfs(dagpb.decode_node(store[root])[1] or b"").type
        == dagpb.TYPE_DIRECTORY
    ):
        for name, cid, _ in unixfs.list_directory(get, root):
            unixfs.resolve(get, root, name)
            if name == "tables":
                for _, leaf, _ in unixfs.list_directory(get, cid):
                    _cat(get, leaf)
            else:
                _cat(get, cid)
    else:
        _cat(get, root)


def _cat(get: Callable[[CID], bytes], cid: CID) -> None:
    total = 0
    for chunk in unixfs.cat(get, cid):
        total += len(chunk)
        assert total <= MAX_CAT_BYTES, f"a ~10 KB DAG expanded past {MAX_CAT_BYTES} bytes"


def _decode_cid(args: tuple[bytes, str]) -> None:
    raw, text = args
    parse_cid(raw)
    decode_cid(raw)
    cid = cid_from_text(text)
    if cid is not None:
        assert str(cid) == text
    frames.parse_cid(text, "cid", RemoteProtocolError)


def _decode_manifest(data: bytes) -> None:
    Manifest.from_bytes(data)


def _decode_frames(args: tuple[list[bytes], int]) -> None:
    pieces, max_frame = args
    dec = frames.FrameDecoder(max_frame=max_frame)
    for piece in pieces:
        for body in dec.feed(piece, max_frames=3):
            assert len(body) <= max_frame
            frames.decode_json(body)
    dec.close()


def _each(typed: tuple[type[BaseException], ...], *steps: Callable[[], object]) -> str:
    """Run every step (parsers of one input); the outcome names each step's result."""
    labels = []
    for step in steps:
        try:
            step()
            labels.append("ok")
        except typed as e:
            labels.append(type(e).__name__)
    return "+".join(labels)


def _decode_head(body: bytes) -> str:
    book = heads.HeadBook()
    book.accept(GOOD_HEAD)
    return _each(
        TYPED["heads"],
        lambda: heads.check_announcement(body, DATASET, book),
        lambda: heads.parse_head_response(frames.decode_json(body), DATASET),
    )


def _decode_fetch(body: bytes) -> str:
    def request() -> None:
        req = fetch.FetchRequest.from_json(frames.decode_json(body))
        fetch.expected_blocks(req, GOOD_FETCH_STATUS)

    def status() -> None:
        st_ = fetch.FetchStatus.from_json(frames.decode_json(body))
        expected = fetch.expected_blocks(GOOD_FETCH_REQUEST, st_)
        seq = fetch.BlockSequence(expected, st_.bytes)
        for cid, data in GOOD_BLOCKS[: st_.count]:
            seq.check(cid, data)
        seq.finish()

    return _each(TYPED["fetch"], request, status)


def _decode_query(data: bytes) -> str:
    def request() -> None:
        req = query.QueryRequest.from_bytes(data)
        assert query.QueryRequest.from_bytes(req.to_bytes()) == req

    def response() -> None:
        resp = query.QueryResponse.from_bytes(data)
        assert query.QueryResponse.from_bytes(resp.to_bytes()) == resp

    return _each(TYPED["query"], request, response)


def _query_messages() -> list[bytes]:
    return [GOOD_QUERY_REQUEST.to_bytes(), *(r.to_bytes() for r in GOOD_QUERY_RESPONSES)]


@st.composite
def query_messages(draw: st.DrawFn) -> bytes:
    """A query message with a byte-mutated body or a hostile JSON header."""
    if draw(st.booleans()):
        return draw(mutated(_query_messages()))
    templates = [json.loads(m[8 : 8 + int.from_bytes(m[4:8], "big")]) for m in _query_messages()]
    header = draw(hostile_json(templates))
    magic = _pick(draw, [query.REQUEST_MAGIC, query.RESPONSE_MAGIC, b"BSQ2"])
    body = _pick(draw, [b"", b"\xff\xff\xff\xff" + bytes(60), b"x"])
    declared = _pick(draw, [len(header), len(header) + 1, 2**32 - 1])
    return magic + declared.to_bytes(4, "big") + header + body


@st.composite
def frame_streams(draw: st.DrawFn) -> tuple[list[bytes], int]:
    bodies = draw(st.lists(hostile_json(JSON_TEMPLATES), min_size=1, max_size=3))
    stream = b"".join(frames.encode_frame(b, max_frame=2**20) for b in bodies)
    if draw(st.booleans()):
        stream = bytes(_mutate_once(draw, bytearray(stream), [stream]))
    return draw(chunked(stream)), _pick(draw, [64, 1024, frames.MAX_FRAME])


@st.composite
def car_inputs(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    data = draw(hostile_car(CAR_SEEDS))
    return data, draw(chunked(data))


@st.composite
def cid_inputs(draw: st.DrawFn) -> tuple[bytes, str]:
    raw = draw(mutated(CID_BYTES, max_ops=2))
    text = _pick(draw, CID_TEXTS)
    op = draw(st.integers(0, 4))
    pos = draw(st.integers(0, len(text)))
    if op == 0:
        text = text[:pos]
    elif op == 1:
        text = text[:pos] + _pick(draw, "bB0zQf1=~\x00é\ud800 ") + text[pos + 1 :]
    elif op == 2:
        text = text[:pos] + draw(st.text(max_size=4)) + text[pos:]
    elif op == 3:
        text = text.upper() if draw(st.booleans()) else text + text
    return raw, text


@dataclass(frozen=True)
class Target:
    strategy: Callable[[], st.SearchStrategy[Any]]
    run: Callable[[Any], object]
    min_kinds: int  # distinct outcomes (errors or "ok") a healthy fuzzer reaches


TARGETS: dict[str, Target] = {
    "car": Target(car_inputs, _decode_car, min_kinds=6),
    "dagpb": Target(lambda: mutated(DAG_PB_BLOCKS + UNIXFS_DATA), _decode_dagpb, min_kinds=2),
    "unixfs": Target(
        lambda: hostile_dag([SNAPSHOT_CAR, FILE_DAG_CAR, GOOD_CARS[3]]), _read_dag, min_kinds=3
    ),
    "cid": Target(cid_inputs, _decode_cid, min_kinds=3),
    "manifest": Target(
        lambda: st.one_of(mutated([MANIFEST_BYTES]), hostile_manifest()),
        _decode_manifest,
        min_kinds=2,
    ),
    "frames": Target(frame_streams, _decode_frames, min_kinds=3),
    "heads": Target(lambda: hostile_json(JSON_TEMPLATES), _decode_head, min_kinds=3),
    "fetch": Target(lambda: hostile_json(JSON_TEMPLATES), _decode_fetch, min_kinds=3),
    "query": Target(query_messages, _decode_query, min_kinds=2),
}


def _outcome(
    typed: tuple[type[BaseException], ...], run: Callable[[Any], object], value: Any
) -> str:
    try:
        label = run(value)
    except typed as e:
        return type(e).__name__
    return label if isinstance(label, str) else "ok"


def fuzz(
    strategy: st.SearchStrategy[Any],
    run: Callable[[Any], object],
    typed: tuple[type[BaseException], ...],
    cases: int,
) -> Counter[str]:
    """Run `cases` derandomized inputs; return how often each outcome occurred.

    An exception outside `typed` fails the test with the shrunk input."""
    outcomes: Counter[str] = Counter()

    @settings(FUZZ_SETTINGS, max_examples=cases)
    @given(strategy)
    def one(value: Any) -> None:
        outcomes[_outcome(typed, run, value)] += 1

    one()
    return outcomes


CASES = [
    pytest.param(QUICK_CASES, id="quick"),
    pytest.param(FULL_CASES, id="full", marks=pytest.mark.fuzz),
]


@pytest.mark.parametrize("cases", CASES)
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_decoder_raises_only_typed_errors(
    name: str, cases: int
) -> None:
    target = TARGETS[name]
    outcomes = fuzz(target.strategy(), target.run, TYPED[name], cases)
    # Hypothesis stops early only when the input space is exhausted; ours is not.
    assert sum(outcomes.values()) >= cases * 0.9, outcomes
    # A fuzzer whose inputs all die at the first check tests nothing behind it.
    assert len(outcomes) >= target.min_kinds, outcomes


# --- end to end: `import` a hostile CAR into a real data directory, then `restore` it --------


def _import_then_restore(base: Path, data: bytes) -> str:
    home = Path(tempfile.mkdtemp(dir=base))
    try:
        with LocalDataset(home, DATASET) as ds:
            try:
                result = ds.import_cars([("fuzz.car", io.BytesIO(data))])
            except StorageError as e:
                return f"import:{type(e).__name__}"
            for root in result.roots:
                try:
                    ds.restore(root)
                except StorageError as e:
                    return f"restore:{type(e).__name__}"
        return "ok"
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize(
    "cases",
    [
        pytest.param(E2E_QUICK_CASES, id="quick"),
        pytest.param(E2E_FULL_CASES, id="full", marks=pytest.mark.fuzz),
    ],
)
def test_import_and_restore_of_hostile_cars_raise_only_storage_errors(
    cases: int, tmp_path: Path
) -> None:
    outcomes = fuzz(
        hostile_car([SNAPSHOT_CAR]),
        lambda data: _import_then_restore(tmp_path, data),
        TYPED["import_restore"],
        cases,
    )
    assert sum(outcomes.values()) >= cases * 0.9, outcomes
    # Some hostile CARs import completely and get as far as a restore.
    assert any(k == "ok" or k.startswith("restore:") for k in outcomes), outcomes


def test_good_snapshot_fixture_imports_and_restores(tmp_path: Path) -> None:
    """The seed every hostile CAR is made from is itself good (else regenerate it)."""
    assert _import_then_restore(tmp_path, SNAPSHOT_CAR) == "ok"


# --- the crashes the fuzzer found, one cheap test each ---------------------------------------

_HELLO = (FIXTURES / "car" / "good-hello-ipfscar.car").read_bytes()
_HELLO_HEADER = _HELLO[: _HELLO[0] + 1]  # the 1-byte length varint and the header
_HELLO_SECTION = _HELLO[len(_HELLO_HEADER) :]  # varint, CIDv1 raw sha2-256, "hello world\n"


def test_car_block_with_hash_code_0x02_is_an_unsupported_hash() -> None:
    """Issue 17 finding 13: 0x02 is a multicodec ("cidv2") but no hash function."""
    data = _HELLO_HEADER + _HELLO_SECTION[:3] + b"\x02" + _HELLO_SECTION[4:]
    with pytest.raises(car.CarUnsupportedHash, match="hash function 0x2 is not supported"):
        _read_car(data)


@pytest.mark.parametrize("code", [0x02, 0x55, 0x70])
def test_cids_naming_a_non_hash_codec_as_hash_are_invalid(code: int) -> None:
    raw = bytes([1, RAW, code, 32]) + bytes(32)  # as long as ROOT's bytes, replaced below
    assert len(raw) == len(bytes(ROOT))
    with pytest.raises(InvalidCID):
        decode_cid(raw)
    # ... as a root in a CAR header and as a dag-pb link
    header = car.encode_header([ROOT]).replace(bytes(ROOT), raw)
    with pytest.raises(car.CarBadHeader):
        car.decode_header(header[1:])
    with pytest.raises(dagpb.DagPbError, match="invalid CID in a dag-pb link"):
        dagpb.decode_node(dagpb.encode_node([dagpb.Link(ROOT)], None).replace(bytes(ROOT), raw))


DEEP_JSON = b"[" * 5000 + b"]" * 5000
HUGE_INT_JSON = b'{"n": ' + b"1" * 5000 + b"}"


@pytest.mark.parametrize("body", [DEEP_JSON, HUGE_INT_JSON], ids=["deep", "huge-int"])
def test_frame_json_too_deep_or_with_huge_integers_is_a_remote_error(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        frames.decode_json(body)


def _query_bytes(header: bytes, magic: bytes = query.REQUEST_MAGIC) -> bytes:
    return magic + len(header).to_bytes(4, "big") + header


@pytest.mark.parametrize(
    "header",
    [
        DEEP_JSON,
        HUGE_INT_JSON,
        b'{"sql":"\\ud800","params":[],"timeout_s":1,"max_rows":1,"max_bytes":1}',
        b'{"sql":"SELECT ?","params":["\\udfff"],"timeout_s":1,"max_rows":1,"max_bytes":1}',
        b'{"sql":"SELECT ?","params":[18446744073709551616],"timeout_s":1,"max_rows":1,'
        b'"max_bytes":1}',
    ],
    ids=["deep", "huge-int", "surrogate-sql", "surrogate-param", "int-over-64-bits"],
)
def test_malformed_query_requests_are_query_message_errors(header: bytes) -> None:
    with pytest.raises(query.QueryMessageError):
        query.QueryRequest.from_bytes(_query_bytes(header))


def test_query_error_messages_carry_only_utf8_text() -> None:
    with pytest.raises(query.QueryMessageError):
        query.QueryResponse.from_bytes(
            _query_bytes(b'{"status":"timeout","message":"\\ud800","body":0}', query.RESPONSE_MAGIC)
        )
    # our own error text (from an exception) is made sendable rather than refused
    assert query.QueryResponse.error("internal", "bad \ud800 path").message == "bad ? path"


# Crashes in decoders other sessions own (protocol/heads.py, storage/snapshot.py): these
# fail until they are fixed there.


def test_head_message_nested_too_deeply_is_an_invalid_head() -> None:
    with pytest.raises(heads.InvalidHead):  # RecursionError from json.loads today
        heads.decode_head(b"[" * 1000 + b"]" * 1000)


@pytest.mark.parametrize(
    ("field", "value"),
    [("seq", b"1e999"), ("schema_version", b"-1e999"), ("created_at", b"1" + b"0" * 400)],
)
def test_manifest_numbers_out_of_range_are_bad_snapshots(field: str, value: bytes) -> None:
    doc = json.loads(MANIFEST_BYTES)
    doc[field] = "@@"
    data = json.dumps(doc).encode().replace(b'"@@"', value)
    with pytest.raises(BadSnapshot):  # OverflowError from int()/float() today
        Manifest.from_bytes(data)


def test_manifest_table_size_of_infinity_is_a_bad_snapshot() -> None:
    data = MANIFEST_BYTES.replace(b'"bytes": 443', b'"bytes": 1e999')
    assert data != MANIFEST_BYTES
    with pytest.raises(BadSnapshot):  # OverflowError in snapshot._table_info today
        Manifest.from_bytes(data)
