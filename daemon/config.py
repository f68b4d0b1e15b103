"""The node's settings: one table, and everything derived from it.

`SETTINGS` is the single source of truth (name, kind, default, help). From it
come the TOML config file (`$BENCHSYNC_HOME/config.toml` or `--config`), the
environment overrides (`BENCHSYNC_<NAME>`), the `benchsync up` flags
(`add_arguments`), the example config and `docs/config.md` (`render_markdown`).

Precedence, lowest first: defaults < config file < environment < CLI flags.
`load_config` checks every value before it returns, so a node never starts
half-configured: anything wrong raises `ConfigError` naming the setting, the
value, where it came from and what is allowed.

This module does no networking; it only reads the config file.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchsync.protocol.names import check_network_name
from benchsync.protocol.query import MAX_RESULT_BYTES, MAX_ROWS
from benchsync.storage.limits import (
    MAX_BLOCK_SIZE,
    QUERY_MAX_BYTES,
    QUERY_MAX_ROWS,
    QUERY_MEMORY_LIMIT,
    QUERY_TIMEOUT,
)
from benchsync.storage.retention import HISTORY_INTERVAL, HISTORY_RETENTION, REPLICA_EXPIRY

CONFIG_FILE_NAME = "config.toml"
CONTROL_SOCKET_NAME = "control.sock"
ENV_PREFIX = "BENCHSYNC_"
# Env vars with this prefix that are not settings (so not "unknown setting" typos).
ENV_NOT_SETTINGS = frozenset({"BENCHSYNC_HOME", "BENCHSYNC_CONFIG"})
MIN_TOKEN_LENGTH = 16  # characters; shorter bearer tokens are guessable
KiB = 1024  # bytes
MiB = 1024 * KiB  # bytes
GiB = 1024 * MiB  # bytes
MAX_PORT = 65535
MAX_INLINED_KEY = 42  # bytes; libp2p inlines public keys up to this size in the peer ID
MAINTENANCE_INTERVAL = 3600.0  # seconds between scheduled maintenance passes

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": KiB,
    "m": 1000**2, "mb": 1000**2, "mib": MiB,
    "g": 1000**3, "gb": 1000**3, "gib": GiB,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_TOML_POS_RE = re.compile(r"\(at line (\d+), column (\d+)\)")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A setting's value is not acceptable; the node must not start.

    `setting` is the setting's name (or None for a whole-file problem), `value`
    the offending value, `source` where it came from (a file with its line, an
    environment variable or a flag) and `allowed` what would be accepted.
    """

    def __init__(
        self,
        setting: str | None,
        value: object,
        allowed: str,
        *,
        source: str = "",
        hint: str | None = None,
    ) -> None:
        self.setting = setting
        self.value = value
        self.allowed = allowed
        self.source = source
        self.hint = hint or (
            f"fix {setting}; `benchsync config docs` lists every setting and its allowed values"
            if setting
            else "fix the file's syntax (it is TOML: https://toml.io)"
        )
        where = f"{source}: " if source else ""
        if setting is None:
            message = f"{where}{allowed}"
        else:
            message = f"{where}setting {setting!r} = {value!r}: {allowed}"
        super().__init__(message)
        self.message = message


# --- kinds: how a setting's value is parsed and described -------------------


@dataclasses.dataclass(frozen=True)
class Kind:
    """How to check a value from TOML and parse one from text (env, flags)."""

    name: str  # shown in docs and --help, e.g. "integer", "list of multiaddrs"
    allowed: str  # what is accepted, for error messages and docs
    check: Callable[[Any], Any]  # TOML value -> value, raises ValueError(reason)
    parse: Callable[[str], Any]  # text -> value, raises ValueError(reason)
    is_list: bool = False
    is_bool: bool = False


def _check_str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("expected a string")
    return v


def _str_kind(
    name: str = "string",
    allowed: str = "a string",
    test: Callable[[str], str] | None = None,
) -> Kind:
    def check(v: Any) -> str:
        s = _check_str(v)
        return test(s) if test else s

    return Kind(name, allowed, check, check)


def _int_kind(lo: int, hi: int | None = None) -> Kind:
    allowed = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"

    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected {allowed}")
        if v < lo or (hi is not None and v > hi):
            raise ValueError(f"out of range, expected {allowed}")
        return v

    def parse(s: str) -> int:
        try:
            return check(int(s.strip()))
        except ValueError:
            raise ValueError(f"expected {allowed}") from None

    return Kind("integer", allowed, check, parse)


