"""``meshctl routes SERVICE``: the compiled discovery chain as this host's sidecar serves it.

Reads the snapshot the agent last applied (its persisted last good state), so
what it prints is what the proxy does: for every local caller of SERVICE, the
routes in order (first match wins) with their match, the split between
clusters, timeouts and retries, then each cluster with its Consul target, load
balancing, failover and instances — like ``consul troubleshoot upstreams``,
but for meshctl's sidecar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from meshctl.cli._config import config_option, load_agent_config
from meshctl.cli._output import emit
from meshctl.errors import ConfigError
from meshctl.model import Cluster, HeaderOps, Route, Snapshot
from meshctl.snapshot_io import read_snapshot, read_state
from meshctl.tables import table


def _seconds(ms: int) -> str:
    if not ms:
        return ""
    return f"{ms / 1000:g}s" if ms % 1000 == 0 or ms >= 10000 else f"{ms}ms"


def describe_match(r: Route) -> str:
    """A route's match in a few words (``*`` matches everything)."""
    parts = []
    ci = " (any case)" if r.case_insensitive else ""
    if r.path_exact:
        parts.append(f"path = {r.path_exact}{ci}")
    elif r.path_regex:
        parts.append(f"path ~ {r.path_regex}{ci}")
    elif r.path_prefix and r.path_prefix != "/":
        parts.append(f"path prefix {r.path_prefix}{ci}")
    for h in r.headers:
        op = ("present" if h.kind == "present" else f"= {h.value!r}" if h.kind == "exact" else
              f"~ {h.value!r}" if h.kind == "regex" else f"{h.kind} {h.value!r}")
        parts.append(f"{'not ' if h.invert else ''}header {h.name} {op}")
    for q in r.query_params:
        op = "present" if q.present else f"= {q.exact!r}" if q.exact else f"~ {q.regex!r}"
        parts.append(f"query {q.name} {op}")
    if r.methods:
        parts.append("method " + "|".join(r.methods))
    return " and ".join(parts) or "*"


def describe_ops(prefix: str, ops: HeaderOps) -> list[str]:
    out = [f"{prefix} -{n}" for n in ops.remove]
    out += [f"{prefix} {n}={v!r}" for n, v in ops.set]
    out += [f"{prefix} +{n}={v!r}" for n, v in ops.add]
    return out


def cluster_label(c: Cluster) -> str:
    label = c.service + (f"/{c.subset}" if c.subset else "")
    return label + (f"@{c.datacenter}" if c.datacenter else "")


def describe_policy(r: Route, c: Cluster) -> str:
    parts = []
    if r.request_timeout_ms or c.request_timeout_ms:
        parts.append(f"request {_seconds(r.request_timeout_ms or c.request_timeout_ms)}")
    if r.idle_timeout_ms:
        parts.append(f"idle {_seconds(r.idle_timeout_ms)}")
    if r.num_retries:
        on = (["connect-failure"] if r.retry_on_connect_failure else []) + list(r.retry_on)
        on += [str(code) for code in r.retry_on_status_codes]
        parts.append(f"{r.num_retries} retries on {', '.join(on) or 'connect-failure'}")
    if r.prefix_rewrite:
        parts.append(f"rewrite to {r.prefix_rewrite}")
    parts += describe_ops("req", r.request_headers) + describe_ops("resp", r.response_headers)
    return "; ".join(parts)


def describe_lb(c: Cluster) -> str:
    if not c.hash_policies:
        return c.lb_policy
    keys = ["source ip" if h.source_ip else f"{h.field} {h.field_value}"
            for h in c.hash_policies]
    return f"{c.lb_policy}({', '.join(keys)})"


