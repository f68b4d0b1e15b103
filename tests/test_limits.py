"""One definition per limit: every default that also lives outside the settings
table equals the setting, and every fixed format limit bounds its setting.

A failure here means two places define the same limit with different values
(issue 16, fault 4): change the setting in daemon/config.py, not the copy.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import pkgutil

import pytest
from multiformats import varint

import benchsync
from benchsync import daemon
from benchsync.daemon import announce, host, sync
from benchsync.daemon import fetch as daemon_fetch
from benchsync.daemon.config import SETTINGS_BY_NAME, ConfigError, load_config
from benchsync.protocol import fetch as protocol_fetch
from benchsync.protocol import frames, heads
from benchsync.protocol import query as protocol_query
from benchsync.protocol.names import check_network_name
from benchsync.storage import car, cid
from benchsync.storage.limits import MAX_BLOCK_SIZE, MAX_CID_BYTES


def default(name: str) -> object:
    return SETTINGS_BY_NAME[name].default


def test_daemon_defaults_are_the_settings() -> None:
    limits = daemon_fetch.FetchLimits()
    assert limits.max_block == default("max_block_bytes")
    assert limits.max_response == default("max_response_bytes")
    assert limits.max_fetches_per_peer == default("max_concurrent_fetches_per_peer")
    assert default("reannounce_interval") == announce.REANNOUNCE_INTERVAL
    assert default("max_followed_datasets") == sync.DEFAULT_MAX_FOLLOWED


def test_block_size_is_one_fixed_limit_that_bounds_its_setting(tmp_path) -> None:
    assert default("max_block_bytes") == MAX_BLOCK_SIZE
    for fn in (car.CarDecoder, car.read_car):
        params = inspect.signature(fn).parameters
        assert params["max_block"].default == MAX_BLOCK_SIZE
        assert params["max_section"].default == MAX_BLOCK_SIZE + MAX_CID_BYTES
    assert daemon_fetch.FetchLimits().max_section == car.DEFAULT_MAX_SECTION
    ok = load_config(tmp_path, env={"BENCHSYNC_MAX_BLOCK_BYTES": "1MiB"})
    assert ok.max_block_bytes == 1024 * 1024
    with pytest.raises(ConfigError, match="from 1024 to 2097152"):
        load_config(tmp_path, env={"BENCHSYNC_MAX_BLOCK_BYTES": str(MAX_BLOCK_SIZE + 1)})


@pytest.mark.parametrize(
    "name, ok",
    [
        ("lab", True),
        ("gpu-lab.2_b", True),
        ("a" * 63, True),
        ("a" * 64, False),
        ("Lab", False),
        ("-lab", False),
        ("bad/name", False),
        ("", False),
    ],
)
def test_one_network_name_rule(tmp_path, name: str, ok: bool) -> None:
    """The setting, the topic and the head request accept exactly the same names."""
    results = []
    for check in (
        check_network_name,
        heads.topic_for,
        heads.head_request,
        lambda n: load_config(tmp_path, env={}, overrides={"network": n}),
    ):
        try:
            check(name)
            results.append(True)
        except (ValueError, ConfigError):
            results.append(False)
    assert results == [ok] * 4


def test_query_settings_stay_within_what_the_protocol_carries(tmp_path) -> None:
    """A QueryRequest's defaults are the protocol's maxima, not settings: the server
    clamps each request to its own settings. A setting above a maximum would make
    every network query fail to encode, so the settings table refuses it."""
    request = protocol_query.QueryRequest("SELECT 1")
    assert (request.timeout_s, request.max_rows, request.max_bytes) == (
        protocol_query.MAX_TIMEOUT, protocol_query.MAX_ROWS, protocol_query.MAX_RESULT_BYTES)
    assert default("query_timeout") <= protocol_query.MAX_TIMEOUT  # type: ignore[operator]
    protocol_query.QueryRequest("SELECT 1", max_rows=default("query_max_rows"),  # type: ignore[arg-type]
                                max_bytes=default("query_max_bytes"))  # type: ignore[arg-type]
    top = load_config(tmp_path, env={"BENCHSYNC_QUERY_MAX_ROWS": str(protocol_query.MAX_ROWS),
                                     "BENCHSYNC_QUERY_MAX_BYTES": "256MiB"})
    assert (top.query_max_rows, top.query_max_bytes) == (protocol_query.MAX_ROWS,
                                                         protocol_query.MAX_RESULT_BYTES)
    for name, value in (("QUERY_MAX_ROWS", protocol_query.MAX_ROWS + 1),
                        ("QUERY_MAX_BYTES", protocol_query.MAX_RESULT_BYTES + 1)):
        with pytest.raises(ConfigError, match=f"to {value - 1}"):
            load_config(tmp_path, env={f"BENCHSYNC_{name}": str(value)})


def test_the_response_limit_is_the_setting_and_the_protocol_has_none_of_its_own() -> None:
    """64 MiB in protocol/fetch.py once disagreed with max_response_bytes (1 GiB)."""
    assert not hasattr(protocol_fetch, "MAX_RESPONSE")
    plan = inspect.signature(protocol_fetch.plan_response).parameters["max_response"]
    assert plan.default is inspect.Parameter.empty  # the provider states its limit
    session = inspect.signature(protocol_fetch.FetchSession).parameters["max_response"]
    assert session.default == protocol_fetch.MAX_REQUESTED_BYTES  # the wire's largest
    assert daemon_fetch.FetchLimits().max_response == default("max_response_bytes")


def test_listen_default_is_the_hosts_and_an_in_process_node_listens_privately() -> None:
    assert default("listen") == tuple(host.NODE_LISTEN)
    # A P2PNode built without `listen` (tests, benchmarks) is not the daemon's default.
    assert host.PRIVATE_LISTEN == ["/ip4/127.0.0.1/tcp/0"]
    assert not hasattr(host, "DEFAULT_LISTEN")


def test_one_dial_timeout() -> None:
    """py-libp2p's dials (the host's config) and ours (connect, peer dials) wait alike."""
    found = {}
    for info in pkgutil.iter_modules(daemon.__path__):
        module = importlib.import_module(f"benchsync.daemon.{info.name}")
        for name in ("DIAL_TIMEOUT", "CONNECT_TIMEOUT"):
            if hasattr(module, name):
                found[f"{info.name}.{name}"] = getattr(module, name)
    assert found.pop("host.DIAL_TIMEOUT") == host.DIAL_TIMEOUT
    assert all(v == host.DIAL_TIMEOUT for v in found.values()), found


def test_one_varint_cap_for_cids_and_frame_prefixes() -> None:
    """A frame's length prefix is a multiformats varint like those in a CID: 9 bytes."""
    assert frames.MAX_VARINT_BYTES is cid.MAX_VARINT_BYTES == 9
    with pytest.raises(ValueError):
        varint.decode_raw(b"\xff" * 9 + b"\x01")  # what a 10-byte cap would have waited for
    decoder = frames.FrameDecoder(max_frame=1024)
    with pytest.raises(frames.RemoteProtocolError, match="not a valid varint"):
        decoder.feed(b"\xff" * cid.MAX_VARINT_BYTES)
    with pytest.raises(cid.InvalidCID, match="longer than 9 bytes"):
        cid.read_uvarint(b"\xff" * 10, 0)


def test_one_version() -> None:
    assert importlib.metadata.version("benchsync") == benchsync.__version__
