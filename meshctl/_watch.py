"""Blocking-query watches: one loop per key, shared by every subscriber.

Modelled on consul-template's ``watch/view.go`` and ``watch/watcher.go``:

- A *key* is plain, hashable data (``HealthConnect("web")``) that knows how to
  fetch its value with a blocking query: ``key.fetch(session, index, wait)``
  returns ``(new_index, value)`` or raises.
- ``Watcher`` runs one thread per distinct key, however many subscribers ask
  for it, and stops that thread when the last subscriber leaves.
- The loop follows Consul's rules for blocking queries: the index is reset
  when it goes backwards and clamped to at least 1, and successive queries are
  spaced by a small minimum interval.
- It *fails static*: on error the last good value is kept, the error is
  logged once when the key goes bad and once when it recovers (not per
  retry), and retries back off exponentially with jitter.

The network stays behind one seam: a ``Source`` opens a ``Session`` per loop
(its own connection, which ``abort()`` can cut short from another thread so
that ``stop()`` is prompt even while a query blocks). The logic here is tested
with a plain in-memory source; the Consul source lives in ``meshctl.consul``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("meshctl.watch")

BACKOFF_BASE = 0.25
BACKOFF_CAP = 10.0
DEFAULT_WAIT = "60s"
MIN_INTERVAL = 0.05  # between two successful queries of one key: protects Consul from a hot loop
MAX_ERROR_LEN = 300


class Session(Protocol):
    """One loop's connection to a source."""

    def abort(self) -> None:
        """Cut an in-flight query short; called from another thread by stop()."""

    def close(self) -> None:
        """Release the connection; called by the loop's own thread when it ends."""


class Source(Protocol):
    """Opens sessions; ``meshctl.consul.ConsulClient`` is the real one."""

    def session(self) -> Session: ...


class Key(Hashable, Protocol):
    """A watched thing: hashable plain data that can fetch itself."""

    def fetch(self, session: Any, index: int, wait: str) -> tuple[int, Any]:
        """Return ``(index, value)``, blocking up to ``wait`` while ``index`` is current."""
        ...


OnChange = Callable[[Any, Any], None]


# ---------------------------------------------------------------- pure rules


def backoff_delay(
    attempt: int,
    *,
    base: float = BACKOFF_BASE,
    cap: float = BACKOFF_CAP,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first retry).

    Exponential (``base * 2**attempt``), capped at ``cap``, with "equal
    jitter": a uniform draw in the upper half of that ceiling, so a fleet
    that lost Consul together does not come back in lock step, yet every
    retry still waits at least half the ceiling.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    ceiling = min(cap, base * 2.0 ** min(attempt, 62))
    return ceiling / 2 + float(rand()) * ceiling / 2


def next_index(previous: int, returned: int) -> int:
    """The index for the next blocking query, per Consul's rules.

    An index that went backwards (a Consul restart, a snapshot restore) resets
    to 0, so the next query does not block and refetches everything. An index
    below 1 is clamped to 1, since index 0 would make every query return
    immediately.
    """
    returned = max(returned, 1)
    return 0 if returned < previous else returned


# ---------------------------------------------------------------- status


@dataclass(frozen=True)
class WatchStatus:
    """How one key's loop is doing.

    ``state`` is ``pending`` (no answer yet), ``ok`` or ``error``; ``since`` is
    when it entered that state; ``error`` is the latest error message (kept
    while in error, empty when ok); ``last_success`` is the time of the last
    good answer, or None if there never was one.
    """

    state: str = "pending"
    error: str = ""
    since: float = 0.0
    last_success: float | None = None
    failures: int = 0

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "state": self.state,
            "error": self.error
            or ("waiting for the first answer" if self.state == "pending" else ""),
            "since": self.since,
            "last_success": self.last_success,
            "failures": self.failures,
        }


