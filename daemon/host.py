"""Building and running the node's py-libp2p host: TCP + Noise + Yamux only.

This module owns the host's configuration and the safety wrappers every
protocol handler goes through. py-libp2p's defaults are unsafe or slow for us
(see notes/libp2p.md): a default host also offers TLS, secio and *plaintext*
and a default dialer silently downgrades to plaintext; it offers Mplex; it
waits a 250 ms happy-eyeballs delay per dial unless the per-peer connection
limit is 1; and an exception escaping a stream handler tears down the whole
host. `new_benchsync_host` fixes the first three, `guard_handler` the last.

Listening is ours too (`ExclusiveTCP`): py-libp2p's TCP listener sets
SO_REUSEPORT (for hole punching, which we do not use), so a second node on a
used port silently shares it and the kernel splits the connections between
the two. Our listener binds exclusively, and `check_listening` turns an
address that could not be bound into an error before the node reports ready
(py-libp2p itself only logs it).

Default listening (`NODE_LISTEN`, the `listen` setting's default): every
interface, IPv4 and IPv6, on `DEFAULT_PORT`, so a node is reachable from the
other machines of a lab and its bootstrap address stays the same across
restarts. The port is ours: 4816 lies in 4805-4826, a range IANA has not
assigned, and no common software uses it (Kubo's 4001 is avoided on purpose:
labs may run both). Only the default's IPv6 half is best effort: on a machine
without IPv6 it is skipped with a warning; any other address that cannot be
bound stops the node. A P2PNode built without `listen` (tests, examples)
keeps `PRIVATE_LISTEN`, loopback on a free port.

A wildcard listener (`0.0.0.0`, `::`) is no address another machine can dial.
`dialable_addrs` (the host's address factory, so identify sends the same list)
replaces it with this machine's interface addresses (IPv4 first; link-local
ones only when nothing else exists), then the `announce` setting's addresses
(a NAT's or DNS name's), loopback last: users copy the first address.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import ifaddr
import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream, IRawConnection
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import THandler, TProtocol
from libp2p.io.trio import TrioTCPStream
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.exceptions import OpenConnectionError
from libp2p.transport.tcp.tcp import TCP, TCPListener

from benchsync.protocol.frames import FrameDecoder, TruncatedFrame

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

DEFAULT_PORT = 4816  # TCP; unassigned by IANA (4805-4826), not Kubo's 4001: see the docstring
# `benchsync up`'s default (the `listen` setting's, config.py keeps a literal copy).
NODE_LISTEN = [f"/ip4/0.0.0.0/tcp/{DEFAULT_PORT}", f"/ip6/::/tcp/{DEFAULT_PORT}"]
# A P2PNode built without `listen` (tests, examples, benchmarks): private, a free port.
PRIVATE_LISTEN = ["/ip4/127.0.0.1/tcp/0"]
# Of the default, what a machine without IPv6 may fail to bind without stopping the node.
BEST_EFFORT_LISTEN = frozenset({f"/ip6/::/tcp/{DEFAULT_PORT}"})
# Errors that mean "this machine has no IPv6", not "the port is taken".
NO_IPV6_ERRNOS = frozenset({errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.EADDRNOTAVAIL})
# seconds for one dial + Noise + Yamux handshake: a LAN peer that has not answered by
# then is down (py-libp2p's own dials and ours, `P2PNode.connect`)
DIAL_TIMEOUT = 10.0
NEGATIVE_DIAL_TTL = 1.0  # seconds a peer whose every address failed is not redialed
MAX_CONNECTIONS = 1024  # connections: far above a lab's node count
LISTEN_BACKLOG = 128  # pending TCP connections per listening socket
READ_CHUNK = 256 * 1024  # bytes asked per stream read (Noise returns at most ~64 KiB anyway)

StreamHandler = Callable[[INetStream], Awaitable[None]]


class HostConfigError(ValueError):
    """A listen or bootstrap address given by the user is unusable."""


class ListenError(HostConfigError):
    """A listen address could not be bound (in use, not ours, no permission)."""


def parse_multiaddr(addr: str, what: str) -> multiaddr.Multiaddr:
    """Parse `addr`; raises `HostConfigError` naming which setting is wrong."""
    try:
        return multiaddr.Multiaddr(addr)
    except Exception as e:  # the multiaddr package raises several types
        raise HostConfigError(
            f"{what} address {addr!r} is not a multiaddr ({e}); "
            "expected e.g. /ip4/127.0.0.1/tcp/4001"
        ) from None


def parse_peer_addr(addr: str) -> PeerInfo:
    """Parse a full peer address `/ip4/.../tcp/.../p2p/<peer id>` into a PeerInfo."""
    maddr = parse_multiaddr(addr, "peer")
    try:
        return info_from_p2p_addr(maddr)
    except Exception as e:
        raise HostConfigError(
            f"peer address {addr!r} has no /p2p/<peer id> part ({e}); "
            "copy the full address from `benchsync status` on that node"
        ) from None


def new_benchsync_host(
    key_pair: KeyPair, *, mdns: bool = False, announce: Sequence[str] = ()
) -> IHost:
    """Create (not start) a host that speaks only TCP + Noise + Yamux.

    mDNS fills the peerstore with peers of the local network (off by default:
    it binds every interface). Bootstrap peers are dialled by the node itself
    once its services run (`P2PNode`): py-libp2p's own bootstrapper dials
    while the host starts, before pubsub can take the connection.
    `host.get_addrs()` gives `dialable_addrs` (with `announce` appended).
    """
    extra = [parse_multiaddr(a, "announce") for a in announce]
    noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
    host = new_host(
        addrs_factory=lambda candidates: dialable_addrs(candidates, extra),
        # Addresses peers observe are ephemeral ports or NAT guesses on a LAN;
        # `announce` is the way to add an address we cannot see ourselves.
        disable_identify_address_discovery=True,
        key_pair=key_pair,
        # Exactly one security transport and one muxer: nothing to downgrade to.
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        enable_mDNS=mdns,
        transports=[ExclusiveTCP()],
        # One connection per peer makes a dial take ~10 ms instead of waiting
        # the 250 ms happy-eyeballs delay for a second connection.
        connection_config=ConnectionConfig(
            max_connections_per_peer=1,
            max_connections=MAX_CONNECTIONS,
            dial_timeout=DIAL_TIMEOUT,
        ),
    )
    # py-libp2p refuses to redial a peer whose addresses all failed for 60 s: a
    # lab's leaves then wait a minute for a restarted hub. Our callers pace their
    # own redials (bootstrap every few seconds), so keep its cache short.
    cache = getattr(host.get_network(), "_negative_peer_cache", None)
    if cache is not None and hasattr(cache, "_ttl"):
        cache._ttl = NEGATIVE_DIAL_TTL
    return host


class _ExclusiveTCPListener(TCPListener):
    """py-libp2p's TCP listener, binding without SO_REUSEPORT (see the module docstring)."""

    def __init__(self, handler_function: THandler, errors: dict[str, str]) -> None:
        super().__init__(handler_function)
        self._errors = errors

    async def listen(self, maddr: multiaddr.Multiaddr) -> None:
        """Bind `maddr` exclusively and serve it; raises OpenConnectionError (and records
        why, for `check_listening`) when it cannot be bound."""
        try:
            await self._listen(maddr)
        except OpenConnectionError as e:
            self._errors[str(maddr)] = str(e)
            cause = e.__cause__ or e.__context__
            if isinstance(cause, OSError) and cause.errno is not None:
                self._errors[_ERRNO_KEY + str(maddr)] = str(cause.errno)
            raise

    async def _listen(self, maddr: multiaddr.Multiaddr) -> None:
        try:
            port = int(maddr.value_for_protocol("tcp"))
        except Exception as e:  # ProtocolLookupError, None, a bad number
            raise OpenConnectionError(f"{maddr} has no TCP port: {e}") from None
        if "ip6" in {p.name for p in maddr.protocols()}:
            family, ip = socket.AF_INET6, str(maddr.value_for_protocol("ip6"))
        else:
            family, ip = socket.AF_INET, str(maddr.value_for_protocol("ip4"))
        try:
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:  # EAFNOSUPPORT: a kernel without IPv6
            raise OpenConnectionError(f"cannot listen on {maddr}: {e.strerror or e}") from e
        try:
            # SO_REUSEADDR only lets a restarted node bind over its old TIME_WAIT
            # connections; it never shares a port with a live listener (Linux).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # "::" must not also take the IPv4 port
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await sock.bind((ip, port))
            sock.listen(LISTEN_BACKLOG)
        except OSError as e:
            sock.close()
            reason = e.strerror or str(e)
            raise OpenConnectionError(f"cannot listen on {maddr}: {reason}") from e
        listener = trio.SocketListener(sock)

        async def handle(stream: trio.SocketStream) -> None:
            with contextlib.suppress(Exception):  # a failed handshake costs its connection
                await self.handler(TrioTCPStream(stream))

        async def serve(task_status: TaskStatus[Any]) -> None:
            await trio.serve_listeners(handle, [listener], task_status=task_status)

        async with self._lifecycle_lock:
            if self._closed:
                await listener.aclose()
                raise OpenConnectionError(f"cannot listen on {maddr}: the host is closing")
            if self._nursery is None:
                await self._spawn_background_task()
            if self._nursery is None:
                await listener.aclose()
                raise OpenConnectionError(f"cannot listen on {maddr}: listener not running")
            await self._nursery.start(serve)
            self.listeners.append(listener)


