"""The words an operator reads when a request to Consul or Vault fails, and what to fix."""

from __future__ import annotations

import pytest
import requests

from meshctl._transport import describe, errno_reason, tls_failure


def _ssl(inner: str) -> requests.exceptions.SSLError:
    return requests.exceptions.SSLError(
        "HTTPSConnectionPool(host='127.0.0.1', port=8200): Max retries exceeded with url: "
        f"/v1/sys/health (Caused by SSLError({inner}))"
    )


@pytest.mark.parametrize(
    ("inner", "expected"),
    [
        (
            "SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
            "failed: unable to get local issuer certificate (_ssl.c:1006)')",
            "TLS handshake failed: certificate verify failed: unable to get local issuer "
            "certificate (is vault.cacert / VAULT_CACERT the CA of the server's certificate?)",
        ),
        (
            "SSLError(1, '[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate "
            "required (_ssl.c:2580)')",
            "TLS handshake failed: tlsv13 alert certificate required (the server requires a "
            "client certificate: set vault.client_cert and vault.client_key "
            "(VAULT_CLIENT_CERT, VAULT_CLIENT_KEY))",
        ),
        (
            "SSLError(1, '[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:2580)')",
            "TLS handshake failed: tlsv1 alert unknown ca (the server does not accept the "
            "client certificate of vault.client_cert: is it issued by a CA the server trusts?)",
        ),
        (
            "SSLEOFError(8, 'EOF occurred in violation of protocol (_ssl.c:2427)')",
            "TLS handshake failed: the server closed the connection during the handshake "
            "(does it require a client certificate? check vault.client_cert and "
            "vault.client_key (VAULT_CLIENT_CERT, VAULT_CLIENT_KEY) and that the server "
            "trusts their CA)",
        ),
        (
            "SSLError(1, '[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)')",
            "TLS handshake failed: wrong version number",
        ),
        ("something else entirely", "TLS handshake failed"),
    ],
)
def test_tls_failures_name_the_setting_to_fix(inner: str, expected: str) -> None:
    assert tls_failure(_ssl(inner), "vault", "VAULT") == expected


def test_the_consul_section_is_named_for_consul() -> None:
    exc = _ssl("SSLError(1, '[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert "
               "certificate required (_ssl.c:2580)')")
    assert "set consul.client_cert and consul.client_key (CONSUL_CLIENT_CERT" in tls_failure(
        exc, "consul", "CONSUL"
    )


def test_errno_reason() -> None:
    exc = requests.exceptions.ConnectionError(
        "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded (Caused by "
        "NewConnectionError('<x>: Failed to establish a new connection: [Errno 111] "
        "Connection refused'))"
    )
    assert errno_reason(exc) == "Connection refused"
    assert errno_reason(requests.exceptions.ConnectionError("no errno here")) is None


_REFUSED = (
    "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded (Caused by "
    "NewConnectionError('<x>: Failed to establish a new connection: [Errno 111] "
    "Connection refused'))"
)


@pytest.mark.parametrize(
    ("exc", "timeout", "expected"),
    [
        (requests.exceptions.ConnectionError(_REFUSED), 10.0, "cannot connect: Connection refused"),
        (requests.exceptions.ConnectionError("no errno"), 10.0, "cannot connect: ConnectionError"),
        (requests.exceptions.ReadTimeout("x"), 2.5, "no answer within 2.5s"),
        # a connect timeout is a ConnectionError too: it still reads as a timeout
        (requests.exceptions.ConnectTimeout("x"), 10.0, "no answer within 10s"),
        (requests.exceptions.ReadTimeout("x"), None, "no answer in time"),
        (requests.exceptions.TooManyRedirects("x"), 10.0, "request failed: TooManyRedirects"),
        (ValueError("not a requests failure"), 10.0, None),
    ],
)
def test_describe_has_one_set_of_words_for_consul_and_vault(
    exc: BaseException, timeout: float | None, expected: str | None
) -> None:
    assert describe(exc, "vault", "VAULT", timeout) == expected
    assert describe(exc, "consul", "CONSUL", timeout) == expected


def test_describe_tls_names_the_section() -> None:
    exc = _ssl("SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate "
               "verify failed: self-signed certificate (_ssl.c:1006)')")
    assert describe(exc, "consul", "CONSUL", 10.0) == (
        "TLS handshake failed: certificate verify failed: self-signed certificate "
        "(is consul.cacert / CONSUL_CACERT the CA of the server's certificate?)"
    )


def _urllib3_cases() -> list[tuple[BaseException, float | None, str]]:
    import http.client

    import urllib3.exceptions as u3
    from urllib3.connection import HTTPConnection

    conn = HTTPConnection("127.0.0.1", 1)
    return [
        (u3.NewConnectionError(conn, "Failed to establish a new connection: [Errno 111] "
                                     "Connection refused"), 10.0,
         "cannot connect: Connection refused"),
        (u3.ReadTimeoutError(None, "/v1/health/connect/api", "timed out"), None,  # type: ignore[arg-type]
         "no answer in time"),
        (u3.ConnectTimeoutError(conn, "timed out"), 10.0, "no answer within 10s"),
        (u3.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset")), None,
         "connection lost: Connection reset by peer"),
        (u3.ProtocolError("Connection aborted.", http.client.RemoteDisconnected("closed")),
         None, "connection lost: the server closed it before answering"),
        (u3.LocationParseError("x"), 10.0, "request failed: LocationParseError"),
    ]


@pytest.mark.parametrize(("exc", "timeout", "expected"), _urllib3_cases())
def test_urllib3_failures_read_like_requests_ones(
    exc: BaseException, timeout: float | None, expected: str
) -> None:
    """The agent's watches GET through urllib3 directly: the same words, for either."""
    assert describe(exc, "consul", "CONSUL", timeout) == expected