class Subscription:
    """A subscriber's interest in one key; ``cancel()`` to leave."""

    def __init__(
        self,
        watcher: Watcher,
        key: Key,
        on_change: OnChange | None,
        event: threading.Event | None,
    ) -> None:
        self.key = key
        self.on_change = on_change
        self.event = event
        self._watcher = watcher

    def cancel(self) -> None:
        """Stop receiving changes; the key's loop ends with its last subscriber."""
        self._watcher._unsubscribe(self)

    def _deliver(self, value: Any) -> None:
        if self.event is not None:
            self.event.set()
        if self.on_change is not None:
            try:
                self.on_change(self.key, value)
            except Exception:
                log.exception("watch %s: a subscriber's callback failed", self.key)


# ---------------------------------------------------------------- the loop


class _Loop:
    """The one thread that watches one key."""

    def __init__(self, watcher: Watcher, key: Key) -> None:
        self.watcher = watcher
        self.key = key
        self.subs: list[Subscription] = []
        self.value: Any = None
        self.has_value = False
        self.status = WatchStatus(since=time.time())
        self.stopping = threading.Event()
        self._session: Session | None = None
        self._session_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"watch {key}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        with self._session_lock:
            session = self._session
        if session is not None:
            try:
                session.abort()
            except Exception:  # aborting is best effort; the loop also checks `stopping`
                log.debug("watch %s: abort failed", self.key, exc_info=True)

    def _run(self) -> None:
        session: Session | None = None
        index = 0
        attempt = 0
        try:
            while not self.stopping.is_set():
                started = time.monotonic()
                try:
                    if session is None:
                        session = self.watcher.source.session()
                        with self._session_lock:
                            self._session = session
                        if self.stopping.is_set():  # stop() may have missed the new session
                            break
                    returned, value = self.key.fetch(session, index, self.watcher.wait)
                except Exception as exc:
                    if self.stopping.is_set():
                        break
                    self._failed(exc)
                    # After an error, ask without blocking: the value may not have
                    # changed, and recovery must show now, not after a full wait.
                    index = 0
                    delay = backoff_delay(
                        attempt, base=self.watcher.backoff_base, cap=self.watcher.backoff_cap
                    )
                    attempt += 1
                    self.stopping.wait(delay)
                    continue
                if self.stopping.is_set():
                    break
                attempt = 0
                index = next_index(index, returned)
                self._succeeded(value)
                rest = self.watcher.min_interval - (time.monotonic() - started)
                if rest > 0:
                    self.stopping.wait(rest)
        finally:
            with self._session_lock:
                self._session = None
            if session is not None:
                try:
                    session.close()
                except Exception:
                    log.debug("watch %s: close failed", self.key, exc_info=True)

    def _failed(self, exc: Exception) -> None:
        message = (str(exc) or type(exc).__name__)[:MAX_ERROR_LEN]
        with self.watcher._lock:
            before = self.status
            went_bad = before.state != "error"
            self.status = WatchStatus(
                state="error",
                error=message,
                since=time.time() if went_bad else before.since,
                last_success=before.last_success,
                failures=before.failures + 1,
            )
        if went_bad:
            keeping = "keeping the last good value" if self.has_value else "no value yet"
            log.warning("watch %s: %s (%s; retrying)", self.key, message, keeping)

    def _succeeded(self, value: Any) -> None:
        now = time.time()
        with self.watcher._lock:
            before = self.status
            self.status = WatchStatus(
                state="ok",
                since=now if before.state != "ok" else before.since,
                last_success=now,
            )
            changed = not self.has_value or value != self.value
            if changed:
                self.value = value
                self.has_value = True
            subs = list(self.subs)
        if before.state == "error":
            log.info("watch %s: recovered after %d failed attempts", self.key, before.failures)
        if changed:
            for sub in subs:
                sub._deliver(value)
            if self.watcher.on_change is not None:
                try:
                    self.watcher.on_change(self.key, value)
                except Exception:
                    log.exception("watch %s: the watcher's callback failed", self.key)