class ExclusiveTCP(TCP):
    """py-libp2p's TCP transport with `_ExclusiveTCPListener`s; remembers listen failures."""

    def __init__(self) -> None:
        super().__init__()
        self.listen_errors: dict[str, str] = {}  # multiaddr -> why it could not be bound

    def create_listener(self, handler_function: THandler) -> TCPListener:
        return _ExclusiveTCPListener(handler_function, self.listen_errors)

    async def dial_with_source(
        self, maddr: multiaddr.Multiaddr, source: tuple[str, int]
    ) -> IRawConnection:
        # Hole punching dials from the listen port, which needs SO_REUSEPORT; we have none.
        return await self.dial(maddr)


_ERRNO_KEY = "errno:"  # listen_errors key prefix: the OS error number of a failed bind


def check_listening(
    host: IHost,
    listen: Sequence[multiaddr.Multiaddr],
    *,
    best_effort: Iterable[str] = BEST_EFFORT_LISTEN,
) -> None:
    """Raise ListenError unless `host` (running) listens on every address of `listen`.

    An address of `best_effort` (the default's IPv6 wildcard) that failed only
    because the machine has no IPv6 is logged and skipped, unless nothing at
    all could be bound.
    """
    network = host.get_network()
    bound = getattr(network, "listeners", {})
    missing = [str(m) for m in listen if str(m) not in bound]
    if not missing:
        return
    errors: dict[str, str] = {}
    for transport in network.transport_manager.get_transports():  # type: ignore[attr-defined]
        errors.update(getattr(transport, "listen_errors", {}))
    optional = set(best_effort)
    skipped = [
        m for m in missing
        if m in optional and errors.get(_ERRNO_KEY + m, "").isdigit()
        and int(errors[_ERRNO_KEY + m]) in NO_IPV6_ERRNOS
    ]  # fmt: skip
    if len(skipped) < len(listen):
        for m in skipped:
            log.warning("not listening on %s (no IPv6 on this machine?): %s", m, errors[m])
        missing = [m for m in missing if m not in skipped]
    if not missing:
        return
    reasons = "; ".join(errors.get(m, f"cannot listen on {m}") for m in missing)
    raise ListenError(reasons)


