"""Peer exchange: nodes tell each other the peers they know, as pure data (no I/O).

`/benchsync/peers/1.0.0`: the requester sends one JSON frame `{"network":
...}`; the responder answers `{"status": "ok", "peers": [{"peer_id": ...,
"addrs": ["/ip4/10.0.0.2/tcp/4816", ...]}, ...]}` (itself first, then the
peers it has been connected to) or a refusal. `PeersSession` is that exchange
as a sans-IO session (`protocol/session.py`).

Which addresses travel (`scope_of`, `shareable`): an address is only
meaningful where it was seen. A loopback address names the machine it was
seen on, so it is shared and taken only over a loopback connection (both ends
on one machine); a link-local address names a link, an unspecified or
multicast address nothing: those never travel. Records are hearsay: a liar
can point a peer ID at any address, which costs a dial that fails the Noise
handshake (the peer ID is proven per connection), so records are bounded in
number and size and the receiver filters them again.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from benchsync.protocol.frames import MAX_FRAME, RemoteProtocolError, encode_json_frame
from benchsync.protocol.names import check_network_name
from benchsync.protocol.session import (
    DONE,
    IDLE,
    NEED_DATA,
    REQUESTED,
    REQUESTER,
    RESPONDER,
    Refusal,
    Session,
    parse_refusal,
)

PEERS_PROTOCOL_ID = "/benchsync/peers/1.0.0"
MAX_PEERS_IN_RESPONSE = 128  # records in one answer (a lab is tens of machines)
MAX_ADDRS_PER_PEER = 8  # addresses kept per peer
MAX_ADDR_LEN = 200  # characters of one multiaddr
MAX_PEER_ID_LEN = 128  # characters: an Ed25519 peer ID in base58 is 52
MAX_PEERS_RESPONSE = 512 * 1024  # bytes: one answer frame (128 records of 8 addresses fit)

ROUTABLE = "routable"  # a LAN or public address: any machine may dial it
LOOPBACK = "loopback"  # only the machine it was seen on
UNUSABLE = "unusable"  # link-local, unspecified, multicast, or not an address we dial

_BASE58 = frozenset("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")
_DNS = ("dns", "dns4", "dns6")


class InvalidPeers(RemoteProtocolError):
    """A peer exchange answer is malformed."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid peer record: {reason}")
        self.reason = reason


def scope_of(addr: str) -> str:
    """Where `addr` (`/ip4|ip6|dns*/<host>/tcp/<port>`, no `/p2p/`) can be dialed from."""
    parts = addr.split("/")
    if len(parts) != 5 or parts[0] or parts[3] != "tcp":
        return UNUSABLE
    if not parts[4].isdigit() or not 0 < int(parts[4]) < 65536:
        return UNUSABLE
    kind, host = parts[1], parts[2]
    if kind in _DNS:
        if host == "localhost" or host.endswith(".localhost"):
            return LOOPBACK
        return ROUTABLE if host and len(host) <= 253 else UNUSABLE
    if kind not in ("ip4", "ip6"):
        return UNUSABLE
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return UNUSABLE
    if (kind == "ip4") != (ip.version == 4):
        return UNUSABLE
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return LOOPBACK
    if ip.is_link_local or ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return UNUSABLE
    return ROUTABLE


def shareable(addr: str, *, same_machine: bool) -> bool:
    """Whether `addr` may be passed to (or taken from) a peer.

    `same_machine`: that peer's connection to us is over loopback.
    """
    scope = scope_of(addr)
    return scope == ROUTABLE or (scope == LOOPBACK and same_machine)


