"""Checks on the deployment files that no schema can express, run by .ci/check-deploy.

Two commands, each exits non-zero with one line per problem:

- `python deploy/validate.py compose`: interpolates docker-compose.yml and
  docker-compose.prod.yml the way `docker compose` does (`${VAR}`, `${VAR:-default}`,
  `${VAR:?message}`, `$$`), merges the prod file onto the base with the Compose
  Specification's merge rules (mappings merged, `command`/`entrypoint`/
  `healthcheck.test` replaced, `volumes`/`ports` merged by target, other sequences
  appended without duplicates), validates the merged result against the vendored
  Compose schema, and checks the policies the files promise: required secrets,
  health checks everywhere, only the app published, restart/limits/log rotation
  in production, persistence, backups, and a stop grace longer than the drain.
- `python deploy/validate.py k8s`: the kustomization lists every manifest; the
  Deployment's probes, grace period and preStop sleep agree with the ConfigMap
  and the Dockerfile; the container drops every capability, runs as non-root
  (the Dockerfile's `USER` too), with `imagePullPolicy: Always`; an HPA scales
  the Deployment; a NetworkPolicy covers its pods; `TRUSTED_PROXIES` names real
  proxies; Redis does not gate readiness; and `monitoring/` (ServiceMonitor,
  PrometheusRule) agrees with `deploy/prometheus/alerts.yml`.
- `python deploy/validate.py prometheus-rule`: prints the PrometheusRule made
  from `deploy/prometheus/alerts.yml` (for `deploy/k8s/monitoring/`).

Standard library plus PyYAML and jsonschema (both installed with check-jsonschema).
"""

from __future__ import annotations

import copy
import json
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_SCHEMA = ROOT / "deploy" / "schemas" / "compose-spec.json"
BASE_FILE = ROOT / "docker-compose.yml"
PROD_FILE = ROOT / "docker-compose.prod.yml"
K8S_DIR = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
ALERTS_FILE = ROOT / "deploy" / "prometheus" / "alerts.yml"
MONITORING_DIR = K8S_DIR / "monitoring"

REQUIRED_SECRETS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "MINIO_ROOT_PASSWORD")
# What CI pretends an operator exported: the required secrets and nothing else.
CI_ENVIRONMENT = {name: "ci-secret-value" for name in REQUIRED_SECRETS}
# What an operator must give the production stack besides the secrets: its
# identity provider (production refuses AUTH_MODE=none).
PROD_REQUIRED = {
    "AUTH_JWKS_URL": "https://idp.example.com/.well-known/jwks.json",
    "AUTH_ISSUER": "https://idp.example.com/",
    "AUTH_AUDIENCE": "story-app",
}

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    """A `${VAR:?message}` whose variable is missing (as `docker compose` refuses)."""