# --- dialable addresses ------------------------------------------------------------------


def dialable_addrs(
    candidates: Sequence[multiaddr.Multiaddr], announce: Sequence[multiaddr.Multiaddr] = ()
) -> list[multiaddr.Multiaddr]:
    """The addresses other machines can dial: `candidates` (listen addresses) with each
    wildcard replaced by this machine's interface addresses, then `announce`.

    Never returns `0.0.0.0` or `::`. Order: interface addresses (routable ones; link-local
    ones only when there is nothing routable), IPv4 first, then `announce`, then
    loopback; duplicates dropped.
    """
    out: list[multiaddr.Multiaddr] = []
    interfaces: tuple[list[str], list[str]] | None = None
    for maddr in candidates:
        ip4, ip6 = _ip_of(maddr, "ip4"), _ip_of(maddr, "ip6")
        wildcard = ip4 == "0.0.0.0" or ip6 == "::"
        if not wildcard:
            out.append(maddr)
            continue
        if interfaces is None:
            interfaces = interface_addrs()
        v4, v6 = interfaces
        rest = str(maddr).split("/", 3)[3]  # "tcp/4816" (and whatever follows)
        for ip in v4 if ip4 is not None else v6:
            proto = "ip4" if ip4 is not None else _ip6_proto(ip)
            out.append(multiaddr.Multiaddr(f"/{proto}/{ip.split('%')[0]}/{rest}"))
    unique = list({str(a): a for a in [*out, *announce]}.values())
    announced = {str(a) for a in announce}
    unique.sort(key=lambda a: _rank(a, str(a) in announced))  # stable: keeps each group's order
    return unique


