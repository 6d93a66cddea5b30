"""``make demo``: bring up lab hosts, show them, wait for Ctrl-C, tear down.

    python -m meshctl.lab.demo [--hosts 3] [--seconds N] [--keep-logs]

The demo is a *scenario* (a function that gets a running :class:`Lab`) run by
:func:`run`, which owns the lab's lifetime, signals and teardown. A richer demo
(the mesh itself) passes its own scenario::

    from meshctl.lab.demo import main
    from meshctl.lab.show import show_lab

    def mesh_demo(lab: Lab) -> None:
        show_lab(lab)
        ...  # start agents, services, proxies; print what a user would see

    main(scenario=mesh_demo)
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType

from meshctl.errors import LabError
from meshctl.lab._lab import Lab
from meshctl.lab.show import show_lab

Scenario = Callable[[Lab], None]

@contextlib.contextmanager
def termination_raises() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, like Ctrl-C, so teardown runs."""

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def run(
    scenario: Scenario = show_lab,
    *,
    hosts: int = 3,
    seconds: float | None = None,
    keep_logs: bool = False,
) -> int:
    """Bring up a lab, run ``scenario`` on it, then hold it until Ctrl-C/SIGTERM or for
    ``seconds``; always tear down. Returns an exit status (0, or 1 on a LabError)."""
    try:
        with termination_raises(), Lab(hosts=hosts, keep_logs=keep_logs, owner_kind="cli") as lab:
            scenario(lab)
            if seconds is None:
                print("lab is up; Ctrl-C tears it down", file=sys.stderr, flush=True)
                while True:
                    signal.pause()
            else:
                time.sleep(seconds)
    except KeyboardInterrupt:
        return 0
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None, scenario: Scenario | None = None) -> int:
    """Command line of the demo (``python -m meshctl.lab.demo``).

    By default it runs the mesh walkthrough and tears down when it is done;
    ``--hold`` keeps the lab up until Ctrl-C, ``--lab-only`` shows just the lab.
    """
    parser = argparse.ArgumentParser(
        prog="python -m meshctl.lab.demo",
        description="meshctl demo: the mesh on test hosts in namespaces",
    )
    parser.add_argument("--hosts", type=int, default=3, help="number of test hosts (3)")
    parser.add_argument("--proxy", default="nginx", help="sidecar proxy driver (nginx, haproxy)")
    parser.add_argument("--lab-only", action="store_true", help="only bring up and show the lab")
    parser.add_argument("--hold", action="store_true", help="keep the lab up until Ctrl-C")
    parser.add_argument(
        "--seconds", type=float, default=None, help="with --hold: tear down after this many seconds"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the lab directory")
    args = parser.parse_args(argv)
    if scenario is None:
        if args.lab_only:
            scenario = show_lab
        else:
            # Imported here so that `meshctl lab` (which imports this module for
            # run()) does not load the mesh walkthrough and Vault setup it never
            # uses; meshdemo does not import this module, so this hides no cycle.
            from meshctl.lab.meshdemo import mesh_demo

            def scenario(lab: Lab) -> None:
                mesh_demo(lab, proxy=args.proxy)

    seconds = args.seconds if args.hold else 0.0
    return run(scenario, hosts=args.hosts, seconds=seconds, keep_logs=args.keep_logs)


if __name__ == "__main__":
    sys.exit(main())
