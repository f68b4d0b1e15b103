"""Fuzzing the control API and the config file parser (issue 17, "keep it fixed").

The control API: one real node, its real Unix socket, and a few thousand
derandomized hostile requests (bodies, query strings, methods, paths, raw
bytes). Every answer must be a success or the one error envelope
`{"error": {"code", "message", "hint"}}` with a 4xx (or 503) status: never a
500, never a handler's traceback in the node's log.

The config parser: mutated TOML files (and environment values) through
`load_config`; every outcome is a `Config` or a `ConfigError`.

`pytest -m fuzz tests/test_fuzz_control.py` runs the full counts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import string
import tempfile
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from fuzzing import FUZZ_SETTINGS
from hypothesis import given, settings
from hypothesis import strategies as st

from benchsync.daemon.config import ConfigError, load_config
from benchsync.daemon.node import Node

QUICK_CASES = 2_000  # requests (config files) in the default run
FULL_CASES = 10_000  # ... under `-m fuzz`
REQUEST_TIMEOUT = 60.0  # seconds for one answer on a loaded machine
NODE_TIMEOUT = 60.0  # seconds to start the node
RECEIVE_SIZE = 65536  # bytes per read


CASES = [
    pytest.param(QUICK_CASES, id="quick"),
    pytest.param(FULL_CASES, id="full", marks=pytest.mark.fuzz),
]


# --- hostile requests ------------------------------------------------------------------------

JSON_LEAVES = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=24)
)  # fmt: skip
JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip

RECORD_FIELDS = (
    "model_name", "model_family", "hardware_type", "device_name", "batch_size", "precision",
    "test_case", "throughput", "latency_avg", "latency_p90", "latency_p95", "latency_p99",
    "memory_peak", "total_time_seconds", "iterations", "warmup_iterations", "metrics",
    "run_id", "is_compatible", "status", "test_module", "test_name", "assertions",
)  # fmt: skip
PLAUSIBLE = st.one_of(
    st.sampled_from(["bert", "cuda", "A100", "fp16", "passed", "", "x" * 300]),
    st.integers(min_value=-3, max_value=2**40), st.floats(allow_nan=False, width=32),
)  # fmt: skip
RECORD = st.dictionaries(st.sampled_from(RECORD_FIELDS), PLAUSIBLE | JSON, max_size=8)
SQL = st.sampled_from([
    "SELECT 1", "SELECT count(*) AS n FROM performance_results", "SELECT * FROM models",
    "SELECT ?", "DROP TABLE models", "SELECT * FROM read_csv('/etc/passwd')", "", ";",
    "SELECT 1; SELECT 2", "PRAGMA version", "SELECT repeat('x', 100)",
]) | st.text(max_size=40)  # fmt: skip
# Names only: a file name, never a path, so the node reads nothing outside the fuzz dir.
FILE_NAME = st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=12)


def route_bodies(fuzz_dir: Path) -> dict[str, st.SearchStrategy[Any]]:
    paths = st.lists(
        st.sampled_from(["not-duckdb.txt", "empty.duckdb", "missing.duckdb", "subdir"]).map(
            lambda n: str(fuzz_dir / n)
        ) | FILE_NAME.map(lambda n: str(fuzz_dir / n)),
        max_size=3,
    )  # fmt: skip
    return {
        "/v1/record/perf": RECORD | st.fixed_dictionaries({"records": st.lists(RECORD,
                                                                                max_size=3)}),
        "/v1/query": st.fixed_dictionaries(
            {"sql": SQL},
            optional={"scope": st.sampled_from(["local", "replicas", "network"]) | JSON,
                      "params": JSON, "peers": JSON, "timeout": JSON, "require_all": JSON},
        ),  # fmt: skip
        "/v1/restore": st.fixed_dictionaries({"cid": st.text(max_size=70) | JSON}),
        "/v1/migrate": st.fixed_dictionaries(
            {"paths": paths | JSON}, optional={"backup": JSON, "verify": JSON}
        ),
    }


ROUTES = [
    ("GET", "/v1/status"), ("GET", "/v1/peers"), ("GET", "/v1/replicas"),
    ("GET", "/v1/history"), ("GET", "/metrics"), ("POST", "/v1/record/perf"),
    ("POST", "/v1/record/compat"), ("POST", "/v1/record/test"), ("POST", "/v1/record/{x}"),
    ("POST", "/v1/query"), ("POST", "/v1/restore"), ("POST", "/v1/migrate"),
]  # fmt: skip
QUERY_KEYS = st.sampled_from(["limit", "scope", "x", "", "limit[]"]) | st.text(max_size=6)
QUERY_VALUES = (
    st.integers(min_value=-5, max_value=10**25).map(str)
    | st.sampled_from(["abc", "", "1e3", "0x10", " 3", "٣", "-0", "+2", "%00", "%ZZ"])
    | st.text(max_size=12)
)  # fmt: skip


def _quote(text: str) -> str:
    """Percent-encode what a request target may not carry raw; keep some of it raw."""
    safe = string.ascii_letters + string.digits + "-._~=&%+"
    return "".join(c if c in safe else "".join(f"%{b:02X}" for b in c.encode()) for c in text)


@st.composite
def requests(draw: st.DrawFn, fuzz_dir: Path) -> tuple[bytes, str]:
    """(raw HTTP/1.1 request, the route it aims at)."""
    bodies = route_bodies(fuzz_dir)
    method, path = draw(st.sampled_from(ROUTES))
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]))
    if "{x}" in path:
        path = path.replace("{x}", _quote(draw(st.text(max_size=10))) or "x")
    if draw(st.integers(0, 14)) == 0:
        path = "/" + _quote(draw(st.text(max_size=20)))
    pairs = draw(st.lists(st.tuples(QUERY_KEYS, QUERY_VALUES), max_size=3))
    query = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in pairs)
    bare_question_mark = draw(st.booleans())
    target = path + (f"?{query}" if pairs or bare_question_mark else "")
    kind = draw(st.integers(0, 9))
    body: bytes
    if kind <= 5 and path in bodies:
        body = json.dumps(draw(bodies[path])).encode()
    elif kind <= 7:
        body = json.dumps(draw(JSON)).encode()
    elif kind == 8:
        body = draw(st.binary(max_size=64))
    else:
        depth = draw(st.integers(1, 200_000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        body = (opener * depth + "1" + closer * depth).encode()
    headers = [b"Host: node", b"Connection: close", b"Content-Length: %d" % len(body)]
    if draw(st.booleans()):
        headers.append(b"Content-Type: application/json")
    head = b"%s %s HTTP/1.1\r\n" % (method.encode(), target.encode("ascii"))
    return head + b"\r\n".join(headers) + b"\r\n\r\n" + body, path


def send(socket_path: Path, raw: bytes) -> tuple[int, str, bytes]:
    """One request on a fresh connection; (status, content type, body)."""
    client = h11.Connection(h11.CLIENT)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(REQUEST_TIMEOUT)
        sock.connect(os.fspath(socket_path))
        # The server may answer (e.g. 413/400) and close before reading all of it.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)
        # The answer is read as h11 would, so a malformed answer fails the test too.
        client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        client.send(h11.EndOfMessage())
        status, ctype, chunks = 0, "", []
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(sock.recv(RECEIVE_SIZE))
            elif isinstance(event, h11.Response):
                status = event.status_code
                ctype = dict(event.headers).get(b"content-type", b"").decode()
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, ctype, b"".join(chunks)


def check_answer(status: int, ctype: str, body: bytes, path: str) -> str:
    """Assert the answer is a success or the error envelope; its outcome label."""
    assert status != 500 and 200 <= status < 600, (status, body[:300])
    if path == "/metrics" and status == 200:
        assert ctype.startswith("text/plain")
        return "200 metrics"
    assert ctype == "application/json", (status, ctype, body[:300])
    decoded = json.loads(body)
    if status < 400:
        return f"{status}"
    assert status < 500 or status == 503, (status, decoded)
    assert isinstance(decoded, dict) and set(decoded) == {"error"}, decoded
    error = decoded["error"]
    assert isinstance(error, dict) and set(error) == {"code", "message", "hint"}, error
    assert isinstance(error["code"], str) and error["code"], error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["hint"] is None or isinstance(error["hint"], str), error
    return f"{status} {error['code']}"


@pytest.fixture
def fuzz_dir() -> Iterator[Path]:
    # Short, so that the node's socket path stays under 107 bytes.
    with tempfile.TemporaryDirectory(prefix="bsfz-", dir="/tmp") as d:
        root = Path(d)
        (root / "files").mkdir()
        (root / "files" / "not-duckdb.txt").write_text("root:x:0:0:root:/root:/bin/bash\n")
        (root / "files" / "empty.duckdb").write_bytes(b"")
        (root / "files" / "subdir").mkdir()
        yield root


@pytest.mark.parametrize("cases", CASES)
async def test_control_api_answers_every_request_with_success_or_an_envelope(
    fuzz_dir: Path, cases: int, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config(fuzz_dir / "home", env={}, overrides={
        "network": "fuzz-control", "listen": ["/ip4/127.0.0.1/tcp/0"], "bootstrap": [],
        "snapshot_interval": 0, "snapshot_after_writes": 0, "metrics": True,
        "control_socket": fuzz_dir / "c.sock",
    })  # fmt: skip
    files = fuzz_dir / "files"
    before = sorted(p.name for p in files.iterdir())
    outcomes: Counter[str] = Counter()

    @settings(FUZZ_SETTINGS, max_examples=cases)
    @given(requests(files))
    def one(req: tuple[bytes, str]) -> None:
        raw, path = req
        outcomes[check_answer(*send(config.control_socket, raw), path)] += 1

    node = Node(config)
    with caplog.at_level(logging.ERROR, logger="benchsync.daemon.control"):
        async with trio.open_nursery() as nursery:
            with trio.fail_after(NODE_TIMEOUT):
                await nursery.start(node.run)
            await trio.to_thread.run_sync(one)
            nursery.cancel_scope.cancel()
    handler_failures = [r for r in caplog.records if r.name == "benchsync.daemon.control"]
    assert not handler_failures, handler_failures[0].getMessage()
    assert sum(outcomes.values()) >= cases * 0.9, outcomes
    # A fuzzer whose requests all die at the first check tests nothing behind it.
    assert {"200", "400 bad_json", "404 not_found", "400 bad_query"} <= set(outcomes), outcomes
    # Migration never writes beside the files it is given (issue 17, finding 12).
    assert sorted(p.name for p in files.iterdir()) == before


# --- the config file -------------------------------------------------------------------------

GOOD_CONFIG = """\
network = "lab-1"
listen = ["/ip4/0.0.0.0/tcp/4242"]
bootstrap = []
snapshot_interval = 300
snapshot_after_writes = 100
max_block_bytes = "2MiB"
control_tcp = "127.0.0.1:7777"
control_token = "0123456789abcdef0123"
metrics = true
log_level = "info"
"""
TOML_PIECES = [
    "=", '"', "'", "[", "]", "{", "}", ",", "\n", "#", "\\u", "\\", "0x", "1e999", "-",
    "inf", "nan", "true", "1979-05-27T07:32:00Z", '"""', "[[a]]", "a.b", "\x00", "é", " ",
    "9" * 30, "[]", "{}", '"0.0.0.0:99999"', '"/ip4/1.2.3.4/tcp/1"',
]  # fmt: skip
SETTING_NAMES = [line.split(" = ")[0] for line in GOOD_CONFIG.splitlines()]


