"""The mesh demo (``make demo``): web on h1 calls api on h2 and h3 through the mesh.

Steps, each printed as it happens:
  1. requests are balanced over the two api instances, over mutual TLS, and
     api sees the verified caller identity ``web`` (an intention allows
     web → api; everything else is denied by default);
  2. a client without a mesh certificate is refused at api's inbound port;
  3. api's health check fails on h2: traffic moves to h3 (time measured);
  4. the check passes again: both instances answer again;
  5. the intention is switched to deny: calls get 403 at api's sidecars, without
     a reload (time measured), and `meshctl intentions check` says why; then
     allowed again;
  6. what an operator sees of the traffic: ``meshctl top`` over the three
     hosts' metrics endpoints under a little load, and the service topology
     written by ``meshctl graph`` as DOT and SVG (GRAPH_DOT, GRAPH_SVG in the
     current directory).

Every step checks what it shows; one that does not hold stops the demo with a
message and exit status 1, so a broken mesh never looks like a working one.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from meshctl.errors import LabError
from meshctl.lab._lab import Lab
from meshctl.lab.mesh import Mesh, wait_until
from meshctl.lab.show import describe
from meshctl.tables import table

API_PORT = 9001
METRICS_PORT = 9466
GRAPH_DOT = Path("meshctl-demo-mesh.dot")
GRAPH_SVG = Path("meshctl-demo-mesh.svg")
ALLOW_WEB = {"Sources": [{"Name": "web", "Action": "allow"}]}
DENY_WEB = {"Sources": [{"Name": "web", "Action": "deny"}]}
Call = tuple[int, str, str, str]


class DemoFailed(LabError):
    """A demo step did not show what it claims."""


def _say(text: str = "") -> None:
    print(text, flush=True)


def _step(n: int, text: str) -> None:
    _say()
    _say(f"== step {n}: {text}")


def _calls(mesh: Mesh, n: int) -> list[Call]:
    rows = []
    for i in range(1, n + 1):
        status, body = mesh["h1"].get(API_PORT, "/hello")
        b: dict[str, Any] = body if isinstance(body, dict) else {}
        rows.append((i, str(status), str(b.get("host", body)).strip(), str(b.get("caller", ""))))
    return rows


def _show_calls(mesh: Mesh, n: int = 6) -> list[Call]:
    rows = _calls(mesh, n)
    _say(table(("#", "STATUS", "ANSWERED BY", "CALLER SEEN BY API"), rows))
    return rows


def expect_answers(step: int, rows: list[Call], hosts: set[str]) -> None:
    """Every call answered 200 by one of ``hosts``, all of them seen, caller ``web``."""
    bad = [r for r in rows if r[1] != "200" or r[2] not in hosts or r[3] != "web"]
    seen = {r[2] for r in rows}
    if bad or seen != hosts:
        raise DemoFailed(
            f"step {step}: expected 200s from {', '.join(sorted(hosts))} with caller web; "
            f"got {[(r[1], r[2], r[3]) for r in rows]}"
        )


def expect_denied(step: int, rows: list[Call]) -> None:
    bad = [r for r in rows if r[1] != "403"]
    if bad:
        raise DemoFailed(f"step {step}: expected every call denied (403); got {bad}")


def _set_intention(mesh: Mesh, entry: dict[str, Any]) -> None:
    mesh.lab.host("h1").consul().config.set("service-intentions", "api", entry)


def deploy(lab: Lab, proxy: str) -> Mesh:
    """Vault setup, services, apps and agents on h1..h3 (web → api)."""
    mesh = Mesh(lab, proxy)
    _say(f"setting up OpenBao: PKI mount, one role per service, one AppRole per host ({proxy})")
    mesh.setup_vault({"h1": ["web"], "h2": ["api"], "h3": ["api"]})
    lab.host("h1").consul().config.set("service-defaults", "api", {"Protocol": "http"})
    _say("intention: web → api allow (Consul service-intentions); all else denied by default")
    _set_intention(mesh, ALLOW_WEB)
    h1 = mesh["h1"]
    h1.add_service(
        {
            "name": "web",
            "port": 8080,
            "connect": {
                "sidecar_service": {
                    "proxy": {
                        "upstreams": [{"destination_name": "api", "local_bind_port": API_PORT}]
                    }
                }
            },
        }
    )
    h1.start_app("web", 8080)
    for name in ("h2", "h3"):
        mh = mesh[name]
        mh.add_service(
            {
                "name": "api",
                "id": f"api-{name}",
                "port": 8080,
                "check": {
                    "http": "http://127.0.0.1:8080/health",
                    "interval": "1s",
                    "timeout": "1s",
                },
            }
        )
        mh.start_app("api", 8080, version="v1")
    for name in ("h2", "h3", "h1"):
        _say(f"starting meshctl agent on {name}")
        # The metrics endpoint on the bridge, so `meshctl top` on h1 reads every host.
        mesh[name].write_config(metrics_address=f"{mesh[name].ip}:{METRICS_PORT}")
        mesh[name].start_agent()
    wait_until("web to see both api instances", lambda: len(h1.endpoints("api")) == 2, timeout=30)
    return mesh


def refused_without_certificate(mesh: Mesh) -> str:
    """What happens to a TLS client without a mesh certificate at api's inbound port."""
    h2 = mesh["h2"]
    port = next(s["sidecar_port"] for s in (h2.status() or {})["services"] if s["name"] == "api")

    def attempt() -> str:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            with (
                socket.create_connection((h2.ip, port), timeout=5) as raw,
                ctx.wrap_socket(raw) as tls,
            ):
                tls.sendall(b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
                reply = tls.recv(4096).decode("latin-1")
        except (ssl.SSLError, OSError) as exc:
            return f"refused in the TLS handshake ({exc.__class__.__name__})"
        first = reply.splitlines()[0] if reply else "connection closed"
        return f"refused: {first}"

    return f"{h2.ip}:{port} → " + mesh["h1"].host.call(attempt)


def reload_count(host: str, status: dict[str, Any] | None) -> int:
    """The proxy reload count in ``host``'s agent state (``meshctl status --json``).

    Raises DemoFailed when the state or its count cannot be read: a missing
    count must not compare equal to another missing count and pass for
    "no reloads".
    """
    reloads = ((status or {}).get("last_apply") or {}).get("reloads")
    if isinstance(reloads, bool) or not isinstance(reloads, int):
        raise DemoFailed(f"step 5: cannot read the proxy reload count on {host} "
                         f"(last_apply.reloads = {reloads!r})")
    return reloads


def _reloads(mesh: Mesh) -> dict[str, int]:
    """Reload counts of the api hosts' proxies, from ``meshctl status``."""
    return {name: reload_count(name, mesh[name].status()) for name in ("h2", "h3")}


def show_traffic(mesh: Mesh) -> None:
    """Step 6: ``meshctl top --once`` and ``meshctl graph`` while web calls api."""
    h1 = mesh["h1"]
    endpoints = [a for h in ("h1", "h2", "h3")
                 for a in ("--endpoint", f"{mesh[h].ip}:{METRICS_PORT}")]
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            h1.get(API_PORT, "/hello")
            time.sleep(0.02)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        time.sleep(1)
        top = h1.meshctl("top", "--once", "--interval", "2", *endpoints)
        graph = h1.meshctl("graph", "--interval", "2", "--out", str(GRAPH_DOT.resolve()),
                           "--svg", str(GRAPH_SVG.resolve()), *endpoints)
    finally:
        stop.set()
        loader.join()
    _say("$ meshctl top --once  (web calling api in a loop)")
    _say(top.stdout.rstrip())
    if top.returncode != 0 or "outbound" not in top.stdout or "inbound" not in top.stdout:
        raise DemoFailed(f"step 6: meshctl top showed no traffic: {top.stdout}{top.stderr}")
    if graph.returncode != 0 or '"web" -> "api"' not in GRAPH_DOT.read_text():
        raise DemoFailed(f"step 6: meshctl graph drew no web → api edge: {graph.stderr}")
    _say(f"meshctl graph wrote the topology to {GRAPH_DOT} and {GRAPH_SVG}:")
    _say(GRAPH_DOT.read_text().rstrip())


def mesh_demo(lab: Lab, proxy: str = "nginx") -> None:
    """The whole walkthrough on a running lab."""
    _say(describe(lab))
    mesh = deploy(lab, proxy)
    h1, h2 = mesh["h1"], mesh["h2"]

    _step(1, "web (h1) calls api through its local sidecar 127.0.0.1:9001; mTLS to h2 and h3")
    both = {"h2", "h3"}
    # The sidecars enforce the intention once their agents have read it from Consul.
    wait_until("api's sidecars to allow web", lambda: {r[1] for r in _calls(mesh, 2)} == {"200"})
    expect_answers(1, _show_calls(mesh), both)

    _step(2, "a client without a mesh certificate at api's inbound port")
    refusal = refused_without_certificate(mesh)
    _say(refusal)
    if "refused" not in refusal:
        raise DemoFailed(f"step 2: a client without a mesh certificate got in: {refusal}")

    _step(3, "api's health check fails on h2")
    h2.set_healthy("api", False)
    t0 = time.monotonic()
    wait_until("h2 to leave", lambda: len(h1.endpoints("api")) == 1, timeout=30)
    _say(
        f"h1's sidecar dropped h2 after {time.monotonic() - t0:.1f}s "
        "(Consul check interval 1s, then a blocking query and a config change)"
    )
    expect_answers(3, _show_calls(mesh), {"h3"})

    _step(4, "the check passes again")
    h2.set_healthy("api", True)
    t0 = time.monotonic()
    wait_until("h2 to come back", lambda: len(h1.endpoints("api")) == 2, timeout=30)
    _say(f"h2 is back after {time.monotonic() - t0:.1f}s")
    # A returning server may first catch up on its share: show calls once both answer.
    wait_until("both api instances to answer", lambda: {r[2] for r in _calls(mesh, 4)} == both)
    expect_answers(4, _show_calls(mesh), both)

    _step(5, "the intention web → api is switched to deny, then back to allow")
    reloads = _reloads(mesh)
    _set_intention(mesh, DENY_WEB)
    t0 = time.monotonic()
    wait_until("api's sidecars to deny web", lambda: all(r[1] == "403" for r in _calls(mesh, 4)))
    _say(f"api's sidecars deny web after {time.monotonic() - t0:.1f}s")
    denied = _show_calls(mesh, 2)
    expect_denied(5, denied)
    _say(h2.meshctl("intentions", "check", "web", "api").stdout.rstrip())
    _set_intention(mesh, ALLOW_WEB)
    t0 = time.monotonic()
    wait_until("web to be allowed again", lambda: {r[1] for r in _calls(mesh, 4)} == {"200"})
    _say(f"allowed again after {time.monotonic() - t0:.1f}s")
    expect_answers(5, _show_calls(mesh), both)
    after = _reloads(mesh)
    if after != reloads:
        raise DemoFailed(f"step 5: intention changes reloaded a proxy ({reloads} → {after})")
    counters = ", ".join(f"{k} {v}" for k, v in sorted(reloads.items()))
    _say(f"proxy reloads on h2 and h3 during step 5: none (reload counters {counters})")

    _step(6, "what the operator sees: meshctl top over the three hosts, and the topology")
    show_traffic(mesh)

    _say()
    _say("meshctl status on h1:")
    _say(h1.meshctl("status").stdout.rstrip())
    _say()
    _say("tearing down: agents stop, the lab removes its namespaces and processes")
    mesh.stop()
