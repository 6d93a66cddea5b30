"""Convergence: how fast h1's sidecar follows an instance's health in Consul.

A :class:`Probe` runs inside h1 and sends requests back to back through the
sidecar (one keep-alive connection), recording when each answer arrived and
which backend instance gave it. The benchmark flips an instance's TTL check
through that instance's own Consul agent at a known moment t0 and reads the
probe's record:

* remove: t0 (check critical) → the last answer from that instance;
* add:    t0 (check passing)  → the first answer from that instance.

Timestamps are ``time.monotonic()`` of this one process, so t0 and the probe's
clock agree to the microsecond. The probe's request rate bounds the resolution.
"""

from __future__ import annotations

import collections
import http.client
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.deploy import UPSTREAM_PORT, Deployment
from bench.report import summarize
from meshctl.lab.mesh import MeshHost

ERROR = "!"  # sample marks: a failed request
RETRIED = "~"  # a request on a reused connection the proxy had closed, retried
CLOSED_RACE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class Probe:
    """Back-to-back GETs to 127.0.0.1:port inside a host; ``samples`` is (time, who)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.samples: list[tuple[float, str]] = []  # appended by one thread, read by another
        self.started = 0.0
        self.stopped = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    def start(self, mh: MeshHost) -> None:
        """Run the probe on one of the host's namespace threads until :meth:`stop`."""

        def main() -> None:
            try:
                mh.host.call(self._loop)
            except BaseException as exc:  # reported to the reader through .failure
                self.failure = exc

        self._thread = threading.Thread(target=main, name="bench-probe", daemon=True)
        self.started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.stopped = time.monotonic()

    @property
    def rate(self) -> float:
        span = (self.stopped or time.monotonic()) - self.started
        return len(self.samples) / span if span > 0 else 0.0

    def _loop(self) -> None:
        conn: http.client.HTTPConnection | None = None
        reused = False
        append = self.samples.append
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2.0)
                    reused = False
                conn.request("GET", "/")
                resp = conn.getresponse()
                body = resp.read()
                now = time.monotonic()
                if resp.status == 200:
                    append((now, body.decode("ascii", "replace").strip()))
                else:
                    append((now, f"{ERROR}{resp.status}"))
                reused = True
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                # A kept-alive connection the proxy closed while our request was on its
                # way (e.g. on a reload): HTTP clients retry such idempotent requests on
                # a new connection (RFC 9110, 9.2.2), so it is counted, not failed.
                closed = isinstance(exc, CLOSED_RACE) and reused
                mark = RETRIED if closed else ERROR
                append((time.monotonic(), f"{mark}{type(exc).__name__}"))
                if conn is not None:
                    conn.close()
                conn = None
                if not closed:
                    time.sleep(0.001)
        if conn is not None:
            conn.close()


def _errors(samples: list[tuple[float, str]], start: int, end: int,
            mark: str = ERROR) -> dict[str, int]:
    """Probe requests in samples[start:end] with ``mark``, by kind (status or exception)."""
    kinds = collections.Counter(who[1:] for _, who in samples[start:end] if who.startswith(mark))
    return dict(sorted(kinds.items()))


def _outcome(seconds: float | None, ack: float, probe: Probe, start: int,
             end: int) -> dict[str, Any]:
    return {"seconds": seconds, "ack_s": ack, "errors": _errors(probe.samples, start, end),
            "retried": _errors(probe.samples, start, end, RETRIED)}


def measure_remove(dep: Deployment, probe: Probe, victim: MeshHost, other: MeshHost,
                   quiet: float, timeout: float) -> dict[str, Any]:
    """Fail ``victim``'s check at t0; seconds until its last answer (None on timeout).

    Done once no answer from ``victim`` came for ``quiet`` seconds while ``other``
    answered at least 20 times (so a stalled probe never passes for "converged").
    """
    start = len(probe.samples)
    t0 = time.monotonic()
    dep.set_passing(victim, False)
    ack = time.monotonic() - t0
    last: float | None = None
    others_since = 0
    i = start
    while True:
        time.sleep(0.02)
        end = len(probe.samples)
        for t, who in probe.samples[i:end]:
            if who == victim.name and t >= t0:
                last = t
                others_since = 0
            elif who == other.name:
                others_since += 1
        i = end
        now = time.monotonic()
        if now - (last or t0) >= quiet and others_since >= 20:
            return _outcome((last - t0) if last is not None else 0.0, ack, probe, start, end)
        if now - t0 > timeout or probe.failure is not None:
            return _outcome(None, ack, probe, start, end)


def measure_add(dep: Deployment, probe: Probe, victim: MeshHost,
                timeout: float) -> dict[str, Any]:
    """Pass ``victim``'s check at t0; seconds until its first answer (None on timeout)."""
    start = len(probe.samples)
    t0 = time.monotonic()
    dep.set_passing(victim, True)
    ack = time.monotonic() - t0
    i = start
    while True:
        time.sleep(0.01)
        end = len(probe.samples)
        for t, who in probe.samples[i:end]:
            if who == victim.name and t >= t0:
                return _outcome(t - t0, ack, probe, start, end)
        i = end
        if time.monotonic() - t0 > timeout or probe.failure is not None:
            return _outcome(None, ack, probe, start, end)


def run_convergence(dep: Deployment, reps: int, quiet: float, timeout: float,
                    say: Callable[[str], None]) -> dict[str, Any]:
    """``reps`` remove/add cycles, alternating the failed instance between h2 and h3."""
    dep.add_second_instance()
    probe = Probe(UPSTREAM_PORT)
    remove: list[dict[str, Any]] = []
    add: list[dict[str, Any]] = []
    probe.start(dep.h1)
    try:
        time.sleep(0.5)
        for rep in range(reps):
            victim, other = (dep.h2, dep.h3) if rep % 2 == 0 else (dep.h3, dep.h2)
            r = measure_remove(dep, probe, victim, other, quiet, timeout)
            remove.append({"instance": victim.name, **r})
            a = measure_add(dep, probe, victim, timeout)
            add.append({"instance": victim.name, **a})
            say(f"{dep.driver}: convergence {rep + 1}/{reps} ({victim.name}): "
                f"remove {_fmt(r['seconds'])}, add {_fmt(a['seconds'])}")
            if probe.failure is not None:
                raise RuntimeError(f"the probe failed: {probe.failure}")
            if r["seconds"] is None or a["seconds"] is None:
                # Put the instance back before the next repetition, whatever happened.
                dep.set_passing(victim, True)
                dep.wait_serving({"h2", "h3"})
            # Random spacing, so repetitions do not lock onto the agents' timers.
            time.sleep(random.uniform(0.2, 0.6))
    finally:
        probe.stop()
    return {
        "probe_rps": probe.rate,
        "remove": _event(remove),
        "add": _event(add),
    }


def _event(samples: list[dict[str, Any]]) -> dict[str, Any]:
    values = [s["seconds"] for s in samples if s["seconds"] is not None]
    kinds: collections.Counter[str] = collections.Counter()
    retried: collections.Counter[str] = collections.Counter()
    for s in samples:
        kinds.update(s["errors"])
        retried.update(s["retried"])
    return {
        "stats_s": summarize(values),
        "timeouts": sum(1 for s in samples if s["seconds"] is None),
        "probe_errors": sum(kinds.values()),
        "probe_error_kinds": dict(sorted(kinds.items())),
        "probe_retries": sum(retried.values()),
        "probe_retry_kinds": dict(sorted(retried.items())),
        "samples": samples,
    }


def _fmt(v: float | None) -> str:
    return "timeout" if v is None else f"{v * 1000:.0f} ms"
