"""systemd service notifications (`sd_notify`) without libsystemd or extra daemons.

Owns the datagram messages a `Type=notify` service sends to `$NOTIFY_SOCKET`:
READY=1 once the node serves, STATUS=... lines for `systemctl status`,
WATCHDOG=1 pings (the `run_watchdog` trio service, at half of
`$WATCHDOG_USEC`), and STOPPING=1 on shutdown. When `$NOTIFY_SOCKET` is unset
(not started by systemd) every call is a no-op, so the node can call these
unconditionally.

The protocol is one `AF_UNIX`/`SOCK_DGRAM` datagram of newline-separated
`KEY=VALUE` lines per notification; a socket path starting with `@` names an
abstract-namespace socket (Linux).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    # trio-typing's stubs (a libp2p dependency) shadow trio's own annotations.
    from trio_typing import TaskStatus

WATCHDOG_FRACTION = 0.5  # ping at this fraction of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises
USEC = 1_000_000  # microseconds per second

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to the socket named by `$NOTIFY_SOCKET` (if any).

    Sending never raises: a service manager that went away must not take the
    node down with it; failures are logged and `notify` returns False.
    """

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        raw = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if raw.startswith("@"):
            self.address = "\0" + raw[1:]  # abstract namespace
        elif raw.startswith("/"):
            self.address = raw
        elif raw:
            log.warning("ignoring NOTIFY_SOCKET=%r: neither a path nor an @abstract name", raw)
        self._watchdog_interval = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening (NOTIFY_SOCKET was set)."""
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings, or None when systemd set no watchdog for us."""
        return self._watchdog_interval if self.enabled else None

    def notify(self, **fields: str | int) -> bool:
        """Send one message, e.g. `notify(READY=1, STATUS="serving")`.

        Returns True if it was sent, False when disabled or sending failed.
        """
        if self.address is None:
            return False
        for key, value in fields.items():
            if "\n" in str(value):
                raise ValueError(f"sd_notify {key} value must be one line, got {value!r}")
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never block: this runs on the trio thread, and a datagram socket whose
                # reader fell behind (queue full, net.unix.max_dgram_qlen) would stall
                # the whole node; a lost ping is what the watchdog is there to notice.
                sock.sendto(message, socket.MSG_DONTWAIT, self.address)
        except OSError as e:
            log.warning("sd_notify to %s failed: %s", self.address.replace("\0", "@"), e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd the node is up (`Type=notify` start-up completes)."""
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        """Set the one-line status `systemctl status` shows."""
        return self.notify(STATUS=text)

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd the node is shutting down on purpose."""
        return self.notify(STOPPING=1, **({"STATUS": status} if status else {}))

    def watchdog(self) -> bool:
        """One keep-alive ping."""
        return self.notify(WATCHDOG=1)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    # WATCHDOG_PID names the process systemd expects pings from; a child that
    # inherited the environment must not ping on its parent's behalf.
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value / USEC * WATCHDOG_FRACTION if value > 0 else None


async def run_watchdog(
    notifier: Notifier, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Ping the systemd watchdog at `notifier.watchdog_interval` until cancelled.

    Returns at once (after `task_status.started()`) when there is no watchdog.
    Start it with `nursery.start(run_watchdog, notifier)` once the node's own
    services are up: a node that hangs stops pinging, and systemd restarts it.
    """
    interval = notifier.watchdog_interval
    task_status.started()
    if interval is None:
        return
    while True:
        notifier.watchdog()
        await trio.sleep(interval)
