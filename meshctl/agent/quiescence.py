"""Quiescence: one pass per burst of changes, not one per change (consul-template's wait),
and the reload splay that keeps a fleet from reloading at once (consul-template's splay)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable


def splay_delay(window: float, rand: Callable[[], float] = random.random) -> float:
    """A delay drawn uniformly in [0, ``window``) seconds (0 when ``window`` is 0).

    Every agent watches the same config entries, so without it one ``consul
    config write`` reloads every proxy of the fleet within ``wait_min``.
    ``rand`` draws in [0, 1); raises ValueError for a negative window or a draw
    outside [0, 1).
    """
    if window < 0:
        raise ValueError(f"splay window must be >= 0, got {window!r}")
    r = float(rand())
    if not 0.0 <= r < 1.0:
        raise ValueError(f"random draw must lie in [0, 1), got {r!r}")
    return r * window


class Quiescence:
    """Debounce: fire once the trigger has been quiet for ``wait_min``, or after ``wait_max``.

    A burst made only of *fast* triggers (``trigger(fast=True)``: an instance
    came, went or changed health) needs only ``wait_fast`` of quiet: the
    agent pushes those at run time, without a reload, so there is little to
    save by waiting and a failed instance keeps getting requests meanwhile.
    Any other trigger in the burst brings back ``wait_min``; ``wait_max``
    bounds both.
    """

    def __init__(self, wait_min: float, wait_max: float, wait_fast: float | None = None) -> None:
        self.wait_min = wait_min
        self.wait_max = wait_max
        self.wait_fast = wait_min if wait_fast is None else min(wait_fast, wait_min)
        self._event = threading.Event()
        self._first: float | None = None
        self._last = 0.0
        self._fast = True  # every trigger since the first was fast
        self._lock = threading.Lock()

    def trigger(self, fast: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if self._first is None:
                self._first = now
                self._fast = fast
            else:
                self._fast = self._fast and fast
            self._last = now
        self._event.set()

    def trigger_now(self) -> None:
        """Fire at once, without waiting for quiet (the proxy died: every moment counts)."""
        with self._lock:
            self._first = time.monotonic() - self.wait_max
            self._last = self._first
        self._event.set()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a settled trigger; True if one fired."""
        if not self._event.wait(timeout):
            return False
        while True:
            with self._lock:
                first, last = self._first or 0.0, self._last
                quiet = self.wait_fast if self._fast else self.wait_min
                now = time.monotonic()
                due = min(last + quiet, first + self.wait_max)
                if now >= due:
                    self._first = None
                    self._event.clear()
                    return True
            # A trigger meanwhile only moves ``due`` later, or a slow one makes the
            # quiet longer: sleeping until it never oversleeps.
            time.sleep(due - now)
