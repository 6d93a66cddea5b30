"""The one exception tree of meshctl.

Library code raises only these; the CLI turns them into messages and exit codes.
Messages carry context (file, field, the proxy's own output) and never a secret.

    MeshctlError
    ├── ConfigError            agent configuration (file, field)
    ├── DefinitionError        a services.d definition (file, field); .problems lists all
    ├── CompileError           config entries / values compile() cannot honour safely
    ├── SourceError            a source could not be read
    │   ├── ConsulError        Consul unreachable or refused a request
    │   └── VaultError         Vault unreachable, auth refused, issue refused
    ├── ProxyError             a proxy driver failure
    │   ├── ValidationError    the proxy refused the rendered config (its output inside)
    │   ├── ReloadError        reload or post-reload check failed (rolled back)
    │   └── DriverNotFound     no driver of that name in the entry-point group
    ├── DiskError              a local file could not be written (path and reason)
    ├── DrainError             a drain could not read the host's connections, or timed out
    └── LabError               the network-namespace test bed
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class MeshctlError(Exception):
    """Base of every error meshctl raises on purpose."""


class ConfigError(MeshctlError):
    """The agent configuration is invalid."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one field of one file."""

    file: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.message}"


class DefinitionError(MeshctlError):
    """One or more service definitions are invalid; ``problems`` lists each."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class CompileError(MeshctlError):
    """compile() refused its input (a value or config entry it cannot honour safely)."""


class DrainError(MeshctlError):
    """A drain could not read the host's connections, or callers stayed past its bound."""


class SourceError(MeshctlError):
    """A source of state (Consul, Vault, disk) could not be read."""


class DiskError(MeshctlError):
    """A local file (state, certificate, rendered config) could not be written.

    Not a SourceError: nothing was being read from a source; the message names
    the path and the reason, never the content.
    """


class ConsulError(SourceError):
    """Consul was unreachable or refused a request."""


class VaultError(SourceError):
    """Vault was unreachable or refused authentication or issuance.

    ``status``: the HTTP status of Vault's error answer, None if it did not answer one.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ProxyError(MeshctlError):
    """A proxy driver failed."""


class ValidationError(ProxyError):
    """The proxy refused a rendered configuration; the message holds its output."""


class ReloadError(ProxyError):
    """A reload or the check after it failed; the previous config was restored."""


class DriverNotFound(ProxyError):
    """No proxy driver of that name is installed."""


class LabError(MeshctlError):
    """The network-namespace test bed could not be built or torn down."""