def interpolate_text(text: str, env: Mapping[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("plain")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        if op is None:
            return value or ""
        unset_or_empty = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return arg if unset_or_empty else str(value)
        if op.endswith("?"):
            if unset_or_empty:
                raise InterpolationError(f"{name}: {arg}")
            return str(value)
        return "" if unset_or_empty else arg  # ":+" / "+"

    return _VARIABLE.sub(substitute, text)


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate_text(node, env)
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    return node


# Sequences the later file replaces instead of extending (Compose merge rules).
_REPLACED = {"command", "entrypoint", "test"}
# Sequences merged by the mount or port they describe.
_KEYED = {"volumes", "ports"}


def _mount_target(item: Any) -> str:
    if isinstance(item, dict):
        return str(item.get("target"))
    parts = str(item).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def _as_mapping(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value)
    result: dict[str, Any] = {}
    for item in value or []:
        key, _, val = str(item).partition("=")
        result[key] = val
    return result


def merge(base: Any, override: Any, key: str = "") -> Any:
    if key in {"environment", "labels"}:
        return {**_as_mapping(base), **_as_mapping(override)}
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for name, value in override.items():
            merged[name] = merge(base[name], value, name) if name in base else value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        if key in _REPLACED:
            return list(override)
        if key in _KEYED:
            by_target = {_mount_target(item): item for item in base}
            by_target.update({_mount_target(item): item for item in override})
            return list(by_target.values())
        return base + [item for item in override if item not in base]
    return copy.deepcopy(override)


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def duration_seconds(text: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a compose duration: {text!r}")
    return sum(float(number) * units[unit] for number, unit in parts)


def memory_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+)([bkmg]?)", str(text).lower())
    if not match:
        raise ValueError(f"not a compose byte size: {text!r}")
    number, unit = match.groups()
    return int(number) * {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]


def schema_problems(config: Any, label: str) -> list[str]:
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{label}: {'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(config), key=lambda e: list(e.path))
    ]


def dev_problems(config: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    services: dict[str, Any] = config["services"]
    for name, service in services.items():
        if not service.get("healthcheck", {}).get("test"):
            problems.append(f"dev: service {name} has no health check")
        if service.get("ports") and name != "app" and not _loopback_monitoring(service):
            problems.append(
                f"dev: service {name} publishes ports (only the app may, and monitoring "
                "on 127.0.0.1)"
            )
    app = services["app"]
    for dependency, service in services.items():
        if dependency == "app" or service.get("profiles"):
            continue  # an opt-in profile (monitoring) waits for the app, not the reverse
        condition = app.get("depends_on", {}).get(dependency, {}).get("condition")
        if condition != "service_healthy":
            problems.append(f"dev: app must depend on {dependency} with service_healthy")
    test = app["healthcheck"]["test"]
    if test[1:] != ["python", "-m", "app.healthcheck"]:
        problems.append(f"dev: app health check must run app.healthcheck, not {test}")
    environment = app["environment"]
    drain = float(environment.get("SHUTDOWN_GRACE_SECONDS") or 35) + float(
        environment.get("SHUTDOWN_DRAIN_DELAY_SECONDS") or 0
    )
    grace = duration_seconds(app.get("stop_grace_period", "10s"))
    if grace <= drain:
        problems.append(
            f"dev: app stop_grace_period {grace:g}s must exceed SHUTDOWN_DRAIN_DELAY_SECONDS"
            f" + SHUTDOWN_GRACE_SECONDS ({drain:g} s)"
        )
    for key in ("OPENAI_API_KEY", "REPLICATE_API_TOKEN"):
        if app["environment"].get(key) != "":
            problems.append(f"dev: {key} must default to empty (providers are optional)")
    return problems


def _loopback_monitoring(service: dict[str, Any]) -> bool:
    """A service of the opt-in monitoring profile publishing on this host only."""
    ports = [str(p.get("host_ip", "") if isinstance(p, dict) else p) for p in service["ports"]]
    return "monitoring" in service.get("profiles", []) and all(
        p.startswith("127.0.0.1") for p in ports
    )


def prod_problems(config: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    services: dict[str, Any] = config["services"]
    for name, service in services.items():
        if service.get("restart") != "unless-stopped":
            problems.append(f"prod: service {name} must restart unless-stopped")
        logging = service.get("logging", {})
        options = logging.get("options", {})
        if logging.get("driver") != "json-file" or not {"max-size", "max-file"} <= set(options):
            problems.append(f"prod: service {name} needs json-file logging with rotation")
        limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
        if not {"cpus", "memory"} <= set(limits):
            problems.append(f"prod: service {name} needs cpus and memory limits")
        if not service.get("healthcheck", {}).get("test"):
            problems.append(f"prod: service {name} has no health check")
        for volume in service.get("volumes", []):
            source = volume.get("source", "") if isinstance(volume, dict) else volume
            source = str(source).split(":")[0]
            if source.startswith((".", "/")) and not str(volume).endswith(":ro"):
                problems.append(f"prod: service {name} bind-mounts {source} writable")
            if source in {".", "./app"}:
                problems.append(f"prod: service {name} mounts the source tree ({source})")
        if str(service.get("environment", {}).get("RELOAD", "false")).lower() in {"1", "true"}:
            problems.append(f"prod: service {name} runs with RELOAD")
    app_limits = services["app"].get("deploy", {}).get("resources", {}).get("limits", {})
    cpus, memory = app_limits.get("cpus"), app_limits.get("memory")
    if cpus is None or memory is None:
        pass  # reported above, with every other service missing a limit
    elif float(cpus) != 2 or memory_bytes(memory) != 2 * 1024**3:
        problems.append(f"prod: app limits must be 2 CPUs and 2G memory, got {app_limits}")
    redis_command = " ".join(services["redis"].get("command", []))
    if "--appendonly yes" not in redis_command:
        problems.append("prod: redis must run with --appendonly yes")

    def has_volume(service: str, target: str) -> bool:
        return any(_mount_target(v) == target for v in services[service].get("volumes", []))

    if not has_volume("redis", "/data"):
        problems.append("prod: redis needs a volume at /data for its AOF")
    if not has_volume("postgres", "/var/lib/postgresql/data"):
        problems.append("prod: postgres needs a volume at /var/lib/postgresql/data")
    backup = services.get("backup")
    if backup is None:
        problems.append("prod: no backup service")
    else:
        if "BACKUP_RETENTION_DAYS" not in backup.get("environment", {}):
            problems.append("prod: backup service must set BACKUP_RETENTION_DAYS")
        if not has_volume("backup", "/backups"):
            problems.append("prod: backup service needs a volume at /backups")
    return problems


def secret_problems(base: Any) -> list[str]:
    """Each required secret: every use is `${NAME:?message}`, and compose refuses without it."""
    problems: list[str] = []
    for path in (BASE_FILE, PROD_FILE):
        for match in _VARIABLE.finditer(path.read_text(encoding="utf-8")):
            if match.group("braced") in REQUIRED_SECRETS and match.group("op") != ":?":
                problems.append(f"{path.name}: use ${{{match.group('braced')}:?message}}")
    for secret in REQUIRED_SECRETS:
        env = {k: v for k, v in CI_ENVIRONMENT.items() if k != secret}
        try:
            interpolate(base, env)
        except InterpolationError as error:
            if not str(error).startswith(f"{secret}:"):
                problems.append(f"dev: unexpected interpolation error {error}")
        else:
            problems.append(f"dev: compose would start without {secret}")
    return problems


def check_compose() -> list[str]:
    base_raw, prod_raw = load_yaml(BASE_FILE), load_yaml(PROD_FILE)
    problems = secret_problems(base_raw)
    base = interpolate(base_raw, CI_ENVIRONMENT)
    merged = merge(base, interpolate(prod_raw, {**CI_ENVIRONMENT, **PROD_REQUIRED}))
    for name in PROD_REQUIRED:
        try:
            interpolate(prod_raw, {k: v for k, v in PROD_REQUIRED.items() if k != name})
        except InterpolationError:
            continue
        problems.append(f"prod: compose would start without {name}")
    problems += schema_problems(base, "dev (interpolated)")
    problems += schema_problems(merged, "prod (merged)")
    if not problems:
        problems += dev_problems(base)
        problems += prod_problems(merged)
    return problems


def _single(documents: list[Any], kind: str) -> dict[str, Any]:
    found = [d for d in documents if isinstance(d, dict) and d.get("kind") == kind]
    if len(found) != 1:
        raise ValueError(f"expected one {kind}, found {len(found)}")
    result: dict[str, Any] = found[0]
    return result


def _dockerfile_healthcheck_probe() -> bool:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    return any(
        line.strip().startswith("HEALTHCHECK") and '"app.healthcheck"' in line
        for line in text.splitlines()
    )


def check_k8s() -> list[str]:
    problems: list[str] = []
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    listed = set(kustomization.get("resources", []))
    on_disk = {
        p.name
        for p in K8S_DIR.glob("*.yaml")
        if p.name != "kustomization.yaml" and not p.name.endswith(".example.yaml")
    }
    for missing in sorted(listed - on_disk):
        problems.append(f"k8s: kustomization lists {missing}, which does not exist")
    for unlisted in sorted(on_disk - listed):
        problems.append(f"k8s: {unlisted} is not listed in kustomization.yaml")

    documents: list[Any] = []
    for name in sorted(on_disk | {"secret.example.yaml"}):
        with (K8S_DIR / name).open(encoding="utf-8") as handle:
            documents += [d for d in yaml.safe_load_all(handle) if d]
    deployment = _single(documents, "Deployment")
    config = _single(documents, "ConfigMap")["data"]
    secret_keys = set(_single(documents, "Secret").get("stringData", {}))
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]

    def probe_path(probe: str) -> str:
        return str(container.get(probe, {}).get("httpGet", {}).get("path"))

    expected = {
        "livenessProbe": "/health/live",
        "readinessProbe": "/health/ready",
        "startupProbe": "/health/live",
    }
    for probe, path in expected.items():
        if probe_path(probe) != path:
            problems.append(f"k8s: {probe} must GET {path}, not {probe_path(probe)}")
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    pre_stop = float(sleep[-1]) if sleep[:1] == ["sleep"] else 0.0
    drain = float(config["SHUTDOWN_GRACE_SECONDS"]) + float(
        config.get("SHUTDOWN_DRAIN_DELAY_SECONDS") or 0
    )
    grace = float(pod["terminationGracePeriodSeconds"])
    deadline = float(config.get("REQUEST_DEADLINE_SECONDS") or 30)
    if float(config["SHUTDOWN_GRACE_SECONDS"]) < deadline:
        problems.append(
            f"k8s: SHUTDOWN_GRACE_SECONDS {config['SHUTDOWN_GRACE_SECONDS']} must be at least "
            f"REQUEST_DEADLINE_SECONDS ({deadline:g}): a rollout would cut off requests "
            "still within their deadline"
        )
    if pre_stop + drain >= grace:
        problems.append(
            f"k8s: terminationGracePeriodSeconds {grace:g} must exceed preStop {pre_stop:g}"
            f" + SHUTDOWN_DRAIN_DELAY_SECONDS + SHUTDOWN_GRACE_SECONDS ({drain:g})"
        )
    if str(config.get("HEALTH_REDIS_REQUIRED", "false")).strip().lower() in {"1", "true", "yes"}:
        # Redis is shared by every pod: gating readiness on it fails them all at once.
        problems.append(
            "k8s: HEALTH_REDIS_REQUIRED must be false: a Redis outage would fail every "
            "pod's readiness at once and empty the Service (the service serves without Redis)"
        )
    security = container.get("securityContext", {})
    if not security.get("readOnlyRootFilesystem") or security.get("allowPrivilegeEscalation"):
        problems.append("k8s: container must have a read-only root and no privilege escalation")
    if "ALL" not in security.get("capabilities", {}).get("drop", []):
        problems.append('k8s: container must drop every capability (capabilities.drop: ["ALL"])')
    if security.get("capabilities", {}).get("add"):
        problems.append("k8s: container must add no capability")
    if not pod.get("securityContext", {}).get("runAsNonRoot"):
        problems.append("k8s: pod must run as non-root")
    if container.get("imagePullPolicy") != "Always":
        problems.append(
            "k8s: imagePullPolicy must be Always (a re-pushed tag must not be served stale "
            "from a node's cache; pin the digest in the kustomization for releases)"
        )
    problems += _trusted_proxies_problems(config.get("TRUSTED_PROXIES", ""))
    problems += _scaling_problems(documents, deployment)
    problems += _network_policy_problems(documents, deployment)
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    for path in ("/tmp", str(Path(config["DATABASE_SQLITE_PATH"]).parent)):  # noqa: S108
        if path not in mounts:
            problems.append(f"k8s: {path} must be a writable volume (read-only root)")
    referenced = {
        e["valueFrom"]["secretKeyRef"]["key"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    if referenced != secret_keys:
        problems.append(
            f"k8s: secret keys {sorted(secret_keys)} != referenced {sorted(referenced)}"
        )
    image = str(container["image"]).split(":")[0]
    if image not in {i.get("name") for i in kustomization.get("images", [])}:
        problems.append(f"k8s: kustomization images does not set {image}")
    if not _dockerfile_healthcheck_probe():
        problems.append("Dockerfile: HEALTHCHECK must run app.healthcheck")
    problems += _dockerfile_user_problems()
    problems += monitoring_problems()
    configmap_text = (K8S_DIR / "configmap.yaml").read_text(encoding="utf-8")
    problems += settings_problems(config, configmap_text, referenced)
    return problems


def _trusted_proxies_problems(value: str) -> list[str]:
    entries = [entry.strip() for entry in value.split(",") if entry.strip()]
    if not entries:
        return [
            "k8s: TRUSTED_PROXIES is empty: behind the ingress every request would be keyed by "
            "the ingress's address and share one rate limit; name the ingress pods' CIDR"
        ]
    wide = [e for e in entries if e in {"*", "0.0.0.0/0", "::/0"} or e.endswith("/0")]
    if wide:
        return [f"k8s: TRUSTED_PROXIES {wide} trusts everyone: any client could name itself"]
    return []


def _targets(document: dict[str, Any], deployment: dict[str, Any]) -> bool:
    ref = document.get("spec", {}).get("scaleTargetRef", {})
    return bool(
        ref.get("kind") == "Deployment" and ref.get("name") == deployment["metadata"]["name"]
    )


def _scaling_problems(documents: list[Any], deployment: dict[str, Any]) -> list[str]:
    hpas = [d for d in documents if d.get("kind") == "HorizontalPodAutoscaler"]
    if not any(_targets(hpa, deployment) for hpa in hpas):
        return ["k8s: no HorizontalPodAutoscaler scales the Deployment"]
    problems: list[str] = []
    for hpa in hpas:
        if int(hpa["spec"].get("minReplicas", 1)) < 2:
            problems.append("k8s: the HPA's minReplicas must be at least 2 (one pod is an outage)")
    if "replicas" in deployment["spec"]:
        problems.append("k8s: the Deployment must not set replicas (the HPA owns them)")
    return problems


def _network_policy_problems(documents: list[Any], deployment: dict[str, Any]) -> list[str]:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for policy in (d for d in documents if d.get("kind") == "NetworkPolicy"):
        spec = policy.get("spec", {})
        wanted = spec.get("podSelector", {}).get("matchLabels", {})
        if wanted and all(labels.get(k) == v for k, v in wanted.items()):
            if set(spec.get("policyTypes", [])) != {"Ingress", "Egress"}:
                return ["k8s: the NetworkPolicy must restrict both Ingress and Egress"]
            if any(not rule.get("from") for rule in spec.get("ingress", [])):
                return ["k8s: a NetworkPolicy ingress rule without `from` admits every pod"]
            return []
    return ["k8s: no NetworkPolicy selects the service's pods"]


def _dockerfile_user_problems() -> list[str]:
    lines = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ").splitlines()
    stages = [i for i, line in enumerate(lines) if line.strip().upper().startswith("FROM ")]
    final = lines[stages[-1] :] if stages else lines
    users = [line.split(None, 1)[1] for line in final if line.strip().upper().startswith("USER ")]
    if not users:
        return ["Dockerfile: the final stage must set USER (the image would run as root)"]
    user = users[-1].strip().split(":")[0]
    if user in {"root", "0"}:
        return [f"Dockerfile: the final stage's USER is {user}"]
    return []


def alerts_groups() -> list[Any]:
    groups: list[Any] = load_yaml(ALERTS_FILE)["groups"]
    return groups


def prometheus_rule() -> dict[str, Any]:
    """The PrometheusRule that carries `deploy/prometheus/alerts.yml`."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "story-service",
            "labels": {
                "app.kubernetes.io/name": "story-service",
                "app.kubernetes.io/component": "api",
                "release": "prometheus",
            },
        },
        "spec": {"groups": alerts_groups()},
    }


def monitoring_problems() -> list[str]:
    problems: list[str] = []
    kustomization = load_yaml(MONITORING_DIR / "kustomization.yaml")
    documents = {
        name: load_yaml(MONITORING_DIR / name) for name in kustomization.get("resources", [])
    }
    kinds = {document.get("kind"): document for document in documents.values()}
    rule = kinds.get("PrometheusRule")
    if rule is None or rule.get("spec", {}).get("groups") != alerts_groups():
        problems.append(
            "k8s: monitoring/ PrometheusRule differs from deploy/prometheus/alerts.yml; "
            "regenerate it: python deploy/validate.py prometheus-rule"
        )
    monitor = kinds.get("ServiceMonitor")
    if monitor is None:
        return [*problems, "k8s: monitoring/ has no ServiceMonitor"]
    service = load_yaml(K8S_DIR / "service.yaml")
    selector = monitor["spec"]["selector"]["matchLabels"]
    if any(service["metadata"]["labels"].get(k) != v for k, v in selector.items()):
        problems.append("k8s: the ServiceMonitor's selector does not match the Service's labels")
    ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        if endpoint.get("port") not in ports or endpoint.get("path") != "/metrics":
            problems.append(
                f"k8s: ServiceMonitor endpoint {endpoint} is not the Service's /metrics"
            )
    return problems


def print_prometheus_rule() -> list[str]:
    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    Dumper.add_representer(str, text)
    print(
        "# The alert rules of deploy/prometheus/alerts.yml for the Prometheus Operator.\n"
        "# Generated, never edited by hand:\n"
        "#   python deploy/validate.py prometheus-rule \\\n"
        "#     > deploy/k8s/monitoring/prometheusrule.yaml\n"
        "# `deploy/validate.py k8s` fails when the two differ. The `release` label must\n"
        "# match your Prometheus's ruleSelector."
    )
    print(yaml.dump(prometheus_rule(), Dumper=Dumper, sort_keys=False, width=100), end="")
    return []


def service_settings() -> dict[str, bool]:
    """Every environment variable the service reads -> whether it holds a secret."""
    sys.path.insert(0, str(ROOT))
    from pydantic_settings import BaseSettings

    from app.__main__ import ServerSettings
    from app.platform.config import Settings

    def walk(model: type[BaseSettings], prefix: str) -> dict[str, bool]:
        found: dict[str, bool] = {}
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
                found |= walk(annotation, str(annotation.model_config.get("env_prefix", "")))
            else:
                found[(prefix + name).upper()] = "SecretStr" in str(annotation)
        return found

    return walk(Settings, "") | walk(ServerSettings, "")


def settings_problems(config: Mapping[str, str], text: str, secret_refs: set[str]) -> list[str]:
    """Each setting is in the ConfigMap (or named there as left out) or a Secret reference,
    secrets only ever the latter, and the ConfigMap's values are ones the service accepts."""
    problems: list[str] = []
    mentioned = set(re.findall(r"^\s*#\s*([A-Z][A-Z0-9_]+):", text, flags=re.MULTILINE))
    settings = service_settings()
    for name, secret in sorted(settings.items()):
        if secret and name in config:
            problems.append(f"k8s: {name} is a secret but sits in the ConfigMap")
        elif secret and name not in secret_refs:
            problems.append(f"k8s: secret {name} is not referenced from the Secret")
        elif not secret and name not in config and name not in mentioned:
            problems.append(f"k8s: setting {name} is neither in the ConfigMap nor named there")
    for name in sorted(set(config) - set(settings)):
        problems.append(f"k8s: ConfigMap key {name} is not a setting the service reads")
    problems += _settings_accept(config)
    return problems


def _settings_accept(config: Mapping[str, str]) -> list[str]:
    """Build the service's settings from exactly the ConfigMap, as a pod would."""
    import os
    import tempfile

    from pydantic import ValidationError

    from app.__main__ import ServerSettings
    from app.platform.config import Settings

    saved = dict(os.environ)
    cwd = Path.cwd()
    try:
        os.environ.clear()
        os.environ.update(config)
        with tempfile.TemporaryDirectory() as empty:
            os.chdir(empty)  # no stray .env file
            Settings()
            ServerSettings()
    except ValidationError as error:
        return [f"k8s: ConfigMap value refused: {line}" for line in str(error).splitlines()]
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved)
    return []


COMMANDS: dict[str, Callable[[], list[str]]] = {
    "compose": check_compose,
    "k8s": check_k8s,
    "prometheus-rule": print_prometheus_rule,
}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in COMMANDS:
        print(f"usage: validate.py {{{'|'.join(COMMANDS)}}}", file=sys.stderr)
        return 2
    problems = COMMANDS[argv[0]]()
    if argv[0] == "prometheus-rule":
        return 0
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{argv[0]}: {'FAILED' if problems else 'ok'} ({len(problems)} problem(s))")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
