"""Where the certificate work of ``meshctl.vault.pem`` runs: here, or in a helper process.

By default (the CLI, the tests) a call imports ``meshctl.vault.pem`` and runs
the function in this process. The agent calls :func:`use_helper` at start:
from then on a call goes to a helper process (``python -m meshctl.vault.pem``,
its own interpreter with ``cryptography`` loaded) over a pipe, one JSON line
each way, and :func:`release` ends the helper once the certificate step of a
pass is done. So the agent, which needs X.509 only at start, at a renewal and
when the CA bundle changes, does not carry the library (8 MB of resident
memory) the rest of the time. Keys cross only that pipe, between two
processes of the same user; nothing is written or logged.

The pure answers (a bundle's canonical form, a chain check) are remembered
for the same input, so the periodic CA refresh of an unchanged bundle starts
no helper.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import threading
from collections import OrderedDict
from typing import Any

from meshctl.errors import SourceError

#: seconds a helper may take to answer one call (key generation is milliseconds)
TIMEOUT = 30.0
#: functions whose answers depend on their arguments alone (remembered)
PURE = frozenset({"chains_to", "non_root", "canonical_certs", "subject_cns"})
_MEMO_SIZE = 64


class PemInputError(ValueError):
    """The input is not what the function needs (``meshctl.vault.pem.PemError``)."""


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.helper = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.memo: OrderedDict[str, Any] = OrderedDict()


_state = _State()


def use_helper(on: bool = True) -> None:
    """Run the certificate work in a helper process from now on (the agent)."""
    with _state.lock:
        _state.helper = on
    if not on:
        release()


def call(fn: str, *args: Any) -> Any:
    """``meshctl.vault.pem.<fn>(*args)``, here or in the helper.

    Raises PemInputError with the function's message for an input it refuses,
    and SourceError naming the helper when it cannot be started or fails.
    """
    memo_key = json.dumps([fn, args]) if fn in PURE else None
    with _state.lock:
        if memo_key is not None and memo_key in _state.memo:
            _state.memo.move_to_end(memo_key)
            return _state.memo[memo_key]
        result = _remote(fn, args) if _state.helper else _local(fn, args)
        if memo_key is not None:
            _state.memo[memo_key] = result
            while len(_state.memo) > _MEMO_SIZE:
                _state.memo.popitem(last=False)
        return result


def _local(fn: str, args: tuple[Any, ...]) -> Any:
    from meshctl.vault import pem

    try:
        # A JSON round trip, as through the helper: both modes return the same types.
        return json.loads(json.dumps(pem.FUNCTIONS[fn](*args)))
    except pem.PemError as exc:
        raise PemInputError(str(exc)) from None


def _remote(fn: str, args: tuple[Any, ...]) -> Any:
    """One call through the helper (caller holds the lock)."""
    what = "certificate helper (python -m meshctl.vault.pem)"
    proc = _state.proc
    if proc is None or proc.poll() is not None:
        try:
            proc = _state.proc = subprocess.Popen(
                [sys.executable, "-m", "meshctl.vault.pem"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, close_fds=True)
        except OSError as exc:
            raise SourceError(f"{what}: cannot start: {exc.strerror or exc}") from None
    assert proc.stdin is not None and proc.stdout is not None
    ready: list[Any] = [True]
    try:
        proc.stdin.write((json.dumps({"fn": fn, "args": list(args)}) + "\n").encode())
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
        line = proc.stdout.readline() if ready else b""
    except OSError:  # a broken pipe: it has exited
        line = b""
    if not line:
        _stop(proc)  # closed its output (it ends), or still silent (it is killed)
        raise SourceError(
            f"{what}: no answer to {fn} "
            + (f"(it exited with {proc.returncode}; its error is in the agent's log, and "
               f"{sys.executable} must be able to import meshctl)" if ready
               else f"within {TIMEOUT:g}s"))
    try:
        answer = json.loads(line)
    except ValueError:
        _stop(proc)
        raise SourceError(f"{what}: an answer that is not JSON") from None
    if "error" in answer:
        raise PemInputError(str(answer["error"]))
    return answer["ok"]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if _state.proc is proc:
        _state.proc = None
    try:
        if proc.stdin is not None:
            proc.stdin.close()
    except OSError:
        pass  # it has gone already
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def release() -> None:
    """End the helper, if one runs (the end of its input makes it exit)."""
    with _state.lock:
        proc = _state.proc
        if proc is not None:
            _stop(proc)