def _seconds_kind(lo: float, *, zero_disables: bool = False) -> Kind:
    allowed = f"a number of seconds > {lo:g}"
    if zero_disables:
        allowed += " (0 disables)"

    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"expected {allowed}")
        f = float(v)
        if not (f > lo or (zero_disables and f == 0)) or f != f or f == float("inf"):
            raise ValueError(f"out of range, expected {allowed}")
        return f

    def parse(s: str) -> float:
        try:
            f = float(s.strip())
        except ValueError:
            raise ValueError(f"expected {allowed}") from None
        return check(f)

    return Kind("seconds", allowed, check, parse)


def _size_kind(lo: int, hi: int | None = None) -> Kind:
    bounds = f">= {lo}" if hi is None else f"from {lo} to {hi}"
    allowed = f'a size in bytes {bounds}: an integer or a string like "64MiB" or "1GB"'

    def parse(s: str) -> int:
        m = _SIZE_RE.match(s)
        unit = _SIZE_UNITS.get(m.group(2).lower()) if m else None
        if m is None or unit is None:
            raise ValueError(f"expected {allowed}")
        n = int(float(m.group(1)) * unit)
        if n < lo or (hi is not None and n > hi):
            raise ValueError(f"out of range, expected {allowed}")
        return n

    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int | str):
            raise ValueError(f"expected {allowed}")
        return parse(str(v))

    return Kind("size", allowed, check, parse)


def _percent_kind(lo: float, hi: float) -> Kind:
    allowed = f"a percentage above {lo:g} and at most {hi:g} (a number, e.g. 10 or 2.5)"

    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"expected {allowed}")
        f = float(v)
        if not lo < f <= hi:  # NaN fails too
            raise ValueError(f"out of range, expected {allowed}")
        return f

    def parse(s: str) -> float:
        try:
            f = float(s.strip().removesuffix("%"))
        except ValueError:
            raise ValueError(f"expected {allowed}") from None
        return check(f)

    return Kind("percent", allowed, check, parse)


def _parse_bool(s: str) -> bool:
    t = s.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError("expected true or false (also 1/0, yes/no, on/off)")


def _check_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


BOOL = Kind("boolean", "true or false", _check_bool, _parse_bool, is_bool=True)


def _list_kind(item: Kind, plural: str) -> Kind:
    allowed = f"a list of {plural}"

    def check(v: Any) -> tuple[Any, ...]:
        if not isinstance(v, list):
            raise ValueError(f"expected {allowed}, e.g. [\"...\"]")
        return tuple(_item(item, x) for x in v)

    def parse(s: str) -> tuple[Any, ...]:
        # Environment form: comma- or whitespace-separated.
        return tuple(_item(item, x) for x in re.split(r"[\s,]+", s.strip()) if x)

    return Kind(f"list of {plural}", allowed, check, parse, is_list=True)


def _item(kind: Kind, v: Any) -> Any:
    try:
        return kind.check(v)
    except ValueError as e:
        raise ValueError(f"item {v!r}: {e}") from None


def check_multiaddr(s: str, *, need_peer: bool = False) -> str:
    """Return `s` normalised if it is a multiaddr, else raise ValueError saying why."""
    from multiaddr import Multiaddr  # a few ms; only needed when multiaddrs are set

    try:
        ma = Multiaddr(s)
    except Exception as e:  # multiaddr raises several unrelated types
        raise ValueError(f"not a multiaddr ({e}); expected e.g. /ip4/127.0.0.1/tcp/4001") from None
    names = [p.name for p in ma.protocols()]
    if "tcp" not in names:
        raise ValueError(
            "benchsync speaks libp2p over TCP only; expected e.g. /ip4/0.0.0.0/tcp/4001"
        )
    if need_peer:
        if "p2p" not in names:
            raise ValueError("a bootstrap address must end in /p2p/<peer-id>")
        check_peer_id(ma.value_for_protocol("p2p"))
    return str(ma)


