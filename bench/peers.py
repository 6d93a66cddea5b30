"""The peers the meshctl pair is measured against, in the same lab as the pair.

    plain:   h1 nginx 127.0.0.1:9200 ── HTTP ──► h2 nginx :9201 ──► backend :8080
             (no TLS, no Lua; the sidecars' worker, keep-alive and listener settings)
    consul:  h1 `consul connect proxy` 127.0.0.1:9300 ── mTLS (Consul's CA) ──►
             h2 `consul connect proxy` :21500 ──► backend :8080
    consul-template: h1 nginx 127.0.0.1:9400 ── HTTP ──► the healthy ``fast``
             instances, rendered by consul-template from Consul's health API and
             applied by ``nginx -s reload`` (the classic consul-template + nginx setup)

Plus :class:`ProxyMeter`, which reads the CPU time and resident memory of the
proxy processes of a path from /proc (both ends of a pair together).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bench.deploy import nginx_head
from meshctl.lab import Host, require_program
from meshctl.lab.mesh import MeshHost, wait_until

PLAIN_CLIENT_PORT = 9200
PLAIN_SERVER_PORT = 9201
CONSUL_CLIENT_PORT = 9300
CONSUL_SERVER_PORT = 21500
CT_PORT = 9400
CONSUL_SERVICE = "fast-builtin"
CONSUL_CLIENT = "client-builtin"


def _nginx_prefix(host: Host, name: str) -> Path:
    prefix = host.workdir / name
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    return prefix


def plain_proxy_config(listen: str, upstream_block: str, prefix: str, pool: int,
                       error_level: str = "warn") -> str:
    """nginx.conf of a plain (no TLS, no Lua) proxy with the sidecars' settings.

    One worker, 4096 worker connections, ``reuseport``, no access log, HTTP/1.1
    keep-alive to the upstream with a pool of ``pool`` idle connections that
    are never retired (as the meshctl sidecars' upstream blocks).
    ``upstream_block`` is the body of the upstream block (its server lines).
    """
    return nginx_head(prefix, error_level) + f"""\
    upstream next {{
{upstream_block}
        keepalive {pool};
        keepalive_timeout 60s;
        keepalive_requests 1000000;
    }}
    server {{
        listen {listen} reuseport;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://next;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}
}}
"""


def _spawn_nginx(host: Host, name: str, text: str) -> Path:
    nginx = require_program("nginx")
    prefix = _nginx_prefix(host, name)
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    host.spawn([nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
               name)
    return prefix


def _wait_answer(mh: MeshHost, port: int, what: str, timeout: float = 30.0) -> None:
    def ok() -> bool:
        status, _ = mh.get(port, "/", timeout=3.0)
        return bool(status == 200)

    wait_until(f"{what} to answer on 127.0.0.1:{port} in {mh.name}", ok, timeout=timeout)


@dataclass
class Peers:
    """The peer paths of one lab (started by :meth:`start`), with their process ids."""

    h1: MeshHost
    h2: MeshHost
    h3: MeshHost
    pool: int
    pids: dict[str, list[int]] = field(default_factory=dict)
    ct_prefix: Path | None = None

    def start_plain(self) -> None:
        """The plain nginx pair h1 → h2 → backend."""
        _spawn_nginx(self.h2.host, "bench-plain", plain_proxy_config(
            f"{self.h2.ip}:{PLAIN_SERVER_PORT}", "        server 127.0.0.1:8080;",
            str(_nginx_prefix(self.h2.host, "bench-plain")), self.pool))
        self.h2.host.wait_tcp(PLAIN_SERVER_PORT, ip=self.h2.ip)
        _spawn_nginx(self.h1.host, "bench-plain", plain_proxy_config(
            f"127.0.0.1:{PLAIN_CLIENT_PORT}", f"        server {self.h2.ip}:{PLAIN_SERVER_PORT};",
            str(_nginx_prefix(self.h1.host, "bench-plain")), self.pool))
        self.h1.host.wait_tcp(PLAIN_CLIENT_PORT)
        _wait_answer(self.h1, PLAIN_CLIENT_PORT, "the plain nginx pair")
        self.pids["plain"] = [self.h1.host.procs["bench-plain"].pid,
                              self.h2.host.procs["bench-plain"].pid]

    def start_consul(self) -> None:
        """Consul's built-in Connect proxy pair (certificates from Consul's own CA)."""
        consul = require_program("consul")
        self.h2.host.spawn([consul, "connect", "proxy", "-service", CONSUL_SERVICE,
                            "-service-addr", "127.0.0.1:8080",
                            "-listen", f"{self.h2.ip}:{CONSUL_SERVER_PORT}", "-register",
                            "-log-level", "warn"], "bench-consul-proxy")
        self.h1.host.spawn([consul, "connect", "proxy", "-service", CONSUL_CLIENT,
                            "-upstream", f"{CONSUL_SERVICE}:{CONSUL_CLIENT_PORT}",
                            "-log-level", "warn"], "bench-consul-proxy")
        _wait_answer(self.h1, CONSUL_CLIENT_PORT, "the Consul Connect proxy pair", timeout=60)
        self.pids["consul"] = [self.h1.host.procs["bench-consul-proxy"].pid,
                               self.h2.host.procs["bench-consul-proxy"].pid]

    def start_consul_template(self, wait_min: float, wait_max: float) -> None:
        """consul-template + nginx in h1, over the healthy instances of ``fast``.

        consul-template's quiescence is set to the agents' (``wait_min``/``wait_max``),
        so that the two follow Consul with the same debounce.
        """
        ct = require_program("consul-template")
        nginx = require_program("nginx")
        host = self.h1.host
        prefix = _nginx_prefix(host, "bench-ct")
        upstreams = prefix / "upstream.inc"
        # Until consul-template renders, nothing answers (a down placeholder).
        upstreams.write_text("        server 127.0.0.1:1 down;\n")
        text = plain_proxy_config(f"127.0.0.1:{CT_PORT}", f"        include {upstreams};",
                                  str(prefix), self.pool, error_level="notice")
        conf = prefix / "nginx.conf"
        conf.write_text(text)
        host.spawn([nginx, "-p", str(prefix), "-e", str(prefix / "error.log"),
                    "-c", str(conf)], "bench-ct-nginx")
        host.wait_tcp(CT_PORT)
        tmpl = prefix / "upstream.ctmpl"
        tmpl.write_text('{{ range service "fast" }}        server {{ .Address }}:{{ .Port }};\n'
                        '{{ else }}        server 127.0.0.1:1 down;\n{{ end }}')
        # A reload as an argument list (consul-template runs it without a shell).
        reload = json.dumps([nginx, "-p", str(prefix), "-e", str(prefix / "error.log"),
                             "-c", str(conf), "-s", "reload"])
        hcl = prefix / "consul-template.hcl"
        hcl.write_text(f"""\
