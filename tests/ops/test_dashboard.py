"""The Grafana dashboard and the compose stack's Prometheus: queries about metrics that exist.

Every panel query must parse as PromQL (promtool checks it as a recording rule),
read only series that `/metrics` exposes (or that the alert rules record, or that
Prometheus writes itself), and group or match only on labels those metrics carry.
A renamed metric or label fails here, not on an operator's blank panel.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from app.platform import metrics as service_metrics
from tests.ops.apps import ops_settings, running
from tests.ops.test_alert_rules import PROMETHEUS_OWN, exposed, metric_names, promtool, rules
from tests.support import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "story-service.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"

_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_MATCHER_LABELS = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_MATCHERS = re.compile(r"\{([^}]*)\}")
# Labels Prometheus adds to every scraped series, and histograms' bucket label.
SCRAPE_LABELS = frozenset({"job", "instance", "le"})


def queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def service_labels() -> dict[str, set[str]]:
    """Metric name (with its exposition suffixes) -> the labels the service gives it."""
    found: dict[str, set[str]] = {}
    for value in vars(service_metrics).values():
        if isinstance(value, MetricWrapperBase):
            labels = set(value._labelnames)
            name = value._name
            for suffix in ("", "_total", "_bucket", "_count", "_sum"):
                found[name + suffix] = labels
    return found


def labels_used(expr: str) -> set[str]:
    used: set[str] = set()
    for group in _GROUPING.findall(expr):
        used.update(label.strip() for label in group.split(",") if label.strip())
    for matcher in _MATCHERS.findall(expr):
        used.update(_MATCHER_LABELS.findall(matcher))
    return used


def test_the_dashboard_has_the_panels_operators_look_at() -> None:
    titles = " | ".join(title for title, _ in queries()).lower()
    for wanted in (
        "rung",
        "degraded",
        "breaker",
        "latency",
        "rate-limit",
        "upstream",
        "dependency",
    ):
        assert wanted in titles, f"no panel about {wanted}"


def test_every_panel_query_parses_as_promql(tmp_path: Path) -> None:
    rules_file = tmp_path / "panels.yml"
    rules_file.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "dashboard",
                        "rules": [
                            {"record": f"dashboard:panel_{i}", "expr": expr}
                            for i, (_, expr) in enumerate(queries())
                        ],
                    }
                ]
            }
        )
    )
    result = subprocess.run(
        [promtool(), "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stdout + result.stderr


async def test_every_panel_reads_series_that_exist(tmp_path: Path) -> None:
    async with running(ops_settings(tmp_path)) as (_, client):
        await client.get("/v1/stories")
        exposition = (await client.get("/metrics")).text
    recorded = {rule["record"] for rule in rules() if "record" in rule}

    missing = {
        title: sorted(metric_names(expr) - exposed(exposition) - recorded - PROMETHEUS_OWN)
        for title, expr in queries()
    }
    assert not {title: names for title, names in missing.items() if names}


def test_every_panel_groups_and_matches_on_labels_its_metrics_carry() -> None:
    labels = service_labels()
    problems: dict[str, Any] = {}
    for title, expr in queries():
        names = metric_names(expr) & set(labels)
        if not names:
            continue
        carried = set().union(*(labels[name] for name in names)) | SCRAPE_LABELS
        unknown = labels_used(expr) - carried
        if unknown:
            problems[title] = sorted(unknown)
    assert not problems


def test_the_compose_prometheus_config_is_valid_and_scrapes_the_alerts_job(
    tmp_path: Path,
) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    assert [job["job_name"] for job in config["scrape_configs"]] == ["story-service"]
    # The container path of the rules, pointed at this checkout's copy for promtool.
    config["rule_files"] = [str(ROOT / "deploy" / "prometheus" / "alerts.yml")]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))

    result = subprocess.run(
        [promtool(), "check", "config", str(local)], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stdout + result.stderr
