"""The mesh demo (``make demo``): web on h1 calls api on h2 and h3 through the mesh.

Steps, each printed as it happens:
  1. requests alternate between the two api instances, over mutual TLS, and
     api sees the verified caller identity ``web``;
  2. a client without a mesh certificate is refused at api's inbound port;
  3. api's health check fails on h2: traffic moves to h3 (time measured);
  4. the check passes again: traffic alternates again.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

from meshctl.lab._lab import Lab
from meshctl.lab.demo import describe, table
from meshctl.lab.mesh import Mesh, wait_until

API_PORT = 9001


def _say(text: str = "") -> None:
    print(text, flush=True)


def _step(n: int, text: str) -> None:
    _say()
    _say(f"== step {n}: {text}")


def _calls(mesh: Mesh, n: int) -> list[tuple[int, str, str, str]]:
    rows = []
    for i in range(1, n + 1):
        status, body = mesh["h1"].get(API_PORT, "/hello")
        b: dict[str, Any] = body if isinstance(body, dict) else {}
        rows.append((i, str(status), str(b.get("host", body)), str(b.get("caller", ""))))
    return rows


def _show_calls(mesh: Mesh, n: int = 6) -> None:
    _say(table(("#", "STATUS", "ANSWERED BY", "CALLER SEEN BY API"), _calls(mesh, n)))


def deploy(lab: Lab, proxy: str) -> Mesh:
    """Vault setup, services, apps and agents on h1..h3 (web → api)."""
    mesh = Mesh(lab, proxy)
    _say(f"setting up OpenBao: PKI mount, one role per service, one AppRole per host ({proxy})")
    mesh.setup_vault({"h1": ["web"], "h2": ["api"], "h3": ["api"]})
    lab.host("h1").consul().config.set("service-defaults", "api", {"Protocol": "http"})
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


def mesh_demo(lab: Lab, proxy: str = "nginx") -> None:
    """The whole walkthrough on a running lab."""
    _say(describe(lab))
    mesh = deploy(lab, proxy)
    h1, h2 = mesh["h1"], mesh["h2"]

    _step(1, "web (h1) calls api through its local sidecar 127.0.0.1:9001; mTLS to h2 and h3")
    _show_calls(mesh)

    _step(2, "a client without a mesh certificate at api's inbound port")
    _say(refused_without_certificate(mesh))

    _step(3, "api's health check fails on h2")
    h2.set_healthy("api", False)
    t0 = time.monotonic()
    wait_until("h2 to leave", lambda: len(h1.endpoints("api")) == 1, timeout=30)
    _say(
        f"h1's sidecar dropped h2 after {time.monotonic() - t0:.1f}s "
        "(Consul check interval 1s, then a blocking query and a config change)"
    )
    _show_calls(mesh)

    _step(4, "the check passes again")
    h2.set_healthy("api", True)
    t0 = time.monotonic()
    wait_until("h2 to come back", lambda: len(h1.endpoints("api")) == 2, timeout=30)
    _say(f"h2 is back after {time.monotonic() - t0:.1f}s")
    _show_calls(mesh)

    _say()
    _say("meshctl status on h1:")
    _say(h1.meshctl("status").stdout.rstrip())
    _say()
    _say("tearing down: agents deregister, the lab removes its namespaces and processes")
    mesh.stop()
