"""A real OpenBao (Vault-API) dev server on loopback, for integration tests.

``openbao_dev(workdir)`` starts ``bao server -dev`` on a free 127.0.0.1 port
with a random root token (optionally with ``-dev-tls``), waits until it
answers, yields an :class:`OpenBao`, and stops it by its pid. Its HOME is the
work directory and the token helper is disabled, so nothing is written to the
real home directory.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from meshctl.lab import find_program
from tests.integration.consul_dev import free_port


@dataclass(frozen=True)
class OpenBao:
    addr: str
    token: str
    pid: int
    cacert: str = ""  # set with tls=True
    log: Path = Path()
    mtls_addr: str = ""  # set with mtls=: a listener that requires client certificates


@dataclass(frozen=True)
class MTLSListener:
    """A second listener that serves only clients with a certificate from ``client_ca``."""

    cert: str
    key: str
    client_ca: str


def _ready(addr: str, cacert: str) -> bool:
    ctx = ssl.create_default_context(cafile=cacert) if cacert else None
    try:
        with urllib.request.urlopen(f"{addr}/v1/sys/health", timeout=2, context=ctx) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


@contextmanager
def openbao_dev(
    workdir: Path,
    *,
    tls: bool = False,
    mtls: MTLSListener | None = None,
    timeout: float = 60.0,
) -> Iterator[OpenBao]:
    # Tests that start one mark themselves needs("bao|vault").
    binary = find_program("bao", "vault")
    if binary is None:
        raise FileNotFoundError("no bao/vault binary (run scripts/deps.sh)")
    workdir.mkdir(parents=True, exist_ok=True)
    token = "root-" + secrets.token_hex(16)
    taken: set[int] = set()
    port = free_port(taken)
    args = [
        binary,
        "server",
        "-dev",
        "-dev-no-store-token",
        f"-dev-root-token-id={token}",
        f"-dev-listen-address=127.0.0.1:{port}",
    ]
    cacert = ""
    if tls:
        certdir = workdir / "tls"
        certdir.mkdir(exist_ok=True)
        args += ["-dev-tls", f"-dev-tls-cert-dir={certdir}"]
        cacert = str(certdir / "vault-ca.pem")
    mtls_addr = ""
    if mtls is not None:
        # Dev mode keeps its own listener and adds the config's. Each listener
        # also takes a cluster port (the dev one: its port + 1), so all are set.
        taken.add(port + 1)
        mport = free_port(taken)
        config = workdir / "mtls-listener.hcl"
        config.write_text(
            'listener "tcp" {\n'
            f'  address = "127.0.0.1:{mport}"\n'
            f'  cluster_address = "127.0.0.1:{free_port(taken)}"\n'
            f"  tls_cert_file = {json.dumps(mtls.cert)}\n"
            f"  tls_key_file = {json.dumps(mtls.key)}\n"
            f"  tls_client_ca_file = {json.dumps(mtls.client_ca)}\n"
            "  tls_require_and_verify_client_cert = true\n"
            "}\n"
        )
        args.append(f"-config={config}")
        mtls_addr = f"https://127.0.0.1:{mport}"
    scheme = "https" if tls else "http"
    addr = f"{scheme}://127.0.0.1:{port}"
    log = workdir / "bao.log"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"bao exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
                )
            if (not tls or Path(cacert).exists()) and _ready(addr, cacert):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"bao did not answer at {addr} within {timeout}s")
            time.sleep(0.1)
        yield OpenBao(
            addr=addr, token=token, pid=proc.pid, cacert=cacert, log=log, mtls_addr=mtls_addr
        )
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
