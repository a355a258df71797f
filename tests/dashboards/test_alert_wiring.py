"""What makes the alerts reach a person: runbooks, the label kube-prometheus-stack selects rules and monitors
by, and monitors that scrape the pods the operator creates under the `job` and `pool` the rules read."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from dashboards import build
from dashboards.checks import rule_expressions, rule_groups
from piggyback_operator import pools

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = ROOT / "docs" / "runbooks.md"
RUNBOOK_URL = re.compile(r"^https://github\.com/piggyback-dev/piggyback/blob/main/docs/runbooks\.md#([a-z0-9-]+)$")


def alerts() -> list[dict]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]


def runbook_sections() -> list[str]:
    return re.findall(r"^## (\S+)\s*$", RUNBOOKS.read_text(), flags=re.MULTILINE)


def test_every_alert_links_its_own_section_of_the_runbooks() -> None:
    sections = runbook_sections()
    for alert in alerts():
        match = RUNBOOK_URL.match(alert["annotations"].get("runbook_url", ""))
        assert match, f"{alert['alert']}: runbook_url missing or not into docs/runbooks.md"
        # GitHub's anchor for a heading: lower case (the alert names have no spaces or punctuation).
        assert match.group(1) == alert["alert"].lower(), alert["alert"]
        assert alert["alert"] in sections, f"docs/runbooks.md has no section for {alert['alert']}"


def test_every_runbook_section_is_an_alert_and_says_what_it_means_and_what_to_check() -> None:
    text = RUNBOOKS.read_text()
    assert set(runbook_sections()) == {a["alert"] for a in alerts()}
    for name in runbook_sections():
        body = text.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        assert "**Means:**" in body and "**Check:**" in body, name


def test_rules_and_monitors_carry_the_label_kube_prometheus_stack_selects() -> None:
    assert build.MONITORING_SELECTOR_LABELS == {"release": "kube-prometheus-stack"}
    components = ROOT / "manifests" / "components"
    for path in (components / "alerts/prometheusrule.yaml", components / "prometheus-monitors/podmonitor.yaml",
                 components / "prometheus-monitors/servicemonitor.yaml"):  # fmt: skip
        labels = yaml.safe_load(path.read_text())["metadata"]["labels"]
        assert labels.items() >= build.MONITORING_SELECTOR_LABELS.items(), path


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def _relabel(relabelings: list[dict], pod_labels: dict[str, str]) -> dict[str, str]:
    """What Prometheus makes of a discovered pod's labels with these relabelings (replace actions only)."""
    meta = {"__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in pod_labels.items()}
    target: dict[str, str] = {"job": "default-from-the-operator"}
    for rule in relabelings:
        assert rule.get("action", "replace") == "replace"
        value = ";".join(meta.get(s, "") for s in rule.get("sourceLabels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if match:
            target[rule["targetLabel"]] = match.expand(rule.get("replacement", "$1").replace("$1", r"\g<1>"))
    return target


def test_the_pod_monitor_scrapes_runtime_and_router_pods_as_the_jobs_the_rules_read() -> None:
    monitor = yaml.safe_load((ROOT / "manifests/components/prometheus-monitors/podmonitor.yaml").read_text())
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    runtime_labels = pools.labels("chat-pool")
    # As pools.render_router labels the router's pods.
    router_labels = {**pools.BASE_LABELS, pools.LABEL_COMPONENT: "router", pools.LABEL_ROUTER_FOR: "chat-pool"}
    assert _selects(monitor["spec"]["selector"], runtime_labels)
    assert _selects(monitor["spec"]["selector"], router_labels)
    assert _relabel(endpoint["relabelings"], runtime_labels) == {"job": build.RUNTIME_JOB, "pool": "chat-pool"}
    assert _relabel(endpoint["relabelings"], router_labels) == {"job": build.ROUTER_JOB, "pool": "chat-pool"}
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"


def test_the_rules_read_only_the_jobs_the_monitors_set() -> None:
    jobs = {job for e in rule_expressions() for job in re.findall(r'job="([^"]+)"', e.expr)}
    assert jobs == {build.RUNTIME_JOB, build.ROUTER_JOB, build.OPERATOR_JOB}
    service_monitor = yaml.safe_load((ROOT / "manifests/components/prometheus-monitors/servicemonitor.yaml")
                                     .read_text())  # fmt: skip
    (endpoint,) = service_monitor["spec"]["endpoints"]
    assert _relabel(endpoint["relabelings"], {}) == {"job": build.OPERATOR_JOB}
