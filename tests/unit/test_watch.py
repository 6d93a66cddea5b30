"""The watch machinery on its own: backoff, index rules, one loop per key, fail static.

The source here is an in-memory store with blocking-query semantics (an index
that only moves on change, queries that wait for it); what these tests claim is
about the Watcher's logic. Its behaviour against a real Consul is in
tests/integration/test_consul.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshctl import _watch
from meshctl._watch import Watcher, WatchStatus, backoff_delay, next_index

# ---------------------------------------------------------------- pure rules


def test_backoff_grows_exponentially_from_base() -> None:
    top = [backoff_delay(n, base=0.25, cap=10.0, rand=lambda: 1.0) for n in range(8)]
    assert top == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    bottom = [backoff_delay(n, base=0.25, cap=10.0, rand=lambda: 0.0) for n in range(3)]
    assert bottom == [0.125, 0.25, 0.5]


def test_backoff_is_capped_even_for_huge_attempts() -> None:
    assert backoff_delay(10_000, cap=10.0, rand=lambda: 1.0) == 10.0
    assert backoff_delay(10_000, cap=10.0, rand=lambda: 0.0) == 5.0


def test_backoff_rejects_negative_attempts() -> None:
    with pytest.raises(ValueError):
        backoff_delay(-1)


@given(
    attempt=st.integers(min_value=0, max_value=10_000), r=st.floats(min_value=0.0, max_value=1.0)
)
def test_backoff_bounds(attempt: int, r: float) -> None:
    delay = backoff_delay(attempt, base=0.25, cap=10.0, rand=lambda: r)
    ceiling = min(10.0, 0.25 * 2.0 ** min(attempt, 62))
    assert ceiling / 2 <= delay <= ceiling <= 10.0


def test_backoff_jitter_spreads_retries() -> None:
    delays = {backoff_delay(5) for _ in range(50)}
    assert len(delays) > 40
    assert all(4.0 <= d <= 8.0 for d in delays)


@pytest.mark.parametrize(
    ("previous", "returned", "expected"),
    [
        (0, 7, 7),  # first answer
        (7, 9, 9),  # moved forward
        (9, 9, 9),  # wait elapsed, nothing changed
        (9, 3, 0),  # went backwards (Consul restarted): reset, refetch
        (0, 0, 1),  # never 0: a 0 index makes every query return at once
        (5, -1, 0),
        (0, -1, 1),
    ],
)
def test_next_index(previous: int, returned: int, expected: int) -> None:
    assert next_index(previous, returned) == expected


# ---------------------------------------------------------------- an in-memory source


class Store:
    """Values with Consul-like indexes; fetch blocks until the index moves."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.index = 1
        self.values: dict[str, Any] = {}
        self.failing: str | None = None
        self.sessions_opened = 0
        self.sessions_closed = 0
        self.active: dict[str, int] = {}
        self.max_active: dict[str, int] = {}
        self.requests: list[tuple[str, int]] = []
        # per_key: each name has its own index (as a Consul view does), else one for all
        self.per_key = False
        self.key_index: dict[str, int] = {}

    def set(self, name: str, value: Any, index: int | None = None) -> None:
        with self.cond:
            self.index = self.index + 1 if index is None else index
            self.values[name] = value
            self.key_index[name] = self.index
            self.cond.notify_all()

    def fail(self, message: str | None) -> None:
        with self.cond:
            self.failing = message
            self.cond.notify_all()

    def session(self) -> FakeSession:
        with self.cond:
            self.sessions_opened += 1
        return FakeSession(self)


class FakeSession:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.aborted = False

    def abort(self) -> None:
        with self.store.cond:
            self.aborted = True
            self.store.cond.notify_all()

    def close(self) -> None:
        with self.store.cond:
            self.store.sessions_closed += 1