def check_peer_id(s: str) -> str:
    """Return `s` if it is a libp2p peer ID (base58 multihash or CIDv1 libp2p-key)."""
    from multiformats import CID, multibase, multihash

    allowed = "expected a libp2p peer ID such as 12D3KooW... or Qm..."
    try:
        if s.startswith(("Qm", "1")):
            code, mh_digest = multihash.unwrap_raw(multibase.get("base58btc").raw_decoder(s))
            digest = bytes(mh_digest)
        else:
            cid = CID.decode(s)
            if cid.codec.name != "libp2p-key":
                raise ValueError("a CID, but not a libp2p-key")
            code, digest = cid.hashfun.code, bytes(cid.raw_digest)
    except Exception:
        raise ValueError(f"not a peer ID; {allowed}") from None
    # sha2-256: a hashed public key (RSA). identity: the public key inlined as the
    # protobuf PublicKey{Type (field 1, 0..3), Data (field 2, bytes)} (Ed25519, secp256k1).
    inlined_key = (
        code == 0x00 and len(digest) <= MAX_INLINED_KEY
        and digest[:1] == b"\x08" and digest[1:2] in (b"\x00", b"\x01", b"\x02", b"\x03")
        and digest[2:3] == b"\x12" and len(digest) > 4 and digest[3] == len(digest) - 4
    )  # fmt: skip
    if not (inlined_key or (code == 0x12 and len(digest) == 32)):
        raise ValueError(f"not a peer ID (not a public key multihash); {allowed}")
    return s


def _check_host_port(s: str) -> str:
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= MAX_PORT:
        raise ValueError('expected HOST:PORT, e.g. "127.0.0.1:7420" (port 0 picks a free one)')
    return s


def _check_group(s: str) -> str:
    if not s or any(c.isspace() or c in ":/" for c in s):
        raise ValueError('expected a group name or number, e.g. "benchsync"')
    return s


def _check_log_level(s: str) -> str:
    level = s.lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return level


BITSWAP_SERVE_MODES = ("lab", "all")


def _check_bitswap_serve(s: str) -> str:
    mode = s.lower()
    if mode == "open":  # the spelling; one meaning, stored as "all"
        return "all"
    if mode not in BITSWAP_SERVE_MODES:
        raise ValueError(f"expected one of {', '.join(BITSWAP_SERVE_MODES)}")
    return mode


def _check_token(s: str) -> str:
    if len(s) < MIN_TOKEN_LENGTH:
        raise ValueError(f"too short, expected at least {MIN_TOKEN_LENGTH} characters")
    return s


LOG_LEVELS = ("debug", "info", "warning", "error")
MULTIADDRS = _list_kind(
    _str_kind("multiaddr", "a multiaddr", check_multiaddr), "multiaddrs"
)
BOOTSTRAP_ADDRS = _list_kind(
    _str_kind(
        "multiaddr", "a multiaddr ending in /p2p/<peer-id>",
        lambda s: check_multiaddr(s, need_peer=True),
    ),
    "multiaddrs ending in /p2p/<peer-id>",
)  # fmt: skip
PEER_IDS = _list_kind(_str_kind("peer ID", "a libp2p peer ID", check_peer_id), "peer IDs")
PATH = _str_kind("path", "a file system path", lambda s: str(Path(s).expanduser()))


