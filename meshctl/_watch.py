"""Blocking-query watches on a bounded number of connections, shared by every subscriber.

Modelled on consul-template's ``watch/view.go`` and ``watch/watcher.go``:

- A *key* is plain, hashable data (``HealthConnect("web")``) that knows how to
  fetch its value with a blocking query: ``key.fetch(session, index, wait)``
  returns ``(new_index, value)`` or raises; index 0 asks without blocking.
- ``Watcher`` keeps one entry per distinct key, however many subscribers ask
  for it, and drops it when the last subscriber leaves.
- The loop follows Consul's rules for blocking queries: the index is reset
  when it goes backwards and clamped to at least 1, and successive queries are
  spaced by a small minimum interval.
- It *fails static*: on error the last good value is kept, the error is
  logged once when the key goes bad and once when it recovers (not per
  retry), and retries back off exponentially with jitter.

Connections are bounded. A held blocking query is one HTTP/1.1 connection, and
a Consul agent allows 200 per client address, so not every key gets one. A key
says how it is followed (its ``follow`` attribute, ``"block"`` when absent):

- ``"block"``: its own loop (one thread, one connection) holding a blocking query;
- ``"budget"``: its own loop while fewer than ``max_blocking`` such keys have
  one; beyond that it is *polled*: fetched by a small fixed pool of workers when
  a *feed* says it may have changed, and re-read every ``resync`` seconds for
  changes no feed reflects. ``feeds(overflow)`` names the feed keys (blocking
  keys, e.g. one aggregate health query) that cover the overflowing keys;
- ``"poll"``: never a loop of its own: fetched once, then again whenever another
  key's change names it.

A key's ``blocking_wait``, if set, replaces the watcher's ``wait`` for its loop.

A key with an ``affected(old, new, keys, get)`` method names, when its value
changes from ``old`` to ``new``, which of the polled ``keys`` may have changed
too; the pool refetches them (blocking up to ``refresh_wait`` past their last
index when the key's ``refresh_blocking`` is true and the change names at most
``BLOCKING_REFRESH_MAX`` keys: a view that lags the feed is
waited for, not missed). Until those answers are in, ``settling()`` is true and
``on_settled`` runs when they are, so a consumer compiles once, not per piece.
A key whose ``notify`` is false (a feed) does not reach the watcher's ``on_change``.

The network stays behind one seam: a ``Source`` opens a ``Session`` per loop or
worker (its own connection, which ``abort()`` can cut short from another thread
so that ``stop()`` is prompt even while a query blocks). The logic here is
tested with a plain in-memory source; the Consul source lives in ``meshctl.consul.client``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from meshctl import metrics

log = logging.getLogger("meshctl.watch")

BACKOFF_BASE = 0.25
BACKOFF_CAP = 10.0
DEFAULT_WAIT = "60s"
MIN_INTERVAL = 0.05  # between two successful queries of one key: protects Consul from a hot loop
MAX_ERROR_LEN = 300
DEFAULT_WORKERS = 4
DEFAULT_RESYNC = 300.0  # s between re-reads of a polled key: under Consul's 20 min view TTL
DEFAULT_REFRESH_WAIT = "1s"
BLOCKING_REFRESH_MAX = 8  # keys one change may refetch blocking (see refresh())
SETTLE_MAX = 3.0  # s a consumer waits at most for refetches a change asked for


class Session(Protocol):
    """One loop's connection to a source."""

    def abort(self) -> None:
        """Cut an in-flight query short; called from another thread by stop()."""

    def close(self) -> None:
        """Release the connection; called by the loop's own thread when it ends."""


class Source(Protocol):
    """Opens sessions; ``meshctl.consul.client.ConsulClient`` is the real one."""

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


def key_kind(key: Key) -> str:
    """A bounded label for a key: its type's name (never the service it names)."""
    return type(key).__name__


def follow_of(key: Key) -> str:
    """How ``key`` is followed: ``block``, ``budget`` or ``poll`` (see the module doc)."""
    follow = getattr(key, "follow", "block")
    return follow if follow in ("block", "budget", "poll") else "block"


