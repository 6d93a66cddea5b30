"""The recorded discovery chains the unit tests read are what a real Consul answers.

A ``consul agent -dev`` of the version under test gets the config entries of
``tests.integration.record_chains``; its answers must equal the recorded ones
for that version (``tests/unit/chains/``), apart from the cluster's trust-domain
id in target names. A Consul whose answer shape changed fails here, and the
fixtures are recorded again with ``python -m tests.integration.record_chains``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.integration.consul_dev import consul_dev
from tests.integration.record_chains import RECORDED, SERVICES, record, version

pytestmark = pytest.mark.needs("consul")

_CLUSTER_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def anonymous(answer: Any) -> Any:
    """``answer`` with the cluster id (random per Consul cluster) replaced by a constant."""
    return json.loads(_CLUSTER_ID.sub("<cluster>", json.dumps(answer, sort_keys=True)))


def test_recorded_chains_are_what_this_consul_answers(tmp_path: Path) -> None:
    with consul_dev(tmp_path) as dev:
        chains, notes = record(dev.addr)
        running = version(dev.addr)
    minor = ".".join(running.split(".")[:2])
    if minor not in RECORDED:
        pytest.skip(f"no recorded chains for Consul {running} (recorded: {sorted(RECORDED)})")
    assert notes == [], notes  # every entry as recorded, no field dropped
    for svc in SERVICES:
        recorded = json.loads((RECORDED[minor] / f"{svc}.json").read_text())
        assert anonymous(chains[svc]) == anonymous(recorded), svc