@dataclass(frozen=True)
class MemKey:
    name: str

    def __str__(self) -> str:
        return f"mem({self.name})"

    def fetch(self, session: FakeSession, index: int, wait: str) -> tuple[int, Any]:
        store = session.store
        deadline = time.monotonic() + float(wait.removesuffix("s"))
        with store.cond:
            store.requests.append((self.name, index))
            store.active[self.name] = store.active.get(self.name, 0) + 1
            store.max_active[self.name] = max(
                store.max_active.get(self.name, 0), store.active[self.name]
            )
            try:
                while True:
                    if session.aborted:
                        raise ConnectionError("aborted")
                    if store.failing:
                        raise ConnectionError(store.failing)
                    now = store.key_index.get(self.name, 1) if store.per_key else store.index
                    if now != index or time.monotonic() >= deadline:
                        return now, store.values.get(self.name)
                    store.cond.wait(deadline - time.monotonic())
            finally:
                store.active[self.name] -= 1


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


@pytest.fixture
def store() -> Store:
    return Store()


@pytest.fixture
def watcher(store: Store) -> Any:
    w = Watcher(store, wait="30s", backoff_base=0.005, backoff_cap=0.02, min_interval=0.0)
    yield w
    w.stop()


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, key: Any, value: Any) -> None:
        with self.lock:
            self.calls.append((key, value))

    def values(self) -> list[Any]:
        with self.lock:
            return [v for _, v in self.calls]


# ---------------------------------------------------------------- one loop per key


def test_two_subscribers_share_one_loop(store: Store, watcher: Watcher) -> None:
    store.set("web", ["a"])
    first, second = Recorder(), Recorder()
    watcher.watch(MemKey("web"), on_change=first)
    watcher.watch(MemKey("web"), on_change=second)
    eventually(lambda: first.values() == [["a"]] and second.values() == [["a"]])
    store.set("web", ["a", "b"])
    eventually(lambda: second.values() == [["a"], ["a", "b"]])
    assert first.values() == [["a"], ["a", "b"]]
    assert watcher.keys() == {MemKey("web")}
    assert store.sessions_opened == 1
    assert store.max_active == {"web": 1}


def test_distinct_keys_get_distinct_loops(store: Store, watcher: Watcher) -> None:
    watcher.watch(MemKey("a"))
    watcher.watch(MemKey("b"))
    eventually(lambda: store.max_active.get("a") == 1 and store.max_active.get("b") == 1)
    assert watcher.keys() == {MemKey("a"), MemKey("b")}
    assert store.sessions_opened == 2


def test_late_subscriber_gets_the_current_value_at_once(store: Store, watcher: Watcher) -> None:
    store.set("web", "v1")
    watcher.watch(MemKey("web"))
    eventually(lambda: watcher.get(MemKey("web")) == "v1")
    late = Recorder()
    event = threading.Event()
    watcher.watch(MemKey("web"), on_change=late, event=event)
    assert late.values() == ["v1"] and event.is_set()


def test_unchanged_answers_notify_nobody(store: Store, watcher: Watcher) -> None:
    rec = Recorder()
    store.set("web", "same")
    watcher.watch(MemKey("web"), on_change=rec)
    eventually(lambda: rec.values() == ["same"])
    for _ in range(5):
        asked = len(store.requests)
        store.set("web", "same")  # index moves, value does not
        eventually(lambda asked=asked: len(store.requests) > asked)  # type: ignore[misc]
    assert rec.values() == ["same"]


def test_none_is_a_value_distinct_from_no_answer(store: Store, watcher: Watcher) -> None:
    key = MemKey("absent")
    assert not watcher.has_value(key)
    rec = Recorder()
    watcher.watch(key, on_change=rec)
    eventually(lambda: watcher.has_value(key))
    assert watcher.get(key) is None and rec.values() == [None]


def test_watcher_level_callback_and_event(store: Store) -> None:
    rec = Recorder()
    w = Watcher(store, on_change=rec, wait="30s", min_interval=0.0)
    try:
        event = threading.Event()
        store.set("web", 1)
        w.watch(MemKey("web"), event=event)
        assert event.wait(5)
        eventually(lambda: rec.calls == [(MemKey("web"), 1)])
    finally:
        w.stop()


