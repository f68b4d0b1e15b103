"""The settings table: file, environment, flags, precedence, errors, generated docs."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchsync.daemon.cli import main as cli_main
from benchsync.daemon.config import (
    SETTINGS,
    ConfigError,
    add_arguments,
    config_from_args,
    load_config,
    render_example_toml,
    render_markdown,
)

REPO = Path(__file__).resolve().parent.parent
ED25519_PEER = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
RSA_PEER = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
TOKEN = "0123456789abcdef0123"


def write(home: Path, text: str) -> Path:
    path = home / "config.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path: Path) -> None:
    c = load_config(tmp_path, env={})
    assert c.network == "lab"
    assert c.listen == ("/ip4/0.0.0.0/tcp/4816", "/ip6/::/tcp/4816") and c.announce == ()
    assert c.trusted_peers == () and c.bootstrap == ()
    assert c.mdns is False and c.metrics is True
    assert c.reannounce_interval == 30.0
    assert c.control_socket == tmp_path / "control.sock"
    assert c.control_tcp is None and c.control_tcp_address is None
    assert set(c.sources.values()) == {"default"}


def test_file_values_are_read_and_typed(tmp_path: Path) -> None:
    write(tmp_path, f'''
network = "gpu-lab"
listen = ["/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001"]
bootstrap = ["/ip4/10.0.0.2/tcp/4001/p2p/{ED25519_PEER}"]
trusted_peers = ["{ED25519_PEER}", "{RSA_PEER}"]
mdns = true
snapshot_interval = 60
max_block_bytes = "1MiB"
query_memory_limit = "2GB"
control_tcp = "127.0.0.1:7420"
control_token = "{TOKEN}"
log_level = "DEBUG"
''')
    c = load_config(tmp_path, env={})
    assert c.network == "gpu-lab"
    assert c.listen == ("/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001")
    assert c.bootstrap == (f"/ip4/10.0.0.2/tcp/4001/p2p/{ED25519_PEER}",)
    assert c.trusted_peers == (ED25519_PEER, RSA_PEER)
    assert c.mdns is True
    assert c.snapshot_interval == 60.0
    assert c.max_block_bytes == 1024 * 1024
    assert c.query_memory_limit == 2_000_000_000
    assert c.control_tcp_address == ("127.0.0.1", 7420)
    assert c.log_level == "debug"
    assert c.sources["mdns"] == f"{tmp_path / 'config.toml'}:6"


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    write(tmp_path, 'network = "from-file"\nquery_timeout = 5\nquery_max_rows = 7\n')
    env = {"BENCHSYNC_NETWORK": "from-env", "BENCHSYNC_QUERY_TIMEOUT": "6.5"}
    c = load_config(tmp_path, env=env, overrides={"network": "from-flag"})
    assert c.network == "from-flag" and c.sources["network"] == "--network"
    assert c.query_timeout == 6.5 and c.sources["query_timeout"] == "$BENCHSYNC_QUERY_TIMEOUT"
    assert c.query_max_rows == 7
    assert c.reannounce_interval == 30.0 and c.sources["reannounce_interval"] == "default"


def test_environment_lists_and_booleans(tmp_path: Path) -> None:
    env = {
        "BENCHSYNC_LISTEN": "/ip4/127.0.0.1/tcp/1, /ip4/127.0.0.1/tcp/2",
        "BENCHSYNC_TRUSTED_PEERS": f"{ED25519_PEER} {RSA_PEER}",
        "BENCHSYNC_MDNS": "yes",
        "BENCHSYNC_METRICS": "0",
        "BENCHSYNC_HOME": "/ignored/not/a/setting",
    }
    c = load_config(tmp_path, env=env)
    assert c.listen == ("/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/2")
    assert c.trusted_peers == (ED25519_PEER, RSA_PEER)
    assert c.mdns is True and c.metrics is False


def test_control_socket_under_systemd_runtime_directory(tmp_path: Path) -> None:
    c = load_config(tmp_path, env={"RUNTIME_DIRECTORY": "/run/benchsync"})
    assert c.control_socket == Path("/run/benchsync/control.sock")
    explicit = load_config(
        tmp_path, env={"RUNTIME_DIRECTORY": "/run/benchsync",
                       "BENCHSYNC_CONTROL_SOCKET": str(tmp_path / "s.sock")},
    )  # fmt: skip
    assert explicit.control_socket == tmp_path / "s.sock"


def test_generated_flags_for_up(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    write(tmp_path, 'network = "file"\nmdns = true\n')
    args = parser.parse_args([
        "--listen", "/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/2",
        "--listen", "/ip4/127.0.0.1/tcp/3",
        "--no-mdns", "--query-max-bytes", "1MiB", "--network", "cli",
    ])  # fmt: skip
    c = config_from_args(tmp_path, args, env={})
    assert c.listen == tuple(f"/ip4/127.0.0.1/tcp/{i}" for i in (1, 2, 3))
    assert c.mdns is False and c.network == "cli" and c.query_max_bytes == 1024 * 1024
    # Flags not given do not override the file.
    c2 = config_from_args(tmp_path, parser.parse_args([]), env={})
    assert c2.network == "file" and c2.mdns is True
    help_text = parser.format_help()
    for s in SETTINGS:
        assert s.flag in help_text


def test_explicit_config_path_and_missing_file(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere.toml"
    other.write_text('network = "other"\n')
    assert load_config(tmp_path, other, env={}).network == "other"
    assert load_config(tmp_path, env={"BENCHSYNC_CONFIG": str(other)}).network == "other"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path, tmp_path / "nope.toml", env={})


@pytest.mark.parametrize(
    ("text", "setting", "needle"),
    [
        ('netwrok = "x"', "netwrok", "did you mean 'network'"),
        ("mdns = 1", "mdns", "expected true or false"),
        ("query_max_rows = 0", "query_max_rows", "out of range"),
        ("query_max_rows = 1.5", "query_max_rows", "integer"),
        ("reannounce_interval = 0", "reannounce_interval", "seconds > 0"),
        ('max_block_bytes = "12 parsecs"', "max_block_bytes", "size in bytes"),
        ('listen = "/ip4/127.0.0.1/tcp/1"', "listen", "list of multiaddrs"),
        ('listen = ["/ip4/300.0.0.1/tcp/1"]', "listen", "not a multiaddr"),
        ('listen = ["/ip4/127.0.0.1/udp/1"]', "listen", "TCP only"),
        ('bootstrap = ["/ip4/10.0.0.2/tcp/4001"]', "bootstrap", "/p2p/<peer-id>"),
        ('trusted_peers = ["12D3KooWnot-a-peer"]', "trusted_peers", "not a peer ID"),
        ('trusted_peers = ["bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"]',
         "trusted_peers", "not a peer ID"),
        ('network = "Has Spaces"', "network", "a-z 0-9"),
        ('control_tcp = "localhost"', "control_tcp", "HOST:PORT"),
        ('control_token = "short"', "control_token", "at least 16"),
        ('log_level = "loud"', "log_level", "debug, info"),
        ('control_tcp = "127.0.0.1:0"', "control_token", "required when control_tcp"),
    ],
)
def test_bad_file_values_name_setting_value_and_line(
    tmp_path: Path, text: str, setting: str, needle: str
) -> None:
    path = write(tmp_path, f'# a comment\nmetrics = true\n{text}\n')
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, env={})
    err = info.value
    assert err.setting == setting
    assert needle in str(err)
    assert f"{path}:3" in str(err)  # the line of the offending key
    assert err.hint


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'network = "lab"\nlisten = [\n  "/ip4/127.0.0.1/tcp/0"\nmdns = true\n')
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, env={})
    assert re.search(rf"{re.escape(str(path))}:4:\d+: TOML syntax error", str(info.value))
    assert info.value.setting is None


def test_bad_environment_and_flags_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\$BENCHSYNC_MDNS: setting 'mdns' = 'perhaps'"):
        load_config(tmp_path, env={"BENCHSYNC_MDNS": "perhaps"})
    with pytest.raises(ConfigError, match="did you mean 'listen'"):
        load_config(tmp_path, env={"BENCHSYNC_LISTN": "/ip4/127.0.0.1/tcp/0"})
    with pytest.raises(ConfigError, match="--query-timeout: setting 'query_timeout'"):
        load_config(tmp_path, env={}, overrides={"query_timeout": "-1"})


def test_config_is_frozen(tmp_path: Path) -> None:
    c = load_config(tmp_path, env={})
    with pytest.raises(AttributeError):
        c.network = "x"


def test_token_is_redacted_in_to_dict(tmp_path: Path) -> None:
    env = {"BENCHSYNC_CONTROL_TCP": "127.0.0.1:0", "BENCHSYNC_CONTROL_TOKEN": TOKEN}
    c = load_config(tmp_path, env=env)
    assert c.to_dict()["control_token"] == "***"
    assert c.to_dict(redact=False)["control_token"] == TOKEN


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=1, max_value=2**30), st.sampled_from(["", "KiB", "MiB", "GiB"]))
def test_sizes_parse_with_units(n: int, unit: str) -> None:
    factor = {"": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[unit]
    env = {"BENCHSYNC_MAX_RESPONSE_BYTES": f"{n}{unit}"}
    if n * factor < 1024:
        with pytest.raises(ConfigError, match="out of range"):
            load_config("/nonexistent-home", env=env)
    else:
        assert load_config("/nonexistent-home", env=env).max_response_bytes == n * factor


def test_committed_docs_equal_generated() -> None:
    committed = (REPO / "docs" / "config.md").read_text()
    assert committed == render_markdown(), "run `benchsync config docs > docs/config.md`"
    for s in SETTINGS:
        assert f"## {s.name}\n" in committed


def test_committed_example_config_equals_generated_and_loads(tmp_path: Path) -> None:
    committed = (REPO / "systemd" / "config.example.toml").read_text()
    assert committed == render_example_toml(), (
        "run `benchsync config example > systemd/config.example.toml`"
    )
    # Uncommented, the example is a valid config equal to the defaults.
    active = re.sub(r"(?m)^# ([a-z_]+ = (?!\.\.\.).*)$", r"\1", committed)
    write(tmp_path, active)
    c = load_config(tmp_path, env={})
    from_file = {name for name, src in c.sources.items() if src != "default"}
    assert from_file == {s.name for s in SETTINGS if s.default is not None}
    defaults = load_config(tmp_path / "elsewhere", env={})
    for name in from_file:
        assert getattr(c, name) == getattr(defaults, name), name


def test_cli_config_check_and_show(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(home, "query_max_rows = -3\n")
    assert cli_main(["config", "check"]) != 0
    err = capsys.readouterr().err
    assert "Error: " in err and "query_max_rows" in err and "-3" in err and "Try: " in err
    write(home, 'network = "ok-net"\n')
    assert cli_main(["config", "check"]) == 0
    assert cli_main(["config", "show", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"network": "ok-net"' in out
