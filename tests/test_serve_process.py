"""One real `bentoml serve` (2 workers) driven over loopback: predictions, /metrics, auth, hot swap under load."""

from __future__ import annotations

import base64
import io
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.serve import ServeProcess
from pipelines.data import digits_splits

pytestmark = pytest.mark.slow

TOKEN = "process-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(_service_home_template: Path, source_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    root = tmp_path_factory.mktemp("serve-process")
    home = root / "home"
    shutil.copytree(_service_home_template, home)
    env = {
        "ADAPTSERVE_HOME": str(home),
        "ADAPTSERVE_BASE_MODEL": str(source_model),
        "ADAPTSERVE_ADMIN_TOKEN": TOKEN,
        "ADAPTSERVE_WORKERS": "2",
        "ADAPTSERVE_THREADS": "1",  # two workers on a two-core machine
    }
    proc = ServeProcess(env, root / "serve").start()
    try:
        proc.wait_ready(timeout=120)
        yield proc
    finally:
        proc.stop()


def _png() -> str:
    buf = io.BytesIO()
    digits_splits(32).test.images[0].save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _per_worker_requests(server: ServeProcess, adapter: str, version: int) -> dict[int, float]:
    """Requests answered per worker process, read from each worker's own Prometheus multiprocess file."""
    counts = {}
    for path in server.multiproc_dir.glob("counter_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        total = 0.0
        for family in MultiProcessCollector.merge([str(path)]):
            for s in family.samples:
                if s.name == "adaptserve_requests_total" and s.labels == {
                    "adapter": adapter,
                    "version": str(version),
                    "status": "ok",
                }:
                    total += s.value
        counts[pid] = total
    return counts


class Load:
    """Client threads posting /predict for one adapter back to back, one fresh connection per request so that
    the kernel spreads them over both workers. Records (sent, received, status, version)."""

    def __init__(self, url: str, adapter: str, clients: int = 4) -> None:
        self.url, self.body = url, {"images": [_png()], "adapter": adapter}
        self.samples: list[tuple[float, float, int, int | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=30.0) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    r = client.post(f"{self.url}/predict", json=self.body)
                    version = r.json().get("version") if r.status_code == 200 else None
                    self.samples.append((sent, time.monotonic(), r.status_code, version))
                except httpx.HTTPError:
                    self.samples.append((sent, time.monotonic(), 0, None))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def test_predict_names_adapter_and_version(server: ServeProcess) -> None:
    r = httpx.post(f"{server.url}/predict", json={"images": [_png()], "adapter": "site-a", "top_k": 2}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["adapter"], body["version"]) == ("site-a", 1)
    assert [len(p["top_k"]) for p in body["predictions"]] == [2]
    assert len(server.worker_pids()) == 2


def test_metrics_over_http_count_requests_and_name_the_engine(server: ServeProcess) -> None:
    for _ in range(3):
        assert httpx.post(
            f"{server.url}/predict", json={"images": [_png()], "adapter": "site-b"}, timeout=30
        ).is_success
    r = httpx.get(f"{server.url}/metrics", timeout=30)
    assert r.status_code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
    requests = samples[("adaptserve_requests_total", (("adapter", "site-b"), ("status", "ok"), ("version", "1")))]
    assert requests >= 3  # summed over both workers' multiprocess files
    assert samples[("adaptserve_engine_info", (("engine", "onnx"),))] == 1.0


@pytest.mark.parametrize(
    "headers, message",
    [
        ({}, "promote needs an admin token: send 'Authorization: Bearer <token>'"),
        ({"Authorization": "Bearer wrong"}, "wrong token: it is not one of this service's tokens"),
    ],
    ids=["no-token", "wrong-token"],
)
def test_admin_route_without_the_token_is_401_json(server: ServeProcess, headers: dict, message: str) -> None:
    r = httpx.post(f"{server.url}/adapters/promote", json={"name": "site-a", "version": 2}, headers=headers)
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"] == message


def _swap_under_load(server: ServeProcess, path: str, body: dict, want: int) -> None:
    """Change site-a's champion while 4 clients hammer it; from 1 s after the change returned, every response
    names `want`, and both workers were among those answering (load runs until each did, 8 s at most)."""
    workers = server.worker_pids()
    assert len(workers) == 2
    with Load(server.url, "site-a") as load:
        time.sleep(1.0)
        r = httpx.post(f"{server.url}{path}", json=body, headers=AUTH, timeout=60)
        returned = time.monotonic()
        assert r.status_code == 200, r.text
        time.sleep(1.0)
        before = _per_worker_requests(server, "site-a", want)
        for _ in range(16):
            time.sleep(0.5)
            after = _per_worker_requests(server, "site-a", want)
            if all(after.get(pid, 0) > before.get(pid, 0) for pid in workers):
                break
    assert [s for s in load.samples if s[2] != 200] == []
    late = [s for s in load.samples if s[0] > returned + 1.0]
    assert len(late) >= 10
    stale = [(round(s[0] - returned, 3), round(s[1] - returned, 3), s[3]) for s in late if s[3] != want]
    assert stale == [], "(sent, received) seconds after the change returned, version"
    # both workers answered with the new version after the 1 s mark, not just the one that took the change
    assert all(after.get(pid, 0) > before.get(pid, 0) for pid in workers), (before, after)


def test_promote_and_rollback_under_load_fail_no_request(server: ServeProcess) -> None:
    _swap_under_load(server, "/adapters/promote", {"name": "site-a", "version": 2}, want=2)
    _swap_under_load(server, "/adapters/rollback", {"name": "site-a"}, want=1)


def test_server_stops_cleanly(server: ServeProcess) -> None:
    """SIGTERM to the server's process group ends it, its workers and what they started, with no SIGKILL."""
    assert len(server.worker_pids()) == 2
    started = time.monotonic()
    assert server.stop(timeout=30) == 0
    assert time.monotonic() - started < 30
    assert server.killed == []
    assert server.alive_children() == []
