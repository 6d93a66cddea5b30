"""Shared test machinery: root/program gating, lab fixtures, lab logs in failure reports.

Markers:
    @pytest.mark.root            needs root, ``ip``, ``consul`` and ``bao``/``vault``;
                                 skipped with the reason otherwise.
    @pytest.mark.needs("nginx")  skipped unless every named program is on the lab's
                                 PATH (``<sys.prefix>/bin`` first).

Fixtures:
    lab          one 3-host lab for the whole session (h1..h3, srv, vault). Tests
                 that change it (stop an agent, block a route) put it back.
    lab_factory  ``lab_factory(hosts=1, **Lab kwargs) -> Lab`` for tests that need
                 their own lab; every lab it made is torn down after the test.

Set MESHCTL_LAB_KEEP_LOGS=1 to keep lab directories (configs, logs) after a run.
When a test fails, the tail of every running lab process's log is attached to
its report.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Generator, Iterator
from types import FrameType
from typing import Any

import pytest

from meshctl.errors import LabError
from meshctl.lab import Lab, find_program, running_labs

LAB_PROGRAMS: dict[str, tuple[str, ...]] = {
    "ip (iproute2)": ("ip",),
    "consul": ("consul",),
    "bao (or vault)": ("bao", "vault"),
}


def lab_unavailable() -> str | None:
    """Why a lab cannot run here (not root, a program missing), or None."""
    if os.geteuid() != 0:
        return "needs root: the lab creates network namespaces"
    missing = [label for label, names in LAB_PROGRAMS.items() if find_program(*names) is None]
    if missing:
        return f"missing program(s) {', '.join(missing)}: run `make deps`"
    return None


def _keep_logs() -> bool:
    return os.environ.get("MESHCTL_LAB_KEEP_LOGS", "") not in ("", "0", "false", "no")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs(*programs): skipped unless each program is found on the lab PATH"
    )
    # SIGTERM (a CI timeout, `kill`) ends the run like Ctrl-C, so fixtures tear labs down.
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    ):

        def interrupt(signum: int, _frame: FrameType | None) -> None:
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

        signal.signal(signal.SIGTERM, interrupt)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None:
        reason = lab_unavailable()
        if reason:
            pytest.skip(reason)
    for mark in item.iter_markers("needs"):
        missing = [p for p in mark.args if find_program(p) is None]
        if missing:
            pytest.skip(f"program(s) not installed: {', '.join(missing)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for lab in running_labs():
            report.sections.append((f"lab {lab.prefix} process logs", lab.log_report(40)))


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """A 3-host lab shared by the whole session."""
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    with Lab(hosts=3, keep_logs=_keep_logs()) as the_lab:
        yield the_lab


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., Lab]]:
    """Make labs of one's own: ``lab_factory(hosts=1, **kwargs)``; torn down after the test."""
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    labs: list[Lab] = []

    def make(hosts: int = 1, **kwargs: Any) -> Lab:
        kwargs.setdefault("keep_logs", _keep_logs())
        new = Lab(hosts=hosts, **kwargs)
        labs.append(new)
        return new.up()

    yield make
    errors = []
    for made in reversed(labs):
        try:
            made.down()
        except LabError as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail("lab teardown failed: " + "; ".join(errors))