consul {{
  address = "127.0.0.1:8500"
}}
log_level = "warn"
wait {{
  min = "{int(wait_min * 1000)}ms"
  max = "{int(wait_max * 1000)}ms"
}}
template {{
  source      = "{tmpl}"
  destination = "{upstreams}"
  command     = {reload}
}}
""")
        host.spawn([ct, "-config", str(hcl)], "bench-consul-template")
        self.ct_prefix = prefix
        _wait_answer(self.h1, CT_PORT, "consul-template's nginx")

    def stop(self) -> None:
        """Stop every peer process started here (the lab would, but only after a grace)."""
        for mh, name in ((self.h1, "bench-consul-template"), (self.h1, "bench-ct-nginx"),
                         (self.h1, "bench-consul-proxy"), (self.h2, "bench-consul-proxy"),
                         (self.h1, "bench-plain"), (self.h2, "bench-plain")):
            proc = mh.host.procs.get(name)
            if proc is not None and proc.alive():
                proc.stop(timeout=5.0)

    def ct_reloads(self) -> int:
        """How many times consul-template's nginx reloaded (its master logs each)."""
        if self.ct_prefix is None:
            return 0
        try:
            text = (self.ct_prefix / "error.log").read_text(errors="replace")
        except OSError:
            return 0
        return text.count("reconfiguring")


# ---------------------------------------------------------------- CPU and memory


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(roots: Iterable[int]) -> list[int]:
    """``roots`` and all their descendants that are alive now."""
    kids = _children()
    out: list[int] = []
    todo = [p for p in roots if Path(f"/proc/{p}").exists()]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return sorted(set(out))


def pids_with(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (the sidecars: their -p / -f path)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if marker in cmd and ("nginx" in cmd or "haproxy" in cmd):
            out.append(int(entry))
    return out


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime and stime: fields 14 and 15 of stat, 12 and 13 after the ")".
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class ProxyMeter:
    """CPU seconds and RSS of the proxy processes of one path, over one load run."""

    def __init__(self, roots: Callable[[], list[int]]) -> None:
        self.roots = roots
        self._start: dict[int, float] = {}

    def start(self) -> None:
        self._start = {p: _cpu_s(p) for p in process_tree(self.roots())}

    def stop(self, requests: int) -> dict[str, float | int]:
        """CPU used since :meth:`start` (processes that ended meanwhile are not counted)."""
        pids = process_tree(self.roots())
        cpu = sum(_cpu_s(p) - self._start.get(p, 0.0) for p in pids)
        rss = sum(_rss_mb(p) for p in pids)
        return {
            "processes": len(pids),
            "cpu_s": cpu,
            "cpu_us_per_request": cpu * 1e6 / requests if requests > 0 else 0.0,
            "rss_mb": rss,
        }

