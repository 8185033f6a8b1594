"""Progress: a tqdm bar on a terminal; in a log file or a pipe, a few plain log lines.

A bar redrawn with carriage returns makes thousands of frames in a log file (a cluster job, `2>
run.log`). Where stderr is not a terminal, `bar` logs one line at most every tenth of the way or
every minute, and one at the end, with the same postfix figures the bar would show; a job over
within a few seconds logs nothing.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger("qatkit.progress")

LOG_EVERY_S = 60.0
QUIET_S = 5.0  # a job done sooner than this logs nothing (a bar would have flashed by)


class LogBar:
    """The part of tqdm's interface qatkit uses, written as log lines."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.postfix = initial, ""
        self._t0 = self._last_t = time.time()
        self._last_n = initial
        self._closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.time()
        if now - self._t0 < QUIET_S:
            return
        step = max(1, (self.total or 0) // 10)
        if (self.total and self.n - self._last_n >= step) or now - self._last_t >= LOG_EVERY_S:
            self._log(now)

    def set_postfix(self, **figures) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in figures.items())

    def _log(self, now: float) -> None:
        of = f"/{self.total}" if self.total else ""
        rate = (self.n - self._last_n) / max(now - self._last_t, 1e-9)
        log.info("%s: %d%s %s (%.3g %s/s)%s", self.desc, self.n, of, self.unit, rate, self.unit, f" {self.postfix}" if self.postfix else "")
        self._last_n, self._last_t = self.n, now

    def close(self) -> None:
        now = time.time()
        if not self._closed and self.n != self._last_n and now - self._t0 >= QUIET_S:
            self._log(now)
        self._closed = True


def bar(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0, disable: bool = False, leave: bool = True):
    """tqdm where stderr is a terminal, LogBar elsewhere, nothing with `disable`."""
    if disable:
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, dynamic_ncols=True, file=sys.stderr)
    return LogBar(iterable, total, desc, unit, initial)
