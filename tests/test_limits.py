"""One definition per limit: every default that also lives outside the settings
table equals the setting, and every fixed format limit bounds its setting.

A failure here means two places define the same limit with different values
(issue 16, fault 4): change the setting in daemon/config.py, not the copy.
"""

from __future__ import annotations

import inspect

import pytest

from benchsync.daemon import announce, sync
from benchsync.daemon import fetch as daemon_fetch
from benchsync.daemon.config import SETTINGS_BY_NAME, ConfigError, load_config
from benchsync.protocol import heads
from benchsync.protocol.names import check_network_name
from benchsync.storage import car
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
