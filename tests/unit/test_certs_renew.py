"""``meshctl certs renew``'s request, as the agent's reload pass takes it."""

from __future__ import annotations

import json
from pathlib import Path

from meshctl.agent.certs import RENEW_FILE, take_renewal_request
from tests.unit.test_agent_loop import DB1, Parts, answer_consul, parts  # noqa: F401


def test_a_renewal_request_renews_the_named_leaf_at_the_next_pass(
        parts: Parts) -> None:  # noqa: F811
    agent = parts.agent
    answer_consul(parts.source, (DB1,))
    agent.reconcile()
    agent.reconcile()
    serial = agent.store.load("web").serial  # type: ignore[union-attr]
    served = parts.served()
    (agent.cfg.run_dir / RENEW_FILE).write_text(json.dumps({"services": ["web"]}))
    agent._reload()  # what SIGHUP runs
    assert not (agent.cfg.run_dir / RENEW_FILE).exists()  # taken once
    agent.reconcile()
    assert agent.store.load("web").serial != serial  # type: ignore[union-attr]
    assert parts.served() != served  # the new leaf's files are in the config applied


def test_a_broken_request_renews_nothing_and_is_taken_once(tmp_path: Path) -> None:
    (tmp_path / RENEW_FILE).write_text("{not json")
    assert take_renewal_request(tmp_path) == set()
    (tmp_path / RENEW_FILE).write_text(json.dumps({"services": ["api", 3]}))
    assert take_renewal_request(tmp_path) == {"api"}
    assert take_renewal_request(tmp_path) == set()