def render_routes(snapshot: Snapshot, service: str, caller: str | None,
                  warnings: list[str]) -> tuple[dict[str, Any], str]:
    """(JSON data, text) for the outbounds of ``snapshot`` to ``service``."""
    outs = [o for o in snapshot.outbounds
            if o.destination == service and (caller is None or o.caller == caller)]
    if not outs:
        known = ", ".join(sorted({o.destination for o in snapshot.outbounds})) or "none"
        raise ConfigError(f"no local service calls {service!r} on node {snapshot.node} "
                          f"(upstreams here: {known})")
    data: dict[str, Any] = {"node": snapshot.node, "service": service, "outbounds": [],
                            "clusters": []}
    text: list[str] = []
    seen: dict[str, Cluster] = {}
    for o in outs:
        data["outbounds"].append({
            "caller": o.caller, "bind": f"{o.bind_address}:{o.bind_port}",
            "protocol": o.protocol,
            "routes": [_route_dict(r) for r in o.routes],
        })
        text.append(f"{o.caller} -> {o.destination}  listen {o.bind_address}:{o.bind_port}  "
                    f"{o.protocol}")
        rows = []
        for i, r in enumerate(o.routes, 1):
            for j, wc in enumerate(r.clusters):
                c = snapshot.cluster(wc.cluster)
                active = snapshot.active(c.id)
                dest = cluster_label(c)
                if active.id != c.id:
                    dest += f" (failing over to {cluster_label(active)})"
                policy = "; ".join(filter(None, [
                    describe_policy(r, c) if j == 0 else "",
                    *describe_ops("req", wc.request_headers),
                    *describe_ops("resp", wc.response_headers)]))
                rows.append([str(i) if j == 0 else "", describe_match(r) if j == 0 else "",
                             dest, f"{wc.weight:g}%", policy])
                todo = [c.id]
                while todo:
                    cc = snapshot.cluster(todo.pop(0))
                    if cc.id not in seen:
                        seen[cc.id] = cc
                        todo.extend(cc.failover)
        text += [table(["#", "match", "destination", "weight", "timeouts, retries, changes"],
                       rows), ""]
    crow = []
    for c in sorted(seen.values(), key=lambda c: c.id):
        eps = [f"{e.address}:{e.port} ({e.node or e.instance})" for e in c.endpoints]
        crow.append([cluster_label(c), c.target, describe_lb(c),
                     _seconds(c.connect_timeout_ms),
                     ", ".join(cluster_label(snapshot.cluster(f)) for f in c.failover),
                     " ".join(eps) or "(none healthy)"])
        data["clusters"].append({
            "id": c.id, "service": c.service, "subset": c.subset,
            "datacenter": c.datacenter, "target": c.target, "lb": describe_lb(c),
            "connect_timeout_ms": c.connect_timeout_ms,
            "request_timeout_ms": c.request_timeout_ms,
            "failover": list(c.failover),
            "endpoints": [{"address": e.address, "port": e.port, "node": e.node,
                           "instance": e.instance} for e in c.endpoints],
        })
    text.append(table(["cluster", "consul target", "load balancing", "connect", "failover",
                       "instances"], crow))
    mine = [w for w in warnings if f"-> {service}" in w or f"{service!r}" in w
            or w.startswith(f"{service}:")]
    data["warnings"] = mine
    if mine:
        text += ["", "warnings:"] + [f"  {w}" for w in mine]
    return data, "\n".join(text)


def _route_dict(r: Route) -> dict[str, Any]:
    from dataclasses import asdict

    d = asdict(r)
    d["match"] = describe_match(r)
    return d


@click.command()
@config_option
@click.argument("service")
@click.option("--caller", default=None, help="Only this local service's upstream.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def routes(config_path: Path | None, service: str, caller: str | None, as_json: bool) -> None:
    """How this host's sidecar routes requests to SERVICE (the compiled discovery chain)."""
    cfg = load_agent_config(config_path)
    snapshot = read_snapshot(cfg.snapshot_path)
    if snapshot is None:
        raise ConfigError(f"{cfg.snapshot_path}: no applied snapshot "
                          "(is `meshctl agent` running?)")
    try:
        state = read_state(cfg.state_path)
    except ConfigError:
        state = None  # the warnings are a nicety: the snapshot's own will do
    if state is not None:
        warnings = [str(w) for w in state.get("warnings", [])]
    else:
        warnings = list(snapshot.warnings)
    data, text = render_routes(snapshot, service, caller, warnings)
    emit(data, as_json, text)
