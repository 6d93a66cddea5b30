"""Spans of the sidecars' sampled requests, exported over OTLP by the agent.

A sidecar sends one record per request of a sampled trace (meshctl/telemetry.py);
each becomes one span with the ids the sidecar chose, so the spans of one
request on every host join into one trace: the caller's outbound is a CLIENT
span, the callee's inbound a SERVER span, and an app that forwards
``traceparent`` puts its own spans (and its outbound calls) under the server
span. Attributes follow OpenTelemetry's HTTP semantic conventions, plus the
mesh's identity of the peer (``meshctl.peer``). ``span_of`` is pure.
"""

from __future__ import annotations

import logging
from functools import cache

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

import meshctl

log = logging.getLogger("meshctl.tracing")

SCOPE = InstrumentationScope("meshctl.sidecar", meshctl.__version__)


@cache
def _resource(service: str, node: str) -> Resource:
    return Resource.create({"service.name": service, "host.name": node,
                            "meshctl.component": "sidecar"})


def _hex(value: str, width: int) -> int | None:
    if len(value) != width:
        return None
    try:
        n = int(value, 16)
    except ValueError:
        return None
    return n or None


def span_of(record: dict[str, str], node: str) -> ReadableSpan | None:
    """The span of one sidecar record, or None when its ids or times do not parse."""
    trace_id, span_id = _hex(record["trace_id"], 32), _hex(record["span_id"], 16)
    if trace_id is None or span_id is None:
        return None
    try:
        start, duration = float(record["start"]), float(record["duration"])
        status = int(record["status"] or 0)
    except ValueError:
        return None
    parent_id = _hex(record["parent_id"], 16) if record["parent_id"] else None
    flags = TraceFlags(TraceFlags.SAMPLED)
    context = SpanContext(trace_id, span_id, is_remote=False, trace_flags=flags)
    parent = (SpanContext(trace_id, parent_id, is_remote=True, trace_flags=flags)
              if parent_id else None)
    outbound = record["direction"] == "outbound"
    method = record["method"] or "GET"
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "url.path": record["path"],
        "http.response.status_code": status,
        "meshctl.direction": record["direction"],
        "meshctl.peer": record["peer"],
    }
    if outbound:
        attributes["server.address"] = record["upstream"]
        attributes["meshctl.upstream"] = record["upstream"]
        if record["route"]:
            attributes["meshctl.route"] = record["route"]
    if record["upstream_addr"]:
        attributes["network.peer.address"] = record["upstream_addr"].split(",")[-1].strip()
    if record["intention"]:
        attributes["meshctl.intention"] = record["intention"]
    # Semantic conventions: a 5xx is an error on both sides, a 4xx only on the client's.
    error = status >= 500 or (outbound and status >= 400) or status == 0
    start_ns = int(start * 1e9)
    return ReadableSpan(
        name=method,
        context=context,
        parent=parent,
        resource=_resource(record["service"], node),
        attributes=attributes,
        kind=SpanKind.CLIENT if outbound else SpanKind.SERVER,
        status=Status(StatusCode.ERROR) if error else Status(StatusCode.UNSET),
        start_time=start_ns,
        end_time=start_ns + int(duration * 1e9),
        instrumentation_scope=SCOPE,
    )


class SpanExporter:
    """Batches the sidecars' spans to an OTLP/HTTP endpoint (a thread of the SDK's)."""

    def __init__(self, endpoint: str, node: str) -> None:
        self.node = node
        self.bad = 0
        self._processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint),
                                             schedule_delay_millis=500)

    def __call__(self, record: dict[str, str]) -> None:
        span = span_of(record, self.node)
        if span is None:
            self.bad += 1
            return
        self._processor.on_end(span)

    def shutdown(self) -> None:
        self._processor.shutdown()  # type: ignore[no-untyped-call]
