"""Every PromQL expression the dashboards and rules hold, and the metric names they read.

The metric-name check compares those names with the metrics the code defines (runtime/piggyback_runtime/
metrics.py: the runtime's and the router's, and operator/piggyback_operator/telemetry.py), so renaming a
metric fails CI instead of leaving a dashboard blank; `unpaneled_families` is the other direction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from dashboards.definitions import DASHBOARDS, VARIABLES

RULES_FILE = Path(__file__).resolve().parent / "rules" / "piggyback-rules.yaml"

# What Prometheus' client library appends to a family's name on the wire, by family type.
_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
}
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
             "inf", "nan", "atan2"}  # fmt: skip
# Grafana's `label_values(metric, label)` and the variables Grafana substitutes.
_GRAFANA_LABEL_VALUES = re.compile(r"label_values\((.*),\s*\w+\)\s*$")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


@dataclass(frozen=True)
class Expression:
    where: str  # "dashboard <uid> / panel <title>" or "rule <name>"
    expr: str


def dashboard_expressions() -> list[Expression]:
    out = []
    for dashboard in DASHBOARDS:
        for panel in dashboard.panels:
            out.extend(Expression(f"dashboard {dashboard.uid} / panel {panel.title!r}", q.expr) for q in panel.queries)
    return out


def variable_selectors() -> list[Expression]:
    """The series selector inside each `label_values(...)` variable query."""
    out = []
    for name, _label, query in VARIABLES:
        match = _GRAFANA_LABEL_VALUES.match(query)
        if match is None:
            raise ValueError(f"variable {name}: {query!r} is not label_values(<selector>, <label>)")
        out.append(Expression(f"variable ${name}", match.group(1)))
    return out


def rule_groups(path: Path = RULES_FILE) -> list[dict]:
    return list(yaml.safe_load(path.read_text())["groups"])


def rule_expressions(path: Path = RULES_FILE) -> list[Expression]:
    return [
        Expression(f"rule {rule.get('record') or rule.get('alert')}", rule["expr"])
        for group in rule_groups(path) for rule in group["rules"]
    ]  # fmt: skip


def recorded_names(path: Path = RULES_FILE) -> set[str]:
    return {rule["record"] for group in rule_groups(path) for rule in group["rules"] if "record" in rule}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (not functions, keywords, label names, durations or numbers)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # ranges and subqueries
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def family_name(sample_name: str, known_families: dict[str, str]) -> str | None:
    """The defined family a sample name belongs to (the name less a suffix its type puts on the wire), or None.

    A counter is read as `<name>_total`, a histogram as `<name>_bucket`; a gauge read with a suffix is not found.
    """
    if sample_name in known_families and known_families[sample_name] not in ("counter", "histogram", "summary"):
        return sample_name
    for family, kind in known_families.items():
        if any(sample_name == family + suffix for suffix in _SAMPLE_SUFFIXES.get(kind, ())):
            return family
    return None


def defined_families() -> dict[str, str]:
    """Every metric family the runtime, the router and the operator define, and its type (counter, gauge...)."""
    from piggyback_operator.telemetry import REGISTRY
    from piggyback_runtime.metrics import OptionalGauge, RouterMetrics, RuntimeMetrics, metric_family_names

    # Optional gauges are absent from a fresh registry until they have a value, but are defined all the same.
    runtime = RuntimeMetrics()
    families = {family.name: family.type for family in runtime.registry.collect()}
    assert set(families) == set(metric_family_names())
    families.update({g.name: "gauge" for g in vars(runtime).values() if isinstance(g, OptionalGauge)})
    families.update({family.name: family.type for family in RouterMetrics().registry.collect()})
    families.update({family.name: family.type for family in REGISTRY.collect()})
    return families


def unpaneled_families(known: dict[str, str]) -> set[str]:
    """Defined metric families that no dashboard panel reads."""
    read = {family_name(name, known) for e in dashboard_expressions() for name in metric_names(e.expr)}
    return set(known) - read


# Series Prometheus itself makes (not any Piggyback code); none are used today, listed so that one may be.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "ALERTS", "ALERTS_FOR_STATE"}


def undefined_metrics(expressions: list[Expression], known: dict[str, str]) -> list[str]:
    """'<where>: <name>' for each metric an expression reads that nothing defines."""
    elsewhere = recorded_names() | PROMETHEUS_SERIES
    problems = []
    for e in expressions:
        for name in sorted(metric_names(e.expr)):
            if name not in elsewhere and family_name(name, known) is None:
                problems.append(f"{e.where}: {name}")
    return problems


def all_expressions() -> list[Expression]:
    return dashboard_expressions() + variable_selectors() + rule_expressions()
