"""What a running lab looks like, for people: hosts, addresses, ``consul members``.

Both demos print it (``meshctl.lab.demo`` as its default scenario,
``meshctl.lab.meshdemo`` before the walkthrough); it lives here so that neither
demo imports the other.
"""

from __future__ import annotations

from meshctl.lab._lab import Lab
from meshctl.tables import table

_SERF_STATUS = {0: "none", 1: "alive", 2: "leaving", 3: "left", 4: "failed"}


def describe(lab: Lab) -> str:
    """Hosts, addresses, services and ``consul members`` of a running lab, for people."""
    rows = []
    for n in lab.nodes:
        what = {"server": "consul server", "vault": f"openbao {lab.vault_addr}"}.get(
            n.role, "consul client, http 127.0.0.1:8500"
        )
        rows.append((n.name, n.ip, n.ns, what))
    members = sorted(
        lab.members(), key=lambda m: (m.get("Tags", {}).get("role") != "consul", m["Name"])
    )
    mrows = [
        (
            m["Name"],
            f"{m['Addr']}:{m['Port']}",
            _SERF_STATUS.get(m["Status"], m["Status"]),
            "server" if m.get("Tags", {}).get("role") == "consul" else "client",
            m.get("Tags", {}).get("dc", ""),
        )
        for m in members
    ]
    token_file = lab.root / "vault" / "root-token" if lab.root else None
    lines = [
        f"lab {lab.prefix}: bridge {lab.bridge}, directory {lab.root}",
        "",
        table(("HOST", "ADDRESS", "NAMESPACE", "RUNS"), rows),
        "",
        "consul members:",
        table(("NODE", "ADDRESS", "STATUS", "TYPE", "DC"), mrows),
        "",
        f"VAULT_ADDR={lab.vault_addr}  (root token in {token_file})",
        f"a shell on h1:  ip netns exec {lab.hosts[0].ns} bash",
    ]
    return "\n".join(lines)


def show_lab(lab: Lab) -> None:
    """The default scenario: print :func:`describe`."""
    print(describe(lab), flush=True)