# --- the table ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of the settings table."""

    name: str
    kind: Kind
    default: Any  # already in checked form; None means "unset" or "derived"
    help: str
    metavar: str = "VALUE"
    default_doc: str | None = None  # how docs show a derived default

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("network", _str_kind("name", "a network name", check_network_name), "lab",
            "Name of the lab network; only nodes with the same name sync.", "NAME"),
    Setting("listen", MULTIADDRS, ("/ip4/0.0.0.0/tcp/4816", "/ip6/::/tcp/4816"),
            "Multiaddrs to listen on (libp2p over TCP). The default is every interface, "
            "IPv4 and IPv6, on port 4816 (ours, unassigned by IANA; not Kubo's 4001), "
            "so bootstrap addresses stay valid across restarts; the IPv6 half is skipped "
            "on a machine without IPv6. Any other address that cannot be bound stops the "
            "node. Use /ip4/127.0.0.1/tcp/0 for a private node on a free port.",
            "MULTIADDR"),
    Setting("announce", MULTIADDRS, (),
            "Extra addresses to show in `status` and tell peers, e.g. a NAT's public "
            "address or a DNS name (/dns4/lab1.example.org/tcp/4816); interface "
            "addresses of a wildcard listener are shown without it.", "MULTIADDR"),
    Setting("bootstrap", BOOTSTRAP_ADDRS, (),
            "Peers to connect to at start-up, as full multiaddrs with /p2p/<peer-id>.",
            "MULTIADDR"),
    Setting("trusted_peers", PEER_IDS, (),
            "Peer IDs allowed to sync and query with this node; empty means everyone "
            "on the network.", "PEER_ID"),
    Setting("lab_key", PATH, None,
            "File holding the lab key (`benchsync lab-key new FILE`): nodes with the same "
            "key are members of one lab, every other peer is a stranger. Copy it (mode "
            "0600) to every machine of the lab.", "FILE",
            default_doc="<home>/lab.key, created on first start (a closed lab of one)"),
    Setting("lab_key_next", PATH, None,
            "A second key file held while a lab rotates: peers holding either key are "
            "members.", "FILE", default_doc="unset"),
    Setting("open", BOOL, False,
            "Serve strangers (peers without the lab key) read-only: heads and blocks."),
    Setting("open_queries", BOOL, False,
            "With open, also answer strangers' queries."),
    Setting("bitswap_serve", _str_kind("mode", "lab or all", _check_bitswap_serve), "lab",
            "Whom Bitswap (/ipfs/bitswap/1.2.0) serves blocks: lab (members; strangers too "
            "when open) or all (also written open: any IPFS peer, e.g. Kubo or Helia; bans "
            "and trusted_peers still apply).", "MODE"),
    Setting("mdns", BOOL, False,
            "Discover peers on the local network with mDNS (binds every interface)."),
    Setting("snapshot_after_writes", _int_kind(0), 100,
            "Take a snapshot after this many recorded rows; 0 disables.", "N"),
    Setting("snapshot_interval", _seconds_kind(0, zero_disables=True), 300.0,
            "Take a snapshot this often when there are unsnapshotted writes; 0 disables.",
            "SECONDS"),
    Setting("history_retention", _seconds_kind(0), HISTORY_RETENTION,
            "Every version of the own history newer than this keeps its tables (is "
            "restorable); older ones are thinned to one per history_interval. A thinned "
            "version keeps its manifest (`log` lists it, marked) but not its tables. "
            "Pinned and tagged versions and the head are kept forever.", "SECONDS"),
    Setting("history_interval", _seconds_kind(0), HISTORY_INTERVAL,
            "Versions older than history_retention are thinned to one per this interval "
            "(the newest of each).", "SECONDS"),
    Setting("replica_expiry", _seconds_kind(0, zero_disables=True), REPLICA_EXPIRY,
            "Drop a peer's replica when neither its owner nor a new version of it was "
            "seen for this long (it left the lab); 0 keeps replicas forever.", "SECONDS"),
    Setting("disk_budget", _size_kind(1 * MiB), None,
            "Bytes the data directory may use (database, history, replicas). Over it, "
            "maintenance thins the oldest versions beyond history_retention, never "
            "pinned or tagged ones or the head; `status` warns when that is not "
            "enough.", "SIZE", default_doc="unset (no budget)"),
    Setting("maintenance_interval", _seconds_kind(0), MAINTENANCE_INTERVAL,
            "How often the node thins its history, expires replicas and deletes "
            "unreferenced blocks (also after large changes), in the background.",
            "SECONDS"),
    Setting("reannounce_interval", _seconds_kind(0), 30.0,
            "Re-announce our head this often (gossip is lossy).", "SECONDS"),
    Setting("max_block_bytes", _size_kind(1024, MAX_BLOCK_SIZE), MAX_BLOCK_SIZE,
            "Largest block accepted from a peer.", "SIZE"),
    Setting("max_response_bytes", _size_kind(1024), 1 * GiB,
            "Largest CAR stream accepted for one fetch.", "SIZE"),
    Setting("max_concurrent_fetches_per_peer", _int_kind(1, 64), 4,
            "Fetch streams served to one peer at the same time.", "N"),
    Setting("max_followed_datasets", _int_kind(1), 256,
            "Peer datasets followed at most (a bound against self-made identities).", "N"),
    Setting("query_timeout", _seconds_kind(0), QUERY_TIMEOUT,
            "Time limit of one query, on this node and per peer of a network query.",
            "SECONDS"),
    # bounded by what the query protocol can carry: a network query asks every peer
    Setting("query_max_rows", _int_kind(1, MAX_ROWS), QUERY_MAX_ROWS,
            "Rows one query may return.", "N"),
    Setting("query_max_bytes", _size_kind(1024, MAX_RESULT_BYTES), QUERY_MAX_BYTES,
            "Bytes of Arrow data one query may return.", "SIZE"),
    Setting("query_memory_limit", _size_kind(16 * MiB), QUERY_MEMORY_LIMIT,
            "DuckDB memory limit for queries served to peers.", "SIZE"),
    Setting("query_ship_max_bytes", _size_kind(MiB), 1 * GiB,
            "Bytes of table rows a network query may gather from all nodes when it cannot "
            "be split into per-node aggregates (median, CTEs, subqueries, ...: the query "
            "then runs here over every node's rows), and the bytes this node ships to "
            "such a query of a peer's (no row limit: query_max_rows and query_max_bytes "
            "bound answers, not shipped rows). One node ships at most 256 MiB per table "
            "(the query protocol's largest answer), within its query_memory_limit and "
            "query_timeout.", "SIZE"),
    Setting("db_memory_limit", _size_kind(64 * MiB), 1 * GiB,
            "DuckDB memory limit of the node's own database; larger sorts (the snapshot "
            "export) spill to disk instead of growing with the database.", "SIZE"),
    Setting("control_socket", PATH, None,
            "Unix socket of the control API (mode 0600; 0660 with control_socket_group).",
            "PATH",
            default_doc="$RUNTIME_DIRECTORY/control.sock under systemd, else "
                        "<home>/control.sock"),
    Setting("control_socket_group", _str_kind("group", "a group name or number", _check_group),
            None,
            "Group that owns the control socket, which is then mode 0660: its members may "
            "use the CLI against this node (the systemd unit sets benchsync). The node's "
            "user must be in the group; set after bind, before the node serves.", "GROUP",
            default_doc="unset (the socket is mode 0600: the node's user only)"),
    Setting("control_tcp", _str_kind("host:port", "HOST:PORT", _check_host_port), None,
            "Also serve the control API on this TCP address; needs control_token.",
            "HOST:PORT", default_doc="unset (Unix socket only)"),
    Setting("control_token", _str_kind("string", "a token", _check_token), None,
            f"Bearer token required on the TCP control API (at least {MIN_TOKEN_LENGTH} "
            "characters). Prefer the environment variable to the file.", "TOKEN",
            default_doc="unset"),
    Setting("metrics", BOOL, True,
            "Serve Prometheus metrics at GET /metrics on the control API."),
    Setting("web_listen", _str_kind("host:port", "HOST:PORT", _check_host_port), None,
            "Serve the read-only lab dashboard (HTML pages, SVG charts, CSV and JSON) on "
            "this TCP address, e.g. 127.0.0.1:7480. An address other than loopback needs "
            "web_token, or web_public to serve it to anyone who can connect.",
            "HOST:PORT", default_doc="unset (no dashboard)"),
    Setting("web_token", _str_kind("string", "a token", _check_token), None,
            f"Token the dashboard asks for (at least {MIN_TOKEN_LENGTH} characters): a "
            "browser gives it as the password of HTTP Basic authentication (any user "
            "name), a script as `Authorization: Bearer <token>`.", "TOKEN",
            default_doc="unset"),
    Setting("web_public", BOOL, False,
            "Serve the dashboard on a non-loopback web_listen without a token (it is "
            "read-only, but shows every result and peer of the lab)."),
    Setting("web_regression_threshold", _percent_kind(0, 1000), 10.0,
            "The dashboard's Trends page flags a series (model x hardware) whose latest "
            "point is worse than the median of its previous points by more than this "
            "percentage: lower throughput, higher latency.", "PERCENT"),
    Setting("log_level", _str_kind("level", "a log level", _check_log_level), "info",
            f"Log verbosity: {', '.join(LOG_LEVELS)}.", "LEVEL"),
)  # fmt: skip
SETTINGS_BY_NAME: Mapping[str, Setting] = {s.name: s for s in SETTINGS}
SECRET_SETTINGS = frozenset({"control_token", "web_token"})  # shown as "***"