def _rank(maddr: multiaddr.Multiaddr, announced: bool) -> tuple[int, int]:
    """Sort key: (interface addresses, then announced ones, then loopback; IPv4 first)."""
    ip4, ip6 = _ip_of(maddr, "ip4"), _ip_of(maddr, "ip6")
    ip = ip4 or ip6
    if ip is not None and ipaddress.ip_address(ip).is_loopback:
        return 2, 4 if ip4 else 6
    return (1 if announced else 0), (4 if ip4 else 6 if ip6 else 0)


def _ip_of(maddr: multiaddr.Multiaddr, proto: str) -> str | None:
    try:
        value = maddr.value_for_protocol(proto)
    except Exception:  # ProtocolLookupError: not this family
        return None
    return None if value is None else str(value)


def _ip6_proto(ip: str) -> str:
    """The multiaddr prefix of an IPv6 interface address (a zone for link-local)."""
    if "%" in ip:
        return f"ip6zone/{ip.split('%', 1)[1]}/ip6"
    return "ip6"


def interface_addrs() -> tuple[list[str], list[str]]:
    """This machine's IPv4 and IPv6 interface addresses, in the order `dialable_addrs`
    shows them. A link-local IPv6 address carries its zone (`fe80::1%eth0`)."""
    try:
        raw = _ifaddr_addrs()
    except OSError as e:  # no netlink (a sandbox such as systemd's RestrictAddressFamilies)
        log.debug("getifaddrs failed (%s); reading interfaces without netlink", e)
        raw = _ioctl_ipv4_addrs() + _proc_ipv6_addrs()
    v4 = _ordered([(ip, z) for ip, z in raw if ipaddress.ip_address(ip).version == 4])
    v6 = _ordered([(ip, z) for ip, z in raw if ipaddress.ip_address(ip).version == 6])
    return v4, v6


def _ordered(addrs: list[tuple[str, str]]) -> list[str]:
    routable, link_local, loopback = [], [], []
    for ip, zone in addrs:
        a = ipaddress.ip_address(ip)
        if a.is_loopback:
            loopback.append(ip)
        elif a.is_link_local:
            link_local.append(f"{ip}%{zone}" if a.version == 6 and zone else ip)
        elif not a.is_unspecified and not a.is_multicast:
            routable.append(ip)
    shown = routable or link_local
    return list(dict.fromkeys(shown + loopback))


def _ifaddr_addrs() -> list[tuple[str, str]]:
    """(address, interface) pairs from getifaddrs(3) (needs a netlink socket)."""
    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            addr = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            out.append((str(addr).split("%")[0], str(adapter.name)))
    return out


SIOCGIFCONF = 0x8912  # Linux ioctl: list the IPv4 addresses of the interfaces
_IFREQ_SIZE = 40  # sizeof(struct ifreq) on 64-bit Linux


