"""``meshctl doctor``'s pure rules: the clock skew read from a server's Date header."""

from __future__ import annotations

import email.utils

from meshctl.agent.doctor import MAX_SKEW, _skew_check, skew

T = 1_800_000_000.0  # a whole second


def test_the_skew_is_how_far_the_local_clock_is_ahead_of_the_servers_date() -> None:
    date = email.utils.formatdate(T, usegmt=True)
    assert skew(date, T + 7.25) == 7.25
    assert skew(date, T - 3) == -3
    assert skew(None, T) is None and skew("yesterday", T) is None


def test_a_clock_off_by_more_than_the_bound_fails_with_the_fix() -> None:
    date = email.utils.formatdate(T, usegmt=True)
    # The server made its answer within [T, T+1): half a second is its truncation.
    assert _skew_check("clock", date, T + 0.4, T + 0.6).ok
    late = _skew_check("clock", date, T + MAX_SKEW + 2, T + MAX_SKEW + 2.01)
    assert not late.ok and "+3.5s off" in late.detail and "NTP" in late.fix
    early = _skew_check("clock", date, T - MAX_SKEW - 2, T - MAX_SKEW - 1.99)
    assert not early.ok and "off the server's" in early.detail
    assert not _skew_check("clock", None, T, T).ok
