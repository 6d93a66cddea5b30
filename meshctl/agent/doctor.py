"""``meshctl doctor``: what this host needs to serve, checked one by one, each with its fix.

Every check returns ``Check`` results (ok or not, what was found, and the fix
when not); a check that cannot run (Consul down for the permission check)
fails with the reason. Nothing is changed on the host: the proxy check
renders an empty config into a scratch directory and runs the proxy's own
validator on it (binary, modules, Lua libraries), then removes it.
"""

from __future__ import annotations

import email.utils
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hvac.adapters import RawAdapter

from meshctl.agent.certs import local_leaves
from meshctl.agent.parts import make_driver
from meshctl.agent.ports import port_unavailable
from meshctl.apply import Applier
from meshctl.config import AgentConfig, missing_files
from meshctl.consul.client import ConsulClient
from meshctl.consul.session import FAILURES
from meshctl.errors import MeshctlError
from meshctl.model import Snapshot, spiffe_id
from meshctl.services import ServiceDefinition, load_definitions
from meshctl.vault.client import VaultClient

#: a clock further off than this (s) from Consul's or Vault's is a failure:
#: certificates issued "in the future" and TTLs measured wrong follow from it
MAX_SKEW = 2.0


@dataclass(frozen=True)
class Check:
    """One finding: which check, ok or not, what was seen, and how to fix it."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix}


def _fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, False, detail, fix)


def skew(date_header: str | None, local: float) -> float | None:
    """Seconds the local clock is ahead of a server's HTTP ``Date`` (None if absent)."""
    if not date_header:
        return None
    try:
        theirs = email.utils.parsedate_to_datetime(date_header).timestamp()
    except (TypeError, ValueError):
        return None
    return local - theirs


def _skew_check(name: str, date_header: str | None, sent: float, got: float) -> Check:
    # Date has a 1 s resolution and names the second the answer was made: compare
    # it with the middle of the exchange, and allow for the truncation.
    ahead = skew(date_header, (sent + got) / 2)
    if ahead is None:
        return _fail(name, "the answer had no Date header", "check the server's HTTP front")
    off = ahead - 0.5
    if abs(off) > MAX_SKEW + (got - sent):
        return _fail(name, f"this host's clock is {off:+.1f}s off the server's",
                     "run NTP (systemd-timesyncd or chrony) on this host and the servers")
    return Check(name, True, f"{off:+.1f}s")


def check_config(cfg: AgentConfig, where: str) -> tuple[list[Check], list[ServiceDefinition]]:
    """The agent config's files and the definitions of services.d."""
    out: list[Check] = []
    missing = missing_files(cfg, where)
    out.append(Check("config", True, f"{where}: valid") if not missing else
               _fail("config", "; ".join(missing), "create the files or fix the settings"))
    defs, problems = load_definitions(cfg.services_dir)
    if problems:
        out.append(_fail("definitions", "; ".join(str(p) for p in problems),
                         "fix the fields named (`meshctl validate DIR` lists them)"))
    else:
        out.append(Check("definitions", True, f"{len(defs)} service(s) in {cfg.services_dir}"))
    return out, defs


def check_consul(cfg: AgentConfig, defs: list[ServiceDefinition]) -> list[Check]:
    """Consul reachable, the token's rights, and the clock against Consul's."""
    consul = ConsulClient(cfg.consul, timeout=5.0)
    try:
        sent = time.time()
        try:
            resp = consul.api.http.session.get(f"{cfg.consul.addr.rstrip('/')}/v1/status/leader",
                                               timeout=5.0)
        except FAILURES as exc:
            return [_fail("consul", f"{cfg.consul.addr}: {type(exc).__name__}: {exc}"[:300],
                          "start the local Consul agent, or set consul.addr / CONSUL_HTTP_ADDR")]
        got = time.time()
        out = [Check("consul", True, f"{cfg.consul.addr} answers (leader {resp.text.strip()})")]
        out.append(_skew_check("clock (Consul)", resp.headers.get("Date"), sent, got))
        out.append(_consul_rights(consul, consul_rights_wanted(cfg, defs)))
        out.append(_local_health(consul, defs))
        return out
    finally:
        consul.close()


@dataclass(frozen=True)
class Right:
    """One permission the agent's Consul token needs, and the policy rule that grants it
    (the minimal agent policy of docs/security.md)."""

    resource: str  # Consul's ACL resource: service, node, agent
    segment: str
    access: str  # read or write
    rule: str

    def request(self) -> dict[str, str]:
        """As ``/v1/internal/acl/authorize`` takes it."""
        return {"Resource": self.resource, "Segment": self.segment, "Access": self.access}

    def __str__(self) -> str:
        return f"{self.resource}:{self.access} on {self.segment}"


