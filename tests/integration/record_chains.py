"""Record the discovery chains of ``tests/unit/chains/`` from a real Consul.

The unit tests of ``meshctl.chain`` read Consul's own compiled answers
(``GET /v1/discovery-chain/<svc>``), one set per Consul version meshctl is
tested with. This writes the config entries below into a ``consul agent -dev``
on loopback and saves each chain as ``<dir>/<svc>.json``:

    .venv/bin/python -m tests.integration.record_chains tests/unit/chains/1.14

(with the ``consul`` binary of that version first on PATH). An entry field the
Consul does not know is dropped from the entry, said on stderr and in the
returned notes, so an older Consul still records the rest.
"""

from __future__ import annotations

import json
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.integration.consul_dev import consul_dev

#: (kind, name, body, optional fields: dotted paths dropped when this Consul refuses them)
ENTRIES: list[tuple[str, str, dict[str, Any], tuple[str, ...]]] = [
    ("service-defaults", "api", {"Protocol": "http"}, ()),
    ("service-defaults", "admin", {"Protocol": "http"}, ()),
    ("service-defaults", "old", {"Protocol": "http"}, ()),
    ("service-resolver", "api", {
        "DefaultSubset": "v1",
        "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"},
                    "v2": {"Filter": "Service.Meta.version == v2", "OnlyPassing": True}},
        "Failover": {"v1": {"ServiceSubset": "v2"}},
        "ConnectTimeout": "3s",
        "RequestTimeout": "7s",
        "LoadBalancer": {"Policy": "ring_hash", "RingHashConfig": {"MinimumRingSize": 1024},
                         "HashPolicies": [
                             {"Field": "header", "FieldValue": "x-user"},
                             {"SourceIP": True, "Terminal": True},
                             {"Field": "cookie", "FieldValue": "sess",
                              "CookieConfig": {"TTL": "10s", "Path": "/"}}]},
    }, ("RequestTimeout",)),
    ("service-splitter", "api", {"Splits": [
        {"Weight": 90, "ServiceSubset": "v1", "RequestHeaders": {"Set": {"x-split": "v1"}}},
        {"Weight": 10, "ServiceSubset": "v2",
         "ResponseHeaders": {"Add": {"x-resp": "v2"}, "Remove": ["server"]}},
    ]}, ()),
    ("service-router", "api", {"Routes": [
        {"Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}]}},
         "Destination": {"ServiceSubset": "v2"}},
        {"Match": {"HTTP": {"PathPrefix": "/admin", "Methods": ["GET", "POST"],
                            "QueryParam": [{"Name": "q", "Exact": "1"},
                                           {"Name": "p", "Present": True}]}},
         "Destination": {"Service": "admin", "PrefixRewrite": "/", "RequestTimeout": "2s",
                         "NumRetries": 3, "RetryOnConnectFailure": True,
                         "RetryOnStatusCodes": [503], "RetryOn": ["5xx"],
                         "RequestHeaders": {"Add": {"x-a": "b"}, "Remove": ["x-r"]}}},
    ]}, ("Routes.1.Destination.RetryOn",)),
    ("service-resolver", "old", {"Redirect": {"Service": "api", "ServiceSubset": "v2"}}, ()),
    ("service-resolver", "db", {"Failover": {"*": {"Targets": [
        {"Service": "db2"}, {"Service": "db3", "Datacenter": "dc2"}]}}}, ()),
]
SERVICES = ("api", "old", "db", "plain")
CHAINS = Path(__file__).resolve().parents[1] / "unit" / "chains"
#: Consul minor version → the directory of its recorded answers (the same ENTRIES)
RECORDED = {"1.14": CHAINS / "1.14", "1.22": CHAINS}


def _call(addr: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(addr + path, data=data, method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


def _drop(body: dict[str, Any], dotted: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(body))
    node: Any = out
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node.pop(last, None)
    return out


def write_entries(addr: str) -> list[str]:
    """Write ENTRIES; returns a note per optional field this Consul refused."""
    notes: list[str] = []
    for kind, name, body, optional in ENTRIES:
        payload = {"Kind": kind, "Name": name, **body}
        try:
            _call(addr, "PUT", "/v1/config", payload)
            continue
        except urllib.error.HTTPError as exc:
            refusal = exc.read().decode(errors="replace").strip()
        for dotted in optional:
            payload = _drop(payload, dotted)
        _call(addr, "PUT", "/v1/config", payload)  # a refusal now is a real error
        notes.append(f"{kind} {name}: without {', '.join(optional)} ({refusal})")
    return notes


def record(addr: str) -> tuple[dict[str, Any], list[str]]:
    """(service → its discovery chain answer, notes) from the Consul at ``addr``."""
    notes = write_entries(addr)
    return {svc: _call(addr, "GET", f"/v1/discovery-chain/{svc}") for svc in SERVICES}, notes


def version(addr: str) -> str:
    """The Consul version at ``addr`` (``/v1/agent/self``), e.g. ``1.14.11``."""
    return str(_call(addr, "GET", "/v1/agent/self")["Config"]["Version"])


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, consul_dev(Path(tmp)) as dev:
        chains, notes = record(dev.addr)
        print(f"Consul {version(dev.addr)}", file=sys.stderr)
    for note in notes:
        print(note, file=sys.stderr)
    for svc, answer in chains.items():
        (out / f"{svc}.json").write_text(json.dumps(answer, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
