"""Where the files shipped with meshctl live: templates, Lua plugins, version pins.

In a built wheel they sit inside the package (``meshctl/templates`` …); in a
source checkout (editable install) they sit at the top of the repository.
"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    for candidate in (_PKG / name, _PKG.parent / name, _PKG.parent / "scripts" / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"meshctl resource {name!r} is missing from the installation")


def templates_dir() -> Path:
    """Directory holding ``nginx/`` and ``haproxy/`` Jinja2 templates."""
    return _find("templates")


def plugins_dir() -> Path:
    """Directory holding the Lua that runs inside the proxies."""
    return _find("plugins")


def pinned_versions() -> dict[str, str]:
    """The component versions pinned in ``versions.env`` (e.g. CONSUL_VERSION)."""
    out: dict[str, str] = {}
    for line in _find("versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out