def consul_rights_wanted(cfg: AgentConfig, defs: list[ServiceDefinition]) -> list[Right]:
    """What the agent does with its token, as permissions: register each local service
    and its sidecar (Consul checks ``service:write`` on both names; intentions:read
    comes with it), read the upstreams' health and discovery chains, see the nodes
    they run on (a token that may read no node sees no endpoint: Consul filters
    them out silently), and read its own agent for the advertise address (unless
    ``advertise_address`` is set). No local service: nothing to ask."""
    if not defs:
        return []
    out: list[Right] = []
    local = sorted({d.name for d in defs})
    for name in local:
        for n in (name, f"{name}-sidecar-proxy"):
            out.append(Right("service", n, "write", f'service "{n}" {{ policy = "write" }}'))
    for up in sorted({u.destination_name for d in defs for u in d.upstreams} - set(local)):
        out.append(Right("service", up, "read", 'service_prefix "" { policy = "read" }'))
    out.append(Right("node", cfg.node_name, "read", 'node_prefix "" { policy = "read" }'))
    if not cfg.advertise_address:
        out.append(Right("agent", cfg.node_name, "read",
                         f'agent "{cfg.node_name}" {{ policy = "read" }}'))
    return out


#: Consul answers at most this many authorizations per request
AUTHORIZE_BATCH = 64


def rights_check(wanted: list[Right], token_set: bool,
                 answers: list[tuple[int, str, Any]]) -> Check:
    """The "consul token" check from Consul's answers to ``/v1/internal/acl/authorize``
    for ``wanted`` (in batches of AUTHORIZE_BATCH): each answer is (HTTP status, body
    text, body as JSON or None).

    Consul 1.14 answers 401 "ACL support disabled" without ACLs, 403 "ACL not
    found" for a token it does not know, and 200 with one ``Allow`` per request,
    in order, echoing it; anything else is reported, never read as allowed.
    """
    name = "consul token"
    allowed: list[bool] = []
    for status, text, body in answers:
        if status == 401 and "disabled" in text:
            return Check(name, True, "Consul's ACLs are disabled: every request allowed")
        if status == 403:
            why = text.strip()[:120] or "no reason given"
            what = ("Consul does not know the token" if "not found" in why.lower()
                    else "Consul refused the token")
            return _fail(name, f"{what} (403: {why})",
                         "set consul.token / CONSUL_HTTP_TOKEN to a token of this host's "
                         "policy (`consul acl token read -self` with it shows whether Consul "
                         "knows it)")
        if status != 200:
            return _fail(name, f"authorize answered {status}: {text.strip()[:200]}",
                         "Consul 1.14 or later answers /v1/internal/acl/authorize")
        start = len(allowed)
        asked = wanted[start:start + AUTHORIZE_BATCH]
        if (not isinstance(body, list) or len(body) != len(asked)
                or not all(_answers(a, w) for a, w in zip(body, asked, strict=True))):
            return _fail(name, f"unexpected answer from authorize: {text.strip()[:200]}",
                         "Consul 1.14 or later answers /v1/internal/acl/authorize")
        allowed += [bool(a["Allow"]) for a in body]
    if len(allowed) != len(wanted):
        return _fail(name, f"authorize answered {len(allowed)} of {len(wanted)} permissions",
                     "Consul 1.14 or later answers /v1/internal/acl/authorize")
    denied = [w for w, ok in zip(wanted, allowed, strict=True) if not ok]
    if denied:
        who = ("no token is set, and Consul's anonymous token lacks " if not token_set
               else "the token lacks ")
        rules = "; ".join(dict.fromkeys(w.rule for w in denied))
        fix = (f"add to the host's Consul policy: {rules} (the whole minimal policy: "
               "docs/security.md)" if token_set else
               f"set consul.token / CONSUL_HTTP_TOKEN to this host's token; its policy: {rules}")
        return _fail(name, who + ", ".join(map(str, denied)), fix)
    return Check(name, True, f"allowed: {len(wanted)} permission(s) asked")


def _answers(answer: Any, asked: Right) -> bool:
    """Whether one item of authorize's answer is the answer to ``asked`` (it echoes it)."""
    return (isinstance(answer, dict) and isinstance(answer.get("Allow"), bool)
            and answer.get("Resource") == asked.resource
            and answer.get("Segment") == asked.segment and answer.get("Access") == asked.access)


