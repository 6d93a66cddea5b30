"""Access-log records and spans: the plan a sidecar renders, the record parser, the
receiver's split into access log and spans, and the span a record becomes."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from meshctl import telemetry
from meshctl.config import TelemetrySettings
from meshctl.errors import ConfigError
from meshctl.proxy.haproxy.driver import embryonic_counters
from meshctl.telemetry import FIELDS, Receiver, observe_plan, parse_record
from meshctl.tracing import span_of

SOCK = Path("/run/meshctl/telemetry.sock")


def record(**kw: str) -> dict[str, str]:
    base = {k: "" for k in FIELDS}
    base.update(time="2026-12-04T21:00:00+00:00", start="1796419519.25",
                duration="0.0125", trace_id="ab" * 16, span_id="cd" * 8, sampled="1", log="1",
                direction="outbound", service="web", peer="api", upstream="api",
                upstream_addr="198.18.0.12:21000", method="GET", path="/x", status="200")
    base.update(kw)
    return base


def test_the_plan_follows_the_settings() -> None:
    off = observe_plan(TelemetrySettings(), SOCK)
    assert not off.emits
    some = observe_plan(TelemetrySettings(access_log="12.5%"), SOCK)
    assert some.log_percent == "12.5" and not some.log_all and not some.tracing
    assert observe_plan(TelemetrySettings(access_log="on"), SOCK).log_all
    traced = observe_plan(TelemetrySettings(otlp_endpoint="http://198.18.0.2:4318/v1/traces",
                                            trace_sample=0.25), SOCK)
    assert traced.tracing and traced.trace_share == 0.25 and traced.emits
    with pytest.raises(ConfigError, match=r"telemetry\.metrics: access_log and otlp_endpoint"):
        TelemetrySettings(metrics=False, access_log="on")


@pytest.mark.parametrize("bad", [{"access_log": "sometimes"}, {"access_log": "0%"},
                                 {"access_log": "101%"}, {"trace_sample": 1.5},
                                 {"otlp_endpoint": "ftp://x"}])
def test_bad_settings_are_refused_naming_the_setting(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=r"telemetry\."):
        TelemetrySettings(**bad)  # type: ignore[arg-type]


def test_a_record_parses_from_syslog_or_raw_and_haproxy_dashes_are_empty() -> None:
    line = json.dumps(record(peer="-"))
    for datagram in (f"<190>Dec  4 21:00:00 meshctl: {line}".encode(), line.encode()):
        r = parse_record(datagram)
        assert r is not None and r["service"] == "web" and r["peer"] == ""
    assert parse_record(b"<190>Dec  4 meshctl: not json") is None
    assert parse_record(b"[1, 2]") is None


def test_haproxy_microseconds_become_seconds_exactly() -> None:
    data = {k: v for k, v in record().items() if k not in ("start", "duration")}
    r = parse_record(json.dumps({**data, "start_us": "1796000000000042",
                                 "duration_us": "1234"}).encode())
    assert r is not None and (r["start"], r["duration"]) == ("1796000000.000042", "0.001234")
    # a variable HAProxy did not set ("-") stays empty, and seconds given win
    r = parse_record(json.dumps({**data, "start_us": "-", "duration": "0.5",
                                 "duration_us": "7"}).encode())
    assert r is not None and (r["start"], r["duration"]) == ("", "0.5")


def test_the_receiver_splits_access_lines_and_spans(tmp_path: Path) -> None:
    spans: list[dict[str, str]] = []
    sock = tmp_path / "t.sock"
    rx = Receiver(sock, tmp_path / "logs" / "access.log", spans.append)
    rx.start()
    try:
        tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        tx.sendto(json.dumps(record(path="/both")).encode(), str(sock))
        tx.sendto(json.dumps(record(path="/span-only", log="")).encode(), str(sock))
        tx.sendto(json.dumps(record(path="/log-only", sampled="")).encode(), str(sock))
        tx.sendto(b"garbage", str(sock))
        tx.close()
        deadline = time.monotonic() + 5
        while rx.received + rx.bad < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        rx.stop()
    lines = [json.loads(x) for x in (tmp_path / "logs" / "access.log").read_text().splitlines()]
    assert [x["path"] for x in lines] == ["/both", "/log-only"]
    assert "log" not in lines[0] and lines[0]["peer"] == "api"
    assert [s["path"] for s in spans] == ["/both", "/span-only"]
    assert rx.bad == 1


def test_a_record_becomes_a_span_with_its_ids_and_http_semconv() -> None:
    s = span_of(record(parent_id="ef" * 8, status="503"), "h1")
    assert s is not None and s.context is not None and s.parent is not None
    assert s.context.trace_id == int("ab" * 16, 16) and s.context.span_id == int("cd" * 8, 16)
    assert s.parent.span_id == int("ef" * 8, 16)
    assert s.kind == SpanKind.CLIENT and s.status.status_code == StatusCode.ERROR
    assert s.attributes is not None
    assert s.attributes["http.request.method"] == "GET"
    assert s.attributes["http.response.status_code"] == 503
    assert s.attributes["server.address"] == "api"
    assert s.end_time is not None and s.start_time is not None
    assert s.end_time - s.start_time == 12_500_000
    assert s.resource.attributes["service.name"] == "web"
    server = span_of(record(direction="inbound", service="api", peer="web", status="404"), "h2")
    assert server is not None and server.kind == SpanKind.SERVER and server.parent is None
    assert server.status.status_code == StatusCode.UNSET  # a 4xx is the client's error
    assert span_of(record(trace_id="00" * 16), "h1") is None
    assert span_of(record(span_id="xyz"), "h1") is None
    assert span_of(record(start="soon"), "h1") is None


def _sender(rx: Receiver) -> tuple[socket.socket, Callable[[str, int], None]]:
    """A datagram socket to ``rx``, and send(path, n): one record for ``path``, then
    wait (at most 5 s) until ``rx`` has received ``n`` records in all."""
    tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def send_and_wait(path: str, n: int) -> None:
        tx.sendto(json.dumps(record(path=path)).encode(), str(rx.socket_path))
        deadline = time.monotonic() + 5
        while rx.received < n and time.monotonic() < deadline:
            time.sleep(0.01)

    return tx, send_and_wait


def test_a_rotated_access_log_is_reopened(tmp_path: Path) -> None:
    sock, log = tmp_path / "t.sock", tmp_path / "access.log"
    rx = Receiver(sock, log)
    rx.start()
    tx, send_and_wait = _sender(rx)

    try:
        send_and_wait("/before", 1)
        log.rename(tmp_path / "access.log.1")  # what logrotate does
        rx.reopen()
        send_and_wait("/after", 2)
    finally:
        tx.close()
        rx.stop()
    assert "/before" in (tmp_path / "access.log.1").read_text()
    assert "/after" in log.read_text() and "/before" not in log.read_text()


def test_a_moved_access_log_is_reopened_without_a_signal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """logrotate's ``create`` (the role's rule) moves the file and signals nobody:
    the receiver notices that its path names another file, or none, and reopens it."""
    monkeypatch.setattr(telemetry, "ROTATION_CHECK", 0.0)
    sock, log = tmp_path / "t.sock", tmp_path / "access.log"
    rx = Receiver(sock, log)
    rx.start()
    tx, send_and_wait = _sender(rx)

    try:
        send_and_wait("/before", 1)
        log.rename(tmp_path / "access.log.1")
        log.touch()  # logrotate's create
        send_and_wait("/after", 2)
        (tmp_path / "access.log").rename(tmp_path / "access.log.2")  # no create
        send_and_wait("/later", 3)
    finally:
        tx.close()
        rx.stop()
    assert "/before" in (tmp_path / "access.log.1").read_text()
    assert "/after" in (tmp_path / "access.log.2").read_text()
    assert log.read_text().count("\n") == 1 and "/later" in log.read_text()


def test_tcp_records_are_counted_as_connections_and_bytes(tmp_path: Path) -> None:
    rx = Receiver(tmp_path / "t.sock", None)
    tcp = {"kind": "tcp", "direction": "inbound", "service": "kv", "peer": "web",
           "upstream": "", "bytes_sent": "120", "bytes_received": "80", "intention": ""}
    rx.handle(json.dumps(tcp).encode())
    rx.handle(json.dumps({**tcp, "peer": "evil", "bytes_sent": "0", "bytes_received": "0",
                          "intention": "intention evil -> kv denies"}).encode())
    rx.handle(json.dumps(record()).encode())  # an http record counts nothing here
    c = rx.counters()
    assert c["k|inbound|kv|web||||"] == 1 and c["k|inbound|kv|evil||||"] == 1
    assert c["d|inbound|kv|evil||||"] == 1
    assert c["o|inbound|kv|||||"] == 120
    assert c["i|inbound|kv|||||"] == 80
    assert len(c) == 5


def test_nginx_stream_records_of_clients_without_a_valid_certificate_are_tls_failures(
        tmp_path: Path) -> None:
    """nginx's stream records say 495/496 for a client whose certificate failed
    verification or was missing: a TLS handshake failure of the inbound, no connection."""
    rx = Receiver(tmp_path / "t.sock", None)
    tcp = {"kind": "tcp", "direction": "inbound", "service": "kv", "peer": "",
           "status": "496", "bytes_sent": "0", "bytes_received": "0",
           "intention": "caller has no mesh identity"}
    rx.handle(json.dumps(tcp).encode())
    rx.handle(json.dumps({**tcp, "status": "495"}).encode())
    rx.handle(json.dumps({**tcp, "status": "200", "peer": "web", "intention": ""}).encode())
    assert rx.counters() == {"x|inbound|kv|||||": 2, "k|inbound|kv|web||||": 1,
                             "o|inbound|kv|||||": 0, "i|inbound|kv|||||": 0}


def test_a_proxy_that_counts_tcp_itself_sends_records_only_to_be_logged(
        tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    rx = Receiver(tmp_path / "t.sock", log, count_tcp=False)
    rx.start()
    try:
        rx.handle(json.dumps({"kind": "tcp", "log": "1", "direction": "outbound",
                              "service": "web", "peer": "kv", "upstream": "kv",
                              "upstream_addr": "-:-", "bytes_sent": "9"}).encode())
    finally:
        rx.stop()
    assert rx.counters() == {}
    (line,) = [json.loads(x) for x in log.read_text().splitlines()]
    assert line["kind"] == "tcp" and line["peer"] == "kv" and line["upstream_addr"] == ""


def test_haproxy_lines_of_failed_handshakes_count_per_inbound(tmp_path: Path) -> None:
    """HAProxy logs a connection that failed before its first request in its own
    format, naming the frontend and the bind (the inbound's service)."""
    rx = Receiver(tmp_path / "t.sock", None, count_tcp=False, lines=embryonic_counters)
    sent = [
        "198.18.0.3:41234 [07/Dec/2026:01:09:41.423] in_db-h3/db: SSL handshake failure\n",
        "198.18.0.3:41236 [07/Dec/2026:01:09:42.212] in_db-h3/db: SSL client certificate "
        "not trusted\n",
        "198.18.0.3:41238 [07/Dec/2026:01:09:43.001] in_kv-h3/kv: SSL client CA chain "
        "cannot be verified\n",
        # a TCP health check: closed before any handshake, no failure
        "127.0.0.1:50000 [07/Dec/2026:01:09:44.000] in_db-h3/db: Connection closed during "
        "SSL handshake\n",
        'meshctl: denied connection from 198.18.0.3:41240 to kv: caller "web": no\n',
    ]
    for line in sent:
        rx.handle(line.encode())
    rx.handle(b"in_db-h3/db: SSL handshake failure")  # not HAProxy's line: refused
    rx.handle(b"1.2.3.4:5 [x] out_9001/1: SSL handshake failure")  # not an inbound's
    assert rx.counters() == {"x|inbound|db|||||": 2, "x|inbound|kv|||||": 1}
    assert rx.received == len(sent) and rx.bad == 2
