"""The certificate helper process: the agent never loads cryptography, and the helper
gives exactly the answers the in-process functions give (a real child process)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshctl.errors import SourceError, VaultError
from meshctl.vault import cryptoproc
from meshctl.vault.leaf import LeafCert, chains_to, leaf_chain_pem, new_key_and_csr, pem_certs
from tests.unit.test_certs import CA

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def helper() -> Iterator[None]:
    cryptoproc.use_helper()
    cryptoproc._state.memo.clear()
    try:
        yield
    finally:
        cryptoproc.use_helper(False)
        cryptoproc._state.memo.clear()


def test_the_agent_and_the_cli_load_no_cryptography() -> None:
    code = ("import sys, meshctl.agent.loop, meshctl.cli, meshctl.agent.parts; "
            "print(sorted(m for m in sys.modules if m.startswith('cryptography')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_helper_answers_as_the_functions_here_do(helper: None) -> None:
    root = CA.make("root")
    leaf = root.leaf("web")
    there = LeafCert.from_pem(leaf.cert_pem, leaf.key_pem, root.pem, where="t")
    assert cryptoproc._state.proc is not None  # it ran in the helper
    cryptoproc.use_helper(False)
    here = LeafCert.from_pem(leaf.cert_pem, leaf.key_pem, root.pem, where="t")
    assert there == here
    cryptoproc.use_helper()
    assert chains_to(leaf.cert_pem, root.pem) and not chains_to(leaf.cert_pem,
                                                                  CA.make("other").pem)
    assert pem_certs([root.pem, root.pem], "x") == [root.pem.strip()]
    assert leaf_chain_pem(leaf.cert_pem, [root.pem]) == leaf.cert_pem.strip() + "\n"
    key_pem, csr_pem = new_key_and_csr("web.svc.mesh.test", ["web.svc.mesh.test"], [])
    assert key_pem.startswith("-----BEGIN PRIVATE KEY-----")
    assert csr_pem.startswith("-----BEGIN CERTIFICATE REQUEST-----")


def test_a_refused_input_keeps_its_message_and_never_quotes_the_key(helper: None) -> None:
    root = CA.make("root")
    a, b = root.leaf("a"), root.leaf("b")
    with pytest.raises(SourceError, match=r"^where: private key does not belong") as got:
        LeafCert.from_pem(a.cert_pem, b.key_pem, "", where="where")
    assert "PRIVATE KEY" not in str(got.value)
    with pytest.raises(VaultError, match="answer is not PEM"):
        pem_certs(["not pem"], "Vault at x")


def test_release_ends_the_helper_and_the_next_call_starts_one(helper: None) -> None:
    root = CA.make("root")
    cryptoproc.call("canonical_certs", [root.pem])
    proc = cryptoproc._state.proc
    assert proc is not None and proc.poll() is None
    cryptoproc.release()
    assert proc.poll() == 0 and cryptoproc._state.proc is None
    # A pure answer is remembered: the same bundle again starts no helper.
    cryptoproc.call("canonical_certs", [root.pem])
    assert cryptoproc._state.proc is None
    cryptoproc.call("chains_to", root.pem, root.pem)
    assert cryptoproc._state.proc is not None


def test_a_helper_that_cannot_start_or_dies_is_a_source_error(
        helper: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with pytest.raises(SourceError, match=r"certificate helper .* cannot start"):
        cryptoproc.call("subject_cns", "")
    monkeypatch.setattr(sys, "executable", "/bin/true")  # exits at once, answers nothing
    with pytest.raises(SourceError, match=r"no answer to subject_cns .*exited with 0"):
        cryptoproc.call("subject_cns", "x")