def _consul_rights(consul: ConsulClient, wanted: list[Right]) -> Check:
    if not wanted:
        return Check("consul token", True, "no local service: nothing to register")
    c = consul.api
    url = f"{consul.settings.addr.rstrip('/')}/v1/internal/acl/authorize"
    answers: list[tuple[int, str, Any]] = []
    for i in range(0, len(wanted), AUTHORIZE_BATCH):
        batch = [w.request() for w in wanted[i:i + AUTHORIZE_BATCH]]
        try:
            resp = c.http.session.post(url, json=batch, headers=c.prepare_headers(),
                                       timeout=5.0)
        except FAILURES as exc:
            return _fail("consul token", f"cannot ask Consul: {type(exc).__name__}",
                         "see `consul`")
        answers.append((resp.status_code, resp.text, _json_or_none(resp)))
        if resp.status_code != 200:
            break
    return rights_check(wanted, bool(consul.settings.token), answers)


def _json_or_none(resp: Any) -> Any:
    try:
        return resp.json() if resp.content else None
    except ValueError:  # Consul's errors are plain text
        return None


def _local_health(consul: ConsulClient, defs: list[ServiceDefinition]) -> Check:
    """Every local service and its sidecar registered and passing on the local agent
    (what callers are shown); a sidecar in maintenance is named as drained."""
    c = consul.api
    bad: list[str] = []
    for d in sorted(defs, key=lambda d: d.id):
        for sid in (d.id, f"{d.id}-sidecar-proxy"):
            url = f"{consul.settings.addr.rstrip('/')}/v1/agent/health/service/id/{sid}"
            try:
                resp = c.http.session.get(url, headers=c.prepare_headers(), timeout=5.0)
            except FAILURES as exc:
                bad.append(f"{sid}: {type(exc).__name__}")
                continue
            if resp.status_code == 200:
                continue
            if resp.status_code == 404:
                bad.append(f"{sid}: not registered")
                continue
            if resp.status_code == 403:
                bad.append(f"{sid}: Consul refused the token (403: "
                           f"{resp.text.strip()[:120] or 'no reason given'})")
                continue
            body = _json_or_none(resp)
            checks = (body.get("Checks") or []) if isinstance(body, dict) else []
            why = [f"{ch.get('Name') or ch.get('CheckID')}: {ch.get('Status')}"
                   for ch in checks if ch.get("Status") != "passing"]
            bad.append(f"{sid}: " + ("; ".join(why) or f"status {resp.status_code}"))
    if bad:
        drained = any("maintenance" in b.lower() for b in bad)
        if all("Consul refused the token" in b for b in bad):
            return _fail("local health", "; ".join(bad),
                         "see the `consul token` check: the token must be known to Consul "
                         "and may read this host's services")
        return _fail("local health", "; ".join(bad),
                     "`meshctl undrain` ends the maintenance" if drained else
                     "start the service or fix its check; a sidecar's check passes once "
                     "the agent serves it")
    return Check("local health", True, f"{2 * len(defs)} service(s) and sidecar(s) passing")


def check_vault(cfg: AgentConfig, defs: list[ServiceDefinition]) -> list[Check]:
    """Vault login, the right to sign for every local service, and the clock against Vault's."""
    vault = VaultClient(cfg.vault)
    s = cfg.vault
    out: list[Check] = []
    try:
        paths = sorted({f"{s.pki_mount}/sign/{s.role_prefix}{d.name}" for d in defs})
        sent = time.time()
        try:
            # The raw adapter keeps the response (its Date header); hvac's JSON one
            # returns only the body.
            answer = vault.call("check its capabilities", lambda c: RawAdapter.request(
                c.adapter, "post", "/v1/sys/capabilities-self",
                json={"paths": paths or ["sys/health"]}))
        except MeshctlError as exc:
            return [_fail("vault", str(exc),
                          "check vault.addr, the AppRole files and that Vault is unsealed")]
        got = time.time()
        out.append(Check("vault", True, f"{vault.addr}: logged in"))
        out.append(_skew_check("clock (Vault)", answer.headers.get("Date"), sent, got))
        caps = (answer.json() or {}).get("data") or answer.json()
        cannot = [p for p in paths
                  if not {"update", "create", "root", "sudo"} & set(caps.get(p) or [])]
        if cannot:
            names = ", ".join(p.rsplit("/", 1)[1].removeprefix(s.role_prefix) for p in cannot)
            out.append(_fail("vault policy", f"may not sign for: {names} ({', '.join(cannot)})",
                             f"`meshctl vault setup --host {cfg.node_name}=<every service of "
                             "this host>` grants the host's AppRole these roles"))
        else:
            out.append(Check("vault policy", True,
                             f"may sign for {len(paths)} service(s)"))
    finally:
        vault.close()
    return out


