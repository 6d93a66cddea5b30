"""meshctl.dataplane: the sidecars' raw counter keys as Prometheus metric families."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from meshctl.dataplane import BOUNDS, DataplaneCollector, families, parse_key

ROOT = Path(__file__).resolve().parents[2]
IN = "inbound|api|web||||200"
OUT = "outbound|web|api|api|v2|1|503"


def _text(raw: dict[str, float] | None) -> str:
    reg = CollectorRegistry()
    reg.register(DataplaneCollector(lambda: raw))
    return generate_latest(reg).decode()


def test_counters_and_histogram_from_raw_keys() -> None:
    raw = {f"r|{IN}": 3, f"s|{IN}": 0.0021, "b2|" + IN: 1, "b3|" + IN: 2, f"r|{OUT}": 1,
           f"t|{OUT}": 2, "d|inbound|api|evil||||": 4}
    text = _text(raw)
    assert ('meshctl_requests_total{code="200",direction="inbound",peer="web",route="",'
            'service="api",subset="",upstream=""} 3.0') in text
    assert ('meshctl_request_retries_total{code="503",direction="outbound",peer="api",'
            'route="1",service="web",subset="v2",upstream="api"} 2.0') in text
    assert 'meshctl_intention_denials_total{direction="inbound",peer="evil",service="api"} 4.0' \
        in text
    # Buckets are cumulative on the way out; +Inf equals the count.
    assert 'le="0.00025",peer="web"' in text
    lines = [ln for ln in text.splitlines() if ln.startswith("meshctl_request_duration_seconds_"
                                                              "bucket") and 'peer="web"' in ln]
    values = [float(ln.rsplit(" ", 1)[1]) for ln in lines]
    assert values == [0.0, 1.0, 3.0] + [3.0] * (len(BOUNDS) - 2)
    assert "meshctl_dataplane_up 1.0" in text


def test_a_key_that_does_not_parse_is_counted_not_exported() -> None:
    raw = {f"r|{IN}": 1, "r|inbound|api|x y||||200": 1, "r|sideways|api|||||200": 1,
           "q|" + IN: 1, "b99|" + IN: 1, "r|inbound|api": 1, f"r|{OUT}": True}
    text = _text(raw)  # type: ignore[arg-type]
    assert "meshctl_dataplane_bad_keys 6.0" in text
    assert "x y" not in text and "sideways" not in text


def test_an_unreadable_sidecar_is_dataplane_up_0_and_not_a_failed_scrape() -> None:
    def broken() -> dict[str, float]:
        raise OSError("no such socket")

    reg = CollectorRegistry()
    reg.register(DataplaneCollector(broken))
    text = generate_latest(reg).decode()
    assert "meshctl_dataplane_up 0.0" in text
    assert "meshctl_requests_total" not in text


def test_parse_key_grammar() -> None:
    assert parse_key(f"r|{IN}") == ("r", ("inbound", "api", "web", "", "", "", "200"))
    assert parse_key("b16|" + IN) is not None and parse_key("b17|" + IN) is None
    assert parse_key("r|inbound|API|||||200") is None  # only the names' grammar


def test_both_lua_modules_use_the_python_buckets() -> None:
    """One naming for both drivers: both Lua modules count in the shared buckets,
    whose bounds are BOUNDS."""
    want = ", ".join(f"{b:g}" for b in BOUNDS)
    text = (ROOT / "plugins/common/meshctl_buckets.lua").read_text()
    body = text.split("BOUNDS = {", 1)[1].split("}", 1)[0]
    got = ", ".join(f"{float(x):g}" for x in body.replace("\n", " ").split(",") if x.strip())
    assert got == want
    for lua in ("plugins/nginx/meshctl_metrics.lua", "plugins/haproxy/meshctl_metrics.lua"):
        text = (ROOT / lua).read_text()
        assert 'require("meshctl_buckets")' in text and "BOUNDS = {" not in text, lua
    assert families({}) != []
