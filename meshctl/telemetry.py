"""Access logs and spans: what the sidecars send the agent, and what it does with them.

The channel: each sidecar sends one JSON line per logged request as a
datagram to the agent's unix socket ``<run_dir>/telemetry.sock`` (nginx
``access_log syslog:server=unix:…``, HAProxy ``log unix@…``): one ``sendto``
per logged request, no file write and no Python on the request path. The
sidecar decides what to send (``ObservePlan``): every request, a sampled
share, and every request of a sampled trace. The agent (``Receiver``, a
thread) writes the access-log lines (``"log": "1"``) to the access-log file
and hands records of sampled traces (``"sampled": "1"``) to the span exporter
(meshctl/tracing.py). nginx's stream records are also how the agent counts
nginx's TCP connections and bytes (``count_tcp``); a line in the proxy's own
format (HAProxy's line of a failed TLS handshake) is turned into counters by
the driver (``lines``). A line that does not parse is dropped and counted.

Fields of a record (both drivers; docs/metrics.md "Access logs"):
time, start, duration (seconds), trace_id, span_id, parent_id, sampled, log,
direction, service, peer (inbound: the verified caller), upstream, upstream_addr
(the instance), method, path (without the query: it may carry secrets), status,
bytes_sent, bytes_received, route, upstream_status (one status per try:
retries), intention (the denial's reason, empty when allowed). No header is
logged.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from meshctl.config import TelemetrySettings, access_log_share
from meshctl.errors import ConfigError

log = logging.getLogger("meshctl.telemetry")

#: the status of a TCP record whose client had no valid mesh certificate (nginx's codes:
#: 495 a certificate that failed verification, 496 none): a TLS handshake failure
TLS_FAILED = ("495", "496")
#: the largest datagram read; a record is well below 2 KiB
MAX_DATAGRAM = 16384
#: how often (seconds, at most) the receiver checks that the access log's path
#: still names the file it writes: logrotate's ``create`` moves it away, and the
#: next check reopens the path, without a signal to the agent
ROTATION_CHECK = 1.0
FIELDS = ("kind", "time", "start", "duration", "trace_id", "span_id", "parent_id", "sampled",
          "log", "direction", "service", "peer", "upstream", "upstream_addr", "method", "path",
          "status", "bytes_sent", "bytes_received", "route", "upstream_status", "intention")


@dataclass(frozen=True)
class ObservePlan:
    """What a sidecar renders for access logs and traces (pure, from the settings).

    ``log_percent``: the share of requests logged, as a percentage string for
    the proxy (``"10"``, ``"0.5"``), ``""`` when all or none are.
    """

    socket: str
    log_all: bool
    log_percent: str
    tracing: bool
    trace_share: float

    @property
    def emits(self) -> bool:
        """True when the sidecar sends any record at all."""
        return self.log_all or bool(self.log_percent) or self.tracing


def observe_plan(settings: TelemetrySettings, socket_path: Path) -> ObservePlan:
    """The sidecar's part of ``settings``. Raises ConfigError when logging or tracing
    is asked for without metrics (their hooks are the metrics' hooks)."""
    share = access_log_share(settings.access_log) or 0.0
    tracing = bool(settings.otlp_endpoint)
    if (share or tracing) and not settings.metrics:
        raise ConfigError("telemetry: access_log and otlp_endpoint need metrics = true")
    percent = "" if share in (0.0, 1.0) else f"{share * 100:.2f}".rstrip("0").rstrip(".")
    return ObservePlan(socket=str(socket_path), log_all=share == 1.0, log_percent=percent,
                       tracing=tracing, trace_share=float(settings.trace_sample))


def parse_record(datagram: bytes) -> dict[str, str] | None:
    """The record in one datagram (a syslog header before the JSON is skipped), or None."""
    text = datagram.decode("utf-8", "replace")
    start = text.find("{")
    if start < 0:
        return None
    try:
        data = json.loads(text[start:].strip())
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    # HAProxy has no arithmetic on fractions: it sends start and duration in
    # microseconds (start_us, duration_us), nginx in seconds.
    for name in ("start", "duration"):
        micros = data.get(f"{name}_us")
        if name not in data and isinstance(micros, str) and micros.isdigit():
            seconds, rest = divmod(int(micros), 1_000_000)
            data[name] = f"{seconds}.{rest:06d}"
    # HAProxy writes "-" for a variable that is not set (and "-:-" for the server
    # address of a connection that reached none): the same as nginx's "".
    out = {k: str(data.get(k, "")) for k in FIELDS}
    out = {k: "" if v in ("-", "-:-") else v for k, v in out.items()}
    out["kind"] = out["kind"] or "http"
    return out


def access_line(record: dict[str, str]) -> str:
    """The access-log line of a record: JSON, fields in a fixed order, ``log`` dropped."""
    return json.dumps({k: record[k] for k in FIELDS if k != "log"}, separators=(",", ":"))


class Receiver:
    """Reads the sidecar's records from ``socket_path`` on a thread of its own."""

    def __init__(self, socket_path: Path, access_log: Path | None,
                 on_span: Callable[[dict[str, str]], None] | None = None,
                 writer: str | None = None, count_tcp: bool = True,
                 lines: Callable[[str], dict[str, float] | None] | None = None) -> None:
        """``count_tcp``: count connections and bytes from ``"kind": "tcp"`` records
        (a proxy that counts them itself sends them only to be logged); ``lines``:
        the counters of a datagram that is no JSON record (the driver's
        ``record_counters``: lines the proxy writes in its own format), None
        when it is not one either."""
        self.socket_path = socket_path
        self.count_tcp = count_tcp
        self.lines = lines
        self.writer = writer
        self.access_log = access_log
        self.on_span = on_span
        self.bad = 0
        self.received = 0
        self._sock: socket.socket | None = None
        self._out: TextIO | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._reopen = threading.Event()
        self._lock = threading.Lock()
        self._tcp: dict[str, float] = {}
        self._checked = 0.0

    def start(self) -> None:
        """Bind the socket (replacing a stale one) and start reading. Raises OSError."""
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.socket_path))
        # Only the proxy's workers may send here (they may run as another user:
        # nginx's `user`); nobody else can put lines into the log or spans into traces.
        os.chmod(self.socket_path, 0o600)
        if self.writer is not None:
            os.chown(self.socket_path, pwd.getpwnam(self.writer).pw_uid, -1)
        # A burst must not be lost while this thread waits for the GIL.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.settimeout(0.5)
        self._sock = sock
        if self.access_log is not None:
            self.access_log.parent.mkdir(parents=True, exist_ok=True)
            self._out = self.access_log.open("a", buffering=1)
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def reopen(self) -> None:
        """Reopen the access log soon (logrotate moved it; the agent's SIGHUP). Safe
        from a signal handler: the reading thread reopens it between records."""
        self._reopen.set()

    def _reopen_now(self) -> None:
        self._reopen.clear()
        if self.access_log is not None and self._out is not None:
            old, self._out = self._out, self.access_log.open("a", buffering=1)
            old.close()

    def _moved(self) -> bool:
        """True when the access log's path no longer names the open file (moved or
        removed by logrotate); looked at no more than once per ROTATION_CHECK."""
        now = time.monotonic()
        if self._out is None or self.access_log is None or now - self._checked < ROTATION_CHECK:
            return False
        self._checked = now
        try:
            on_disk = os.stat(self.access_log)
        except FileNotFoundError:
            return True
        mine = os.fstat(self._out.fileno())
        return (on_disk.st_dev, on_disk.st_ino) != (mine.st_dev, mine.st_ino)

    def _run(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                data = self._sock.recv(MAX_DATAGRAM)
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            self.handle(data)

    def handle(self, data: bytes) -> None:
        """One datagram: written to the access log and/or handed on as a span."""
        record = parse_record(data)
        if record is None:
            known = self.lines(data.decode("utf-8", "replace")) if self.lines else None
            if known is not None:
                self.received += 1
                self._add(known)
                return
            self.bad += 1
            if self.bad == 1:
                log.warning("telemetry: dropping a record that is not JSON: %r", data[:200])
            return
        self.received += 1
        if record["kind"] == "tcp" and self.count_tcp:
            self._count_tcp(record)
        if self._reopen.is_set() or (record["log"] == "1" and self._moved()):
            self._reopen_now()
        if record["log"] == "1" and self._out is not None:
            self._out.write(access_line(record) + "\n")
        if record["sampled"] == "1" and self.on_span is not None:
            try:
                self.on_span(record)
            except Exception:  # one bad span never stops the log
                log.exception("telemetry: a span could not be exported")

    def _count_tcp(self, r: dict[str, str]) -> None:
        # The keys of meshctl/dataplane.py: connections by peer, bytes without it
        # (HAProxy counts bytes per frontend).
        if r["direction"] == "inbound" and r["status"] in TLS_FAILED:
            with self._lock:
                key = f"x|inbound|{r['service']}|||||"
                self._tcp[key] = self._tcp.get(key, 0) + 1
            return
        labels = f"{r['direction']}|{r['service']}|{r['peer']}|{r['upstream']}|||"
        plain = f"{r['direction']}|{r['service']}||{r['upstream']}|||"
        with self._lock:
            c = self._tcp
            c["k|" + labels] = c.get("k|" + labels, 0) + 1
            if r["intention"]:
                deny = f"d|{r['direction']}|{r['service']}|{r['peer']}||||"
                c[deny] = c.get(deny, 0) + 1
            for kind, field_ in (("o", "bytes_sent"), ("i", "bytes_received")):
                try:
                    n = int(r[field_] or 0)
                except ValueError:
                    continue
                c[f"{kind}|{plain}"] = c.get(f"{kind}|{plain}", 0) + n

    def _add(self, counts: dict[str, float]) -> None:
        with self._lock:
            for k, v in counts.items():
                self._tcp[k] = self._tcp.get(k, 0) + v

    def counters(self) -> dict[str, float]:
        """The counters from the records and lines so far (nginx's TCP listeners,
        HAProxy's failed handshakes)."""
        with self._lock:
            return dict(self._tcp)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._sock is not None:
            self._sock.close()
            self.socket_path.unlink(missing_ok=True)
        if self._out is not None:
            self._out.close()
