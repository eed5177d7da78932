"""Shared fixtures: tiny seeded data and one small source model trained once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test reads or writes the developer's ./.adaptserve."""
    home = tmp_path / "home"
    monkeypatch.setenv("ADAPTSERVE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def source_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded digits source model with its default recipe (6 epochs, ~20 s), trained once per session."""
    from pipelines.adapt import pretrain
    from pipelines.train import TrainConfig

    if os.environ.get("ADAPTSERVE_TEST_SOURCE_MODEL"):  # local iteration: reuse a model `adaptserve pretrain` built
        return Path(os.environ["ADAPTSERVE_TEST_SOURCE_MODEL"])
    out = tmp_path_factory.mktemp("source") / "digits-resnet18"
    pretrain(out, "resnet18", TrainConfig(epochs=6, batch_size=32, patience=3, seed=0))
    return out


@pytest.fixture(scope="session")
def _service_home_template(tmp_path_factory: pytest.TempPathFactory, source_model: Path) -> Path:
    """A service state dir: site-a v1 (champion), v2; site-b v1 (champion); base ONNX pre-built."""
    from models.registry import open_registry
    from pipelines.release import make_random_adapter, publish

    home = tmp_path_factory.mktemp("service-home")
    registry = open_registry(home)
    work = tmp_path_factory.mktemp("adapters")
    for name, seed, promote in [("site-a", 1, True), ("site-a", 2, False), ("site-b", 3, True)]:
        src = make_random_adapter(source_model, work / f"{name}-{seed}", seed)
        publish(registry, name, src, source_model, promote=promote)
    from service.config import ServiceConfig
    from service.runtime import Runtime

    Runtime(ServiceConfig(home=home, base_model=source_model))  # builds and caches the base model's ONNX file
    return home


@pytest.fixture
def service_home(_service_home_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the template, so a test may promote, delete or corrupt freely."""
    import shutil

    home = tmp_path / "svc"
    shutil.copytree(_service_home_template, home)
    monkeypatch.setenv("ADAPTSERVE_HOME", str(home))
    return home


# ---- storage backends (issue 13): real PostgreSQL and S3-compatible servers on loopback; see tests/servers.py

from collections.abc import Iterator  # noqa: E402 - this block is appended, self-contained

from servers import MotoServer, PostgresCluster, postgres_bindir  # noqa: E402 - tests/ is on sys.path (rootdir)

from models.db import url_for_home  # noqa: E402


@pytest.fixture(scope="session")
def _postgres_cluster() -> Iterator[PostgresCluster]:
    """One throwaway cluster per session; skipped only where PostgreSQL is not installed."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb, none on PATH): "
                    "run .ci/system-deps")
    cluster = PostgresCluster(bindir).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def postgres_url(_postgres_cluster: PostgresCluster) -> str:
    """The URL of a new, empty database on the session's cluster (one per test)."""
    return _postgres_cluster.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every store test runs on both backends: a fresh SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return url_for_home(tmp_path / "db")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def backend(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The stores of this test on `db_url` (tests/state_backend.py says what each backend needs); every engine the
    test opened is disposed at its end (PostgreSQL's connection slots are few)."""
    from state_backend import use_backend

    from models.state import close_all

    use_backend(db_url, monkeypatch)
    yield db_url
    close_all()


@pytest.fixture(params=["dir", "s3"])
def artifacts(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The artifact store of the test, for the tests where files matter: each home's own <home>/artifacts (returns
    "dir"), then a fresh bucket on moto's S3 (returns its URL; ADAPTSERVE_ARTIFACTS_URL and AWS_* point at it)."""
    from state_backend import use_artifacts

    return use_artifacts(request.param, request, monkeypatch)


@pytest.fixture(scope="session")
def _moto_server() -> Iterator[MotoServer]:
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def s3_url(_moto_server: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """`s3://<new bucket>/artifacts` on moto's server, with the standard AWS_* variables pointing at it."""
    import uuid

    import boto3  # heavy; only S3 tests need it

    env = {"AWS_ENDPOINT_URL": _moto_server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           # no developer profile or credentials file may leak in
           "AWS_CONFIG_FILE": str(tmp_path / "aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-creds")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/artifacts"