@st.composite
def config_files(draw: st.DrawFn) -> str:
    text = GOOD_CONFIG
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 4))
        pos = draw(st.integers(0, len(text)))
        if op == 0:
            text = text[:pos] + draw(st.sampled_from(TOML_PIECES)) + text[pos:]
        elif op == 1:
            text = text[:pos] + text[pos + draw(st.integers(1, 8)):]
        elif op == 2:
            text = text[:pos] + draw(st.text(max_size=6)) + text[pos:]
        elif op == 3:  # a known setting with a value of any TOML type
            name = draw(st.sampled_from(SETTING_NAMES))
            value = draw(st.sampled_from(
                ['"x"', "1", "-1", "0", "1.5", "true", "[1]", '["a"]', "{a = 1}", '""',
                 "1979-05-27", '"10 parsecs"', "99999999999999999999999"]
            ))  # fmt: skip
            text += f"\n{name} = {value}\n"
        else:
            text += f"\n{draw(st.text(string.ascii_lowercase + '_', min_size=1, max_size=9))} = 1\n"
    return text


def _load(home: Path, text: str, env: dict[str, str]) -> str:
    path = home / "config.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(home, path, env=env)
    except ConfigError as e:
        assert e.message and e.hint, e
        return "ConfigError"
    return "ok"