def check_proxy(cfg: AgentConfig) -> list[Check]:
    """The proxy binary with its modules and Lua libraries; whether it serves the agent's
    generation."""
    driver = make_driver(cfg)
    out: list[Check] = []
    scratch = Path(tempfile.mkdtemp(prefix=".doctor-", dir=cfg.data_dir))
    try:
        files = driver.render_config(Snapshot(cfg.node_name, cfg.trust_domain,
                                              cfg.datacenter)).files
        for name, text in files.items():
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            (scratch / name).write_text(text)
        driver.validate(scratch)
        out.append(Check("proxy", True, f"{driver.name} {driver.version()}: "
                                        "binary, modules and Lua libraries load"))
    except MeshctlError as exc:
        out.append(_fail("proxy", str(exc)[:600],
                         f"install {driver.name} and its modules (see README: make deps), "
                         "or set proxy_binary"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    applier = Applier(driver, cfg.proxy_dir)
    wanted = applier.current_generation()
    if wanted is None:
        out.append(_fail("proxy serving", "no config applied yet",
                         "start the agent (systemctl start meshctl-agent)"))
    elif not driver.running():
        out.append(_fail("proxy serving", f"{driver.name} is not running (generation {wanted} "
                         "is on disk)", "start the agent: it starts the proxy"))
    else:
        serving = driver.serving_generation()
        out.append(Check("proxy serving", True, f"generation {wanted}") if serving == wanted
                   else _fail("proxy serving", f"the proxy serves {serving or '(no answer)'}, "
                              f"the agent applied {wanted}",
                              "see `meshctl status` for the last apply error; "
                              "`systemctl reload meshctl-agent` applies again"))
    return out


def check_ports(cfg: AgentConfig, defs: list[ServiceDefinition]) -> list[Check]:
    """The upstream listener ports are free, or held by this host's own proxy."""
    driver = make_driver(cfg)
    taken: list[str] = []
    for d in defs:
        for u in d.upstreams:
            why = port_unavailable(u.local_bind_address or "127.0.0.1", u.local_bind_port)
            if why is None:
                continue
            holders = driver.foreign_listeners({u.local_bind_port})
            if holders or not driver.running():
                taken.append(f"{d.id} upstream {u.destination_name}: "
                             + ("; ".join(holders) or why))
    if taken:
        return [_fail("ports", "; ".join(taken),
                      "stop what holds them, or choose other local_bind_port values")]
    return [Check("ports", True, "every upstream port is free or the proxy's")]


def check_certs(cfg: AgentConfig, defs: list[ServiceDefinition],
                now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> list[Check]:
    """Each local service's leaf: present, valid now, its identity, chained to the bundle."""
    try:
        leaves = {v.service: v for v in local_leaves(cfg)}
    except MeshctlError as exc:
        return [_fail("certificates", str(exc), "remove the file: the agent issues it again")]
    bad: list[str] = []
    t = now()
    for name in sorted({d.name for d in defs}):
        v = leaves.get(name)
        if v is None:
            bad.append(f"{name}: no leaf")
        elif not v.not_before <= t < v.not_after:
            bad.append(f"{name}: not valid now (valid {v.not_before:%Y-%m-%d %H:%M} to "
                       f"{v.not_after:%Y-%m-%d %H:%M} UTC)")
        elif v.identity != spiffe_id(name, cfg.trust_domain, cfg.datacenter):
            bad.append(f"{name}: identity {v.identity}, expected "
                       f"{spiffe_id(name, cfg.trust_domain, cfg.datacenter)}")
        elif not v.chains:
            bad.append(f"{name}: not issued by a CA of the bundle {cfg.certs_dir / 'ca.pem'}")
    if bad:
        return [_fail("certificates", "; ".join(bad),
                      "check the agent's Vault errors (`meshctl status`); "
                      "`meshctl certs renew` issues new leaves")]
    return [Check("certificates", True, f"{len(leaves)} leaf/leaves valid and chained")]


def run_checks(cfg: AgentConfig, where: str) -> list[Check]:
    """Every check, in the order a newcomer would fix them."""
    checks, defs = check_config(cfg, where)
    return [*checks, *check_consul(cfg, defs), *check_vault(cfg, defs), *check_proxy(cfg),
            *check_ports(cfg, defs), *check_certs(cfg, defs)]
