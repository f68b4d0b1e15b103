"""Waiting, on the wall clock, for a condition about real processes (nodes started as
programs, network namespaces) that no event announces."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

POLL = 0.1  # seconds between two polls of a condition


def wait_for(what: str, condition: Callable[[], Any], timeout: float = 60.0, *,
             poll: float = POLL) -> Any:  # fmt: skip
    """Poll `condition` until it returns something truthy, and return that.

    Raises AssertionError naming `what` after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)
