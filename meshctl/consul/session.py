"""Abortable HTTP sessions to Consul and the account of a failure.

A blocking query sits in ``recv`` for up to its wait time; the agent must be
able to stop a watch loop at once (shutdown, a changed key set), so each loop
gets its own py-consul client whose connections are tracked and can be shut
down from another thread.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import consul
import requests
from consul.callback import CB
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from meshctl._transport import describe

# ---------------------------------------------------------------- errors


def describe_failure(exc: BaseException, timeout: float | None = None) -> str:
    """A short, secret-free account of a py-consul / requests failure.

    ``timeout``: the request's limit; None for a watch key's blocking query,
    whose limit also includes its wait.
    """
    if isinstance(exc, consul.ACLPermissionDenied):
        return f"permission denied (check the token's policy): {str(exc)[:200]}"
    if isinstance(exc, consul.ConsulException):
        return str(exc)[:300] or type(exc).__name__
    transport = describe(exc, "consul", "CONSUL", timeout)
    if transport is not None:
        return transport
    return f"{type(exc).__name__}: {str(exc)[:200]}"


#: what a py-consul call may raise: each becomes a ConsulError naming the operation
FAILURES = (
    consul.ConsulException,
    requests.RequestException,
    ValueError,
    KeyError,
    TypeError,
    AttributeError,  # an answer of the wrong shape
)


# ---------------------------------------------------------------- abortable sessions


class _Tracker:
    """The connections of one session, so another thread can cut them short.

    A blocking query sits in ``recv`` for up to its wait time; shutting the
    socket down makes it return at once. Connections made after ``abort()``
    are shut down as soon as they connect, so no query can slip past it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: weakref.WeakSet[HTTPConnection] = weakref.WeakSet()
        self.aborted = False

    def connected(self, conn: HTTPConnection) -> None:
        with self._lock:
            if not self.aborted:
                self._conns.add(conn)
                return
        _shutdown(conn)

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            conns = list(self._conns)
        for conn in conns:
            _shutdown(conn)


def _shutdown(conn: HTTPConnection) -> None:
    sock = getattr(conn, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _TrackedHTTPConnection(HTTPConnection):
    tracker: ClassVar[_Tracker]

    def connect(self) -> None:
        super().connect()
        self.tracker.connected(self)


class _TrackedHTTPSConnection(HTTPSConnection):
    tracker: ClassVar[_Tracker]

    def connect(self) -> None:
        super().connect()
        self.tracker.connected(self)


def _make_abortable(client: consul.Consul, tracker: _Tracker) -> None:
    """Route the client's connections through ``tracker`` (per session, not global)."""
    http_conn = type("_Conn", (_TrackedHTTPConnection,), {"tracker": tracker})
    https_conn = type("_TLSConn", (_TrackedHTTPSConnection,), {"tracker": tracker})
    pools = {
        "http": type("_Pool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
        "https": type("_TLSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
    }
    session: requests.Session = client.http.session
    for prefix in ("http://", "https://"):
        adapter = session.get_adapter(prefix)
        adapter.poolmanager.pool_classes_by_scheme = pools  # type: ignore[attr-defined]


def consul_at(addr: str) -> str:
    """The start of every Consul error: which Consul, as Vault errors name their Vault."""
    return f"Consul at {addr}: " if addr else "Consul: "


class ConsulSession:
    """One watch loop's own py-consul client (own connection pool), abortable.

    ``addr``: the Consul address, for error messages.
    """

    def __init__(self, client: consul.Consul, addr: str = "") -> None:
        self.consul = client
        self.addr = addr
        self._tracker = _Tracker()
        _make_abortable(client, self._tracker)

    def abort(self) -> None:
        self._tracker.abort()

    def close(self) -> None:
        self.consul.http.session.close()


def blocking_params(index: int, wait: str) -> list[tuple[str, Any]]:
    """The query parameters of a blocking query after ``index`` (none for a first read)."""
    return [("index", index), ("wait", wait)] if index > 0 else []


def indexed(allow_404: bool) -> Callable[[Any], tuple[int, Any]]:
    """py-consul callback: (X-Consul-Index, decoded JSON or None on 404)."""
    inner = CB.json(index=True, allow_404=allow_404)

    def cb(response: Any) -> tuple[int, Any]:
        index, data = inner(response)
        return int(index), data

    return cb