def _ioctl_ipv4_addrs() -> list[tuple[str, str]]:
    """IPv4 (address, interface) pairs via SIOCGIFCONF: no netlink needed. Linux only."""
    size = 64 * _IFREQ_SIZE
    buf = array.array("B", bytes(size))
    ptr = buf.buffer_info()[0]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            got = fcntl.ioctl(s.fileno(), SIOCGIFCONF, struct.pack("iL", size, ptr))
    except OSError:
        return []
    length = struct.unpack("iL", got)[0]
    data = buf.tobytes()[:length]
    out = []
    for off in range(0, length - _IFREQ_SIZE + 1, _IFREQ_SIZE):
        name = data[off : off + 16].split(b"\0", 1)[0].decode(errors="replace")
        out.append((socket.inet_ntoa(data[off + 20 : off + 24]), name))
    return out


def _proc_ipv6_addrs() -> list[tuple[str, str]]:
    """IPv6 (address, interface) pairs from /proc/self/net/if_inet6. Linux only."""
    out = []
    with contextlib.suppress(OSError), open("/proc/self/net/if_inet6") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6:
                ip = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
                out.append((str(ip), fields[5]))
    return out


def remote_peer(stream: INetStream) -> ID:
    """The authenticated peer ID at the other end of `stream` (Noise proved it)."""
    return stream.muxed_conn.peer_id


def guard_handler(name: str, handler: StreamHandler) -> StreamHandler:
    """Wrap a stream handler so that any failure costs only its stream.

    py-libp2p tears the whole host down when a handler raises; a bad peer must
    never be able to do that. The wrapped handler resets the stream on error
    and closes it on success (an unclosed stream leaves the reader hanging).
    """

    async def guarded(stream: INetStream) -> None:
        try:
            await handler(stream)
        except trio.Cancelled:
            raise
        except BaseException as e:  # an ExceptionGroup from a nursery, too
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            log.info("%s handler failed for peer %s: %r", name, _peer_or_unknown(stream), e)
            # The stream may already be gone; resetting is best effort.
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await stream.reset()
            return
        with trio.move_on_after(1), contextlib.suppress(Exception):
            await stream.close()

    return guarded


def _peer_or_unknown(stream: INetStream) -> str:
    try:
        return str(remote_peer(stream))
    except Exception:
        return "?"


SEVER_TIMEOUT = 2.0  # seconds to close one connection at its transport


async def new_stream(
    host: IHost, peer: ID, protocols: Sequence[str], timeout: float
) -> INetStream:
    """`host.new_stream` (dialing if needed) within `timeout` seconds; raises
    `trio.TooSlowError` past it, after severing the peer's connections.

    A stream open that takes this long on a connection means its muxer is
    wedged: py-libp2p's Yamux writes ACKs and pongs from its read loop under
    the connection's write lock, so two peers whose writers both wait on full
    socket buffers stop reading each other for good (seen under mutual bulk
    fetches). Closing the connection at its transport frees both sides; the
    next stream dials a new one. A slow dial loses nothing by it.
    """
    try:
        with trio.fail_after(timeout):
            return await host.new_stream(peer, [TProtocol(p) for p in protocols])
    except trio.TooSlowError:
        severed = await sever(host, peer)
        if severed:
            log.warning("opening a stream to %s took over %.0f s: closed its %d connection(s) "
                        "to start afresh", peer, timeout, severed)  # fmt: skip
        raise


async def sever(host: IHost, peer: ID) -> int:
    """Close every connection to `peer` at its transport; returns how many.

    Not `conn.close()`: its goodbye frame waits on the same write lock as the
    wedged writer. With the socket closed, that writer fails and lets go, the
    muxer's read loop fails in turn and py-libp2p drops the connection as it
    drops any broken one (streams reset, peer disconnected).
    """
    conns = list(host.get_network().get_connections(peer))
    for conn in conns:
        secured = getattr(conn.muxed_conn, "secured_conn", None)
        if secured is None:
            continue
        with trio.move_on_after(SEVER_TIMEOUT):
            try:
                await secured.close()
            except Exception as e:  # already closing: what we wanted
                log.debug("closing a connection to %s: %r", peer, e)
    return len(conns)


