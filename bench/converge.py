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
from collections.abc import Callable, Mapping
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


class _Remove:
    """One probe's view of a remove event: done once ``victim`` stays silent."""

    def __init__(self, probe: Probe, victim: str, other: str, quiet: float,
                 t0: float) -> None:
        self.probe, self.victim, self.other, self.quiet, self.t0 = probe, victim, other, quiet, t0
        self.start = self.i = len(probe.samples)
        self.last: float | None = None
        self.others_since = 0

    def done(self, now: float) -> bool:
        end = len(self.probe.samples)
        for t, who in self.probe.samples[self.i:end]:
            if who == self.victim and t >= self.t0:
                self.last = t
                self.others_since = 0
            elif who == self.other:
                self.others_since += 1
        self.i = end
        return now - (self.last or self.t0) >= self.quiet and self.others_since >= 20

    def seconds(self) -> float:
        return (self.last - self.t0) if self.last is not None else 0.0


def measure_remove(dep: Deployment, probes: Mapping[str, Probe], victim: MeshHost,
                   other: MeshHost, quiet: float, timeout: float) -> dict[str, dict[str, Any]]:
    """Fail ``victim``'s check at t0; per probe, seconds until its last answer (None on timeout).

    A probe is done once no answer from ``victim`` came for ``quiet`` seconds while
    ``other`` answered at least 20 times (so a stalled probe never passes for
    "converged"). All probes watch the same event.
    """
    starts = {name: len(p.samples) for name, p in probes.items()}
    t0 = time.monotonic()
    dep.set_passing(victim, False)
    ack = time.monotonic() - t0
    views = {name: _Remove(p, victim.name, other.name, quiet, t0) for name, p in probes.items()}
    out: dict[str, dict[str, Any]] = {}
    while len(out) < len(probes):
        time.sleep(0.02)
        now = time.monotonic()
        late = now - t0 > timeout
        for name, view in views.items():
            if name in out:
                continue
            p = probes[name]
            if view.done(now):
                out[name] = _outcome(view.seconds(), ack, p, starts[name], view.i)
            elif late or p.failure is not None:
                out[name] = _outcome(None, ack, p, starts[name], view.i)
    return out


def measure_add(dep: Deployment, probes: Mapping[str, Probe], victim: MeshHost,
                timeout: float) -> dict[str, dict[str, Any]]:
    """Pass ``victim``'s check at t0; per probe, seconds until its first answer (or None)."""
    starts = {name: len(p.samples) for name, p in probes.items()}
    t0 = time.monotonic()
    dep.set_passing(victim, True)
    ack = time.monotonic() - t0
    seen = dict(starts)
    out: dict[str, dict[str, Any]] = {}
    while len(out) < len(probes):
        time.sleep(0.01)
        late = time.monotonic() - t0 > timeout
        for name, p in probes.items():
            if name in out:
                continue
            end = len(p.samples)
            hit = next((t for t, who in p.samples[seen[name]:end]
                        if who == victim.name and t >= t0), None)
            seen[name] = end
            if hit is not None:
                out[name] = _outcome(hit - t0, ack, p, starts[name], end)
            elif late or p.failure is not None:
                out[name] = _outcome(None, ack, p, starts[name], end)
    return out


def run_convergence(dep: Deployment, reps: int, quiet: float, timeout: float,
                    say: Callable[[str], None], peers: Mapping[str, int] | None = None,
                    reloads: Mapping[str, Callable[[], int]] | None = None,
                    ) -> dict[str, Any]:
    """``reps`` remove/add cycles, alternating the failed instance between h2 and h3.

    ``peers`` are more proxies in h1 that route to the same instances (name → port,
    e.g. consul-template's nginx): each gets its own probe, and every TTL flip is
    measured by all probes at once. ``reloads`` count each one's proxy reloads
    (name → counter; "pair" is meshctl's), read before and after the repetitions.
    Returns the pair's figures, with the peers' under "peers".
    """
    dep.add_second_instance()
    probes = {"pair": Probe(UPSTREAM_PORT)}
    probes.update({name: Probe(port) for name, port in (peers or {}).items()})
    counters = dict(reloads or {})
    before = {name: count() for name, count in counters.items()}
    remove: dict[str, list[dict[str, Any]]] = {name: [] for name in probes}
    add: dict[str, list[dict[str, Any]]] = {name: [] for name in probes}
    for p in probes.values():
        p.start(dep.h1)
    try:
        time.sleep(0.5)
        for rep in range(reps):
            victim, other = (dep.h2, dep.h3) if rep % 2 == 0 else (dep.h3, dep.h2)
            rs = measure_remove(dep, probes, victim, other, quiet, timeout)
            adds = measure_add(dep, probes, victim, timeout)
            for name in probes:
                remove[name].append({"instance": victim.name, **rs[name]})
                add[name].append({"instance": victim.name, **adds[name]})
            say(f"{dep.driver}: convergence {rep + 1}/{reps} ({victim.name}): " + "; ".join(
                f"{name} remove {_fmt(rs[name]['seconds'])}, add {_fmt(adds[name]['seconds'])}"
                for name in probes))
            failed = [f"{n}: {p.failure}" for n, p in probes.items() if p.failure is not None]
            if failed:
                raise RuntimeError(f"a probe failed: {'; '.join(failed)}")
            if any(r["seconds"] is None for r in (*rs.values(), *adds.values())):
                # Put the instance back before the next repetition, whatever happened.
                dep.set_passing(victim, True)
                dep.wait_serving({"h2", "h3"})
            # Random spacing, so repetitions do not lock onto the agents' timers.
            time.sleep(random.uniform(0.2, 0.6))
    finally:
        for p in probes.values():
            p.stop()
    counted = {name: count() - before[name] for name, count in counters.items()}

    def block(name: str) -> dict[str, Any]:
        out = {"probe_rps": probes[name].rate, "remove": _event(remove[name]),
               "add": _event(add[name])}
        if name in counted:
            out["reloads"] = counted[name]
        return out

    result = block("pair")
    result["peers"] = {name: block(name) for name in probes if name != "pair"}
    return result


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