def is_loopback_host(host: str) -> bool:
    """Whether a connection's remote IP is loopback (the peer runs on this machine)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@dataclass(frozen=True)
class PeerRecord:
    """A peer and the addresses (without `/p2p/`) it can be dialed at."""

    peer_id: str
    addrs: tuple[str, ...]

    def __post_init__(self) -> None:
        pid = self.peer_id
        if not isinstance(pid, str) or not 0 < len(pid) <= MAX_PEER_ID_LEN or set(pid) - _BASE58:
            raise InvalidPeers(f"peer_id must be a base58 peer ID, got {pid!r}")
        if not isinstance(self.addrs, tuple) or len(self.addrs) > MAX_ADDRS_PER_PEER:
            raise InvalidPeers(f"at most {MAX_ADDRS_PER_PEER} addresses per peer")
        for a in self.addrs:
            if not isinstance(a, str) or len(a) > MAX_ADDR_LEN:
                raise InvalidPeers(f"an address must be a string of at most {MAX_ADDR_LEN} chars")

    def to_json(self) -> dict[str, Any]:
        return {"peer_id": self.peer_id, "addrs": list(self.addrs)}

    @classmethod
    def from_json(cls, obj: object) -> PeerRecord:
        """Build a record from decoded JSON; raises `InvalidPeers`."""
        if not isinstance(obj, Mapping):
            raise InvalidPeers("a peer record must be a JSON object")
        addrs = obj.get("addrs")
        if not isinstance(addrs, list):
            raise InvalidPeers("addrs must be a list")
        return cls(peer_id=obj.get("peer_id"), addrs=tuple(addrs))  # type: ignore[arg-type]

    def filtered(self, *, same_machine: bool) -> PeerRecord:
        """This record with only the addresses that may travel (see `shareable`)."""
        keep = [a for a in self.addrs if shareable(a, same_machine=same_machine)]
        return PeerRecord(self.peer_id, tuple(dict.fromkeys(keep))[:MAX_ADDRS_PER_PEER])


@dataclass(frozen=True)
class PeersRequest:
    """ "Which peers do you know?" for `network` (the adapter checks it)."""

    network: object


@dataclass(frozen=True)
class PeersResponse:
    """The responder's own record first, then the peers it has been connected to."""

    peers: tuple[PeerRecord, ...]


def parse_peers_response(obj: Mapping[str, Any]) -> PeersResponse:
    """Check a peers answer; raises `InvalidPeers` (a refusal never reaches here)."""
    if obj.get("status") != "ok":
        raise InvalidPeers(f"unknown peers response status {obj.get('status')!r}")
    raw = obj.get("peers")
    if not isinstance(raw, list) or len(raw) > MAX_PEERS_IN_RESPONSE:
        raise InvalidPeers(f"peers must be a list of at most {MAX_PEERS_IN_RESPONSE} records")
    return PeersResponse(tuple(PeerRecord.from_json(r) for r in raw))


def peers_response(records: Iterable[PeerRecord]) -> PeersResponse:
    """A response of at most `MAX_PEERS_IN_RESPONSE` records, those without addresses left out."""
    kept = [r for r in records if r.addrs]
    return PeersResponse(tuple(kept[:MAX_PEERS_IN_RESPONSE]))


class PeersSession(Session):
    """One side of `/benchsync/peers/1.0.0`: `PeersRequest`, then `PeersResponse` or `Refusal`."""

    TRANSITIONS = {
        (REQUESTER, IDLE, PeersRequest): REQUESTED,
        (RESPONDER, IDLE, Refusal): DONE,  # refused before the request was read
        (RESPONDER, REQUESTED, Refusal): DONE,
        (RESPONDER, REQUESTED, PeersResponse): DONE,
    }

    def __init__(self, role: str) -> None:
        super().__init__(role, max_frame=MAX_PEERS_RESPONSE if role == REQUESTER else MAX_FRAME)

    def _encode(self, event: object) -> bytes:
        if isinstance(event, PeersRequest):
            return encode_json_frame({"network": check_network_name(str(event.network))})
        if isinstance(event, PeersResponse):
            body = {"status": "ok", "peers": [r.to_json() for r in event.peers]}
            return encode_json_frame(body, max_frame=MAX_PEERS_RESPONSE)
        return super()._encode(event)

    def _decode(self) -> object:
        obj = self._next_json()
        if obj is None:
            return NEED_DATA
        if self.role == RESPONDER:
            return PeersRequest(network=obj.get("network"))
        return parse_refusal(obj) or parse_peers_response(obj)