@dataclasses.dataclass(frozen=True)
class Config:
    """A node's complete, checked settings (see `SETTINGS` for each field)."""

    home: Path
    network: str
    listen: tuple[str, ...]
    announce: tuple[str, ...]
    bootstrap: tuple[str, ...]
    trusted_peers: tuple[str, ...]
    lab_key: str | None
    lab_key_next: str | None
    open: bool
    open_queries: bool
    bitswap_serve: str
    mdns: bool
    snapshot_after_writes: int
    snapshot_interval: float
    history_retention: float
    history_interval: float
    replica_expiry: float
    disk_budget: int | None
    maintenance_interval: float
    reannounce_interval: float
    max_block_bytes: int
    max_response_bytes: int
    max_concurrent_fetches_per_peer: int
    max_followed_datasets: int
    query_timeout: float
    query_max_rows: int
    query_max_bytes: int
    query_memory_limit: int
    query_ship_max_bytes: int
    db_memory_limit: int
    control_socket: Path
    control_socket_group: str | None
    control_tcp: str | None
    control_token: str | None
    metrics: bool
    web_listen: str | None
    web_token: str | None
    web_public: bool
    web_regression_threshold: float
    log_level: str
    # Where each setting's value came from: "default", "<file>:<line>", "$ENV", "--flag".
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def control_tcp_address(self) -> tuple[str, int] | None:
        """`control_tcp` split into (host, port), or None."""
        if self.control_tcp is None:
            return None
        host, _, port = self.control_tcp.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def web_address(self) -> tuple[str, int] | None:
        """`web_listen` split into (host, port), or None."""
        if self.web_listen is None:
            return None
        host, _, port = self.web_listen.rpartition(":")
        return host.strip("[]"), int(port)

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """The settings as JSON-able values (the token shown as "***" unless redact=False)."""
        out: dict[str, Any] = {"home": str(self.home)}
        for s in SETTINGS:
            v = getattr(self, s.name)
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Path):
                v = str(v)
            if s.name in SECRET_SETTINGS and v is not None and redact:
                v = "***"
            out[s.name] = v
        return out


