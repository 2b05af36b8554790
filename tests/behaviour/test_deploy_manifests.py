"""deploy/: the compose file and the Kubernetes manifests, checked without a container engine or a cluster.

The compose file is validated against the Compose Specification's JSON schema (the copy check-jsonschema vendors),
before and after interpolating deploy/.env.example; the Kubernetes manifests against kubernetes-validate's bundled
schemas (strict: no unknown fields). Both packages ship their schemas, so nothing is downloaded. Then the parts
must fit together: replicas on PostgreSQL and Redis, probes on /healthz and /readyz, every mounted file present,
the proxy and Prometheus naming every replica, Grafana loading the shipped dashboard.
"""

from __future__ import annotations

import json
import re
import tomllib
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version
from support.paths import CONFIG_DIR, REPO_ROOT

from gateway.config import Settings, load_settings

DEPLOY = REPO_ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def env_example() -> dict[str, str]:
    values = {}
    for line in (DEPLOY / ".env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``; a required variable missing is an error."""

    def value(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2) or "", match.group(3) or ""
        given = env.get(name)
        if operator.endswith("?") and not given:
            raise AssertionError(f"compose would stop: {name}: {argument}")
        if operator.endswith("-") and not given:
            return argument
        return given or ""

    return VARIABLE.sub(value, text)


@cache
def compose_text() -> str:
    return (DEPLOY / "compose.yaml").read_text(encoding="utf-8")


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    text = compose_text() if env is None else interpolate(compose_text(), env)
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


@cache
def compose_schema() -> dict[str, Any]:
    schema = files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    loaded: dict[str, Any] = json.loads(schema.read_text(encoding="utf-8"))
    return loaded


def schema_errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.validators.validator_for(compose_schema())(compose_schema())
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(document)]


