"""Every panel and every rule against a real Prometheus scraping a real `piggyback serve` under mixed load.

One stack per module (dashboards/live.py): the runtime process with an LS and a BE service of the synthetic
tiny model and ~10 s of Poisson LS / closed-loop BE load through a real `piggyback router`, the operator's
registry served over HTTP as `piggyback-operator run` serves it, and Prometheus (1 s scrapes) with the rules
file loaded. Dashboard variables are substituted as Grafana does for "All" (`.*`), and `$__rate_interval` as a
window holding several scrapes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import pytest

from dashboards.checks import dashboard_expressions, recorded_names, rule_expressions, rule_groups, variable_selectors
from dashboards.live import NAMESPACE, LiveStack, live_stack, runtime_config

# The first test also waits for the live stack to start (dashboards.live.STARTUP_TIMEOUT_S).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600), pytest.mark.usefixtures("prometheus_tools")]

LOAD_S = 10.0
# Panel queries whose series exist only after an event the live stack does not cause: its stages are far above
# the requests' lengths, so nothing migrates; its KV cache is sized so that nothing is preempted; it submits no
# Batch API batch (tests/runtime/test_batch_api.py reads those series); it has no remote CPU attention nodes
# (tests/runtime/test_remote_ray.py reads those). These panels are checked to parse and evaluate all the same.
NEEDS_AN_EVENT = ("piggyback_migrations_total", "piggyback_router_migrations_total", "piggyback_migration_seconds",
                  "vllm:num_preemptions_total", "piggyback_batch_lines{", "piggyback_batch_lines_finished_total",
                  "piggyback_remote_")
ALL = ".*"
ERROR_RATIO_1H = "model_name:piggyback_slo_errors:ratio_rate1h"


def substitute(expr: str, **values: str) -> str:
    """Grafana's variable substitution for the dashboard variables (`$namespace`, `$__rate_interval`, ...)."""
    merged = {"namespace": ALL, "service": ALL, "class": ALL, "__rate_interval": "15s", **values}
    out = re.sub(r"\$(\w+)", lambda m: merged[m.group(1)], expr)
    assert "$" not in out, f"unsubstituted variable in {out!r}"
    return out


def finite_values(result: list[dict]) -> list[float]:
    return [v for series in result if math.isfinite(v := float(series["value"][1]))]


@pytest.fixture(scope="module")
def stack(prometheus_tools: None) -> Iterator[LiveStack]:
    with live_stack(LOAD_S) as live:
        yield live


def test_the_load_reached_the_runtime(stack: LiveStack) -> None:
    finished = stack.query('sum by (model_name) (piggyback_requests_total{outcome="finished"})')
    by_service = {s["metric"]["model_name"]: float(s["value"][1]) for s in finished}
    assert by_service.get("chat", 0) > 0 and by_service.get("batch", 0) > 0, by_service


@pytest.mark.parametrize("expression", dashboard_expressions(), ids=lambda e: f"{e.where}: {e.expr[:40]}")
def test_every_panel_query_returns_data(stack: LiveStack, expression) -> None:
    result = stack.query(substitute(expression.expr))  # raises with Prometheus' error if it does not parse
    if any(name in expression.expr for name in NEEDS_AN_EVENT):
        return
    assert finite_values(result), f"{expression.where}: no finite value for {expression.expr}: {result}"


def test_panels_filtered_to_one_service_return_only_that_service(stack: LiveStack) -> None:
    """The variables filter for real: with $service=chat no panel shows another service, TTFT shows chat's."""
    for expression in dashboard_expressions():
        result = stack.query(substitute(expression.expr, service="chat", namespace=NAMESPACE))
        services = {s["metric"].get("model_name") or s["metric"].get("service") for s in result} - {None}
        assert services <= {"chat"}, expression
        if "TTFT" in expression.where:
            assert finite_values(result) and services == {"chat"}, expression
    ttft = next(e for e in dashboard_expressions() if "TTFT" in e.where)
    assert stack.query(substitute(ttft.expr, namespace="some-other-namespace")) == []


def test_variables_list_the_namespace_services_and_classes(stack: LiveStack) -> None:
    selectors = {e.where: substitute(e.expr) for e in variable_selectors()}
    series = {where: stack.get("/api/v1/series", **{"match[]": sel}) for where, sel in selectors.items()}
    assert {s["namespace"] for s in series["variable $namespace"]} == {NAMESPACE}
    assert {s["model_name"] for s in series["variable $service"]} == {"chat", "batch"}
    assert {s["class"] for s in series["variable $class"]} == {"LS", "BE"}


def test_slo_thresholds_follow_the_runtime_config(stack: LiveStack) -> None:
    slo = next(s for s in runtime_config(8000).services if s.name == "chat").slo
    assert slo is not None
    got = {
        metric: float(stack.query(f'{metric}{{model_name="chat"}}')[0]["value"][1])
        for metric in ("piggyback_slo_ttft_target_seconds", "piggyback_slo_tpot_target_seconds",
                       "piggyback_slo_attainment_target_ratio")
    }  # fmt: skip
    assert got == {"piggyback_slo_ttft_target_seconds": slo.ttft_s, "piggyback_slo_tpot_target_seconds": slo.tpot_s,
                   "piggyback_slo_attainment_target_ratio": slo.attainment_target}  # fmt: skip
    assert stack.query('piggyback_slo_ttft_target_seconds{model_name="batch"}') == []  # BE has no SLO


@pytest.mark.parametrize("expression", rule_expressions(), ids=lambda e: e.where)
def test_every_rule_expression_evaluates(stack: LiveStack, expression) -> None:
    result = stack.query(expression.expr)  # raises with Prometheus' error if it does not parse or evaluate
    if expression.where.removeprefix("rule ") in recorded_names():
        assert finite_values(result), f"{expression.where} recorded nothing: {result}"


def test_the_error_ratio_rule_agrees_with_the_runtime_counters(stack: LiveStack) -> None:
    # The rule's own expression now: its recorded series may predate the load (the group runs every 30 s).
    (rule,) = [r for g in rule_groups() for r in g["rules"] if r.get("record") == ERROR_RATIO_1H]
    (ratio,) = [s for s in stack.query(rule["expr"]) if s["metric"]["model_name"] == "chat"]
    counts = {s["metric"]["attained"]: float(s["value"][1])
              for s in stack.query('piggyback_slo_requests_total{model_name="chat"}')}  # fmt: skip
    assert counts["true"] + counts["false"] > 0
    expected = counts["false"] / (counts["true"] + counts["false"])
    # rate() extrapolates over the window's edges; the share of misses stays within a few points.
    assert float(ratio["value"][1]) == pytest.approx(expected, abs=0.05)


def test_prometheus_loaded_every_rule_without_error(stack: LiveStack) -> None:
    loaded = stack.get("/api/v1/rules")["groups"]
    names = {rule["name"]: rule for group in loaded for rule in group["rules"]}
    expected = {rule.get("record") or rule["alert"] for group in rule_groups() for rule in group["rules"]}
    assert set(names) == expected
    errors = {name: rule.get("lastError") for name, rule in names.items() if rule.get("health") == "err"}
    assert errors == {}
