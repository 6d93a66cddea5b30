"""The render sandbox keeps Jinja2's rules while it remembers its verdicts."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from jinja2.exceptions import SecurityError

from meshctl.proxy.templating import environment


@dataclass(frozen=True)
class Item:
    name: str


def _function() -> None:
    pass


@pytest.mark.parametrize("source", [
    "{{ item.name }}{{ item.__class__ }}",       # a dunder after a safe read of the type
    "{{ items.append }}{{ items.append(1) }}",   # a list's mutator (immutable sandbox)
    "{{ item.name }}{{ f.__globals__ }}",        # a function's internals
])
def test_what_jinja2_refuses_stays_refused_after_safe_reads(source: str) -> None:
    env = environment("nginx")
    ctx = {"item": Item("a"), "items": [1], "f": _function}
    for _ in range(2):  # the second time from the remembered verdicts
        with pytest.raises(SecurityError):
            env.from_string(source).render(**ctx)


def test_safe_reads_are_served_from_the_remembered_verdict() -> None:
    env = environment("nginx")
    assert env.from_string("{{ item.name }}-{{ item.name }}").render(item=Item("a")) == "a-a"
    assert env._verdicts[(Item, "name")] is True  # type: ignore[attr-defined]