def _fuzz_config(run: Callable[[Any], str], strategy: st.SearchStrategy[Any],
                 cases: int) -> Counter[str]:
    outcomes: Counter[str] = Counter()

    @settings(FUZZ_SETTINGS, max_examples=cases)
    @given(strategy)
    def one(value: Any) -> None:
        outcomes[run(value)] += 1

    one()
    return outcomes


@pytest.mark.parametrize("cases", CASES)
def test_config_parser_raises_only_config_errors(
    tmp_path: Path, cases: int
) -> None:
    tomllib.loads(GOOD_CONFIG)  # the seed itself is valid TOML
    assert _load(tmp_path, GOOD_CONFIG, {}) == "ok"
    outcomes = _fuzz_config(lambda text: _load(tmp_path, text, {}), config_files(), cases)
    assert sum(outcomes.values()) >= cases * 0.9, outcomes
    assert set(outcomes) == {"ok", "ConfigError"}, outcomes


ENV_NAMES = [f"BENCHSYNC_{n.upper()}" for n in SETTING_NAMES] + ["BENCHSYNC_NO_SUCH"]


@pytest.mark.parametrize("cases", CASES)
def test_config_environment_raises_only_config_errors(
    tmp_path: Path, cases: int
) -> None:
    envs = st.dictionaries(
        st.sampled_from(ENV_NAMES),
        st.text(max_size=20)
        | st.sampled_from(["1", "0", "true", "300", "2MiB", "-1", "1e999", "nan"]),
        max_size=4,
    )  # fmt: skip
    outcomes = _fuzz_config(lambda env: _load(tmp_path, GOOD_CONFIG, env), envs, cases)
    assert set(outcomes) == {"ok", "ConfigError"}, outcomes
