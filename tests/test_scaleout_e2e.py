"""Scale-out end to end (issue 13): two `adaptserve serve` replicas and two job runners, each on a home of its own,
sharing one real PostgreSQL database and one bucket on a real S3-compatible server (moto) on loopback.

One test, in the order a deployment lives it: an adapter registered through replica A is served by B; a promote
through B is served by A within a second; a prediction served by A is labelled through B (and one served by B
through A); a drift check run by A counts both replicas' records; a missed cron tick fires once although two
runners start at the same moment; its job is claimed by exactly one runner, which is then killed -9 mid-job: the
other runner fails the job once its lease runs out (LEASE_ERROR; ORPHAN_ERROR if it started after the kill:
failed, not retried either way: README "Deploy") and runs the next one.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.serve import ServeProcess
from models import migrations
from models.state import close_all
from pipelines.data import digits_splits
from pipelines.jobs import LEASE_ERROR, ORPHAN_ERROR
from pipelines.schedules import ScheduleStore

ROOT = Path(__file__).resolve().parents[1]
ADMIN, LABELLER = "e2e-admin-token", "e2e-labeller-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
LABEL_AUTH = {"Authorization": f"Bearer {LABELLER}"}
LEASE_S = 2.0
PER_REPLICA = 20  # predictions each replica serves (and captures)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 60.0, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _images() -> list[tuple[str, str]]:
    """(base64 PNG, true label) for 2 * PER_REPLICA held-out digits."""
    test = digits_splits(32).test
    out = []
    for image, label in list(zip(test.images, test.labels, strict=True))[: 2 * PER_REPLICA]:
        buf = io.BytesIO()
        image.save(buf, "PNG")
        out.append((base64.b64encode(buf.getvalue()).decode(), test.classes[label]))
    return out


def _archive(source_model: Path, tmp: Path, seed: int) -> bytes:
    from pipelines.release import make_random_adapter

    src = make_random_adapter(source_model, tmp / f"adapter-{seed}", seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(src, arcname="adapter")
    return buf.getvalue()


@pytest.fixture
def shared(postgres_url: str, s3_url: str, source_model: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The settings every replica and runner shares (the AWS_* variables are in os.environ: s3_url set them)."""
    migrations.upgrade(postgres_url)  # as the deployment's init container does: a server database is not migrated
    env = {
        "ADAPTSERVE_DATABASE_URL": postgres_url,
        "ADAPTSERVE_ARTIFACTS_URL": s3_url,
        "ADAPTSERVE_BASE_MODEL": str(source_model),
        "ADAPTSERVE_ADMIN_TOKEN": ADMIN,
        "ADAPTSERVE_LABELLER_TOKENS": LABELLER,
        "ADAPTSERVE_THREADS": "1",
        "ADAPTSERVE_JOB_RUNNER": "0",  # runners are deployed separately
        "ADAPTSERVE_DRIFT_INTERVAL_S": "0",  # checks on demand only: the test runs the one it counts
        "ADAPTSERVE_DRIFT_MIN_RECORDS": "10",
        "ADAPTSERVE_DRIFT_WINDOW": "500",
        "ADAPTSERVE_JOB_LEASE_S": str(LEASE_S),
        "ADAPTSERVE_RETRAIN_MIN_TRAIN_LABELS": "2",
        "ADAPTSERVE_RETRAIN_MIN_HOLDOUT_LABELS": "1",
        "ADAPTSERVE_RETRAIN_TIME_BUDGET_S": "15",
    }
    for name, value in env.items():  # this process reads the same stores
        monkeypatch.setenv(name, value)
    yield env
    close_all()


