"""meshctl: a service mesh for VM and bare-metal fleets.

Consul is the distributed engine, Vault's PKI issues identities, and one local
nginx or HAProxy per host carries the mesh traffic.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("meshctl")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+src"

__all__ = ["__version__"]