# ---------------------------------------------------------------- one key's state


class _Entry:
    """One watched key: its subscribers, last good value and status."""

    polled = False

    def __init__(self, watcher: Watcher, key: Key) -> None:
        self.watcher = watcher
        self.key = key
        self.subs: list[Subscription] = []
        self.value: Any = None
        self.has_value = False
        self.status = WatchStatus(since=time.time())
        self.index = 0  # the last index answered (polled entries ask past it)

    def adopt(self, other: _Entry) -> None:
        """Take over ``other``'s subscribers, value and status (a key changing mode)."""
        self.subs, self.value, self.has_value = other.subs, other.value, other.has_value
        self.status, self.index = other.status, other.index

    def _failed(self, exc: Exception) -> None:
        message = (str(exc) or type(exc).__name__)[:MAX_ERROR_LEN]
        metrics.WATCH_ERRORS.labels(kind=key_kind(self.key)).inc()
        with self.watcher._lock:
            before = self.status
            went_bad = before.state != "error"
            if went_bad or before.error != message:
                self.watcher._status_version += 1
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
            if before.state != "ok":
                self.watcher._status_version += 1
            self.status = WatchStatus(
                state="ok",
                since=now if before.state != "ok" else before.since,
                last_success=now,
            )
            had, old = self.has_value, self.value
            changed = not had or value != old
            if changed:
                self.value = value
                self.has_value = True
            subs = list(self.subs)
        if before.state == "error":
            log.info("watch %s: recovered after %d failed attempts", self.key, before.failures)
        if changed:
            for sub in subs:
                sub._deliver(value)
            self.watcher._changed(self.key, old if had else None, value)


class _Loop(_Entry):
    """The one thread that watches one key with blocking queries."""

    def __init__(self, watcher: Watcher, key: Key) -> None:
        super().__init__(watcher, key)
        self.stopping = threading.Event()
        # A key may ask for its own wait: a held RPC at the servers (a config kind)
        # is re-issued less often with Consul's own default of 5 minutes.
        self.wait = str(getattr(key, "blocking_wait", "") or watcher.wait)
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
            _abort(session, self.key)

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
                    returned, value = self.key.fetch(session, index, self.wait)
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
                metrics.BLOCKING_QUERY.labels(kind=key_kind(self.key)).observe(
                    time.monotonic() - started)
                index = next_index(index, returned)
                self.index = index
                self._succeeded(value)
                rest = self.watcher.min_interval - (time.monotonic() - started)
                if rest > 0:
                    self.stopping.wait(rest)
        finally:
            with self._session_lock:
                self._session = None
            _close(session, self.key)


class _Polled(_Entry):
    """A key fetched by the worker pool: when asked for, and again every ``resync``."""

    polled = True

    def __init__(self, watcher: Watcher, key: Key) -> None:
        super().__init__(watcher, key)
        self.attempt = 0
        self.asked: float | None = None  # monotonic time of an unanswered refetch request


def _abort(session: Session, key: object) -> None:
    try:
        session.abort()
    except Exception:  # aborting is best effort; the loop also checks `stopping`
        log.debug("watch %s: abort failed", key, exc_info=True)


def _close(session: Session | None, key: object) -> None:
    if session is not None:
        try:
            session.close()
        except Exception:
            log.debug("watch %s: close failed", key, exc_info=True)


# ---------------------------------------------------------------- the worker pool


