"""Short, secret-free accounts of an HTTP client's transport failures.

Shared by the Consul and Vault adapters (requests, and urllib3 under the
agent's Consul watches), so an operator reads the same words, and the same hint
at the setting to fix, for either: :func:`describe`. Never quotes anything but
the OpenSSL reason, the errno text and exception class names.
"""

from __future__ import annotations

import errno
import os
import re

import requests
import urllib3.exceptions as u3

_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\"()\]]+)")
_SSL_REASON = re.compile(r"\[SSL: ([A-Z0-9_]+)\] ([^('\"]+)")

_REFUSED_OUR_CERT = (
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "TLSV1_ALERT_DECRYPT_ERROR",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "TLSV1_ALERT_ACCESS_DENIED",
)


def errno_reason(exc: BaseException) -> str | None:
    """The OS's words for a failed connection ("Connection refused"), if any."""
    m = _ERRNO.search(str(exc))
    return m.group(1).strip() if m else None


def tls_failure(exc: BaseException, section: str, env_prefix: str) -> str:
    """``TLS handshake failed: <OpenSSL's reason> (<which setting to look at>)``.

    ``section`` names the agent-config section (``vault``), ``env_prefix`` its
    environment variables (``VAULT``).
    """
    text = str(exc)
    m = _SSL_REASON.search(text)
    if m:
        code, reason = m.group(1), m.group(2).strip()
    elif "SSLEOFError" in text or "EOF occurred in violation of protocol" in text:
        # TLS 1.3: the server checks the client certificate after the client
        # thinks the handshake is done, and may hang up before its alert is read.
        return (
            "TLS handshake failed: the server closed the connection during the handshake "
            f"(does it require a client certificate? check {section}.client_cert and "
            f"{section}.client_key ({env_prefix}_CLIENT_CERT, {env_prefix}_CLIENT_KEY) "
            "and that the server trusts their CA)"
        )
    else:
        return "TLS handshake failed"
    if code == "CERTIFICATE_VERIFY_FAILED":
        hint = f"is {section}.cacert / {env_prefix}_CACERT the CA of the server's certificate?"
    elif code.endswith("CERTIFICATE_REQUIRED"):
        hint = (
            f"the server requires a client certificate: set {section}.client_cert and "
            f"{section}.client_key ({env_prefix}_CLIENT_CERT, {env_prefix}_CLIENT_KEY)"
        )
    elif code in _REFUSED_OUR_CERT:
        hint = (
            f"the server does not accept the client certificate of {section}.client_cert: "
            "is it issued by a CA the server trusts?"
        )
    else:
        hint = ""
    return f"TLS handshake failed: {reason}" + (f" ({hint})" if hint else "")


def describe(
    exc: BaseException, section: str, env_prefix: str, timeout: float | None = None
) -> str | None:
    """The words for a failed request, or None if ``exc`` is not a requests failure.

    ``TLS handshake failed: …`` (see :func:`tls_failure`), ``no answer within
    <timeout>s`` (``no answer in time`` when ``timeout`` is None, e.g. for a
    blocking query whose limit includes its wait), ``cannot connect: <the OS's
    reason>``, or ``request failed: <exception class>``. ``section`` and
    ``env_prefix`` name the settings, as for :func:`tls_failure`.
    """
    # SSLError and ConnectTimeout are ConnectionErrors too: most specific first.
    if isinstance(exc, u3.HTTPError):
        return _describe_urllib3(exc, section, env_prefix, timeout)
    if isinstance(exc, requests.exceptions.SSLError):
        return tls_failure(exc, section, env_prefix)
    if isinstance(exc, requests.exceptions.Timeout):
        return f"no answer within {timeout:g}s" if timeout is not None else "no answer in time"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return f"cannot connect: {errno_reason(exc) or type(exc).__name__}"
    if isinstance(exc, requests.exceptions.RequestException):
        return f"request failed: {type(exc).__name__}"
    return None


def _describe_urllib3(
    exc: u3.HTTPError, section: str, env_prefix: str, timeout: float | None
) -> str:
    """:func:`describe` for urllib3's own exceptions (a watch's lean session)."""
    if isinstance(exc, u3.SSLError):
        return tls_failure(exc, section, env_prefix)
    # NewConnectionError is a ConnectTimeoutError too: it comes first.
    if isinstance(exc, u3.NewConnectionError):
        return f"cannot connect: {errno_reason(exc) or type(exc).__name__}"
    if isinstance(exc, u3.TimeoutError):
        return f"no answer within {timeout:g}s" if timeout is not None else "no answer in time"
    if isinstance(exc, u3.ProtocolError):
        cause = exc.args[1] if len(exc.args) > 1 else None
        code = getattr(cause, "errno", None)
        if isinstance(code, int) and code in errno.errorcode:
            return f"connection lost: {os.strerror(code)}"
        return "connection lost: the server closed it before answering"
    return f"request failed: {type(exc).__name__}"
