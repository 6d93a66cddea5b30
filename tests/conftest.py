"""Shared test machinery: root/program gating, lab fixtures, lab logs in failure reports.

Markers:
    @pytest.mark.root            needs root, ``ip``, ``consul`` and ``bao``/``vault``;
                                 skipped with the reason otherwise.
    @pytest.mark.needs("nginx")  skipped unless every named program is on the lab's
                                 PATH (``<sys.prefix>/bin`` first); ``"bao|vault"``
                                 takes either.

Fixtures:
    lab          one 3-host lab for the whole session (h1..h3, srv, vault). Tests
                 that change it (stop an agent, block a route) put it back.
    lab_factory  ``lab_factory(hosts=1, **Lab kwargs) -> Lab`` for tests that need
                 their own lab; every lab it made is torn down after the test.

Helpers for fixtures: :func:`need_programs` (the ``needs`` marker's check) and
:func:`own_lab` (a lab of one's own, e.g. per module).

Set MESHCTL_REQUIRE_ALL=1 (``make test`` does) to turn every "cannot run here"
skip (not root, a program missing) into a failure: a run that silently skipped
whole suites must not pass. Skips that are part of a test's design stay skips.
Set MESHCTL_LAB_KEEP_LOGS=1 to keep lab directories (configs, logs) after a run.
When a test fails, the tail of every running lab process's log is attached to
its report.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Generator, Iterator
from types import FrameType
from typing import Any, NoReturn

import pytest

from meshctl.errors import LabError
from meshctl.lab import Lab, find_program, running_labs

LAB_PROGRAMS: dict[str, tuple[str, ...]] = {
    "ip (iproute2)": ("ip",),
    "consul": ("consul",),
    "bao (or vault)": ("bao", "vault"),
}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "no")


def unavailable(reason: str) -> NoReturn:
    """Skip the test because it cannot run here; under MESHCTL_REQUIRE_ALL=1, fail it."""
    if _env_flag("MESHCTL_REQUIRE_ALL"):
        pytest.fail(f"MESHCTL_REQUIRE_ALL=1: {reason}", pytrace=False)
    pytest.skip(reason)


def need_programs(*programs: str) -> None:
    """:func:`unavailable` unless each program is on the lab PATH (``"a|b"``: either)."""
    missing = [p for p in programs if find_program(*p.split("|")) is None]
    if missing:
        unavailable(f"program(s) not installed: {', '.join(missing)} (make deps installs them)")


def lab_unavailable() -> str | None:
    """Why a lab cannot run here (not root, a program missing), or None."""
    if os.geteuid() != 0:
        return "needs root: the lab creates network namespaces"
    missing = [label for label, names in LAB_PROGRAMS.items() if find_program(*names) is None]
    if missing:
        return f"missing program(s) {', '.join(missing)}: run `make deps`"
    return None


def _keep_logs() -> bool:
    return _env_flag("MESHCTL_LAB_KEEP_LOGS")


@contextlib.contextmanager
def own_lab(hosts: int = 3, **kwargs: Any) -> Iterator[Lab]:
    """A lab of one's own (``Lab(hosts, **kwargs)``), torn down when the block ends.

    :func:`unavailable` when no lab can run here; MESHCTL_LAB_KEEP_LOGS is
    honoured unless ``keep_logs`` is given.
    """
    reason = lab_unavailable()
    if reason:
        unavailable(reason)
    kwargs.setdefault("keep_logs", _keep_logs())
    with Lab(hosts=hosts, **kwargs) as the_lab:
        yield the_lab


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "needs(*programs): skipped unless each program is found on the lab PATH "
        "('a|b': either)",
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
            unavailable(reason)
    for mark in item.iter_markers("needs"):
        need_programs(*mark.args)


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
    with own_lab(hosts=3) as the_lab:
        yield the_lab


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., Lab]]:
    """Make labs of one's own: ``lab_factory(hosts=1, **kwargs)``; torn down after the test."""
    reason = lab_unavailable()
    if reason:
        unavailable(reason)
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