class _Pool:
    """A fixed number of worker threads (one session each) fetching polled keys when due.

    The queue holds at most one request per key: asking again moves it earlier
    (and makes it blocking, if the new request is), never duplicates it. A key
    is never fetched by two workers at once: asked for while a fetch of it is
    in flight, it waits for that fetch to end. (Two fetches of one key could
    answer out of order, and the older answer, delivered last, would stay:
    a config entry's change then lost until the next resync.)
    """

    def __init__(self, watcher: Watcher, size: int) -> None:
        self.watcher = watcher
        self.size = size
        self.cv = threading.Condition()
        self.heap: list[tuple[float, int, Key]] = []
        self.queued: dict[Key, tuple[float, int, bool]] = {}  # key -> (due, seq, blocking)
        self.seq = itertools.count()
        self.threads: list[threading.Thread] = []
        self.sessions: list[Session] = []
        self.busy = 0
        self.inflight: set[Key] = set()  # being fetched by a worker
        self.deferred: dict[Key, bool] = {}  # asked for while in flight -> blocking
        self.stopping = False

    def schedule(self, key: Key, due: float, blocking: bool = False) -> None:
        """Fetch ``key`` at monotonic time ``due`` (or earlier, if already asked for)."""
        with self.cv:
            if self.stopping:
                return
            old = self.queued.get(key)
            if old is not None:
                blocking = blocking or old[2]
                if old[0] <= due:
                    self.queued[key] = (old[0], old[1], blocking)
                    return
            seq = next(self.seq)
            self.queued[key] = (due, seq, blocking)
            heapq.heappush(self.heap, (due, seq, key))
            if len(self.threads) < self.size and len(self.threads) <= self.busy + len(self.heap):
                t = threading.Thread(target=self._work, name=f"watch pool {len(self.threads)}",
                                     daemon=True)
                self.threads.append(t)
                t.start()
            self.cv.notify()

    def drop(self, key: Key) -> None:
        with self.cv:
            self.queued.pop(key, None)  # its heap item is skipped when it comes up
            self.deferred.pop(key, None)

    def _next(self) -> tuple[Key, bool] | None:
        with self.cv:
            while not self.stopping:
                while self.heap and self.queued.get(self.heap[0][2], (0, -1))[1] != self.heap[0][1]:
                    heapq.heappop(self.heap)  # dropped or moved earlier: a stale item
                if self.heap:
                    due, _, key = self.heap[0]
                    rest = due - time.monotonic()
                    if rest <= 0:
                        heapq.heappop(self.heap)
                        blocking = self.queued.pop(key)[2]
                        if key in self.inflight:
                            # Fetched once its fetch in flight has ended (_done).
                            self.deferred[key] = self.deferred.get(key, False) or blocking
                            continue
                        self.inflight.add(key)
                        self.busy += 1
                        return key, blocking
                    self.cv.wait(rest)
                else:
                    self.cv.wait()
            return None

    def _work(self) -> None:
        session: Session | None = None
        try:
            while True:
                job = self._next()
                if job is None:
                    return
                key, blocking = job
                try:
                    if session is None:
                        session = self.watcher.source.session()
                        with self.cv:
                            self.sessions.append(session)
                            if self.stopping:
                                return
                    self.watcher._poll(session, key, blocking)
                finally:
                    self._done(key)
        finally:
            if session is not None:
                with self.cv:
                    if session in self.sessions:
                        self.sessions.remove(session)
            _close(session, "pool")

    def _done(self, key: Key) -> None:
        """A worker's fetch of ``key`` ended: a request that waited for it is due now."""
        with self.cv:
            self.busy -= 1
            self.inflight.discard(key)
            again = self.deferred.pop(key, None)
        if again is not None:
            self.schedule(key, time.monotonic(), again)

    def stop(self) -> list[threading.Thread]:
        with self.cv:
            self.stopping = True
            self.heap.clear()
            self.queued.clear()
            self.deferred.clear()
            sessions = list(self.sessions)
            self.cv.notify_all()
        for s in sessions:
            _abort(s, "pool")
        return list(self.threads)


# ---------------------------------------------------------------- the watcher


