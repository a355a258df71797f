"""promtool: the rules parse (plain file and the PrometheusRule's groups), and every alert has a unit test that
makes it fire on a breaching series while a healthy series beside it stays silent."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from dashboards.checks import RULES_FILE, rule_groups

ROOT = Path(__file__).resolve().parents[2]
UNIT_TESTS = RULES_FILE.with_name("piggyback-rules.test.yaml")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prometheus_tools")]  # slow: runs promtool


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_promtool_checks_the_rules_file() -> None:
    result = _promtool("check", "rules", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_prometheus_rule_groups(tmp_path: Path) -> None:
    rule = yaml.safe_load((ROOT / "manifests/components/alerts/prometheusrule.yaml").read_text())
    plain = tmp_path / "from-prometheusrule.yaml"
    plain.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = _promtool("check", "rules", str(plain))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = _promtool("test", "rules", UNIT_TESTS.name, cwd=UNIT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_where_it_fires() -> None:
    alerts = {rule["alert"] for group in rule_groups() for rule in group["rules"] if "alert" in rule}
    firing = {
        case["alertname"]
        for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts - firing == set(), "alerts without a unit test where they fire"
