"""The dashboards and rules as files: generated from one source, filtered by the variables, naming real metrics."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dashboards import build
from dashboards.checks import (
    Expression,
    all_expressions,
    dashboard_expressions,
    defined_families,
    metric_names,
    rule_groups,
    undefined_metrics,
    unpaneled_families,
)
from dashboards.definitions import DASHBOARDS, NOT_ON_A_PANEL, THRESHOLD_LEGEND_REGEX, Panel, Query, dashboard_json

ROOT = Path(__file__).resolve().parents[2]


def test_generated_files_are_up_to_date() -> None:
    stale = [str(p.relative_to(ROOT)) for p in build.stale_files()]
    assert not stale, f"run `python -m dashboards.build`; out of date: {stale}"


def test_every_dashboard_has_the_datasource_and_filter_variables() -> None:
    for dashboard in DASHBOARDS:
        model = dashboard_json(dashboard)
        variables = {v["name"]: v for v in model["templating"]["list"]}
        assert set(variables) == {"datasource", "namespace", "service", "class"}, dashboard.uid
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        for panel in model["panels"]:
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]


def test_runtime_series_are_filtered_by_namespace_and_service_series_by_service() -> None:
    for e in dashboard_expressions():
        names = metric_names(e.expr)
        runtime_series = any(n.startswith(("vllm:", "piggyback_")) and not n.startswith("piggyback_operator_")
                             for n in names)  # fmt: skip
        if runtime_series:
            assert 'namespace=~"$namespace"' in e.expr, e
        if any(n.startswith(("piggyback_slo_", "vllm:time_to_first", "vllm:request_time")) for n in names):
            assert 'model_name=~"$service"' in e.expr, e


def test_slo_panels_draw_the_configured_targets_as_thresholds() -> None:
    slo = next(d for d in DASHBOARDS if d.uid == "piggyback-slo")
    by_title = {p.title: p for p in slo.panels}
    for title, target_metric in [("LS SLO attainment against target", "piggyback_slo_attainment_target_ratio"),
                                 ("TTFT p50 / p99 against SLO", "piggyback_slo_ttft_target_seconds"),
                                 ("TPOT p50 / p99 against SLO", "piggyback_slo_tpot_target_seconds")]:  # fmt: skip
        thresholds = [q for q in by_title[title].queries if target_metric in q.expr]
        assert len(thresholds) == 1 and ("SLO" in thresholds[0].legend or "target" in thresholds[0].legend), title


def test_only_target_series_are_styled_as_thresholds() -> None:
    """The dashed-red override (Grafana and the render script) must catch SLO lines and nothing else."""
    threshold = re.compile(THRESHOLD_LEGEND_REGEX)
    for dashboard in DASHBOARDS:
        for panel in dashboard.panels:
            if panel.kind == "stat":
                continue  # a stat shows a number, no lines: a target read there (error budget) is no threshold
            for query in panel.queries:
                reads_a_target = "_target_" in query.expr
                example = query.legend.replace("{{model_name}}", "chat").replace("{{condition}}", "SLOMet")
                assert bool(threshold.match(example)) == reads_a_target, (panel.title, query.legend)


def test_every_metric_a_dashboard_or_rule_reads_is_defined_in_the_code() -> None:
    assert undefined_metrics(all_expressions(), defined_families()) == []


def test_a_renamed_metric_is_reported() -> None:
    """What CI would say if metrics.py renamed a metric a panel reads: the check must not pass vacuously."""
    known = defined_families()
    panel = Expression("dashboard x / panel y", 'histogram_quantile(0.99, sum by (le) (rate(vllm:ttft_seconds_bucket'
                                                '{model_name=~"$service"}[5m])))')  # fmt: skip
    assert undefined_metrics([panel], known) == ["dashboard x / panel y: vllm:ttft_seconds_bucket"]
    assert undefined_metrics([Expression("rule r", "piggyback_slo_requests_total > 0")], known) == []
    # A suffix is only stripped down to a defined family: a gauge read as `_total` is still a mistake.
    assert undefined_metrics([Expression("rule r", "piggyback_host_kv_usage_ratio_total")], known) != []


def test_every_exported_metric_is_on_a_panel_or_excluded_with_a_reason() -> None:
    known = defined_families()
    assert unpaneled_families(known) == set(NOT_ON_A_PANEL), "metrics on no panel (add one, or a reason why not)"
    assert all(reason.strip() for reason in NOT_ON_A_PANEL.values())
    assert set(NOT_ON_A_PANEL) <= set(known), "an exclusion names a metric nothing exports"


def test_the_panel_coverage_check_sees_a_metric_dropped_from_every_panel(monkeypatch: pytest.MonkeyPatch) -> None:
    known = defined_families()
    without_router_panels = tuple(d for d in DASHBOARDS if d.uid != "piggyback-router")
    monkeypatch.setattr("dashboards.checks.DASHBOARDS", without_router_panels)
    assert {"piggyback_router_leader", "piggyback_router_requests"} <= unpaneled_families(known)
    extra = Panel("x", (Query("sum(rate(piggyback_router_requests_total[5m]))", "x"),))
    with_one = (*without_router_panels, dataclasses.replace(DASHBOARDS[0], panels=(extra,)))
    monkeypatch.setattr("dashboards.checks.DASHBOARDS", with_one)
    assert "piggyback_router_requests" not in unpaneled_families(known)


def test_router_metrics_are_checked_like_the_runtimes() -> None:
    assert defined_families()["piggyback_router_requests"] == "counter"


def test_metric_names_skip_functions_keywords_labels_and_durations() -> None:
    expr = ('sum by (le, pod) (rate(a_bucket{x="b(c)", y=~"$service"}[5m] offset 1h)) > on (pod) group_left (z) '
            "b:c:d and 1e3 * max_over_time(e[1h:]) unless bool f")  # fmt: skip
    assert metric_names(expr) == {"a_bucket", "b:c:d", "e", "f"}


def test_prometheus_rule_component_carries_the_rules_file() -> None:
    generated = yaml.safe_load((ROOT / "manifests/components/alerts/prometheusrule.yaml").read_text())
    assert generated["kind"] == "PrometheusRule"
    assert generated["spec"]["groups"] == rule_groups()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_monitoring_overlay_provisions_dashboards_for_the_grafana_sidecar_and_the_rules() -> None:
    result = subprocess.run(["kubectl", "kustomize", str(ROOT / "manifests/overlays/monitoring")],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    config_maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get(
        "grafana_dashboard") == "1"]  # fmt: skip
    provisioned = {json.loads(next(iter(cm["data"].values())))["uid"] for cm in config_maps}
    assert provisioned == {d.uid for d in DASHBOARDS}
    rules = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert len(rules) == 1 and rules[0]["metadata"]["namespace"] == "piggyback-system"