# --- loading -----------------------------------------------------------------


def default_config_path(home: Path) -> Path:
    return home / CONFIG_FILE_NAME


def load_config(
    home: str | os.PathLike[str],
    config_path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] = os.environ,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the node's `Config`: defaults < file < environment < `overrides` (CLI flags).

    `config_path` defaults to `$BENCHSYNC_CONFIG`, else `<home>/config.toml`; an
    explicitly named file must exist, the default one may be absent. Override
    values may be text (as typed on the command line) or already-typed values.

    Raises `ConfigError` for a TOML syntax error (with file and line), an unknown
    setting, a value of the wrong type or out of range, a malformed multiaddr or
    peer ID, or a TCP control address without a token.
    """
    home_path = Path(home).expanduser()
    values: dict[str, Any] = {s.name: s.default for s in SETTINGS}
    sources: dict[str, str] = {s.name: "default" for s in SETTINGS}

    explicit = config_path if config_path is not None else env.get("BENCHSYNC_CONFIG")
    path = Path(explicit).expanduser() if explicit else default_config_path(home_path)
    if path.exists() or explicit:
        for name, (value, source) in _read_file(path).items():
            values[name], sources[name] = value, source

    for s in SETTINGS:
        if s.env in env:
            values[s.name] = _from_text(s, env[s.env], source=f"${s.env}")
            sources[s.name] = f"${s.env}"
    unknown_env = sorted(
        k for k in env
        if k.startswith(ENV_PREFIX) and k not in ENV_NOT_SETTINGS
        and k[len(ENV_PREFIX):].lower() not in SETTINGS_BY_NAME
    )  # fmt: skip
    if unknown_env:
        name = unknown_env[0][len(ENV_PREFIX) :].lower()
        raise ConfigError(
            name, env[unknown_env[0]], _unknown(name),
            source=f"${unknown_env[0]}", hint=f"unset {unknown_env[0]} or fix its name",
        )  # fmt: skip

    for name, value in (overrides or {}).items():
        s = _setting(name, value, source="override")
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, str) and not s.kind.is_list:
            values[name] = _from_text(s, value, source=s.flag)  # as typed after the flag
        else:
            values[name] = _checked(s, list(value) if s.kind.is_list else value, source=s.flag)
        sources[name] = s.flag

    if values["control_socket"] is None:
        runtime = env.get("RUNTIME_DIRECTORY")
        # systemd may pass several directories separated by ':'; the first is ours.
        base = Path(runtime.split(":")[0]) if runtime else home_path
        values["control_socket"] = base / CONTROL_SOCKET_NAME
        sources["control_socket"] = "$RUNTIME_DIRECTORY" if runtime else "default"
    else:
        values["control_socket"] = Path(values["control_socket"])

    if values["control_tcp"] is not None and values["control_token"] is None:
        raise ConfigError(
            "control_token", None,
            "required when control_tcp is set (the TCP control API is not protected by "
            "file permissions)",
            source=sources["control_tcp"],
            hint=f"set BENCHSYNC_CONTROL_TOKEN to a random string of at least "
                 f"{MIN_TOKEN_LENGTH} characters (e.g. `openssl rand -hex 32`), or unset "
                 "control_tcp",
        )  # fmt: skip
    _check_web_exposure(values, sources)
    return Config(home=home_path, sources=sources, **values)


def _is_loopback(host: str) -> bool:
    """Whether `host` (a name or an IP address) is this machine's loopback only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any interface