class Watcher:
    """Follows every distinct key on a bounded number of connections; keeps its latest good value.

    ``on_change(key, value)``, if given, is called (from the fetching thread)
    whenever any watched key whose ``notify`` is not false gets a new value, in
    addition to each subscription's own callback or event. Values must compare
    with ``==`` (plain data); an answer equal to the current value notifies nobody.

    ``max_blocking`` bounds the loops of ``budget`` keys (None: no bound);
    ``workers`` is the size of the pool that fetches polled keys, ``resync``
    the seconds between re-reads of an overflowing key, ``refresh_wait`` how
    long a refetch asked for by a feed may block, ``feeds(overflow)`` the feed
    keys covering the overflowing keys, and ``on_settled()`` runs when the
    last refetch a change asked for has answered.
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
        max_blocking: int | None = None,
        workers: int = DEFAULT_WORKERS,
        resync: float = DEFAULT_RESYNC,
        refresh_wait: str = DEFAULT_REFRESH_WAIT,
        feeds: Callable[[frozenset[Key]], set[Key]] | None = None,
        on_settled: Callable[[], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.source = source
        self.on_change = on_change
        self.wait = wait
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.min_interval = min_interval
        self.max_blocking = max_blocking
        self.resync = resync
        self.refresh_wait = refresh_wait
        self.feeds = feeds
        self.on_settled = on_settled
        self._lock = threading.RLock()
        self._loops: dict[Key, _Entry] = {}
        # Moves whenever a key is added or dropped or its (state, error) changes:
        # a consumer compares it instead of every key's status (status_version()).
        self._status_version = 0
        self._own: dict[Key, Subscription] = {}
        self._feed_subs: dict[Key, Subscription] = {}
        self._group_last: dict[Hashable, Any] = {}
        self._pool = _Pool(self, workers)
        self._stopped = False
        self._planning = threading.Lock()
        self._batch = False  # inside watch_only(): feeds are planned at its end

    # ------------------------------------------------------------ subscribing

    def watch(
        self,
        key: Key,
        on_change: OnChange | None = None,
        event: threading.Event | None = None,
    ) -> Subscription:
        """Subscribe to ``key``, starting to follow it unless it already is.

        If the key already has a value, ``on_change``/``event`` get it at once
        (in the caller's thread). Raises RuntimeError after ``stop()``.
        """
        sub = Subscription(self, key, on_change, event)
        with self._lock:
            if self._stopped:
                raise RuntimeError("watcher is stopped")
            entry = self._loops.get(key)
            fresh = entry is None
            if entry is None:
                entry = self._loops[key] = self._new_entry(key)
                self._status_version += 1
            entry.subs.append(sub)
            has_value, value = entry.has_value, entry.value
        if fresh:
            self._start(entry)
            if entry.polled and follow_of(key) == "budget" and not self._batch:
                self._plan_feeds()
        elif has_value:
            sub._deliver(value)
        return sub

    def _new_entry(self, key: Key) -> _Entry:
        follow = follow_of(key)
        if follow == "poll":
            return _Polled(self, key)
        if follow == "budget" and self.max_blocking is not None:
            held = sum(1 for k, e in self._loops.items()
                       if not e.polled and follow_of(k) == "budget")
            if held >= self.max_blocking:
                return _Polled(self, key)
        return _Loop(self, key)

    def _start(self, entry: _Entry) -> None:
        if isinstance(entry, _Loop):
            entry.start()
        else:
            self._pool.schedule(entry.key, time.monotonic())

    def watch_only(self, keys: Iterable[Key]) -> None:
        """Make the watcher's own subscriptions exactly ``keys``.

        New keys start (sharing any loop another subscriber started); keys no
        longer listed are dropped, and their loops stop if nobody else watches.
        Changes reach the watcher's ``on_change``.
        """
        wanted = set(keys)
        # The feeds are planned once for the whole change, not once per key.
        self._batch = True
        try:
            for key in sorted(set(self._own) - wanted, key=str):
                self._own.pop(key).cancel()
            for key in sorted(wanted - set(self._own), key=str):
                self._own[key] = self.watch(key)
        finally:
            self._batch = False
        self._fill_slots()
        for mode, n in self.counts().items():
            if mode != "workers":
                metrics.WATCHES.labels(mode=mode).set(n)
        self._plan_feeds()

    def _fill_slots(self) -> None:
        """Give every free blocking slot to an overflowing key (after a batch of changes)."""
        started: list[_Loop] = []
        with self._lock:
            if self._stopped or self.max_blocking is None:
                return
            held = sum(1 for k, e in self._loops.items()
                       if not e.polled and follow_of(k) == "budget")
            for _ in range(self.max_blocking - held):
                loop = self._promote()
                if loop is None:
                    break
                started.append(loop)
        for loop in started:
            loop.start()

    def _unsubscribe(self, sub: Subscription) -> None:
        promoted: _Loop | None = None
        with self._lock:
            entry = self._loops.get(sub.key)
            if entry is None or sub not in entry.subs:
                return
            entry.subs.remove(sub)
            if entry.subs:
                return
            del self._loops[sub.key]
            self._status_version += 1
            budget = follow_of(sub.key) == "budget"
            # Within watch_only, the freed slot is handed on once the whole change
            # is known (_fill_slots): promoted now, it could go to a key the same
            # change drops next, a loop and a connection started only to be cut.
            if budget and not entry.polled and not self._stopped and not self._batch:
                promoted = self._promote()
        if isinstance(entry, _Loop):
            entry.stop()
        else:
            self._pool.drop(sub.key)
        if promoted is not None:
            promoted.start()
        if budget and not self._batch:
            self._plan_feeds()

    def _promote(self) -> _Loop | None:
        """A blocking slot came free: the first overflowing key gets it (caller holds the lock)."""
        overflow = sorted((k for k, e in self._loops.items()
                           if e.polled and follow_of(k) == "budget"), key=str)
        if not overflow:
            return None
        key = overflow[0]
        loop = _Loop(self, key)
        loop.adopt(self._loops[key])
        self._loops[key] = loop
        self._pool.drop(key)
        return loop

    def _plan_feeds(self) -> None:
        """Watch exactly the feeds that cover the keys now polled for lack of a slot."""
        if self.feeds is None:
            return
        with self._planning:
            with self._lock:
                if self._stopped:
                    return
                overflow = frozenset(k for k, e in self._loops.items()
                                     if e.polled and follow_of(k) == "budget")
            wanted = self.feeds(overflow) if overflow else set()
            for key in sorted(set(self._feed_subs) - wanted, key=str):
                self._feed_subs.pop(key).cancel()
            for key in sorted(wanted - set(self._feed_subs), key=str):
                self._feed_subs[key] = self.watch(key)

    # ------------------------------------------------------------ changes

    def _changed(self, key: Key, old: Any, new: Any) -> None:
        """``key`` has a new value: tell the watcher's callback, refetch what it affects."""
        group = getattr(key, "group", None)
        if group is not None:
            with self._lock:
                if old is None:
                    # A feed that replaced another of its group (new filter) diffs
                    # against the last answer of the group: nothing falls between.
                    old = self._group_last.get(group)
                self._group_last[group] = new
        affected = getattr(key, "affected", None)
        if affected is not None:
            with self._lock:
                polled = [k for k, e in self._loops.items() if e.polled]
            try:
                targets = set(affected(old, new, polled, self.get))
            except Exception:
                log.exception("watch %s: working out what its change affects failed", key)
                targets = set(polled)  # refetch everything rather than miss a change
            self.refresh(targets)
        if self.on_change is not None and getattr(key, "notify", True):
            try:
                self.on_change(key, new)
            except Exception:
                log.exception("watch %s: the watcher's callback failed", key)

    def refresh(self, keys: Iterable[Key]) -> None:
        """Refetch these polled keys now (others are ignored); ``settling()`` until
        those read at once have answered."""
        now = time.monotonic()
        with self._lock:
            entries = sorted((e for k in keys if isinstance(e := self._loops.get(k), _Polled)),
                             key=lambda e: str(e.key))
            # A blocking refetch holds a worker up to refresh_wait when the view has
            # nothing new: worth it for the few keys one change names, not for a
            # batch that would queue every other fetch behind it (read at once).
            few = len(entries) <= BLOCKING_REFRESH_MAX
            jobs = [(e, few and bool(getattr(e.key, "refresh_blocking", False)) and e.index > 0)
                    for e in entries]
            for e, blocking in jobs:
                # A blocking refetch answers when its view moves (a change of its
                # own, then) or after refresh_wait with nothing new: a consumer
                # does not hold a compile for it (that held a protocol change 0.2 s
                # behind an unrelated instance's refetch).
                if e.asked is None and not blocking:
                    e.asked = now
        for e, blocking in jobs:
            self._pool.schedule(e.key, now, blocking)

    def settling(self) -> bool:
        """True while refetches a change asked for (less than SETTLE_MAX ago) are unanswered."""
        limit = time.monotonic() - SETTLE_MAX
        with self._lock:
            return any(isinstance(e, _Polled) and e.asked is not None and e.asked > limit
                       for e in self._loops.values())

    def _poll(self, session: Session, key: Key, blocking: bool) -> None:
        """One fetch of a polled key, in a pool worker."""
        with self._lock:
            entry = self._loops.get(key)
            if not isinstance(entry, _Polled) or self._stopped:
                return
            index = entry.index if blocking else 0
        started = time.monotonic()
        try:
            returned, value = key.fetch(session, index, self.refresh_wait if index else self.wait)
        except Exception as exc:
            if self._pool.stopping:
                return
            entry._failed(exc)
            delay = backoff_delay(entry.attempt, base=self.backoff_base, cap=self.backoff_cap)
            entry.attempt += 1
            self._answered(entry)
            self._pool.schedule(key, time.monotonic() + delay)
            return
        with self._lock:
            if self._loops.get(key) is not entry:  # dropped or promoted meanwhile
                return
        entry.attempt = 0
        if index and returned == index:
            log.debug("watch %s: a refetch the feed asked for found no change in %.2fs",
                      key, time.monotonic() - started)
        entry.index = next_index(index, returned)
        entry._succeeded(value)
        self._answered(entry)
        if follow_of(key) == "budget":
            # Overflowing keys are re-read now and then: a change no feed reflects
            # (an instance's port or meta, not its checks) shows within ``resync``.
            jitter = 0.75 + random.random() / 2
            self._pool.schedule(key, time.monotonic() + self.resync * jitter)

    def _answered(self, entry: _Polled) -> None:
        with self._lock:
            if entry.asked is None:
                return
            entry.asked = None
            done = self._loops.get(entry.key) is entry and not any(
                isinstance(e, _Polled) and e.asked is not None for e in self._loops.values())
        if done and self.on_settled is not None:
            try:
                self.on_settled()
            except Exception:
                log.exception("watch: the on_settled callback failed")

    # ------------------------------------------------------------ reading

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

    def status_version(self) -> int:
        """A number that moves when :meth:`statuses` would differ in a key or in
        a key's state or error (not merely in its last success or failure count)."""
        with self._lock:
            return self._status_version

    def keys(self) -> set[Key]:
        """The keys that are followed (a loop of their own or polled)."""
        with self._lock:
            return set(self._loops)

    def counts(self) -> dict[str, int]:
        """How the keys are followed: ``blocking`` loops, ``polled`` keys, pool ``workers``."""
        with self._lock:
            polled = sum(1 for e in self._loops.values() if e.polled)
            loops = len(self._loops) - polled
        with self._pool.cv:
            workers = len(self._pool.threads)
        return {"blocking": loops, "polled": polled, "workers": workers}

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every loop and worker, cutting in-flight queries short; wait up to ``timeout``."""
        with self._lock:
            self._stopped = True
            loops = [e for e in self._loops.values() if isinstance(e, _Loop)]
            self._loops.clear()
            self._status_version += 1
            self._own.clear()
            self._feed_subs.clear()
        for loop in loops:
            loop.stop()
        threads: list[tuple[object, threading.Thread]] = [(loop.key, loop.thread)
                                                          for loop in loops]
        threads += [("pool", t) for t in self._pool.stop()]
        deadline = time.monotonic() + timeout
        for what, thread in threads:
            if thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("watch %s: loop did not stop within %.1fs", what, timeout)
