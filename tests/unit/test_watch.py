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
from meshctl._watch import Watcher, backoff_delay, next_index

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

    def set(self, name: str, value: Any, index: int | None = None) -> None:
        with self.cond:
            self.index = self.index + 1 if index is None else index
            self.values[name] = value
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
                    if store.index != index or time.monotonic() >= deadline:
                        return store.index, store.values.get(self.name)
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
