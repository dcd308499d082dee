"""A dependency-free progress bar for long loops (sampling, training), written to stderr."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``with ProgressBar(total, "sampling") as bar: bar.update(1, loss=0.1)``.

    Redraws at most 10 times a second; prints a final line with the total time.
    Disabled (silent) when ``enabled`` is False. ``total`` None: a count without bar or time left (a loop
    that decides its own length, such as DPM adaptive's steps).
    """

    def __init__(self, total: int | None, desc: str = "", enabled: bool = True, stream: TextIO | None = None, width: int = 28,
                 initial: int = 0):
        self.total = None if total is None else max(total, 1)
        self.desc, self.enabled, self.width = desc, enabled, width
        self.stream = stream or sys.stderr
        self.n = self.initial = initial  # a resumed run starts part-way; the rate counts only new steps
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self.postfix = ""

    def __enter__(self) -> "ProgressBar":
        self._draw(force=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1, **postfix: float | str) -> None:
        self.n += n
        if postfix:
            self.postfix = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last_draw < 0.1 and (self.total is None or self.n < self.total):
            return
        self._last_draw = now
        elapsed = now - self.start
        if self.total is None:
            self.stream.write(f"\r{self.desc} {self.n} [{elapsed:5.1f}s] {self.postfix}  ")
            self.stream.flush()
            return
        frac = min(self.n / self.total, 1.0)
        filled = int(frac * self.width)
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        bar = "█" * filled + "·" * (self.width - filled)
        eta_s = f"{eta:5.1f}s" if eta == eta else "  ?  "
        self.stream.write(f"\r{self.desc} {bar} {self.n}/{self.total} [{elapsed:5.1f}s<{eta_s}] {self.postfix}  ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