def _check_web_exposure(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """A dashboard beyond loopback needs a token or an explicit web_public."""
    listen = values["web_listen"]
    if listen is None or values["web_token"] is not None or values["web_public"]:
        return
    host = listen.rpartition(":")[0]
    if _is_loopback(host):
        return
    raise ConfigError(
        "web_listen", listen,
        "not a loopback address, so anyone who can reach it would see every result of "
        "the lab; it needs web_token (or web_public)",
        source=sources["web_listen"],
        hint=f"set BENCHSYNC_WEB_TOKEN to a random string of at least {MIN_TOKEN_LENGTH} "
             "characters (e.g. `openssl rand -hex 32`), pass --web-public to serve it to "
             "anyone, or listen on 127.0.0.1",
    )  # fmt: skip


def _read_file(path: Path) -> dict[str, tuple[Any, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            None, None, f"config file {path} does not exist",
            hint="create it (`benchsync config example > FILE`) or drop --config",
        ) from None  # fmt: skip
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(None, None, f"cannot read config file {path}: {e}",
                          hint="check the file's permissions and encoding (UTF-8)") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = _TOML_POS_RE.search(str(e))
        where = f"{path}:{m.group(1)}:{m.group(2)}" if m else str(path)
        reason = _TOML_POS_RE.sub("", str(e)).strip()
        raise ConfigError(None, None, f"TOML syntax error: {reason}", source=where) from None
    lines = text.splitlines()
    out: dict[str, tuple[Any, str]] = {}
    for name, value in data.items():
        source = _where(path, lines, name)
        s = _setting(name, value, source=source)
        out[name] = (_checked(s, value, source=source), source)
    return out


def _where(path: Path, lines: Sequence[str], key: str) -> str:
    """`file:line` of the key's assignment (best effort: top-level keys only)."""
    pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=|^\s*\[\s*{re.escape(key)}\s*\]")
    for i, line in enumerate(lines, 1):
        if pattern.match(line):
            return f"{path}:{i}"
    return str(path)


def _unknown(name: str) -> str:
    close = difflib.get_close_matches(name, SETTINGS_BY_NAME, n=1)
    guess = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown setting{guess} (known: {', '.join(SETTINGS_BY_NAME)})"


def _setting(name: str, value: object, *, source: str) -> Setting:
    try:
        return SETTINGS_BY_NAME[name]
    except KeyError:
        raise ConfigError(name, value, _unknown(name), source=source) from None


def _checked(s: Setting, value: Any, *, source: str) -> Any:
    try:
        return s.kind.check(value)
    except ValueError as e:
        raise ConfigError(s.name, value, str(e), source=source) from None


def _from_text(s: Setting, text: str, *, source: str) -> Any:
    try:
        return s.kind.parse(text)
    except ValueError as e:
        raise ConfigError(s.name, text, str(e), source=source) from None


# --- CLI flags ---------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config` and one flag per setting to `parser` (for `benchsync up`).

    Flags the user did not give are absent from the parsed namespace, so that
    they do not override the file or the environment; `overrides_from_args`
    collects the ones that were given.
    """
    parser.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS,
        help=f"config file (default: $BENCHSYNC_CONFIG, else <home>/{CONFIG_FILE_NAME})",
    )  # fmt: skip
    group = parser.add_argument_group(
        "settings", "each also comes from the config file or $BENCHSYNC_<NAME>; flags win"
    )
    for s in SETTINGS:
        help_text = f"{s.help} [env {s.env}; default {_default_doc(s)}]".replace("%", "%%")
        if s.kind.is_bool:
            group.add_argument(
                s.flag, dest=s.name, action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS, help=help_text,
            )  # fmt: skip
        elif s.kind.is_list:
            # `--listen A B` and `--listen A --listen B` both give [A, B].
            group.add_argument(
                s.flag, dest=s.name, nargs="+", action="extend", metavar=s.metavar,
                default=argparse.SUPPRESS, help=help_text,
            )  # fmt: skip
        else:
            group.add_argument(
                s.flag, dest=s.name, metavar=s.metavar, default=argparse.SUPPRESS,
                help=help_text,
            )  # fmt: skip


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags in `args` (parsed by a parser from `add_arguments`)."""
    given = vars(args)
    return {s.name: given[s.name] for s in SETTINGS if s.name in given}


def config_from_args(
    home: str | os.PathLike[str], args: argparse.Namespace, env: Mapping[str, str] = os.environ
) -> Config:
    """`load_config` for a namespace parsed with `add_arguments`'s flags."""
    return load_config(home, getattr(args, "config", None), env, overrides_from_args(args))


# --- documentation -----------------------------------------------------------


def _default_doc(s: Setting) -> str:
    if s.default_doc is not None:
        return s.default_doc
    if s.kind.name == "size":
        return _toml_value(_size_text(s.default))
    return _toml_value(s.default)


def _size_text(n: int) -> str:
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, float) and v.is_integer():
        return f"{v:.1f}"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(v)


def render_markdown() -> str:
    """`docs/config.md`, generated from `SETTINGS` (a test keeps the committed file equal)."""
    out = [
        "# benchsync configuration",
        "",
        "<!-- Generated from SETTINGS in daemon/config.py by `benchsync config docs`; "
        "do not edit by hand. -->",
        "",
        "A node reads its settings from, lowest precedence first:",
        "",
        "1. the defaults below;",
        f"2. the TOML file `$BENCHSYNC_HOME/{CONFIG_FILE_NAME}` (or `--config FILE`, or "
        "`$BENCHSYNC_CONFIG`), with one top-level `name = value` per setting;",
        "3. environment variables `BENCHSYNC_<NAME>` (lists are comma- or space-separated, "
        "booleans `true`/`false`/`1`/`0`);",
        "4. flags of `benchsync up` (`--name-with-dashes`).",
        "",
        "A bad value (unknown name, wrong type, out of range, malformed multiaddr or peer ID) "
        "stops the node with an error naming the setting, the value, where it came from and "
        "what is allowed. `benchsync config check` runs the same checks without starting a "
        "node; `benchsync config show` prints the effective settings and their sources.",
        "",
        "Sizes are bytes: an integer, or a string with a unit (`\"64MiB\"`, `\"1GB\"`; "
        "k/M/G are powers of 1000, KiB/MiB/GiB powers of 1024).",
        "",
        "| Setting | Type | Default | Environment | Flag |",
        "|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        out.append(
            f"| [`{s.name}`](#{s.name}) | {s.kind.name} | `{_default_doc(s)}` | `{s.env}` | "
            f"`{s.flag}` |"
        )
    out.append("")
    for s in SETTINGS:
        out += [
            f"## {s.name}",
            "",
            s.help,
            "",
            f"- Type: {s.kind.name} — {s.kind.allowed}",
            f"- Default: `{_default_doc(s)}`",
            f"- Environment: `{s.env}`",
            f"- Flag: `{s.flag}" + (f" {s.metavar}`" if not s.kind.is_bool else f"` / "
                                      f"`--no-{s.flag[2:]}`"),
            "",
        ]
    return "\n".join(out)


def render_example_toml() -> str:
    """An example config file: every setting, commented out at its default."""
    out = [
        "# benchsync node configuration (TOML).",
        f"# Copy to $BENCHSYNC_HOME/{CONFIG_FILE_NAME} (under systemd: "
        f"/var/lib/benchsync/{CONFIG_FILE_NAME}).",
        "# Every setting is shown at its default, commented out; environment variables",
        "# BENCHSYNC_<NAME> and `benchsync up` flags override this file.",
        "# Generated by `benchsync config example`; see docs/config.md.",
        "",
    ]
    for s in SETTINGS:
        out.append(f"# {s.help}")
        if s.default is None:
            out.append(f"# {s.name} = ...  # default: {_default_doc(s)}")
        else:
            out.append(f"# {s.name} = {_default_doc(s)}")
        out.append("")
    return "\n".join(out)
