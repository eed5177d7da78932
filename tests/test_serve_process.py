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
from PIL import Image
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.serve import ServeProcess
from pipelines.data import digits_splits

pytestmark = pytest.mark.slow

TOKEN = "process-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LABELLER = {"Authorization": "Bearer process-labeller-token"}
CONTRIBUTOR = {"Authorization": "Bearer process-contributor-token"}


@pytest.fixture(scope="module")
def server(_service_home_template: Path, source_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    root = tmp_path_factory.mktemp("serve-process")
    home = root / "home"
    shutil.copytree(_service_home_template, home)
    env = {
        "ADAPTSERVE_HOME": str(home),
        "ADAPTSERVE_BASE_MODEL": str(source_model),
        "ADAPTSERVE_ADMIN_TOKEN": TOKEN,
        "ADAPTSERVE_LABELLER_TOKENS": LABELLER["Authorization"].removeprefix("Bearer "),
        "ADAPTSERVE_CONTRIBUTOR_TOKENS": CONTRIBUTOR["Authorization"].removeprefix("Bearer "),
        "ADAPTSERVE_WORKERS": "2",
        "ADAPTSERVE_THREADS": "1",  # two workers on a two-core machine
    }
    proc = ServeProcess(env, root / "serve").start()
    try:
        proc.wait_ready(timeout=120)
        yield proc
    finally:
        proc.stop()


def _png(i: int = 0) -> str:
    buf = io.BytesIO()
    digits_splits(32).test.images[i].save(buf, "PNG")
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


# The first promote of a version is the slow one: the other worker loads it only when the notification arrives,
# 1.6 s after the promote returned under this load on 2 cores (2026-12-03; later swaps between loaded versions:
# 0 stale responses). Loading every worker before the commit is issue 14's; bench serve measures the swap p99.
SETTLE_S = 3.0


def _swap_under_load(server: ServeProcess, path: str, body: dict, want: int) -> None:
    """Change site-a's champion while 4 clients hammer it; from SETTLE_S after the change returned, every response
    names `want`, and both workers were among those answering (load runs until each did, 8 s at most)."""
    workers = server.worker_pids()
    assert len(workers) == 2
    with Load(server.url, "site-a") as load:
        time.sleep(1.0)
        r = httpx.post(f"{server.url}{path}", json=body, headers=AUTH, timeout=60)
        returned = time.monotonic()
        assert r.status_code == 200, r.text
        time.sleep(SETTLE_S)
        before = _per_worker_requests(server, "site-a", want)
        for _ in range(16):
            time.sleep(0.5)
            after = _per_worker_requests(server, "site-a", want)
            if all(after.get(pid, 0) > before.get(pid, 0) for pid in workers):
                break
    assert [s for s in load.samples if s[2] != 200] == []
    late = [s for s in load.samples if s[0] > returned + SETTLE_S]
    assert len(late) >= 10
    stale = [(round(s[0] - returned, 3), round(s[1] - returned, 3), s[3]) for s in late if s[3] != want]
    assert stale == [], "(sent, received) seconds after the change returned, version"
    # both workers answered with the new version after the SETTLE_S mark, not just the one that took the change
    assert all(after.get(pid, 0) > before.get(pid, 0) for pid in workers), (before, after)


def test_promote_and_rollback_under_load_fail_no_request(server: ServeProcess) -> None:
    _swap_under_load(server, "/adapters/promote", {"name": "site-a", "version": 2}, want=2)
    _swap_under_load(server, "/adapters/rollback", {"name": "site-a"}, want=1)


def test_label_requests_offer_uncertain_unlabelled_predictions_to_labellers_only(server: ServeProcess) -> None:
    margins = {}  # prediction id -> top-1 minus top-2 probability, from the predictions' own answers
    for i in range(16):
        r = httpx.post(f"{server.url}/predict", json={"images": [_png(i)], "adapter": "site-b", "top_k": 2},
                       timeout=30)
        assert r.status_code == 200, r.text
        p = r.json()["predictions"][0]
        margins[p["id"]] = p["top_k"][0]["score"] - p["top_k"][1]["score"]
    url = f"{server.url}/labels/requests"
    assert httpx.get(url, params={"adapter": "site-b"}, timeout=30).status_code == 401
    assert httpx.get(url, params={"adapter": "site-b"}, headers=CONTRIBUTOR, timeout=30).status_code == 403
    for params in ({"adapter": "site-b", "n": 0}, {"adapter": "site-b", "n": 501}, {"adapter": "../x"},
                   {"adapter": "site-b", "images": "maybe"}, {}):
        r = httpx.get(url, params=params, headers=LABELLER, timeout=30)
        assert 400 <= r.status_code < 500 and "error" in r.json(), (params, r.status_code, r.text)
    assert httpx.get(url, params={"adapter": "nope"}, headers=LABELLER, timeout=30).status_code == 404

    deadline = time.monotonic() + 30
    while True:  # capture and the input cache are written off the request path
        body = httpx.get(url, params={"adapter": "site-b", "n": 2}, headers=LABELLER, timeout=30).json()
        if body["candidates"] >= len(margins) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert body["adapter"] == "site-b" and body["candidates"] >= len(margins), body
    requested = body["requests"]
    assert len(requested) == 2 and len({r["id"] for r in requested}) == 2
    # margin sampling first: both come from the 4 x 2 smallest margins (other tests' site-b predictions can only
    # lower that cut-off)
    cutoff = sorted(margins.values())[7]
    assert all(r["margin"] <= cutoff + 1e-4 for r in requested), (requested, cutoff)
    for r in requested:
        if r["id"] in margins:
            assert r["margin"] == pytest.approx(margins[r["id"]], abs=1e-4)
        assert Image.open(io.BytesIO(base64.b64decode(r["image"]))).size == (32, 32)

    # a label sent for a request is ordinary feedback: counted, and the request is not offered again
    first = requested[0]["id"]
    r = httpx.post(f"{server.url}/feedback", json={"id": first, "label": "3"}, headers=LABELLER, timeout=30)
    assert r.status_code == 201, r.text
    again = httpx.get(url, params={"adapter": "site-b", "n": 500, "images": "false"}, headers=LABELLER,
                      timeout=30).json()
    assert first not in {r["id"] for r in again["requests"]}
    assert again["labelled"] >= 1 and "image" not in again["requests"][0]


def test_server_stops_cleanly(server: ServeProcess) -> None:
    """SIGTERM to the server's process group ends it, its workers and what they started, with no SIGKILL."""
    assert len(server.worker_pids()) == 2
    started = time.monotonic()
    assert server.stop(timeout=30) == 0
    assert time.monotonic() - started < 30
    assert server.killed == []
    assert server.alive_children() == []
