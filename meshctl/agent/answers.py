"""The last good answer of every watched Consul key, kept on disk.

compile() depends only on its inputs, Consul's answers. Fail static is per
key: the watcher keeps a key's last good value while its queries fail (a
429, Consul down), and this store keeps the answers the agent last compiled
from in ``data_dir/last-good-answers.json``, so that an agent restarted
while Consul is unreachable compiles from them, as if Consul had answered
what it last did, until it answers again.

An intention answer is kept only once it compiled (``keep(..., intentions=)``):
a malformed one that Consul serves later is refused by compile, which then
falls back to the kept one (and says so), never to "allow".

Values on disk are the watcher's values as JSON; everything read back goes
through compile's validation again, like a fresh answer from Consul.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from meshctl._fs import write_atomic
from meshctl._watch import Key
from meshctl.consul.keys import (
    ConfigEntries,
    ConfigEntry,
    DiscoveryChain,
    HealthConnect,
    IntentionMatch,
)
from meshctl.errors import MeshctlError
from meshctl.model import Instance

log = logging.getLogger("meshctl.agent")

#: the key types whose answers are kept (a feed's are not: nothing compiles from them)
KEPT: dict[str, type] = {k.__name__: k for k in (
    HealthConnect, ConfigEntries, ConfigEntry, DiscoveryChain, IntentionMatch)}
VERSION = 1


class AnswerStore:
    """Consul's answers as compile reads them: the watcher's value of a key, else the
    one kept on disk (``get``); ``keep`` writes the current ones."""

    def __init__(self, path: Path, live: Callable[[Key], Any]) -> None:
        self.path = path
        self.live = live
        self._kept: dict[Key, Any] = _read(path)
        self._encoded: dict[Key, tuple[Any, str]] = {}  # key -> (value, its JSON), reused
        self._written = ""

    def get(self, key: Key) -> Any:
        """The latest good answer of ``key``: Consul's, else the kept one, else None."""
        value = self.live(key)
        return self._kept.get(key) if value is None else value

    def any(self) -> bool:
        """Whether any answer is kept."""
        return bool(self._kept)

    def kept(self, key: Key) -> Any:
        """The answer kept for ``key`` (the last one compiled from), or None."""
        return self._kept.get(key)

    def keep(self, keys: Iterable[Key], intentions: Mapping[IntentionMatch, Any]) -> None:
        """Keep the current answers of ``keys`` (those that have one), with
        ``intentions``' answers (those that compiled) for their keys; forget the
        rest; write them if they changed. A disk error is logged, not raised:
        the proxy keeps serving, the next keep tries again."""
        kept: dict[Key, Any] = {}
        for key in keys:
            if type(key).__name__ not in KEPT:
                continue
            value = (intentions.get(key, self._kept.get(key))
                     if isinstance(key, IntentionMatch) else self.get(key))
            if value is not None:
                kept[key] = value
        self._kept = kept
        lines = sorted(self._line(k, v) for k, v in kept.items())
        text = f'{{"version":{VERSION},"answers":[\n' + ",\n".join(lines) + "\n]}\n"
        if text == self._written:
            return
        try:
            write_atomic(self.path, text.encode(), 0o640)
            self._written = text
        except MeshctlError as exc:
            log.warning("cannot persist the last good Consul answers: %s", exc)

    def _line(self, key: Key, value: Any) -> str:
        hit = self._encoded.get(key)
        if hit is not None and hit[0] is value:
            return hit[1]
        line = json.dumps([type(key).__name__, _key_fields(key), _plain(value)],
                          sort_keys=True, separators=(",", ":"))
        self._encoded[key] = (value, line)
        return line


def _key_fields(key: Key) -> dict[str, Any]:
    return {f.name: getattr(key, f.name) for f in fields(key)}  # type: ignore[arg-type]


def _plain(value: Any) -> Any:
    if isinstance(value, tuple) and all(isinstance(v, Instance) for v in value):
        return [{f.name: getattr(i, f.name) for f in fields(i)} for i in value]
    return value


def _decode(kind: type, data: Any) -> Any:
    """A kept value of a key of type ``kind`` as the watcher would hold it."""
    if kind is HealthConnect:
        return tuple(Instance(
            node=str(d["node"]), service_id=str(d["service_id"]), address=str(d["address"]),
            port=int(d["port"]), tags=tuple(str(t) for t in d.get("tags", ())),
            meta=tuple((str(k), str(v)) for k, v in d.get("meta", ())),
            passing=bool(d.get("passing", True)), warning=bool(d.get("warning", False)),
        ) for d in data)
    if kind is IntentionMatch:
        if not (isinstance(data, list) and all(isinstance(d, dict) for d in data)):
            raise ValueError("not a list of intentions")
        return tuple(data)
    if not isinstance(data, dict):
        raise ValueError("not an object")
    return data


def _read(path: Path) -> dict[Key, Any]:
    """The answers kept at ``path``; none (and a warning) if it is unusable, an
    entry that cannot be read back is skipped (compile then waits for Consul)."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring the last good Consul answers in %s: %s", path, exc)
        return {}
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        log.warning("ignoring the last good Consul answers in %s: not version %d", path, VERSION)
        return {}
    out: dict[Key, Any] = {}
    for item in doc.get("answers") or ():
        try:
            name, params, data = item
            kind = KEPT[name]
            out[kind(**params)] = _decode(kind, data)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("%s: skipping a kept answer that cannot be read back (%s)", path,
                        type(exc).__name__)
    return out
