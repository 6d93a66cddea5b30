"""``make demo``'s walkthrough, as a user runs it, on both drivers.

The demo checks every step it shows (DemoFailed → exit status 1), so exit 0
means the mesh did what the demo says; the test also reads the output a user
reads.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshctl.lab.meshdemo import DemoFailed, expect_answers, expect_denied

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.root
@pytest.mark.needs("nginx", "haproxy")
@pytest.mark.parametrize("proxy", ["nginx", "haproxy"])
def test_the_demo_shows_a_working_mesh(proxy: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "meshctl.lab.demo", "--proxy", proxy],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for n in range(1, 7):
        assert f"== step {n}:" in out
    assert "P99 MS" in out and '"web" -> "api"' in out
    assert (ROOT / "meshctl-demo-mesh.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert "1  200     h" in out and "web\n" in out
    assert "denied: intention web -> api denies" in out
    assert "proxy reloads on h2 and h3 during step 5: none" in out
    assert f"proxy {proxy}" in out
    assert "down in" in proc.stderr + out


def test_a_step_that_does_not_hold_fails_the_demo() -> None:
    ok = [(1, "200", "h2", "web"), (2, "200", "h3", "web")]
    expect_answers(1, ok, {"h2", "h3"})
    with pytest.raises(DemoFailed, match="step 1: expected 200s from h2, h3"):
        expect_answers(1, [(1, "403", "denied: no intention matched", "")], {"h2", "h3"})
    with pytest.raises(DemoFailed, match="step 4"):
        expect_answers(4, [(1, "200", "h2", "web")], {"h2", "h3"})  # h3 never answered
    with pytest.raises(DemoFailed, match="step 3"):
        expect_answers(3, [(1, "200", "h3", "")], {"h3"})  # no verified caller
    expect_denied(5, [(1, "403", "denied", "")])
    with pytest.raises(DemoFailed, match="step 5"):
        expect_denied(5, [(1, "200", "h2", "web")])