def test_index_rules_are_applied(store: Store, watcher: Watcher) -> None:
    store.set("web", "a", index=50)
    watcher.watch(MemKey("web"))
    eventually(lambda: ("web", 50) in store.requests)
    store.set("web", "b", index=10)  # went backwards: next query starts over
    eventually(lambda: watcher.get(MemKey("web")) == "b")
    eventually(lambda: ("web", 10) in store.requests)
    asked = [i for name, i in store.requests if name == "web"]
    assert asked[:2] == [0, 50]
    assert asked[2:4] == [0, 10]


def test_a_failing_callback_does_not_stop_the_loop(store: Store, watcher: Watcher) -> None:
    def broken(key: Any, value: Any) -> None:
        raise RuntimeError("subscriber bug")

    rec = Recorder()
    watcher.watch(MemKey("web"), on_change=broken)
    watcher.watch(MemKey("web"), on_change=rec)
    store.set("web", 1)
    store.set("web", 2)
    eventually(lambda: rec.values()[-1:] == [2])


# ---------------------------------------------------------------- fail static


def test_errors_keep_the_last_value_and_log_once_per_change(
    store: Store, watcher: Watcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshctl.watch")
    rec = Recorder()
    key = MemKey("web")
    store.set("web", ["good"])
    watcher.watch(key, on_change=rec)
    eventually(lambda: watcher.get(key) == ["good"])
    ok = watcher.status(key)
    assert ok is not None and ok.ok and ok.last_success is not None

    store.fail("connection refused")
    eventually(lambda: (watcher.status(key) or ok).failures >= 10)
    bad = watcher.status(key)
    assert bad is not None and bad.state == "error" and bad.error == "connection refused"
    assert bad.last_success == ok.last_success
    assert watcher.get(key) == ["good"]  # fail static
    assert rec.values() == [["good"]]
    assert watcher.statuses()[key]["ok"] is False

    store.set("web", ["good", "new"])  # changes while Consul is unreachable
    store.fail(None)
    eventually(lambda: watcher.get(key) == ["good", "new"])
    eventually(lambda: (watcher.status(key) or bad).ok)

    store.fail("boom again")
    eventually(lambda: (watcher.status(key) or ok).failures >= 5)
    store.fail(None)
    eventually(lambda: (watcher.status(key) or bad).ok)

    messages = [r.getMessage() for r in caplog.records if r.name == "meshctl.watch"]
    assert [m for m in messages if "connection refused" in m] == [
        "watch mem(web): connection refused (keeping the last good value; retrying)"
    ]
    assert len([m for m in messages if "boom again" in m]) == 1
    assert len([m for m in messages if "recovered" in m]) == 2


def test_the_status_version_moves_with_keys_and_their_state_not_with_answers(
    store: Store, watcher: Watcher
) -> None:
    """What the agent compares on every timer-woken pass instead of each key's status."""
    v0 = watcher.status_version()
    key = MemKey("web")
    store.set("web", ["a"])
    sub = watcher.watch(key)
    eventually(lambda: watcher.get(key) == ["a"])
    v1 = watcher.status_version()
    assert v1 > v0  # a key came, and went from pending to ok
    for value in (["a", "b"], ["c"]):  # answers alone: the statuses read the same
        store.set("web", value)
        eventually(lambda value=value: watcher.get(key) == value)  # type: ignore[misc]
    assert watcher.status_version() == v1
    store.fail("connection refused")
    eventually(lambda: (watcher.status(key) or WatchStatus()).failures >= 3)
    v2 = watcher.status_version()
    assert v2 > v1
    eventually(lambda: (watcher.status(key) or WatchStatus()).failures >= 6)
    assert watcher.status_version() == v2  # the same error again and again
    store.fail("no route to host")
    eventually(lambda: (watcher.status(key) or WatchStatus()).error == "no route to host")
    v3 = watcher.status_version()
    assert v3 > v2
    store.fail(None)
    eventually(lambda: (watcher.status(key) or WatchStatus()).ok)
    v4 = watcher.status_version()
    assert v4 > v3
    sub.cancel()
    assert watcher.status_version() > v4 and watcher.statuses() == {}


def test_error_before_any_answer(store: Store, watcher: Watcher) -> None:
    store.fail("no route")
    key = MemKey("web")
    watcher.watch(key)
    eventually(lambda: (watcher.status(key) is not None) and watcher.status(key).state == "error")  # type: ignore[union-attr]
    assert watcher.get(key) is None and not watcher.has_value(key)
    store.set("web", "late")
    store.fail(None)
    eventually(lambda: watcher.get(key) == "late")


def test_retries_back_off_and_start_over_after_a_success(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each retry waits backoff_delay(attempt) with the watcher's base and cap; the
    attempt counts the failures in a row, and a success resets it."""
    attempts: list[int] = []
    lock = threading.Lock()

    def recording_delay(attempt: int, *, base: float, cap: float) -> float:
        assert (base, cap) == (0.05, 0.2)
        with lock:
            attempts.append(attempt)
        return 0.001

    def recorded() -> list[int]:
        with lock:
            return list(attempts)

    monkeypatch.setattr(_watch, "backoff_delay", recording_delay)
    w = Watcher(store, wait="30s", backoff_base=0.05, backoff_cap=0.2, min_interval=0.0)
    key = MemKey("web")
    try:
        store.fail("down")
        w.watch(key)
        eventually(lambda: len(recorded()) >= 5)
        store.set("web", "up")
        store.fail(None)
        eventually(lambda: w.get(key) == "up")
        first = recorded()
        assert first == list(range(len(first))), first
        store.fail("down again")
        eventually(lambda: len(recorded()) >= len(first) + 3)
    finally:
        w.stop()
    second = recorded()[len(first):]
    assert second == list(range(len(second))), second


# ---------------------------------------------------------------- stopping


def test_stop_cuts_blocking_queries_short(store: Store) -> None:
    w = Watcher(store, wait="600s", min_interval=0.0)
    for name in ("a", "b", "c"):
        w.watch(MemKey(name))
    eventually(lambda: sum(store.active.values()) == 3)
    started = time.monotonic()
    w.stop(timeout=5)
    assert time.monotonic() - started < 2.0
    assert sum(store.active.values()) == 0
    assert store.sessions_closed == store.sessions_opened == 3
    with pytest.raises(RuntimeError):
        w.watch(MemKey("a"))


def test_last_unsubscribe_stops_the_loop(store: Store, watcher: Watcher) -> None:
    one = watcher.watch(MemKey("web"))
    two = watcher.watch(MemKey("web"))
    eventually(lambda: store.active.get("web") == 1)
    one.cancel()
    time.sleep(0.05)
    assert store.active.get("web") == 1 and watcher.keys() == {MemKey("web")}
    two.cancel()
    eventually(lambda: store.active.get("web") == 0 and store.sessions_closed == 1)
    assert watcher.keys() == set() and watcher.status(MemKey("web")) is None


def test_watch_only_keeps_exactly_the_given_keys(store: Store, watcher: Watcher) -> None:
    other = watcher.watch(MemKey("b"))
    watcher.watch_only({MemKey("a"), MemKey("b")})
    assert watcher.keys() == {MemKey("a"), MemKey("b")}
    watcher.watch_only({MemKey("c")})
    # b is still wanted by another subscriber; a is not.
    assert watcher.keys() == {MemKey("b"), MemKey("c")}
    other.cancel()
    assert watcher.keys() == {MemKey("c")}
    eventually(lambda: store.max_active.get("b") == 1 and store.active.get("b") == 0)


# ---------------------------------------------------------------- bounded connections


@dataclass(frozen=True)
class BudgetKey(MemKey):
    """A key that holds a loop only within the watcher's budget (like HealthConnect)."""

    follow = "budget"
    refresh_blocking = True

    def __str__(self) -> str:
        return f"budget({self.name})"


@dataclass(frozen=True)
class PollKey(MemKey):
    """A key that never holds a loop (like DiscoveryChain): refetched when named."""

    follow = "poll"

    def __str__(self) -> str:
        return f"poll({self.name})"


@dataclass(frozen=True)
class FeedKey(MemKey):
    """A feed (like HealthChecks/ConfigEntries): its value lists names that changed."""

    notify = False

    def __str__(self) -> str:
        return f"feed({self.name})"

    def affected(self, old: Any, new: Any, keys: Any, get: Any) -> set[Any]:
        if old is None:
            return set()
        names = set(new or ()) ^ set(old or ())
        return {k for k in keys if k.name in names}


def feeds_for(overflow: frozenset[Any]) -> set[Any]:
    return {FeedKey("feed")} if overflow else set()


def bounded(store: Store, **kw: Any) -> Watcher:
    kw.setdefault("max_blocking", 2)
    kw.setdefault("workers", 2)
    kw.setdefault("refresh_wait", "5s")
    return Watcher(store, wait="30s", backoff_base=0.005, backoff_cap=0.02, min_interval=0.0,
                   feeds=feeds_for, **kw)


def test_budget_keys_beyond_the_budget_share_a_feed_and_a_small_pool(store: Store) -> None:
    """50 keys: 2 loops, the rest polled by 2 workers, one feed: 5 sessions, not 50."""
    for i in range(50):
        store.set(f"k{i}", [i])
    w = bounded(store)
    try:
        w.watch_only({BudgetKey(f"k{i}") for i in range(50)})
        eventually(lambda: all(w.get(BudgetKey(f"k{i}")) == [i] for i in range(50)))
        assert w.counts() == {"blocking": 3, "polled": 48, "workers": 2}  # 2 keys + the feed
        assert {FeedKey("feed")} <= w.keys()
        assert store.sessions_opened <= 5
        held = {name for name, n in store.active.items() if n}
        eventually(lambda: {name for name, n in store.active.items() if n} >= {"feed"})
        assert len(held) <= 3 + 2
    finally:
        w.stop()


def test_a_feed_change_refetches_only_the_keys_it_names(store: Store) -> None:
    rec = Recorder()
    for i in range(6):
        store.set(f"k{i}", "v1")
    store.set("feed", [])
    w = bounded(store, on_change=rec)
    try:
        w.watch_only({BudgetKey(f"k{i}") for i in range(6)})
        eventually(lambda: all(w.get(BudgetKey(f"k{i}")) == "v1" for i in range(6)))
        eventually(lambda: w.has_value(FeedKey("feed")))
        asked = len(store.requests)
        store.set("k5", "v2")
        store.set("feed", ["k5"])  # the feed names k5; k3 changes too but unnamed
        eventually(lambda: w.get(BudgetKey("k5")) == "v2")
        refetched = {name for name, _ in store.requests[asked:]} - {"feed", "k0", "k1"}
        assert refetched == {"k5"}
        assert FeedKey("feed") not in [k for k, _ in rec.calls]  # feeds notify nobody
    finally:
        w.stop()


def test_a_refetch_waits_for_a_view_that_lags_the_feed(store: Store) -> None:
    """The feed may answer before the key's own view moved: the refetch blocks past its
    last index instead of reading the old value and missing the change."""
    store.per_key = True
    store.set("k2", "old")
    store.set("feed", [])
    w = bounded(store, max_blocking=0)
    try:
        w.watch(BudgetKey("k2"))
        eventually(lambda: w.get(BudgetKey("k2")) == "old" and w.has_value(FeedKey("feed")))
        store.set("feed", ["k2"])  # the feed first...
        eventually(lambda: store.active.get("k2") == 1)  # a blocking refetch waits
        # ...without holding a consumer's compile: it answers when its view moves.
        assert not w.settling()
        store.set("k2", "new")  # ...then the value
        eventually(lambda: w.get(BudgetKey("k2")) == "new")
    finally:
        w.stop()


def test_a_change_that_names_many_keys_reads_them_at_once(store: Store) -> None:
    """A refetch that blocks holds a worker up to refresh_wait when nothing is new;
    for a change naming hundreds of keys (a node check) that queued every other
    fetch behind them for minutes. Beyond a few keys, they are read without blocking."""
    from meshctl._watch import BLOCKING_REFRESH_MAX

    n = BLOCKING_REFRESH_MAX + 4
    store.per_key = True
    names = [f"k{i:02d}" for i in range(n)]
    for name in names:
        store.set(name, "v1")
    store.set("feed", [])
    w = bounded(store, max_blocking=0, workers=2, refresh_wait="30s")
    try:
        w.watch_only({BudgetKey(name) for name in names})
        eventually(lambda: all(w.get(BudgetKey(name)) == "v1" for name in names))
        eventually(lambda: w.has_value(FeedKey("feed")))
        asked = len(store.requests)
        store.set("feed", names)  # names all of them; none changed

        def again() -> list[tuple[str, int]]:
            return [(name, i) for name, i in store.requests[asked:] if name != "feed"]

        eventually(lambda: len(again()) == n, timeout=3.0)  # not n / 2 x 30 s
        eventually(lambda: not w.settling())
        assert sorted(name for name, _ in again()) == names
        assert all(index == 0 for _, index in again())
        # A change naming a few keys still waits for their views.
        asked = len(store.requests)
        store.set("feed", names[2:])  # the feed's change names k00 and k01
        eventually(lambda: store.active.get(names[0]) == 1)
        assert not w.settling()
        store.set(names[0], "v2")
        eventually(lambda: w.get(BudgetKey(names[0])) == "v2")
    finally:
        w.stop()


def test_a_key_asked_for_again_while_it_is_fetched_waits_for_that_fetch(store: Store) -> None:
    """Two workers never fetch one key at once: their answers could arrive out of
    order and leave the older one (a chain from before a config entry's change)."""
    store.per_key = True
    store.set("k", "old")
    store.set("feed", [])
    w = bounded(store, max_blocking=0, workers=4, refresh_wait="0.3s")
    try:
        w.watch(BudgetKey("k"))
        eventually(lambda: w.get(BudgetKey("k")) == "old" and w.has_value(FeedKey("feed")))
        w.refresh({BudgetKey("k")})
        eventually(lambda: store.active.get("k") == 1)  # a blocking refetch waits
        for _ in range(3):
            w.refresh({BudgetKey("k")})  # other workers are free: they must not take it
            time.sleep(0.02)
        assert store.max_active["k"] == 1
        store.set("k", "new")
        eventually(lambda: w.get(BudgetKey("k")) == "new")
        eventually(lambda: not w.settling())  # the waiting request ran, after the first
        assert store.max_active["k"] == 1
        assert w.get(BudgetKey("k")) == "new"
    finally:
        w.stop()


def test_poll_keys_hold_no_loop_and_follow_what_names_them(store: Store) -> None:
    settled = threading.Event()
    store.set("chain", "c1")
    store.set("entries", [])
    w = bounded(store, on_settled=settled.set)
    try:
        w.watch(FeedKey("entries"))
        w.watch(PollKey("chain"))
        eventually(lambda: w.get(PollKey("chain")) == "c1" and w.has_value(FeedKey("entries")))
        assert w.counts()["blocking"] == 1 and store.max_active.get("chain") == 1
        before = len([1 for name, _ in store.requests if name == "chain"])
        time.sleep(0.1)
        assert len([1 for name, _ in store.requests if name == "chain"]) == before  # no loop
        store.set("chain", "c2")
        store.set("entries", ["chain"])
        eventually(lambda: w.get(PollKey("chain")) == "c2")
        assert settled.wait(5)
    finally:
        w.stop()


def test_a_refused_polled_key_keeps_its_value_and_backs_off(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshctl.watch")
    store.set("k1", ["a:1"])
    w = bounded(store, max_blocking=0, resync=0.01)  # re-read all the time: many failures
    key = BudgetKey("k1")
    try:
        w.watch(key)
        eventually(lambda: w.get(key) == ["a:1"])
        store.fail("429 Your IP is issuing too many concurrent connections")
        eventually(lambda: (w.status(key) or WatchStatus()).failures >= 5)
        assert w.get(key) == ["a:1"]  # fail static: known endpoints stay
        store.set("k1", ["a:1", "b:2"])
        store.fail(None)
        eventually(lambda: w.get(key) == ["a:1", "b:2"])
    finally:
        w.stop()
    messages = [m for r in caplog.records if "429" in (m := r.getMessage()) and "k1" in m]
    assert len(messages) == 1


def test_a_freed_slot_goes_to_a_polled_key(store: Store) -> None:
    for name in ("a", "b", "c"):
        store.set(name, name)
    w = bounded(store, max_blocking=2)
    try:
        w.watch_only({BudgetKey("a"), BudgetKey("b"), BudgetKey("c")})
        eventually(lambda: w.get(BudgetKey("c")) == "c")
        assert w.counts()["polled"] == 1 and {FeedKey("feed")} <= w.keys()
        w.watch_only({BudgetKey("b"), BudgetKey("c")})
        assert w.counts() == {"blocking": 2, "polled": 0, "workers": w.counts()["workers"]}
        assert not {FeedKey("feed")} & w.keys()  # nothing overflows: no feed
        assert w.get(BudgetKey("c")) == "c"  # the promoted key kept its value
        store.set("c", "c2")
        eventually(lambda: w.get(BudgetKey("c")) == "c2")  # now by its own blocking query
    finally:
        w.stop()


def test_a_change_that_drops_slot_holders_starts_loops_only_for_keys_it_keeps(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slots freed within one watch_only go to the keys that stay, once: no loop (and
    connection) is started for a key the same change drops."""
    import meshctl._watch as watch

    names = "abcdef"
    for name in names:
        store.set(name, name)
    w = bounded(store, max_blocking=2)
    started: list[str] = []
    real_start = watch._Loop.start

    def start(loop: watch._Loop) -> None:
        started.append(loop.key.name)
        real_start(loop)

    monkeypatch.setattr(watch._Loop, "start", start)
    try:
        w.watch_only({BudgetKey(n) for n in names})
        eventually(lambda: all(w.get(BudgetKey(n)) == n for n in names))
        assert sorted(n for n in started if n in names) == ["a", "b"]
        started.clear()
        w.watch_only({BudgetKey("e"), BudgetKey("f")})
        assert sorted(started) == ["e", "f"]  # not c and d, dropped by the same change
        assert w.counts()["blocking"] == 2 and w.counts()["polled"] == 0
        assert w.get(BudgetKey("e")) == "e"
    finally:
        w.stop()


def test_stop_is_prompt_with_workers_blocked(store: Store) -> None:
    store.per_key = True
    store.set("k", "v")
    store.set("feed", [])
    w = bounded(store, max_blocking=0, refresh_wait="600s")
    w.watch(BudgetKey("k"))
    eventually(lambda: w.has_value(BudgetKey("k")) and w.has_value(FeedKey("feed")))
    store.set("feed", ["k"])  # a blocking refetch that would wait 600 s
    eventually(lambda: store.active.get("k") == 1)
    started = time.monotonic()
    w.stop(timeout=5)
    assert time.monotonic() - started < 2.0
    assert sum(store.active.values()) == 0
    assert store.sessions_closed == store.sessions_opened
