"""Progress for long CLI work: a bar on a terminal, plain lines otherwise.

Output goes to stderr, so stdout stays machine-readable (`--json`, CIDs).
On a terminal the bar is redrawn at most `REDRAW_INTERVAL` apart; when
stderr is not a terminal (systemd, CI, a pipe) a plain line is printed every
`LINE_INTERVAL` instead, so logs are not flooded with carriage returns.
"""

from __future__ import annotations

import io
import sys
import time
from typing import IO, Any

REDRAW_INTERVAL = 0.1  # seconds between bar redraws on a terminal
LINE_INTERVAL = 5.0  # seconds between plain progress lines
BAR_WIDTH = 30  # characters


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class Progress:
    """Counts bytes of one job; `update(n)` as they move, `close()` at the end."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        enabled: bool = True,
        stream: IO[str] | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._last = self.started  # first draw after one interval: short jobs stay quiet

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last >= (REDRAW_INTERVAL if self.tty else LINE_INTERVAL):
            self._last = now
            self._draw(final=False)

    def close(self) -> None:
        # A job that finished within one interval never drew: nothing to close.
        if self.enabled and (self.tty or self._last > self.started):
            self._draw(final=True)

    def _draw(self, *, final: bool) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = f"{_mb(self.done / elapsed)}/s"
        if self.total:
            frac = min(self.done / self.total, 1.0)
            filled = int(frac * BAR_WIDTH)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            text = f"{self.label} [{bar}] {frac:4.0%} {_mb(self.done)}/{_mb(self.total)} {rate}"
        else:
            text = f"{self.label} {_mb(self.done)} {rate}"
        if self.tty:
            end = "\n" if final else ""
            print(f"\r\x1b[K{text}", end=end, file=self.stream, flush=True)
        elif final or self.done:
            print(text, file=self.stream, flush=True)


class CountingReader(io.RawIOBase):
    """A readable stream that reports bytes read to a Progress."""

    def __init__(self, raw: IO[bytes], progress: Progress) -> None:
        self.raw = raw
        self.progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.progress.update(n)
        return n


class CountingWriter(io.RawIOBase):
    """A writable stream that reports bytes written to a Progress."""

    def __init__(self, raw: IO[bytes], progress: Progress) -> None:
        self.raw = raw
        self.progress = progress

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = self.raw.write(data) or 0
        self.progress.update(n)
        return n
