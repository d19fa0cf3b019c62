"""The ``cloudexec`` logger, with a filter that keeps a failing loop from flooding it.

Every module of the library logs through :data:`log` (``logging.getLogger("cloudexec")``);
the library never prints. Configure it as any library logger::

    logging.getLogger("cloudexec").setLevel(logging.DEBUG)

A poller that retries a failing call every second would otherwise write the same
warning thousands of times: an identical message (same level, same text) passes once
per ``window_s``; the next one that passes says how many were held back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["RepeatFilter", "log"]


class RepeatFilter(logging.Filter):
    """Lets an identical message through once per window and counts the repeats.

    Args:
        window_s: Seconds during which a message already logged is held back.
        max_keys: Distinct messages remembered; the oldest are forgotten first.
        clock: Monotonic time source (tests pass their own).
    """

    def __init__(
        self, window_s: float = 60.0, max_keys: int = 1000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0; got {window_s!r}")
        self.window_s = window_s
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        # message key -> [time it last passed, repeats held back since]
        self._seen: dict[tuple[int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True  # debug and info are asked for explicitly: never held back
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format is logging's to report, not ours
            return True
        key = (record.levelno, message)
        now = self._clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self.window_s:
                seen[1] += 1
                return False
            held = int(seen[1]) if seen is not None else 0
            self._seen.pop(key, None)
            self._seen[key] = [now, 0]
            while len(self._seen) > self.max_keys:
                del self._seen[next(iter(self._seen))]
        if held:
            record.msg = f"{message} (and {held} identical message{'s' if held > 1 else ''} in the last {self.window_s:g} s)"
            record.args = None
        return True


log = logging.getLogger("cloudexec")
"""The library's logger; warnings repeated within a minute are folded into one."""

if not any(isinstance(f, RepeatFilter) for f in log.filters):
    log.addFilter(RepeatFilter())