def gateway_services(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services built from this repository's Dockerfile."""
    return {
        name: service
        for name, service in document["services"].items()
        if isinstance(service.get("build"), dict) and service["build"].get("dockerfile") == "Dockerfile"
    }


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path (relative to deploy/) of each bind mount of ``service``."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def gateway_settings(toml_text: str, tmp_path: Path, env: dict[str, str]) -> Settings:
    """The settings a replica gets from this TOML and environment (what ``check-config`` would say)."""
    path = tmp_path / "gateway.toml"
    path.write_text(toml_text, encoding="utf-8")
    return load_settings(path, env=env, require_upstream_key=True)


class TestComposeFile:
    def test_matches_the_compose_specification(self) -> None:
        """The file as written (interpolation markers in place) is valid against the Compose Specification."""
        assert compose_schema()["$id"] == "compose_spec.json"
        assert schema_errors(compose()) == []

    def test_interpolated_with_the_example_env_is_valid(self) -> None:
        """With deploy/.env.example's values every required variable is set and the result is still valid."""
        assert schema_errors(compose(env_example())) == []

    def test_schema_catches_a_mistake(self) -> None:
        """The schema check has teeth: an unknown service key and a wrong type are both reported."""
        broken = compose()
        broken["services"]["proxy"]["portz"] = ["8080:8080"]
        broken["services"]["redis"]["command"] = {"redis-server": True}
        errors = schema_errors(broken)
        assert any(error.startswith("services/proxy:") and "'portz'" in error for error in errors), errors
        assert any(error.startswith("services/redis/command:") for error in errors), errors

    def test_every_variable_is_in_the_example(self) -> None:
        """Every ${VAR} compose.yaml reads is documented in .env.example, and the gateway's secrets are there."""
        used = {match.group(1) for match in VARIABLE.finditer(compose_text())}
        assert used <= set(env_example())
        assert {"UNIALL_API_KEY", "KLING_GATEWAY_ADMIN_TOKEN", "POSTGRES_PASSWORD"} <= used
        assert (REPO_ROOT / ".gitignore").read_text(encoding="utf-8").count("/deploy/.env") == 1

    def test_replicas_share_postgresql_and_redis(self, tmp_path: Path) -> None:
        """At least two replicas of the image, each with gateway.toml mounted where KLING_GATEWAY_CONFIG points,
        which (with the example secrets) is a valid configuration on PostgreSQL and Redis, on port 8080."""
        document = compose(env_example())
        replicas = gateway_services(document)
        assert len(replicas) >= 2
        for name, service in replicas.items():
            environment = service["environment"]
            mounts = bind_mounts(service)
            config = mounts[environment["KLING_GATEWAY_CONFIG"]]
            assert config == DEPLOY / "gateway.toml", name
            assert {"postgres", "redis"} <= set(service["depends_on"])
            env = {key: str(value) for key, value in environment.items() if key != "KLING_GATEWAY_CONFIG"}
            settings = gateway_settings(config.read_text(encoding="utf-8"), tmp_path, env)
            assert settings.store_url.startswith("postgresql://gateway@postgres:5432/")
            assert settings.cache.url.startswith("redis://redis:6379/")
            assert (settings.server.host, settings.server.port) == ("0.0.0.0", 8080)
            assert env["PGPASSWORD"] == env_example()["POSTGRES_PASSWORD"]
            assert "ports" not in service  # only the proxy is published

    def test_every_mounted_file_exists(self) -> None:
        """Each bind mount's source is a file or directory of this repository."""
        for name, service in compose()["services"].items():
            for target, source in bind_mounts(service).items():
                assert source.exists(), f"{name}: {source} (for {target})"

    def test_proxy_and_prometheus_name_every_replica(self) -> None:
        """nginx balances over every replica, and Prometheus scrapes each one with the shipped alert rules."""
        document = compose()
        replicas = sorted(gateway_services(document))
        nginx = (DEPLOY / "nginx.conf").read_text(encoding="utf-8")
        assert sorted(re.findall(r"^\s*server\s+([\w-]+):8080\b", nginx, re.MULTILINE)) == replicas
        assert set(bind_mounts(document["services"]["proxy"]).values()) == {DEPLOY / "nginx.conf"}
        prometheus = document["services"]["prometheus"]
        mounts = bind_mounts(prometheus)
        assert mounts["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus.yml"
        assert mounts["/etc/prometheus/alerts.yml"] == CONFIG_DIR / "alerts.yml"
        assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
        scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
        assert scrape["rule_files"] == ["alerts.yml"]
        (job,) = scrape["scrape_configs"]
        assert job["job_name"] == "kling-gateway"  # the job the KlingGatewayDown alert watches
        assert sorted(target for group in job["static_configs"] for target in group["targets"]) == [
            f"{name}:8080" for name in replicas
        ]

    def test_grafana_provisions_datasource_and_dashboard(self) -> None:
        """Grafana gets the Prometheus service as its default data source and loads config/grafana-dashboard.json."""
        grafana = compose()["services"]["grafana"]
        mounts = bind_mounts(grafana)
        assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
        provisioning = DEPLOY / "grafana" / "provisioning"
        (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
        assert (source["type"], source["url"], source["isDefault"]) == ("prometheus", "http://prometheus:9090", True)
        (provider,) = yaml.safe_load((provisioning / "dashboards" / "kling-gateway.yaml").read_text())["providers"]
        dashboards = [target for target, path in mounts.items() if path == CONFIG_DIR / "grafana-dashboard.json"]
        assert len(dashboards) == 1
        assert Path(dashboards[0]).parent == Path(provider["options"]["path"])
        assert "GF_SECURITY_ADMIN_PASSWORD" in grafana["environment"]

    def test_only_loopback_is_published(self) -> None:
        """Published ports bind the host's 127.0.0.1; PostgreSQL and Redis are on an internal network only."""
        document = compose()
        for name, service in document["services"].items():
            for port in service.get("ports", []):
                assert str(port).startswith("127.0.0.1:"), name
        assert document["networks"]["backend"]["internal"] is True
        for name in ("postgres", "redis"):
            assert document["services"][name]["networks"] == ["backend"]


# -- Kubernetes ---------------------------------------------------------------------------------------------------


@cache
def manifests() -> dict[str, dict[str, Any]]:
    """kind -> the one object of that kind in deploy/kubernetes (kustomization.yaml aside)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            assert document["kind"] not in found, document["kind"]
            found[document["kind"]] = document
    return found


def container() -> dict[str, Any]:
    (only,) = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


class TestKubernetesManifests:
    @pytest.mark.parametrize("version", ["1.29", latest_version()])
    def test_valid_against_the_kubernetes_schemas(self, version: str) -> None:
        """Every object validates (strict: no unknown field) for an older and the newest Kubernetes bundled."""
        assert set(manifests()) == {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"}
        for kind, document in manifests().items():
            assert kubernetes_validate.validate(document, version, strict=True), kind

    def test_validator_catches_a_mistake(self) -> None:
        """A misspelt field is refused, so the check above has teeth."""
        broken = json.loads(json.dumps(manifests()["Deployment"]))
        broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, "1.29", strict=True)

    def test_kustomization_lists_every_file(self) -> None:
        """``kubectl apply -k deploy/kubernetes`` applies every manifest."""
        kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text(encoding="utf-8"))
        listed = set(kustomization["resources"])
        assert listed == {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}

    def test_probes(self) -> None:
        """Liveness on /healthz, readiness on /readyz, both on the named port that is the configured 8080."""
        gateway = container()
        (port,) = gateway["ports"]
        assert (port["name"], port["containerPort"]) == ("http", 8080)
        assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert gateway["startupProbe"]["httpGet"]["path"] == "/healthz"

    def test_secret_holds_the_keys_as_placeholders(self) -> None:
        """The Secret the pods take their environment from holds the upstream key and admin token, as placeholders."""
        secret = manifests()["Secret"]
        assert container()["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
        values = secret["stringData"]
        assert {"UNIALL_API_KEY", "KLING_GATEWAY_ADMIN_TOKEN", "PGPASSWORD"} <= set(values)
        assert all("REPLACE-ME" in value for value in values.values())

    def test_configmap_is_a_replica_configuration(self, tmp_path: Path) -> None:
        """The mounted gateway.toml is where KLING_GATEWAY_CONFIG points and is valid: PostgreSQL, Redis, port 8080;
        the grace period covers the gateway's own shutdown."""
        config_map = manifests()["ConfigMap"]
        pod = manifests()["Deployment"]["spec"]["template"]["spec"]
        (volume,) = [volume for volume in pod["volumes"] if "configMap" in volume]
        assert volume["configMap"]["name"] == config_map["metadata"]["name"]
        (mount,) = [mount for mount in container()["volumeMounts"] if mount["name"] == volume["name"]]
        env = {item["name"]: item["value"] for item in container()["env"]}
        assert env["KLING_GATEWAY_CONFIG"] == f"{mount['mountPath']}/gateway.toml"
        secrets = manifests()["Secret"]["stringData"]
        settings = gateway_settings(config_map["data"]["gateway.toml"], tmp_path, dict(secrets))
        assert settings.store_url.startswith("postgresql://")
        assert settings.cache.url.startswith("redis://")
        assert (settings.server.host, settings.server.port) == ("0.0.0.0", 8080)
        grace = settings.server.shutdown_grace_s + settings.server.shutdown_timeout_s
        assert pod["terminationGracePeriodSeconds"] > grace
        assert (
            tomllib.loads(config_map["data"]["gateway.toml"])["server"]["port"]
            == container()["ports"][0]["containerPort"]
        )

    def test_service_and_budget_select_the_pods(self) -> None:
        """The Service and the PodDisruptionBudget select the Deployment's pods; the budget leaves one replica up
        of at least two."""
        deployment = manifests()["Deployment"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["replicas"] >= 2
        service = manifests()["Service"]["spec"]
        assert service["selector"].items() <= labels.items()
        assert service["ports"][0]["targetPort"] == "http"
        budget = manifests()["PodDisruptionBudget"]["spec"]
        assert budget["selector"]["matchLabels"].items() <= labels.items()
        assert 1 <= budget["minAvailable"] < deployment["spec"]["replicas"]
