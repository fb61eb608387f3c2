"""A dependency-free progress line on stderr for long loops."""
from __future__ import annotations

import sys
import time


class Progress:
    """Counts steps of a job and redraws `label: done/total (rate, eta)` on
    stderr at most every `interval` seconds; silent when disabled."""

    def __init__(self, label: str, total: int | None, enabled: bool = True, interval: float = 0.5):
        self.label, self.total, self.enabled, self.interval = label, total, enabled, interval
        self.done, self.start, self.shown = 0, time.monotonic(), 0.0

    def update(self, steps: int = 1) -> None:
        self.done += steps
        now = time.monotonic()
        if self.enabled and (now - self.shown >= self.interval or self.done == self.total):
            self.shown = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            text = f"{self.label}: {self.done}/{self.total} ({rate:.1f}/s, eta {eta:.0f}s)"
        else:
            text = f"{self.label}: {self.done} ({rate:.1f}/s)"
        sys.stderr.write("\r" + text)
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self._draw(time.monotonic())
            sys.stderr.write("\n")
            sys.stderr.flush()
