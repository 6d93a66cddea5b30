"""Abortable HTTP sessions to Consul and the account of a failure.

A blocking query sits in ``recv`` for up to its wait time; the agent must be
able to stop a watch loop at once (shutdown, a changed key set), so each loop
gets its own session whose connections are tracked and can be shut down from
another thread.

A watch's GETs (:meth:`ConsulSession.get`) go straight through one urllib3
connection, with the address, TLS files and token of the session's py-consul
client, and py-consul's own answer rules (its exceptions per status, the
``X-Consul-Index`` header, JSON). requests' session machinery (hooks, cookies,
proxy environment, adapters) cost about 0.7 ms of CPU per answer, twice the
whole of the rest: at 1,000 upstreams, 2,000 answers at start and a steady
trickle of resyncs. Everything else (registrations, one-shot reads) stays on
py-consul.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import urllib.parse
import weakref
from typing import Any, ClassVar

import certifi
import consul
import requests
import urllib3
from consul.base import Response
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
    urllib3.exceptions.HTTPError,
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


def consul_at(addr: str) -> str:
    """The start of every Consul error: which Consul, as Vault errors name their Vault."""
    return f"Consul at {addr}: " if addr else "Consul: "


class ConsulSession:
    """One watch loop's own connection to Consul, abortable.

    ``client``: a py-consul client whose address, TLS files, timeout and token
    the session uses (its requests session stays unused). ``addr``: the Consul
    address, for error messages.
    """

    def __init__(self, client: consul.Consul, addr: str = "") -> None:
        self.consul = client
        self.addr = addr
        self._tracker = _Tracker()
        self._pool = _lean_pool(client.http, self._tracker)

    def get(self, path: str, params: list[tuple[str, Any]],
            allow_404: bool = False) -> tuple[int, Any]:
        """GET ``path``: ``(X-Consul-Index, decoded JSON)``; None for a 404 if allowed.

        Fails as py-consul's ``CB.json(index=True)`` does (its exceptions per
        status), or with urllib3's transport errors; ``FAILURES`` names both.
        """
        code, raw_index, body = self.get_bytes(path, params, allow_404)
        if raw_index is None and code != 404:
            raise consul.ConsulException(f"{code} answer without an X-Consul-Index header")
        return int(raw_index or 0), None if code == 404 else json.loads(body)

    def get_bytes(self, path: str, params: list[tuple[str, Any]],
                  allow_404: bool = False) -> tuple[int, str | None, bytes]:
        """GET ``path``: ``(status, X-Consul-Index or None, body)``; refusals raise
        as for :meth:`get`."""
        url = urllib.parse.quote(path, safe="/:")
        if params:
            url = f"{url}?{urllib.parse.urlencode(params)}"
        headers = self.consul.prepare_headers()
        # py-consul's limit (its call timeout, plus a blocking query's wait and
        # jitter), for the connect and for each read, as requests applies it.
        response = self._pool.urlopen("GET", url, headers=headers, retries=False,
                                      redirect=False, timeout=self.consul.http.timeout(params),
                                      preload_content=True)
        code = response.status
        if code >= 400:
            CB._status(Response(code, response.headers,
                                response.data.decode("utf-8", "replace")), allow_404)
        return code, response.headers.get("X-Consul-Index"), response.data

    def abort(self) -> None:
        self._tracker.abort()

    def close(self) -> None:
        self._pool.close()


def _lean_pool(http: Any, tracker: _Tracker) -> HTTPConnectionPool:
    """One urllib3 connection to py-consul client ``http``'s Consul, tracked for abort."""
    if http.scheme != "https":
        conn = type("_Conn", (_TrackedHTTPConnection,), {"tracker": tracker})
        plain: HTTPConnectionPool = type("_Pool", (HTTPConnectionPool,),
                                         {"ConnectionCls": conn})(http.host, int(http.port),
                                                                  maxsize=1)
        return plain
    tls_conn = type("_TLSConn", (_TrackedHTTPSConnection,), {"tracker": tracker})
    verify = http.verify
    # requests' own choice of CA bundle when told only "verify": its environment
    # variables, then certifi's bundle.
    ca = verify if isinstance(verify, str) else (
        os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        or certifi.where())
    cert, key = http.cert if isinstance(http.cert, tuple) else (http.cert, None)
    tls: HTTPSConnectionPool = type("_TLSPool", (HTTPSConnectionPool,),
                                    {"ConnectionCls": tls_conn})(
        http.host, int(http.port), maxsize=1,
        cert_reqs="CERT_REQUIRED" if verify is not False else "CERT_NONE",
        ca_certs=ca if verify is not False else None, cert_file=cert, key_file=key)
    return tls


def blocking_params(index: int, wait: str) -> list[tuple[str, Any]]:
    """The query parameters of a blocking query after ``index`` (none for a first read)."""
    return [("index", index), ("wait", wait)] if index > 0 else []