async def read_some(stream: INetStream, n: int = READ_CHUNK) -> bytes:
    """Read up to `n` bytes; returns b"" at end of stream (EOF, reset or closed)."""
    try:
        return await stream.read(n)
    except StreamError:  # StreamEOF, StreamReset, StreamClosed: a dead peer looks like EOF
        return b""


class StreamReader:
    """Reads frames, then raw bytes, from one stream, with a named frame limit.

    Bytes read past a frame stay buffered: a second frame that came in the
    same read as the first is returned without waiting for more bytes (a
    requester may send two frames in one write, then wait), and `read()`
    returns leftover bytes first, so a status frame followed by a CAR stream
    splits cleanly.
    """

    def __init__(self, stream: INetStream, *, max_frame: int) -> None:
        self.stream = stream
        self._decoder = FrameDecoder(max_frame=max_frame)
        self.wire_bytes = 0  # bytes read from the stream so far

    async def frame(self, *, max_frame: int | None = None) -> bytes:
        """The next frame body (at most `max_frame` bytes, default: the reader's).

        Raises `TruncatedFrame` if the stream ends first,
        `FrameTooLarge`/`RemoteProtocolError` on a bad prefix.
        """
        if max_frame is not None:
            self._decoder.max_frame = max_frame
        data = b""
        while True:
            frames = self._decoder.feed(data, max_frames=1)
            if frames:
                return frames[0]
            data = await read_some(self.stream)
            if not data:
                self._decoder.close()
                raise TruncatedFrame("stream ended before a frame was received")
            self.wire_bytes += len(data)

    async def read(self) -> bytes:
        """The next raw bytes after the frames read so far; b"" at end of stream."""
        leftover = self._decoder.take_buffer()
        if leftover:
            return leftover
        data = await read_some(self.stream)
        self.wire_bytes += len(data)
        return data


BAN_DURATION = 600.0  # seconds a peer that sent corrupt data or garbage stays banned


class AccessPolicy:
    """Who may talk to us: the `trusted_peers` allow-list and temporary bans.

    py-libp2p has no peer-ID connection gater, so every protocol handler and
    the gossip validator ask `refusal(peer)` themselves. An empty trusted set
    means every peer of the network is welcome.
    """

    def __init__(
        self, trusted_peers: set[str] | None = None, *, ban_duration: float = BAN_DURATION
    ) -> None:
        self.trusted_peers = frozenset(trusted_peers or ())
        self.ban_duration = ban_duration
        self._bans: dict[str, tuple[float, str]] = {}  # peer -> (monotonic expiry, reason)
        self.bans_total = 0  # peers banned since start (each sent corrupt data or garbage)

    def is_trusted(self, peer: str) -> bool:
        return not self.trusted_peers or peer in self.trusted_peers

    def ban(self, peer: str, reason: str) -> None:
        """Ban `peer` for `ban_duration` seconds because of `reason`."""
        log.warning("banning peer %s for %.0f s: %s", peer, self.ban_duration, reason)
        self.bans_total += 1
        self._bans[peer] = (time.monotonic() + self.ban_duration, reason)

    def ban_reason(self, peer: str) -> str | None:
        entry = self._bans.get(peer)
        if entry is None:
            return None
        expiry, reason = entry
        if time.monotonic() >= expiry:
            del self._bans[peer]
            return None
        return reason

    def is_banned(self, peer: str) -> bool:
        return self.ban_reason(peer) is not None

    def banned_peers(self) -> dict[str, str]:
        """Currently banned peers and why."""
        return {p: r for p in list(self._bans) if (r := self.ban_reason(p)) is not None}

    def refusal(self, peer: str) -> str | None:
        """Why `peer` may not use our services, or None when it may."""
        ban = self.ban_reason(peer)
        if ban is not None:
            return f"peer {peer} is temporarily banned by this node: {ban}"
        if not self.is_trusted(peer):
            return (
                f"peer {peer} is not in this node's trusted_peers; "
                "ask its operator to add your peer ID"
            )
        return None
