"""A dependency-free progress line on stderr for long loops."""
from __future__ import annotations

import sys
import time

# Logs (stderr not a terminal) get a full line this often instead of a redrawn one.
LOG_INTERVAL = 10.0


class Progress:
    """Counts steps of a job and shows `label: done/total (rate, eta)` on
    stderr: redrawn in place at most every `interval` seconds on a terminal,
    a new line every LOG_INTERVAL seconds in a log. enabled=None shows it
    only when stderr is a terminal (quiet in non-interactive logs unless
    asked with enabled=True); False never."""

    def __init__(self, label: str, total: int | None, enabled: bool | None = None, interval: float = 0.5):
        terminal = sys.stderr.isatty()
        self.label, self.total = label, total
        self.enabled = terminal if enabled is None else bool(enabled)
        self.terminal = terminal
        self.interval = interval if terminal else max(interval, LOG_INTERVAL)
        self.done, self.start, self.shown = 0, time.monotonic(), time.monotonic()

    def update(self, steps: int = 1) -> None:
        """Counts `steps` more steps and redraws the line when due."""
        self.done += steps
        now = time.monotonic()
        if self.enabled and now - self.shown >= self.interval:
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
        sys.stderr.write(("\r" + text) if self.terminal else (text + "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        """The final count with the elapsed time, once, when anything was done."""
        if self.enabled and self.done:
            text = f"{self.label}: {self.done}" + (f"/{self.total}" if self.total else "")
            text += f" in {time.monotonic() - self.start:.1f}s"
            sys.stderr.write(("\r" + text + "\n") if self.terminal else (text + "\n"))
            sys.stderr.flush()
