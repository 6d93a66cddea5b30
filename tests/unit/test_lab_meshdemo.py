"""``make demo``'s checks on plain data: a step that cannot be shown fails the demo."""

from __future__ import annotations

import pytest

from meshctl.lab.meshdemo import DemoFailed, reload_count


def test_reload_count_reads_the_agent_state() -> None:
    assert reload_count("h2", {"last_apply": {"action": "reloaded", "reloads": 3}}) == 3
    assert reload_count("h2", {"last_apply": {"reloads": 0}}) == 0


@pytest.mark.parametrize(
    "status",
    [None, {}, {"last_apply": None}, {"last_apply": {}}, {"last_apply": {"reloads": "2"}},
     {"last_apply": {"reloads": True}}],
)
def test_an_unreadable_reload_count_fails_the_demo(status: dict[str, object] | None) -> None:
    # Two unreadable counts must not compare equal and pass for "no reloads".
    with pytest.raises(DemoFailed, match="cannot read the proxy reload count on h3"):
        reload_count("h3", status)
