"""The lab: test hosts in network namespaces, for integration tests, ``make demo`` and benchmarks.

    from meshctl.lab import Lab

    with Lab(hosts=3) as lab:                      # needs root
        h1, h2 = lab.host("h1"), lab.host("h2")
        h1.consul().agent.members()                # py-consul, against h1's own 127.0.0.1:8500
        web = h2.spawn(["nginx", "-p", str(h2.workdir), ...], "nginx")
        h2.wait_tcp(8080)
        status, body = h1.http_get(f"http://{h2.ip}:8080/")
        h1.block(lab.vault.ip)                     # cut h1 off from OpenBao
        bao = h2.vault_client()                    # hvac client, root token of the dev server

Public API: :class:`Lab`, :class:`Host`, :class:`Proc`, :class:`InNamespace`,
:func:`running_labs`, :func:`list_labs` / :class:`LabState` (what ``meshctl lab
status`` shows), :func:`remove_lab`, :func:`find_program`, :func:`require_program`. Errors are
:class:`meshctl.errors.LabError`.
"""

from __future__ import annotations

from meshctl.lab._host import Host, InNamespace
from meshctl.lab._lab import (
    DATACENTER,
    SERVER_IP,
    SUBNET,
    VAULT_IP,
    Lab,
    consul_client_config,
    consul_server_config,
    running_labs,
)
from meshctl.lab._manage import list_labs, remove_lab
from meshctl.lab._proc import Proc
from meshctl.lab._state import LabState, NodeRecord, ProcRecord, state_dir
from meshctl.lab._sys import find_program, require_program, search_path

__all__ = [
    "DATACENTER",
    "SERVER_IP",
    "SUBNET",
    "VAULT_IP",
    "Host",
    "InNamespace",
    "Lab",
    "LabState",
    "NodeRecord",
    "Proc",
    "ProcRecord",
    "consul_client_config",
    "consul_server_config",
    "find_program",
    "list_labs",
    "remove_lab",
    "require_program",
    "running_labs",
    "search_path",
    "state_dir",
]
