"""The Prometheus alert rules: valid, unit-tested with promtool, and about metrics that exist.

promtool comes with Debian's `prometheus` package. Without it these tests skip on
a developer's machine and fail under CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ops.apps import ops_settings, running
from tests.support import ROOT

RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

_STRINGS = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
_TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)
_SAMPLE_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)[{ ]", re.MULTILINE)
_SUFFIXES = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",)}
# Series Prometheus writes itself for each scrape target: no /metrics exposes them.
PROMETHEUS_OWN = frozenset({"up"})


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool not installed (apt-get install prometheus)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def metric_names(expr: str) -> set[str]:
    """Metric (and recorded series) names an expression reads; functions and labels aside."""
    text = _STRINGS.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group()
        if text[match.end() :].lstrip().startswith("(") or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def exposed(exposition: str) -> set[str]:
    names = set(_SAMPLE_LINE.findall(exposition))
    for name, kind in _TYPE_LINE.findall(exposition):
        names.add(name)
        names.update(name + suffix for suffix in _SUFFIXES.get(kind, ()))
    return names


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_pass_their_promtool_unit_tests() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=RULE_TESTS.parent,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_the_seed_thresholds_are_the_ones_alerted_on() -> None:
    alerts = {rule["alert"]: rule for rule in rules() if "alert" in rule}

    assert alerts["StoryErrorRateHigh"]["expr"].endswith("> 0.01")
    assert alerts["StoryErrorRateCritical"]["expr"].endswith("> 0.05")
    assert alerts["StoryCPUHigh"]["expr"].endswith("> 80")
    assert alerts["StoryCPUHigh"]["for"] == "5m"
    assert alerts["StoryMemoryHigh"]["expr"].endswith("> 90")
    assert 'state="open"' in alerts["StoryCircuitBreakerOpen"]["expr"]


def test_a_service_that_is_gone_alerts_on_prometheus_own_up_series() -> None:
    # With no instance answering, the error-rate alerts see 0/0 and stay silent.
    alerts = {rule["alert"]: rule for rule in rules() if "alert" in rule}

    assert "absent(" in alerts["StoryServiceDown"]["expr"]
    assert alerts["StoryServiceDown"]["labels"]["severity"] == "critical"
    assert 'up{job="story-service"}' in alerts["StoryInstanceDown"]["expr"]


def test_metric_names_are_read_from_expressions() -> None:
    expr = 'max by (breaker) (rate(story_x_total{state="open"}[5m])) / job:y:rate5m > 0.5'

    assert metric_names(expr) == {"story_x_total", "job:y:rate5m"}


async def test_every_metric_the_rules_use_is_exposed_at_metrics(tmp_path: Path) -> None:
    async with running(ops_settings(tmp_path)) as (_, client):
        await client.get("/v1/stories")
        exposition = (await client.get("/metrics")).text

    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used = set().union(*(metric_names(str(rule["expr"])) for rule in rules())) - recorded
    assert used, "no metric found in the rules"
    missing = sorted(used - exposed(exposition) - PROMETHEUS_OWN)
    assert not missing, f"rules use metrics /metrics does not expose: {missing}"


async def test_the_rule_tests_feed_series_that_metrics_exposes(tmp_path: Path) -> None:
    async with running(ops_settings(tmp_path)) as (_, client):
        exposition = (await client.get("/metrics")).text

    document = yaml.safe_load(RULE_TESTS.read_text())
    fed = {
        series["series"].split("{", 1)[0]
        for case in document["tests"]
        for series in case["input_series"]
    }
    assert not sorted(fed - exposed(exposition) - PROMETHEUS_OWN)