@pytest.fixture
def replicas(shared: dict[str, str], tmp_path: Path) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    servers = [ServeProcess({**shared, "ADAPTSERVE_HOME": str(tmp_path / f"home-{n}")}, tmp_path / f"serve-{n}",
                            cli=True) for n in ("a", "b")]
    try:
        for server in servers:  # both start at once: one builds the base model's derived files, the other waits
            server.start()
        for server in servers:
            server.wait_ready(timeout=240)
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def start_runner(shared: dict[str, str], tmp_path: Path) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """`adaptserve jobs runner` on a home of its own, in its own process group (killed with it at the end)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, **shared, "ADAPTSERVE_HOME": str(tmp_path / f"runner-{name}")}
        with open(tmp_path / f"runner-{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipelines.cli", "jobs", "runner", "--no-drift", "--poll", "0.2"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _predict(server: ServeProcess, images: list[str], adapter: str, served: list[int] | None = None) -> dict:
    """The prediction; `served` counts the images served (each one captured record)."""
    r = httpx.post(f"{server.url}/predict", json={"images": images, "adapter": adapter}, timeout=60)
    assert r.status_code == 200, r.text
    if served is not None:
        served.append(len(images))
    return r.json()


def _jobs(server: ServeProcess) -> list[dict]:
    r = httpx.get(f"{server.url}/jobs", params={"adapter": "site-x"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["jobs"]


def _job(server: ServeProcess, job_id: str) -> dict:
    r = httpx.get(f"{server.url}/jobs/{job_id}", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_two_replicas_and_two_runners_share_one_database_and_bucket(
    replicas: tuple[ServeProcess, ServeProcess], start_runner: Callable[[str], subprocess.Popen[bytes]],
    source_model: Path, tmp_path: Path,
) -> None:
    a, b = replicas
    images = _images()

    # register through A (v1 champion, v2 not yet): B serves v1 from the shared registry
    for seed, promote in [(1, "true"), (2, "false")]:
        r = httpx.post(f"{a.url}/adapters/register", params={"name": "site-x", "promote": promote}, headers=AUTH,
                       files={"archive": ("adapter.tar.gz", _archive(source_model, tmp_path, seed))}, timeout=180)
        assert r.status_code == 200, r.text
    served: list[int] = []  # images served as site-x v1, by either replica
    on_b = _predict(b, [images[0][0]], "site-x", served)
    assert (on_b["adapter"], on_b["version"]) == ("site-x", 1), "B serves the version registered through A"

    # predictions on both replicas; each labelled through the other one
    on_a = _predict(a, [img for img, _ in images[:PER_REPLICA]], "site-x", served)
    on_b = _predict(b, [img for img, _ in images[PER_REPLICA:]], "site-x", served)
    assert (on_a["version"], on_b["version"]) == (1, 1)
    for via, answer, truth in [(b, on_a, images[:PER_REPLICA]), (a, on_b, images[PER_REPLICA:])]:
        for prediction, (_, label) in zip(answer["predictions"], truth, strict=True):
            r = httpx.post(f"{via.url}/feedback", json={"id": prediction["id"], "label": label}, headers=LABEL_AUTH,
                           timeout=30)
            assert r.status_code == 201, r.text
            assert r.json()["adapter"] == "site-x"
    assert r.json()["labels"] == 2 * PER_REPLICA, "every label, from either replica, counts in one store"

    # a drift check run by A sees both replicas' records (captured in the background: wait for all of them)
    def checked() -> dict | None:
        r = httpx.post(f"{a.url}/drift/check", json={"adapter": "site-x"}, headers=AUTH, timeout=60)
        assert r.status_code in (200, 409), r.text
        return r.json() if r.status_code == 200 and r.json()["window_size"] >= sum(served) else None

    check = wait_for(checked, "A's drift check to count both replicas' records", timeout=30, every=0.5)
    assert check["window_size"] == sum(served) == 2 * PER_REPLICA + 1, "A's and B's records, each once"
    assert check["version"] == 1

    # promote v2 through B: A serves it within a second
    r = httpx.post(f"{b.url}/adapters/promote", json={"name": "site-x", "version": 2}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    promoted = time.monotonic()
    wait_for(lambda: _predict(a, [images[0][0]], "site-x")["version"] == 2, "A to serve v2", timeout=10, every=0.02)
    agreed_s = time.monotonic() - promoted
    assert agreed_s < 1.0, f"A served the promote made through B after {agreed_s:.2f} s"

    # a cron tick missed while no runner ran: two runners start at once, it fires once
    r = httpx.post(f"{b.url}/schedules", json={"adapter": "site-x", "cron": "0 3 * * *"}, headers=AUTH, timeout=30)
    assert r.status_code == 201, r.text
    ScheduleStore(tmp_path / "test-home").mark_run(r.json()["id"], time.time() - 2 * 86400)  # a day overdue
    with ThreadPoolExecutor(2) as pool:
        runners = list(pool.map(start_runner, ["one", "two"]))
    by_pid = {proc.pid: proc for proc in runners}
    scheduled = wait_for(lambda: next((j for j in _jobs(a) if j["trigger"] == "schedule"), None),
                         "the missed tick to fire", timeout=90)

    # its job is claimed by exactly one runner; kill -9 that runner (and its job process) mid-job
    running = wait_for(lambda: (j := _job(a, scheduled["id"]))["state"] == "running" and j["runner_pid"] and j,
                       "a runner to claim the job", timeout=90)
    claimer = by_pid[running["runner_pid"]]
    survivor = next(proc for pid, proc in by_pid.items() if pid != claimer.pid)
    os.killpg(claimer.pid, signal.SIGKILL)
    assert claimer.wait(10) == -signal.SIGKILL
    killed_at = time.time()

    failed = wait_for(lambda: (j := _job(b, scheduled["id"]))["state"] != "running" and j,
                      "the surviving runner to fail the killed runner's job", timeout=LEASE_S + 30, every=0.2)
    # LEASE_ERROR once the lease ran out; ORPHAN_ERROR at once when the survivor's start came after the kill (on a
    # loaded machine one runner can fire, claim and be killed before the other is up): it finds the pid gone
    assert failed["state"] == "failed" and failed["error"] in (LEASE_ERROR, ORPHAN_ERROR), failed
    assert failed["log"].count("running (runner pid") == 1, "claimed once, not retried"
    assert time.time() - killed_at < LEASE_S + 20

    # the survivor carries on: a manual job through A runs on it to the end
    r = httpx.post(f"{a.url}/retrain", json={"adapter": "site-x"}, headers=AUTH, timeout=30)
    assert r.status_code == 202, r.text
    manual = r.json()["job"]["id"]
    done = wait_for(lambda: (j := _job(b, manual))["state"] not in ("queued", "running") and j,
                    "the survivor to run the manual job", timeout=180, every=0.5)
    assert done["state"] in ("succeeded", "rejected"), done.get("log", "")[-2000:]
    assert done["runner_pid"] == survivor.pid and survivor.poll() is None
    assert [j["trigger"] for j in _jobs(a)].count("schedule") == 1, "the missed tick fired once, by one runner"
