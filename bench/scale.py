"""The scale scenario: one host with many upstreams against stock Consul agents.

    python -m bench.scale [--upstreams 1000] [--driver nginx] [--idle 30]
                          [--out DIR] [--keep-logs]

On a fresh 3-host lab (needs root; talks only to lab namespaces), with Consul
agents in their stock configuration (``limits.http_max_conns_per_client`` 200):

    h1: client ── N upstreams svc0000 … → 127.0.0.1:25000+i, one meshctl agent
    h2, h3: 1-3 connect-proxy instances of every svcNNNN (TTL checks, passing),
            registered straight through their own Consul agents

Measured on h1's agent (from /proc, inside its namespace): the time from its
start until every upstream has all its endpoints applied; its connections to
the local Consul agent, threads and RSS once applied; its CPU over ``--idle``
seconds when nothing changes (and how many compiles ran meanwhile); the time a
structural change (a new upstream, a protocol change) takes to be applied and
an endpoint change (a new instance, a failed check) to be pushed, with the
apply action that carried it (``endpoints``: at run time, no reload). Also:
whether another client of h1's Consul agent still gets answers (the agent
must leave it most of the per-client allowance) and whether the agent's log
shows a ``429``.

Results: ``<out>/scale-<stamp>.{json,md}`` and ``scale-latest.*``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from meshctl._fs import write_atomic
from meshctl.config import AgentConfig
from meshctl.lab import Host, Lab
from meshctl.lab.mesh import Mesh, MeshHost, wait_until

CLIENT = "client"
CLIENT_PORT = 8081
#: clear of the agent's sidecar port range (21000-21255) and below Linux's ephemeral
#: ports (32768-60999): an outgoing connection of h1's (the agent's to Consul) could
#: otherwise hold 127.0.0.1:<bind port> and make nginx refuse the config (seen at 40076)
FIRST_BIND_PORT = 25000
CONSUL_PORT = 8500
STOCK_CONNS_PER_CLIENT = 200  # Consul's limits.http_max_conns_per_client default

#: the issue's 1,000-upstream figures with the previous watcher (thread + connection per key)
BASELINE = {"connections": 3004, "threads": 3008, "rss_mb": 295, "idle_cpu_pct": 21.0,
            "start_to_applied_s": 18.0, "structural_change_s": 3.3}
#: agent settings the lab shortens for its tests, at the agent's defaults (meshctl.config)
AGENT_DEFAULTS = {f.name: f.default if isinstance(f.default, str) else f"{f.default:g}s"
                  for f in dataclasses.fields(AgentConfig)
                  if f.name in ("wait_min", "wait_max", "sync_interval", "sidecar_check_interval")}
TARGETS = {"rss_mb": 100.0, "idle_cpu_pct": 1.0, "start_to_applied_s": 5.0,
           "structural_change_s": 1.0, "endpoint_change_s": 0.2}


def say(msg: str) -> None:
    print(f"[bench.scale] {msg}", file=sys.stderr, flush=True)


def service(i: int) -> str:
    return f"svc{i:04d}"


def instances(i: int) -> int:
    """How many instances ``svc<i>`` has: 1, 2 or 3."""
    return 1 + i % 3


def instance_host(k: int) -> str:
    return "h2" if k % 2 == 0 else "h3"


def sidecar(i: int, k: int, ip: str, *, check_status: str = "passing") -> dict[str, Any]:
    """Agent registration of instance ``k`` of ``svc<i>``: connect-capable, with a TTL check.

    Registered as Connect-native, which ``/v1/health/connect`` lists like a
    sidecar: a ``connect-proxy`` registration would make h2's and h3's Consul
    agents run a proxy configuration (xDS state, leaf certificates) for each of
    the 2,000 instances, load that has nothing to do with the host measured.
    """
    name = service(i)
    sid = f"{name}-{k}"
    return {
        "ID": sid, "Name": name, "Address": ip, "Port": 21000 + i * 3 + k,
        "Connect": {"Native": True},
        "Check": {"CheckID": f"ttl-{sid}", "Name": "scale TTL", "TTL": "24h",
                  "Status": check_status},
    }


def _put_all(payloads: list[tuple[str, dict[str, Any] | None]]) -> None:
    """PUT each (path, body) to the local Consul agent over one keep-alive connection."""
    import requests

    with requests.Session() as s:
        s.trust_env = False
        for path, body in payloads:
            r = s.put(f"http://127.0.0.1:{CONSUL_PORT}{path}", json=body, timeout=120)
            r.raise_for_status()


def register(host: Host, payloads: list[tuple[str, dict[str, Any] | None]]) -> None:
    host.call(_put_all, payloads)


def register_instances(lab: Lab, upstreams: int) -> int:
    """Register every instance of svc0000 … svc<upstreams> (and one spare); returns the count."""
    by_host: dict[str, list[tuple[str, dict[str, Any] | None]]] = {"h2": [], "h3": []}
    for i in range(upstreams + 1):  # the last one is the upstream the structural change adds
        for k in range(instances(i)):
            h = instance_host(k)
            by_host[h].append(("/v1/agent/service/register", sidecar(i, k, lab.host(h).ip)))
    # Two connections per host at once: more only queues in a loaded Consul agent.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(register, lab.host(h), payloads[n::2])
                for h, payloads in by_host.items() for n in range(2)]
        for job in jobs:
            job.result()
    return sum(len(p) for p in by_host.values())


def client_definition(upstreams: int) -> dict[str, Any]:
    ups = [{"destination_name": service(i), "local_bind_port": FIRST_BIND_PORT + i}
           for i in range(upstreams)]
    return {"name": CLIENT, "port": CLIENT_PORT,
            "connect": {"sidecar_service": {"proxy": {"upstreams": ups}}}}


# ---------------------------------------------------------------- the agent from /proc


def _sockets(pid: int) -> set[str]:
    out: set[str] = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def consul_connections(pid: int) -> int:
    """Established TCP connections of ``pid`` to 127.0.0.1:8500 (its namespace's table).

    Counted by socket inode: the kernel builds ``/proc/net/tcp`` in pieces and
    repeats lines when sockets come and go meanwhile (nginx binding a thousand
    listeners, say), which read once showed 116 "connections" where 29 were.
    """
    inodes = _sockets(pid)
    want = f"0100007F:{CONSUL_PORT:04X}"
    seen: set[str] = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[2] == want and cols[3] == "01" and cols[9] in inodes:
            seen.add(cols[9])
    return len(seen)


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_facts(pid: int) -> dict[str, Any]:
    return {"connections": consul_connections(pid), "threads": threads(pid),
            "rss_mb": round(rss_mb(pid), 1)}


# ---------------------------------------------------------------- the scenario


class Scale:
    """One scale run on ``lab``: deploy, then measure (each step returns its figures)."""

    def __init__(self, lab: Lab, driver: str, upstreams: int) -> None:
        self.lab = lab
        self.upstreams = upstreams
        self.mesh = Mesh(lab, driver)
        self.h1: MeshHost = self.mesh["h1"]
        self.peak: dict[str, Any] = {"connections": 0, "threads": 0}
        self.added = 0

    @property
    def pid(self) -> int:
        proc = self.h1.agent
        assert proc is not None
        return proc.pid

    def expected(self) -> dict[str, int]:
        return {service(i): instances(i) for i in range(self.upstreams)}

    def applied(self, expected: dict[str, int]) -> bool:
        """Every expected upstream is in h1's status with all its endpoints."""
        st = self.h1.status() or {}
        got = {u["destination"]: len(u["endpoints"]) for u in st.get("upstreams", [])}
        return all(got.get(name) == n for name, n in expected.items())

    def _sample(self) -> None:
        try:
            conns, th = consul_connections(self.pid), threads(self.pid)
        except OSError:
            return
        self.peak["connections"] = max(self.peak["connections"], conns)
        self.peak["threads"] = max(self.peak["threads"], th)

    def _wait(self, what: str, check: Callable[[], bool], timeout: float) -> float:
        """Seconds until ``check()`` holds, sampling the agent's connections meanwhile."""
        t0 = time.monotonic()

        def probe() -> bool:
            self._sample()
            return check()

        wait_until(what, probe, timeout=timeout)
        return time.monotonic() - t0

    def deploy(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self.mesh.setup_vault({"h1": [CLIENT]})
        n = register_instances(self.lab, self.upstreams)
        say(f"{n} instances of {self.upstreams + 1} services registered "
            f"({time.monotonic() - t0:.1f}s)")
        wait_until("the catalog to hold every instance",
                   lambda: len(self.h1.host.consul().health.connect(
                       service(self.upstreams - 1))[1]) == instances(self.upstreams - 1),
                   timeout=60)
        # http everywhere: endpoint changes of http upstreams are pushed at run time by
        # both drivers (nginx renders tcp upstreams' endpoints into its stream config).
        self.h1.host.consul().config.set("proxy-defaults", "global",
                                         {"Config": {"protocol": "http"}})
        self.h1.add_service(client_definition(self.upstreams), "client.json")
        # The agent's own defaults for what the figures depend on, not the lab's
        # quicker test settings: what an operator who sets nothing gets.
        self.h1.write_config(**AGENT_DEFAULTS)
        return {"instances": n}

    def start(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self.h1.start_agent(wait=False, log_level=os.environ.get("SCALE_LOG_LEVEL", "info"))
        expected = self.expected()
        elapsed = self._wait("every upstream applied with its endpoints",
                             lambda: self.applied(expected), timeout=300)
        say(f"all {self.upstreams} upstreams applied {elapsed:.2f}s after the start "
            f"({time.monotonic() - t0:.2f}s)")
        return {"start_to_applied_s": round(elapsed, 3), **process_facts(self.pid)}

    def others_served(self, calls: int = 20) -> dict[str, int]:
        """Plain API calls of another client of h1's Consul agent while meshctl runs."""
        ok = failed = 0
        consul = self.h1.host.consul()
        for _ in range(calls):
            try:
                consul.catalog.datacenters()
                ok += 1
            except Exception:
                failed += 1
        return {"ok": ok, "failed": failed}

    def idle(self, seconds: float) -> dict[str, Any]:
        log = self.h1.agent.log_path if self.h1.agent else None
        applies_before = _count(log, "proxy ")
        c0, t0 = cpu_seconds(self.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_seconds(self.pid), time.monotonic()
        return {"seconds": round(t1 - t0, 1), "cpu_pct": round(100 * (c1 - c0) / (t1 - t0), 2),
                "applies": _count(log, "proxy ") - applies_before, **process_facts(self.pid)}

    def add_upstream(self) -> dict[str, Any]:
        """A structural change: one more upstream in the definition."""
        self.upstreams += 1
        t0 = time.monotonic()
        self.h1.add_service(client_definition(self.upstreams), "client.json")
        name = service(self.upstreams - 1)
        elapsed = self._wait(f"{name} applied",
                             lambda: len(self.h1.endpoints(name)) == instances(self.upstreams - 1),
                             timeout=180)
        return {"seconds": round(elapsed, 3), "action": self._last_action(), "since": t0}

    def protocol_change(self, i: int) -> dict[str, Any]:
        """A structural change from Consul: ``svc<i>`` becomes a tcp service."""
        name = service(i)
        consul = self.h1.host.consul()
        consul.config.set("service-defaults", name, {"Protocol": "tcp"})

        def tcp() -> bool:
            return any(u["destination"] == name and u["protocol"] == "tcp"
                       for u in (self.h1.status() or {}).get("upstreams", []))

        elapsed = self._wait(f"{name} to turn tcp", tcp, timeout=180)
        return {"seconds": round(elapsed, 3), "action": self._last_action()}

    def new_instance(self, i: int) -> dict[str, Any]:
        """An endpoint change: one more instance of ``svc<i>`` (on h3)."""
        self.added += 1
        k = instances(i) + 10 * self.added  # a new instance id every time
        h3 = self.lab.host("h3")
        before = len(self.h1.endpoints(service(i)))
        register(h3, [("/v1/agent/service/register", sidecar(i, k, h3.ip))])
        elapsed = self._wait(f"the new instance of {service(i)}",
                             lambda: len(self.h1.endpoints(service(i))) == before + 1,
                             timeout=120)
        return {"seconds": round(elapsed, 3), "action": self._last_action()}

    def fail_instance(self, i: int) -> dict[str, Any]:
        """An endpoint change: instance 0 of ``svc<i>`` fails its TTL check (on h2)."""
        before = len(self.h1.endpoints(service(i)))
        register(self.lab.host(instance_host(0)),
                 [(f"/v1/agent/check/fail/ttl-{service(i)}-0", None)])
        elapsed = self._wait(f"the failed instance of {service(i)} to go",
                             lambda: len(self.h1.endpoints(service(i))) == before - 1,
                             timeout=120)
        return {"seconds": round(elapsed, 3), "action": self._last_action()}

    def _last_action(self) -> str:
        return str(((self.h1.status() or {}).get("last_apply") or {}).get("action", ""))

    def agent_log_has_429(self) -> int:
        proc = self.h1.agent
        return _count(proc.log_path if proc else None, "too many concurrent connections")


def _count(path: Path | None, needle: str) -> int:
    if path is None or not path.exists():
        return 0
    return sum(1 for line in path.read_text(errors="replace").splitlines() if needle in line)


def run_scale(lab: Lab, driver: str, upstreams: int, idle: float) -> dict[str, Any]:
    """The whole scenario on ``lab``; returns the figures (see the module doc)."""
    sc = Scale(lab, driver, upstreams)
    result: dict[str, Any] = {"driver": driver, "upstreams": upstreams,
                              "stock_conns_per_client": STOCK_CONNS_PER_CLIENT}
    result["deploy"] = sc.deploy()
    result["start"] = sc.start()
    result["others_while_running"] = sc.others_served()
    if idle > 0:
        result["idle"] = sc.idle(idle)
    say(f"idle: {result.get('idle')}")
    # One change through a blocking slot (svc0001 sorts among the first keys) and
    # one through the aggregate feed (the last upstreams overflow the budget).
    # (With fewer upstreams than the budget, every change goes through a slot.)
    late = max(upstreams - 2, 1)
    result["changes"] = {
        "new_instance_slot": sc.new_instance(1 % upstreams),
        "new_instance_feed": sc.new_instance(late % upstreams),
        "failed_check_feed": sc.fail_instance(max(late - 1, 0)),
        "add_upstream": sc.add_upstream(),
        "protocol_change": sc.protocol_change(max(late - 3, 0)),
    }
    for change in result["changes"].values():
        change.pop("since", None)
    say(f"changes: {result['changes']}")
    result["peak"] = dict(sc.peak)
    result["after"] = process_facts(sc.pid)
    result["log_429_lines"] = sc.agent_log_has_429()
    sc.mesh.stop()
    return result


# ---------------------------------------------------------------- report


def targets_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    ch = result["changes"]
    rows = [
        ("connections to Consul (peak)", result["peak"]["connections"], "<= 40 (20% of 200)",
         result["peak"]["connections"] <= 40),
        ("RSS after changes, MB", result["after"]["rss_mb"], f"<= {TARGETS['rss_mb']:g}",
         result["after"]["rss_mb"] <= TARGETS["rss_mb"]),
        ("CPU idle, % of a core", result["idle"]["cpu_pct"], f"<= {TARGETS['idle_cpu_pct']:g}",
         result["idle"]["cpu_pct"] <= TARGETS["idle_cpu_pct"]),
        ("start to all applied, s", result["start"]["start_to_applied_s"],
         f"<= {TARGETS['start_to_applied_s']:g}",
         result["start"]["start_to_applied_s"] <= TARGETS["start_to_applied_s"]),
    ]
    for name in ("add_upstream", "protocol_change"):
        rows.append((f"structural change ({name}), s", ch[name]["seconds"],
                     f"<= {TARGETS['structural_change_s']:g}",
                     ch[name]["seconds"] <= TARGETS["structural_change_s"]))
    for name in ("new_instance_slot", "new_instance_feed", "failed_check_feed"):
        rows.append((f"endpoint change ({name}), s, action {ch[name]['action']}",
                     ch[name]["seconds"], f"<= {TARGETS['endpoint_change_s']:g}, endpoints",
                     ch[name]["seconds"] <= TARGETS["endpoint_change_s"]
                     and ch[name]["action"] == "endpoints"))
    return [{"what": w, "value": v, "target": t, "met": m} for w, v, t, m in rows]


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"# meshctl scale scenario — {result['stamp']}",
        "",
        f"{result['upstreams']} upstreams (1-3 instances each) on one host, {result['driver']}, "
        f"stock Consul {m['versions']['consul']} agents "
        f"({STOCK_CONNS_PER_CLIENT} connections per client).",
        f"Machine: {m['cores']} cores, load {m['loadavg_start']} → {m['loadavg_end']}.",
        "Agent settings: the defaults ("
        + ", ".join(f"{k} {v}" for k, v in AGENT_DEFAULTS.items()) + ").",
        "",
        "| figure | measured | target | met | before (issue 11) |",
        "| --- | --- | --- | --- | --- |",
    ]
    before = {"connections to Consul (peak)": BASELINE["connections"],
              "RSS after changes, MB": BASELINE["rss_mb"],
              "CPU idle, % of a core": BASELINE["idle_cpu_pct"],
              "start to all applied, s": BASELINE["start_to_applied_s"],
              "structural change (add_upstream), s": BASELINE["structural_change_s"]}
    for t in result["targets"]:
        lines.append(f"| {t['what']} | {t['value']} | {t['target']} | "
                     f"{'yes' if t['met'] else 'NO'} | {before.get(t['what'], '')} |")
    st, idle = result["start"], result["idle"]
    lines += [
        "",
        f"Once applied: {st['connections']} connections, {st['threads']} threads, "
        f"{st['rss_mb']} MB. Peak over the run: {result['peak']['connections']} connections, "
        f"{result['peak']['threads']} threads.",
        f"Idle {idle['seconds']} s: {idle['cpu_pct']} % of a core, {idle['applies']} applies.",
        f"Another client of the same Consul agent meanwhile: "
        f"{result['others_while_running']['ok']} answered, "
        f"{result['others_while_running']['failed']} refused; agent log lines with 429: "
        f"{result['log_429_lines']}.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstreams", type=int, default=1000)
    p.add_argument("--driver", default="nginx", choices=("nginx", "haproxy"))
    p.add_argument("--idle", type=float, default=30.0, help="seconds of idle measurement")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--keep-logs", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from bench.run import machine_facts

    args = parse_args(argv)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    machine = machine_facts()
    with Lab(hosts=3, keep_logs=args.keep_logs, progress=say) as lab:
        result = run_scale(lab, args.driver, args.upstreams, args.idle)
    machine["loadavg_end"] = list(os.getloadavg())
    result.update(stamp=stamp, machine=machine)
    result["targets"] = targets_of(result)
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    md = markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, body in ((f"scale-{stamp}.json", text), (f"scale-{stamp}.md", md),
                       ("scale-latest.json", text), ("scale-latest.md", md)):
        write_atomic(args.out / name, body.encode(), 0o644)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
