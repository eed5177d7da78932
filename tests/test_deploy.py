"""deploy/: the Kubernetes manifests parse, name only settings that exist, and hold values those settings accept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from models import settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
AWS = {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}


def _documents() -> dict[str, list[dict[str, Any]]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(DEPLOY.glob("*.yaml"))}


def _kind(kind: str) -> list[dict[str, Any]]:
    return [d for docs in _documents().values() for d in docs if d.get("kind") == kind]


def _settings_map() -> dict[str, str]:
    (config,) = _kind("ConfigMap")
    (secret,) = _kind("Secret")
    return {**config["data"], **secret["stringData"]}


def _containers() -> list[dict[str, Any]]:
    return [c for d in _kind("Deployment") for key in ("initContainers", "containers")
            for c in d["spec"]["template"]["spec"].get(key, [])]


def test_every_manifest_parses_and_kustomize_lists_them_all() -> None:
    docs = _documents()
    (kustomization,) = docs.pop("kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(docs)
    assert all(d.get("apiVersion") and d.get("kind") and d["metadata"].get("name") for ds in docs.values() for d in ds)


def test_configuration_names_only_settings_and_aws_variables() -> None:
    known = {settings.env_name(name) for name in settings.Settings.model_fields} | AWS
    assert sorted(set(_settings_map()) - known) == []


def test_configuration_values_are_accepted_by_the_settings() -> None:
    loaded = settings.load(_settings_map())  # SettingsError naming the variable if a value is refused
    assert loaded.job_runner is False, "serving pods must not run retraining (runners are their own Deployment)"
    assert loaded.database_url and loaded.database_url.startswith("postgresql+psycopg://")
    assert loaded.artifacts_url and loaded.artifacts_url.startswith("s3://")


def test_secrets_stay_in_the_secret() -> None:
    (config,) = _kind("ConfigMap")
    assert not [k for k in config["data"] if "TOKEN" in k or "SECRET" in k or k == "ADAPTSERVE_DATABASE_URL"]


def test_every_container_reads_the_settings_and_secrets() -> None:
    for container in _containers():
        refs = {next(iter(r.values()))["name"] for r in container["envFrom"]}
        assert refs == {"adaptserve-settings", "adaptserve-secrets"}, container["name"]


@pytest.mark.parametrize(("probe", "path"), [("readinessProbe", "/readyz"), ("livenessProbe", "/livez")])
def test_the_service_is_probed_on_its_health_routes(probe: str, path: str) -> None:
    (service,) = [d for d in _kind("Deployment") if d["metadata"]["name"] == "adaptserve"]
    (container,) = service["spec"]["template"]["spec"]["containers"]
    assert container[probe]["httpGet"]["path"] == path  # tests/test_service_http.py answers both through the app
    assert service["spec"]["replicas"] >= 2


def test_commands_are_cli_commands_that_exist() -> None:
    from typer.main import get_command

    from pipelines.cli import app

    cli = get_command(app)
    for container in _containers():
        if "command" not in container:
            continue
        assert container["command"][:3] == ["python", "-m", "pipelines.cli"], container["name"]
        group, sub = container["command"][3:5]
        assert sub in cli.commands[group].commands, container["command"]  # type: ignore[attr-defined]


def test_the_autoscaler_targets_the_service() -> None:
    (hpa,) = _kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "adaptserve" and hpa["spec"]["minReplicas"] >= 2


def test_every_pod_keeps_its_home_to_itself() -> None:
    """State is shared through the database and artifact URLs only: each pod's ADAPTSERVE_HOME is a local cache
    (an emptyDir), and no manifest asks for a shared volume (README, Deploy)."""
    home = settings.load(_settings_map()).home.as_posix()
    for deployment in _kind("Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == home]
            assert set(volumes[mount["name"]]) == {"name", "emptyDir"}, deployment["metadata"]["name"]
    assert not _kind("PersistentVolumeClaim") and not _kind("PersistentVolume")


_WITHOUT_BENCHMARKS = """
import sys
class NoBenchmarks:  # the Bento ships service/, models/, pipelines/, monitoring/: no benchmarks/
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "benchmarks":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoBenchmarks())
from typer.main import get_command
from pipelines.cli import app
print(" ".join(sorted(get_command(app).commands)))
"""


def test_the_cli_runs_where_benchmarks_are_not_shipped() -> None:
    """The manifests run `python -m pipelines.cli db upgrade` and `jobs runner` inside the Bento."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _WITHOUT_BENCHMARKS], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    commands = out.stdout.split()
    assert {"db", "jobs", "serve"} <= set(commands) and "bench" not in commands
