"""`deploy/validate.py` catches each policy breach it promises to catch.

Each test copies the deployment files into a scratch tree, breaks one thing the
way an operator's edit would, and runs the validator there as CI runs it (a
subprocess): the unbroken copy passes, the broken one fails naming the problem,
and no breach crashes the validator instead of reporting it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import ROOT

pytest.importorskip("jsonschema", reason="deploy/validate.py needs jsonschema")

FILES = ("Dockerfile", "docker-compose.yml", "docker-compose.prod.yml")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    for name in FILES:
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def validate(tree: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(tree / "deploy" / "validate.py"), command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path.name}: the test's fixture is out of date"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


@pytest.mark.parametrize("command", ["k8s", "compose"])
def test_the_shipped_files_pass(tree: Path, command: str) -> None:
    result = validate(tree, command)
    assert result.returncode == 0, result.stderr
    assert f"{command}: ok" in result.stdout


K8S_BREACHES: dict[str, tuple[Callable[[Path], None], str]] = {
    "capabilities kept": (
        lambda t: edit(t / "deploy/k8s/deployment.yaml", 'drop: ["ALL"]', "drop: []"),
        "must drop every capability",
    ),
    "no HPA": (
        lambda t: edit(
            t / "deploy/k8s/hpa.yaml",
            "name: story-service\n  minReplicas",
            "name: other\n  minReplicas",
        ),
        "no HorizontalPodAutoscaler scales the Deployment",
    ),
    "single replica": (
        lambda t: edit(t / "deploy/k8s/hpa.yaml", "minReplicas: 2", "minReplicas: 1"),
        "minReplicas must be at least 2",
    ),
    "no trusted proxies": (
        lambda t: edit(
            t / "deploy/k8s/configmap.yaml",
            'TRUSTED_PROXIES: "10.244.0.0/16"',
            'TRUSTED_PROXIES: ""',
        ),
        "TRUSTED_PROXIES is empty",
    ),
    "everyone trusted": (
        lambda t: edit(
            t / "deploy/k8s/configmap.yaml",
            'TRUSTED_PROXIES: "10.244.0.0/16"',
            'TRUSTED_PROXIES: "0.0.0.0/0"',
        ),
        "trusts everyone",
    ),
    "redis gates readiness": (
        lambda t: edit(
            t / "deploy/k8s/configmap.yaml",
            'HEALTH_REDIS_REQUIRED: "false"',
            'HEALTH_REDIS_REQUIRED: "true"',
        ),
        "HEALTH_REDIS_REQUIRED must be false",
    ),
    "stale image tags": (
        lambda t: edit(
            t / "deploy/k8s/deployment.yaml",
            "imagePullPolicy: Always",
            "imagePullPolicy: IfNotPresent",
        ),
        "imagePullPolicy must be Always",
    ),
    "no network policy": (
        lambda t: edit(
            t / "deploy/k8s/networkpolicy.yaml",
            "component: api\n  policyTypes",
            "component: nope\n  policyTypes",
        ),
        "no NetworkPolicy selects the service's pods",
    ),
    "root image": (
        lambda t: edit(t / "Dockerfile", "USER ${APP_UID}:${APP_GID}", "# no user"),
        "the final stage must set USER",
    ),
    "alerts drifted from the PrometheusRule": (
        lambda t: edit(t / "deploy/prometheus/alerts.yml", "for: 5m", "for: 6m"),
        "PrometheusRule differs from deploy/prometheus/alerts.yml",
    ),
}


@pytest.mark.parametrize("breach", sorted(K8S_BREACHES))
def test_a_k8s_breach_is_reported(tree: Path, breach: str) -> None:
    apply, message = K8S_BREACHES[breach]
    apply(tree)
    result = validate(tree, "k8s")
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_an_app_without_a_cpu_limit_is_reported_not_a_crash(tree: Path) -> None:
    prod = tree / "docker-compose.prod.yml"
    text = prod.read_text(encoding="utf-8")
    start = text.index("  app:")
    cpus = text.index("cpus:", start)
    line_end = text.index("\n", cpus)
    prod.write_text(text[:cpus] + "# no cpus" + text[line_end:], encoding="utf-8")

    result = validate(tree, "compose")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "prod: service app needs cpus and memory limits" in result.stderr


def test_the_prometheus_rule_is_what_the_generator_prints(tree: Path) -> None:
    printed = validate(tree, "prometheus-rule")
    assert printed.returncode == 0, printed.stderr
    shipped = (ROOT / "deploy/k8s/monitoring/prometheusrule.yaml").read_text(encoding="utf-8")
    assert printed.stdout == shipped
