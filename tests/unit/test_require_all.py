"""The suite's own gate: "cannot run here" is a skip by hand and a failure under
MESHCTL_REQUIRE_ALL=1 (``make test``), so CI cannot pass with suites unrun."""

from __future__ import annotations

import pytest

from tests.conftest import need_programs, unavailable

MISSING = "meshctl-no-such-program"


def test_a_missing_program_is_a_skip_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHCTL_REQUIRE_ALL", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"not installed: {MISSING}"):
        need_programs("sh", MISSING)
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        unavailable("needs root")


def test_a_missing_program_fails_under_require_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHCTL_REQUIRE_ALL", "1")
    with pytest.raises(pytest.fail.Exception, match=f"not installed: {MISSING}"):
        need_programs(MISSING)
    with pytest.raises(pytest.fail.Exception, match="MESHCTL_REQUIRE_ALL=1: needs root"):
        unavailable("needs root")


def test_either_of_two_programs_will_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHCTL_REQUIRE_ALL", "1")
    need_programs(f"{MISSING}|sh")  # sh is there: nothing happens
    with pytest.raises(pytest.fail.Exception, match=f"{MISSING}\\|{MISSING}2"):
        need_programs(f"{MISSING}|{MISSING}2")
