"""The request counters HAProxy keeps itself (templates/haproxy/count.j2), as the
raw keys of meshctl.dataplane (pure).

Every answer a server gave is an entry of the ``meshctl_requests`` stick table,
keyed ``<labels>|<backend>|<bucket>`` (the 7 label fields of meshctl.dataplane,
the backend, the duration's bucket from 1 to len(BOUNDS) + 1), whose ``gpc0``
counts the requests and ``gpc1`` … ``gpc32`` the set bits of each request's
duration in microseconds: bit ``k`` set in ``gpc(k + 1)`` requests adds
``gpc(k + 1) * 2**k`` µs to the duration sum, exactly. ``show table`` prints one
entry per line: ``0x…: key=<key> use=0 exp=0 gpc0=3 gpc1=1 …``.
"""

from __future__ import annotations

import re

from meshctl.dataplane import BOUNDS

TABLE = "meshctl_requests"
#: the bits of a duration in microseconds the table counts (2**32 µs: 71 min)
BITS = 32

_ENTRY = re.compile(r"^0x[0-9a-f]+: key=(?P<key>.*?) use=\d+ exp=\d+(?: shard=\d+)? (?P<data>.*)$")
_GPC = re.compile(r"\bgpc(\d+)=(\d+)")


def table_counters(text: str, bad: list[str] | None = None) -> dict[str, float]:
    """``show table meshctl_requests`` → {"r|<labels>": n, "b<i>|<labels>": n,
    "s|<labels>": seconds}, summed over the backends of a label set. Lines that are
    not entries (the header) are skipped; so are entries whose key does not parse
    (longer than the table's key length, which HAProxy cuts), added to ``bad``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _ENTRY.match(line.strip())
        if m is None:
            continue
        fields = m["key"].split("|")
        if len(fields) != 9 or not fields[8].isdigit() or \
                not 1 <= int(fields[8]) <= len(BOUNDS) + 1:
            if bad is not None:
                bad.append(m["key"])
            continue
        bucket = int(fields[8])
        labels = "|".join(fields[:7])
        gpc = {int(i): int(v) for i, v in _GPC.findall(m["data"])}
        n = gpc.get(0, 0)
        micros = sum(gpc.get(k + 1, 0) << k for k in range(BITS))
        for key, value in ((f"r|{labels}", n), (f"b{bucket}|{labels}", n),
                           (f"s|{labels}", micros / 1e6)):
            out[key] = out.get(key, 0) + value
    return out


def merge(lua: dict[str, float], table: dict[str, float]) -> dict[str, float]:
    """The Lua table's counters (HAProxy's own answers, TCP, retries …) plus the
    stick table's: each request is in exactly one of them."""
    out = dict(lua)
    for key, value in table.items():
        out[key] = out.get(key, 0) + value
    return out
