"""The agent's Consul client over TLS: CA file and client certificate, as configured.

A real Consul dev agent serves its HTTP API over HTTPS only (``verify_incoming``:
client certificates required). The agent's ``ConsulClient`` reaches it with
``consul.cacert`` + ``consul.client_cert``/``client_key`` and is refused without
them — with a message that names the address, never the token.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshctl.config import ConsulSettings
from meshctl.consul.client import ConsulClient
from meshctl.consul.keys import HealthConnect, IntentionMatch
from meshctl.errors import ConsulError
from tests.integration.consul_dev import ConsulDev, free_port
from tests.pki import TestCA

pytestmark = pytest.mark.needs("consul")
TOKEN = "0f9b3c52-1f0e-4c3a-9d55-000000000001"  # not a real secret; must never show up


class TLSConsul(ConsulDev):
    """ConsulDev with its HTTP API on HTTPS only, client certificates required."""

    def __init__(self, workdir: Path, pki: Path) -> None:
        super().__init__(workdir)
        self.https_port = free_port(set(self.ports.values()))
        self.pki = pki

    def _args(self) -> list[str]:
        args = super()._args()
        i = args.index("-http-port")
        args[i + 1] = "-1"  # no plain HTTP at all
        ca, crt, key = (self.pki / "ca.pem", self.pki / "server.consul.crt",
                        self.pki / "server.consul.key")
        tls = (f'tls {{ defaults {{ ca_file = "{ca}" cert_file = "{crt}" key_file = "{key}" '
               "verify_incoming = true } }")
        return [*args, "-hcl", f"ports {{ https = {self.https_port} }}", "-hcl", tls]

    @property
    def addr(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    def _ready(self) -> bool:
        try:
            client = ConsulClient(self.settings(), timeout=2)
            client.advertise_address()
            return True
        except ConsulError:
            return False

    def settings(self, **kw: str) -> ConsulSettings:
        base = {"addr": self.addr, "token": TOKEN, "cacert": str(self.pki / "ca.pem"),
                "client_cert": str(self.pki / "agent.crt"),
                "client_key": str(self.pki / "agent.key")}
        base.update(kw)
        return ConsulSettings(**base)


@pytest.fixture(scope="module")
def tls_consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSConsul]:
    pki = tmp_path_factory.mktemp("pki")
    ca = TestCA.create("consul CA")
    # ca.pem, server.consul.crt/.key (Consul is reached at 127.0.0.1), agent.crt/.key
    ca.write_leaf(pki, "server.consul", cn="server.consul", ips=("127.0.0.1",))
    ca.write_leaf(pki, "agent", cn="agent")
    dev = TLSConsul(tmp_path_factory.mktemp("consul"), pki)
    dev.start()
    try:
        yield dev
    finally:
        dev.stop()


def test_agent_client_reaches_consul_over_tls_with_ca_and_client_certificate(
        tls_consul: TLSConsul) -> None:
    client = ConsulClient(tls_consul.settings())
    assert client.advertise_address() == "127.0.0.1"
    session = client.session()
    try:
        index, answer = IntentionMatch("api").fetch(session, 0, "1s")
    finally:
        session.close()
    assert index > 0 and answer == ()


@pytest.mark.parametrize(("change", "expected"), [
    # The system CAs do not know Consul's; without a client certificate, verify_incoming refuses.
    ({"cacert": ""}, "TLS handshake failed: certificate verify failed"),
    # The server's alert, or (TLS 1.3) its hang-up before the alert is read: both name the fix.
    ({"client_cert": "", "client_key": ""}, "consul.client_cert and consul.client_key"),
])
def test_without_the_ca_or_client_certificate_it_is_refused(
        tls_consul: TLSConsul, change: dict[str, str], expected: str) -> None:
    with pytest.raises(ConsulError) as info:
        ConsulClient(tls_consul.settings(**change), timeout=5).advertise_address()
    message = str(info.value)
    assert expected in message, message
    assert TOKEN not in message


@pytest.mark.parametrize(("change", "expected"), [
    ({"cacert": ""}, "TLS handshake failed: certificate verify failed"),
    ({"client_cert": "", "client_key": ""}, "consul.client_cert and consul.client_key"),
])
def test_a_watch_session_refused_names_the_setting_to_fix(
        tls_consul: TLSConsul, change: dict[str, str], expected: str) -> None:
    """The watches' own HTTPS connection (urllib3, not requests) says the same as py-consul."""
    session = ConsulClient(tls_consul.settings(**change), timeout=5).session()
    try:
        with pytest.raises(ConsulError) as info:
            HealthConnect("api").fetch(session, 0, "1s")
    finally:
        session.close()
    message = str(info.value)
    assert message.startswith(f"Consul at {tls_consul.addr}: health.connect(api): "), message
    assert expected in message, message
    assert TOKEN not in message
