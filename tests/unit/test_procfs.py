"""meshctl._procfs: process identity and socket holders from /proc (no root needed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from meshctl import _procfs
from meshctl.agent.proxy_watch import ProxyWatch
from meshctl.agent.quiescence import Quiescence

UNIX = """\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 23073 /run/a/proxy-status.sock
0000000000000000: 00000003 00000000 00000000 0001 03 23080 /run/a/proxy-status.sock
0000000000000000: 00000002 00000000 00010000 0001 01 23090 /run/b c/proxy-status.sock
0000000000000000: 00000002 00000000 00010000 0001 01 23099 @abstract
0000000000000000: 00000003 00000000 00000000 0001 03 23100
"""

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2329 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 501 1
   1: 0100007F:2329 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 502 1
   2: 0100007F:232A 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 503 1
"""
TCP6 = (
    "  sl  local_address remote_address st tx_queue rx_queue tr tm->when retrnsmt uid "
    "timeout inode\n"
    "   0: 00000000000000000000000000000000:2329 00000000000000000000000000000000:0000 0A "
    "00000000:00000000 00:00000000 00000000     0        0 601 1\n"
)


def test_unix_sockets_are_found_by_path_spaces_included(tmp_path: Path) -> None:
    net = tmp_path / "unix"
    net.write_text(UNIX)
    # The listening socket and a connection it accepted both name the path.
    assert _procfs.unix_socket_inodes({"/run/a/proxy-status.sock"}, net) == {23073, 23080}
    assert _procfs.unix_socket_inodes({"/run/b c/proxy-status.sock"}, net) == {23090}
    assert _procfs.unix_socket_inodes({"/run/x.sock"}, net) == set()
    assert _procfs.unix_socket_inodes({"/run/a"}, tmp_path / "missing") == set()


def test_only_listening_tcp_sockets_of_the_ports_count(tmp_path: Path) -> None:
    (tmp_path / "tcp").write_text(TCP)
    (tmp_path / "tcp6").write_text(TCP6)
    assert _procfs.listening_inodes({9001}, tmp_path) == {501: 9001, 601: 9001}
    assert _procfs.listening_inodes({9002, 7}, tmp_path) == {503: 9002}


def test_holders_are_the_processes_with_the_socket_open(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(path)
        srv.listen()
        inodes = _procfs.unix_socket_inodes({path})
        assert len(inodes) == 1
        me = _procfs.process(os.getpid())
        assert me is not None and me.ppid == os.getppid()
        targets = {f"socket:[{i}]" for i in inodes}
        assert _procfs.holders(None, targets) == [me]
        assert _procfs.holders(_procfs.executable(os.getpid()), targets) == [me]
        assert _procfs.holders("/nonexistent/program", targets) == []
    assert _procfs.holders(None, targets) == []  # closed


def test_a_zombie_is_not_a_running_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        fields = (Path("/proc") / str(child.pid) / "stat").read_text().rsplit(")", 1)[1]
        if fields.split()[0] == "Z":
            break
        started = _procfs.start_time(child.pid) or started
        time.sleep(0.01)
    assert _procfs.process(child.pid) is None and _procfs.start_time(child.pid) is None
    assert not _procfs.same_process(child.pid, started)
    child.wait()


def test_proxy_watch_fires_once_when_the_watched_process_exits() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    fired = threading.Event()
    calls: list[float] = []

    def on_exit() -> None:
        calls.append(time.monotonic())
        fired.set()

    watch = ProxyWatch(lambda: child.pid, on_exit, interval=0.2)
    watch.start()
    try:
        time.sleep(0.5)
        assert not fired.is_set()
        child.kill()
        assert fired.wait(5)
        time.sleep(0.6)  # more intervals: the same exited pid does not fire again
        assert len(calls) == 1
    finally:
        watch.stop()
        child.wait()


def test_trigger_now_does_not_wait_for_quiet() -> None:
    # A trigger() would wait an hour of quiet: trigger_now() fires at once.
    q = Quiescence(wait_min=3600.0, wait_max=3600.0)
    q.trigger_now()
    fired: list[bool] = []
    waiter = threading.Thread(target=lambda: fired.append(q.wait(1.0)), daemon=True)
    waiter.start()
    waiter.join(timeout=30)
    assert fired == [True]