# ---------------------------------------------------------------- the watcher


class Watcher:
    """Runs one blocking-query loop per distinct key and keeps its latest good value.

    ``on_change(key, value)``, if given, is called (from the key's thread)
    whenever any watched key gets a new value, in addition to each
    subscription's own callback or event. Values must compare with ``==``
    (plain data); an answer equal to the current value notifies nobody.
    """

    def __init__(
        self,
        source: Source,
        on_change: OnChange | None = None,
        *,
        wait: str = DEFAULT_WAIT,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        min_interval: float = MIN_INTERVAL,
    ) -> None:
        self.source = source
        self.on_change = on_change
        self.wait = wait
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.min_interval = min_interval
        self._lock = threading.Lock()
        self._loops: dict[Key, _Loop] = {}
        self._own: dict[Key, Subscription] = {}
        self._stopped = False

    def watch(
        self,
        key: Key,
        on_change: OnChange | None = None,
        event: threading.Event | None = None,
    ) -> Subscription:
        """Subscribe to ``key``, starting its loop unless one already runs.

        If the key already has a value, ``on_change``/``event`` get it at once
        (in the caller's thread). Raises RuntimeError after ``stop()``.
        """
        sub = Subscription(self, key, on_change, event)
        with self._lock:
            if self._stopped:
                raise RuntimeError("watcher is stopped")
            loop = self._loops.get(key)
            fresh = loop is None
            if loop is None:
                loop = self._loops[key] = _Loop(self, key)
            loop.subs.append(sub)
            has_value, value = loop.has_value, loop.value
        if fresh:
            loop.start()
        elif has_value:
            sub._deliver(value)
        return sub

    def watch_only(self, keys: Iterable[Key]) -> None:
        """Make the watcher's own subscriptions exactly ``keys``.

        New keys start (sharing any loop another subscriber started); keys no
        longer listed are dropped, and their loops stop if nobody else watches.
        Changes reach the watcher's ``on_change``.
        """
        wanted = set(keys)
        for key in sorted(set(self._own) - wanted, key=str):
            self._own.pop(key).cancel()
        for key in sorted(wanted - set(self._own), key=str):
            self._own[key] = self.watch(key)

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            loop = self._loops.get(sub.key)
            if loop is None or sub not in loop.subs:
                return
            loop.subs.remove(sub)
            if loop.subs:
                return
            del self._loops[sub.key]
        loop.stop()

    def get(self, key: Key) -> Any:
        """The latest good value of ``key``, or None if it has none (yet)."""
        with self._lock:
            loop = self._loops.get(key)
            return loop.value if loop is not None else None

    def has_value(self, key: Key) -> bool:
        """True once ``key`` has had at least one good answer (None may be a value)."""
        with self._lock:
            loop = self._loops.get(key)
            return loop is not None and loop.has_value

    def status(self, key: Key) -> WatchStatus | None:
        """How ``key``'s loop is doing, or None if it is not watched."""
        with self._lock:
            loop = self._loops.get(key)
            return loop.status if loop is not None else None

    def statuses(self) -> dict[Key, dict[str, Any]]:
        """Every watched key's status as plain data (for the agent's state file)."""
        with self._lock:
            return {key: loop.status.to_dict() for key, loop in self._loops.items()}

    def keys(self) -> set[Key]:
        """The keys that have a running loop."""
        with self._lock:
            return set(self._loops)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every loop, cutting in-flight queries short; wait up to ``timeout``."""
        with self._lock:
            self._stopped = True
            loops = list(self._loops.values())
            self._loops.clear()
            self._own.clear()
        for loop in loops:
            loop.stop()
        deadline = time.monotonic() + timeout
        for loop in loops:
            if loop.thread.ident is not None:
                loop.thread.join(max(0.0, deadline - time.monotonic()))
            if loop.thread.is_alive():
                log.warning("watch %s: loop did not stop within %.1fs", loop.key, timeout)
