"""Running one call in several threads at once, for the proxies' Lua tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_threads(threads: int, each: int, call: Callable[[], T]) -> list[T]:
    """``call()`` ``each`` times in each of ``threads`` threads: every result."""
    out: list[T] = []
    lock = threading.Lock()

    def run() -> None:
        got = [call() for _ in range(each)]
        with lock:
            out.extend(got)
    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return out
