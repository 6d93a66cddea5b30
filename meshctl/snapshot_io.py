"""Read what the agent persisted: the last good Snapshot and the agent state.

The agent writes both (``Snapshot.to_json()``, the status file); the CLI
(``meshctl status``, ``routes``, ``intentions``) and the agent at start read
them back here. Reading is the only side effect; errors are ConfigError
naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from meshctl.errors import ConfigError
from meshctl.intentions import authorization_from_dict
from meshctl.model import Cluster, Inbound, Outbound, Snapshot

T = TypeVar("T")


def snapshot_from_dict(data: Mapping[str, Any]) -> Snapshot:
    """Rebuild a Snapshot from ``Snapshot.to_dict()`` output (the persisted last good)."""
    clusters = tuple(_from_plain(Cluster, c) for c in data["clusters"])
    inbounds = tuple(
        _from_plain(Inbound, {
            **i, "authz": authorization_from_dict(i.get("authz") or {"pending": True})})
        for i in data["inbounds"]
    )
    outbounds = tuple(_from_plain(Outbound, o) for o in data["outbounds"])
    return Snapshot(
        node=data["node"],
        trust_domain=data["trust_domain"],
        datacenter=data["datacenter"],
        inbounds=inbounds,
        outbounds=outbounds,
        clusters=clusters,
        warnings=tuple(data.get("warnings", ())),
    )


def _read_json(path: Path, what: str) -> tuple[bool, Any]:
    """``(True, the JSON document at path)``, or ``(False, None)`` if there is no
    file (a file holding ``null`` is not "no file"); ConfigError naming ``what``
    when it cannot be read or parsed."""
    try:
        return True, json.loads(path.read_text())
    except FileNotFoundError:
        return False, None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: unreadable {what}: {exc}") from None


def read_snapshot(path: Path) -> Snapshot | None:
    """The snapshot persisted at ``path`` (the agent's last good), None if there is none.

    Raises ConfigError when the file cannot be read (permissions, not a file)
    or does not hold a snapshot.
    """
    found, data = _read_json(path, "snapshot")
    if not found:
        return None
    try:
        return snapshot_from_dict(data)
    except ValueError as exc:
        raise ConfigError(f"{path}: unreadable snapshot: {exc}") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: unreadable snapshot ({type(exc).__name__}: {exc})") from None


def read_state(path: Path) -> dict[str, Any] | None:
    """The agent state written at ``path`` (what ``meshctl status`` shows), None if none.

    Raises ConfigError when the file cannot be read or is not a JSON object.
    """
    found, data = _read_json(path, "agent state")
    if not found:
        return None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: unreadable agent state: not a JSON object")
    return data


def _from_plain(cls: type[T], data: Any) -> T:
    """Rebuild dataclass ``cls`` (nested dataclasses, tuples) from ``asdict`` output.

    Values already of the right type pass through (``authz`` above); fields the
    data lacks take their defaults, so snapshots persisted by an older meshctl load.
    """
    if isinstance(data, cls):
        return data
    hints = typing.get_type_hints(cls)
    kwargs = {f.name: _convert(hints[f.name], data[f.name])
              for f in dataclasses.fields(cls)  # type: ignore[arg-type]
              if f.init and f.name in data}
    return cls(**kwargs)


def _convert(hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _from_plain(hint, value)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v) for v in value)
        return tuple(_convert(a, v) for a, v in zip(args, value, strict=True))
    return value
