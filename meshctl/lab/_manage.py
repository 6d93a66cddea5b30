"""Looking at and removing labs from outside their owner (``meshctl lab status|down``)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from meshctl.errors import LabError
from meshctl.lab import _state, _sys


def list_labs() -> list[dict[str, Any]]:
    """Every lab on this machine as plain data (what ``meshctl lab status --json`` prints).

    Each: prefix, owner (pid, kind, argv, alive), stale (owner gone), bridge, root,
    consul_server_addr, vault_addr, vault_token_file, nodes (name, role, ns, ip,
    workdir), procs (node, name, pid, alive, log), machines (name, pid, alive, root).
    """
    out = []
    for st in _state.list_states():
        alive = st.owner_alive()
        out.append({
            "prefix": st.prefix,
            "owner": {"pid": st.owner_pid, "kind": st.owner_kind, "argv": st.owner_argv,
                      "alive": alive},
            "stale": not alive,
            "created": st.created,
            "bridge": st.bridge,
            "root": st.root,
            "consul_server_addr": st.consul_server_addr,
            "vault_addr": st.vault_addr,
            "vault_token_file": st.vault_token_file,
            "nodes": [{"name": n.name, "role": n.role, "ns": n.ns, "ip": n.ip,
                       "workdir": n.workdir, "netns_exists": _sys.netns_exists(n.ns)}
                      for n in st.nodes],
            "procs": [{"node": p.node, "name": p.name, "pid": p.pid, "alive": p.alive(),
                       "log": p.log} for p in st.procs],
            "machines": [{"name": m.name, "pid": m.pid, "alive": m.nspawn_alive(),
                          "root": m.root} for m in st.machines],
        })
    return out


def remove_lab(
    prefix: str,
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    wait: float = 60.0,
) -> None:
    """Tear down lab ``prefix``.

    If its owner is dead, the lab is removed at once. If its owner is a running
    command that holds a lab until it is stopped (``meshctl lab up``, ``make
    demo``, ``bench.run``: owner kind "cli"), that process is asked (SIGTERM) to
    tear down its lab and given ``wait`` seconds. A lab owned by any other live
    process (somebody's test run) is refused unless ``force``. Raises LabError
    when refused or incomplete.
    """
    say = progress or (lambda _msg: None)
    st = _state.load_state(prefix)
    if st.owner_alive():
        if st.owner_pid == os.getpid():
            raise LabError(f"lab {prefix} belongs to this process: call its Lab.down()")
        if st.owner_kind == "cli":
            owner = f"pid {st.owner_pid}, {' '.join(st.owner_argv)[:120]}"
            say(f"asking its owner ({owner}) to tear down lab {prefix}")
            _sys.send_signal(st.owner_pid, signal.SIGTERM)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and st.path.exists() and st.owner_alive():
                time.sleep(0.1)
            if not st.path.exists():
                return
            if st.owner_alive() and not force:
                raise LabError(f"the owner of lab {prefix} ({owner}) did not tear it down "
                               f"within {wait}s")
        elif not force:
            raise LabError(
                f"lab {prefix} belongs to running process {st.owner_pid} "
                f"({' '.join(st.owner_argv)[:120]}); not touching it (--force removes it anyway)")
        if st.path.exists():
            st = _state.LabState.load(st.path)
        else:
            return
    say(f"removing lab {prefix}")
    with _state.cleanup_lock():
        _state.teardown(st, progress)
