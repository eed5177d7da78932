"""The whole product against a real `bentoml serve`: the demo loop at small scale, scraped by a real Prometheus.

Clean traffic, then a degraded camera with feedback labels; the service's own drift monitor, the job runner's
drift policy, the gate and the hot swap do the rest. Prometheus (Debian's package; `.ci/system-deps` installs it)
scrapes /metrics on loopback and the drift gauge is read back through its query API.

First, fast: how the demo's shifted phase ends (promoted, rejected, failed, or the time limit with what it still
waited for), against a scripted service behind httpx.MockTransport.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from benchmarks.demo import (
    DEMO_ENV,
    Client,
    DemoConfig,
    Timeline,
    free_port,
    local_url,
    new_state,
    run_demo,
    shifted_phase,
    start_service,
    summarize,
    wait_ready,
    write_report,
)

PROMETHEUS = shutil.which("prometheus")


def _start_prometheus(tmp: Path, target_port: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: adaptserve\n    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
    )
    cmd = [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
           f"--web.listen-address=127.0.0.1:{port}"]
    log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), port


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) with a TCP socket listening on `port` (Linux)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def _query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())["data"]["result"]


# --------------------------------------------------------------------------------------------- the demo's ending


def _job(state: str, progress: float = 0.0, message: str = "", error: str | None = None, id: str = "abc12345ffff"):
    return {"id": id, "adapter": "site-demo", "trigger": "drift", "state": state, "progress": progress,
            "message": message, "error": error, "result": None}  # fmt: skip


@dataclass
class ScriptedService:
    """The routes the demo uses; `jobs(n)` and `drift` say what the service reports after n /predict requests."""

    promote_after: int | None = None
    jobs: Callable[[int], list[dict]] = lambda n: []
    drift: dict | None = None
    labels: int = 87
    requests: int = 0
    feedback_auth: list[str | None] = field(default_factory=list)
    served: list[str] = field(default_factory=list)  # prediction ids not labelled yet, newest last

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/predict":
            self.requests += 1
            version = 2 if self.promote_after is not None and self.requests > self.promote_after else 1
            n = len(json.loads(request.content)["images"])
            preds = [{"id": f"p{self.requests}-{i}", "label": "0"} for i in range(n)]
            self.served += [p["id"] for p in preds]
            return httpx.Response(200, json={"version": version, "predictions": preds})
        if path == "/labels/requests":
            self.feedback_auth.append(request.headers.get("authorization"))
            n = int(request.url.params["n"])
            return httpx.Response(200, json={"requests": [{"id": i} for i in self.served[-n:]]})
        if path == "/feedback":
            self.feedback_auth.append(request.headers.get("authorization"))
            self.served.remove(json.loads(request.content)["id"])
            return httpx.Response(201, json={"labels": self.labels})
        if path == "/drift":
            return httpx.Response(200, json=self.drift) if self.drift else httpx.Response(404, json={"error": "none"})
        if path == "/jobs":
            return httpx.Response(200, json={"jobs": self.jobs(self.requests)})
        return httpx.Response(404)


@dataclass
class Pool:
    images: list[Any]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


POOL = Pool([Image.new("L", (4, 4), v) for v in range(10)], list(range(10)))
FLAGGED = {"checked_at": "t1", "score": 9.5, "threshold": 8.2, "drift": True, "features": {}}
CALM = {"checked_at": "t1", "score": 3.14, "threshold": 8.2, "drift": False, "features": {}}
ENDINGS = [
    pytest.param(ScriptedService(promote_after=25), "promoted", None, 31, id="promoted-then-5-more-requests"),
    pytest.param(ScriptedService(jobs=lambda n: [_job("rejected")] if n >= 15 else []), "rejected", None, 20,
                 id="rejected-stops-at-the-next-look"),  # fmt: skip
    pytest.param(ScriptedService(jobs=lambda n: [_job("failed", error="RuntimeError: boom")] if n >= 15 else []),
                 "failed", None, 20, id="failed-stops-at-the-next-look"),  # fmt: skip
    pytest.param(ScriptedService(), "timeout", "waiting for the first drift check of 'site-demo'", None,
                 id="timeout-no-drift-check"),  # fmt: skip
    pytest.param(ScriptedService(drift=CALM), "timeout",
                 "waiting for the drift check to flag the shift (last score 3.1 < 8.2)", None,
                 id="timeout-not-flagged"),  # fmt: skip
    pytest.param(ScriptedService(drift=FLAGGED), "timeout", "waiting for 120 labels (have 87)", None,
                 id="timeout-labels"),  # fmt: skip
    pytest.param(ScriptedService(drift=FLAGGED, labels=130), "timeout",
                 "waiting for the job runner's drift policy to start a job (drift flagged, 130 labels; the accuracy "
                 "lost must reach ADAPTSERVE_RETRAIN_MIN_DROP; is a job runner running, or is a drift job of this "
                 "adapter within the cooldown?)", None,
                 id="timeout-no-job"),  # fmt: skip
    pytest.param(ScriptedService(drift=FLAGGED, jobs=lambda n: [_job("running", 0.4, "training")] if n else []),
                 "timeout", "waiting for job abc12345 (running, 40%: training)", None,
                 id="timeout-job-running"),  # fmt: skip
    pytest.param(ScriptedService(jobs=lambda n: [_job("running", 0.4, "training"), _job("rejected", id="old0ld")]
                                 if n else [_job("rejected", id="old0ld")]), "timeout",
                 "waiting for job abc12345 (running, 40%: training)", None,
                 id="an-earlier-rejected-job-is-not-this-story"),  # fmt: skip
]


@pytest.mark.parametrize(("service", "outcome", "waiting_for", "requests"), ENDINGS)
def test_the_shifted_phase_ends_with_an_outcome_or_says_what_it_waited_for(
    service: ScriptedService, outcome: str, waiting_for: str | None, requests: int | None
) -> None:
    client = Client("http://demo.test", "admin-token")
    client.http = httpx.Client(base_url="http://demo.test", transport=httpx.MockTransport(service))
    cfg = DemoConfig(after_promote_requests=5, timeout_s=0.3, min_labels=120)
    lines: list[str] = []
    state, tl = new_state(client, cfg, lines.append), Timeline()

    shifted_phase(client, tl, cfg, POOL, state)

    assert (state["outcome"], state.get("waiting_for")) == (outcome, waiting_for)
    summary = summarize(tl, cfg, 0, state)
    assert (summary["outcome"], summary["waiting_for"], summary["promoted"]) == (
        outcome, waiting_for, outcome == "promoted",
    )  # fmt: skip
    if requests is not None:
        assert service.requests == requests
    assert service.feedback_auth and set(service.feedback_auth) == {"Bearer admin-token"}, "labels come as the admin"
    assert len(service.feedback_auth) >= 2, "requests asked for and labelled"
    kinds = [e.kind for e in tl.events]
    assert kinds.count({"promoted": "promote"}.get(outcome, outcome)) == 1, kinds
    if outcome == "promoted":
        assert len(tl.correct) - state["promoted_at"] == 5 * cfg.images_per_request
    if outcome == "failed":
        assert lines[-2].endswith("  failed   job abc12345 (drift) failed: RuntimeError: boom"), lines
    if outcome == "timeout":
        assert lines[-1].endswith(f"  timeout  no outcome within 0 s: {waiting_for}"), lines
        assert "old0ld" not in "".join(lines)
    if outcome in ("rejected", "failed"):
        assert lines[-1] == f"the {outcome} job kept champion v1: the demo stops here"
    assert all(" image " in line for line in lines if line.startswith("[")), "the console counts images"


def test_the_demo_service_listens_on_loopback_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    started: list[list[str]] = []
    monkeypatch.setattr("benchmarks.demo.subprocess.Popen", lambda cmd, **kw: started.append(cmd))
    start_service(tmp_path, tmp_path / "base", 8123, "t", {})
    start_service(tmp_path, tmp_path / "base", 8124, "t", {}, host="0.0.0.0")
    assert [c[c.index("--host"):] for c in started] == [
        ["--host", "127.0.0.1", "--port", "8123"], ["--host", "0.0.0.0", "--port", "8124"],
    ]  # fmt: skip
    assert [local_url(h, 80) for h in ("127.0.0.1", "0.0.0.0", "::", "::1", "example.org")] == [
        "http://127.0.0.1:80", "http://127.0.0.1:80", "http://[::1]:80", "http://[::1]:80", "http://example.org:80",
    ]  # fmt: skip


@pytest.mark.slow
def test_drift_triggers_retrain_promotion_and_recovery(source_model: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    port, token = free_port(), "e2e-token"
    service = start_service(home, source_model, port, token, DEMO_ENV)
    prom = _start_prometheus(tmp_path, port) if PROMETHEUS else None
    try:
        client = Client(f"http://127.0.0.1:{port}", token)
        wait_ready(client, service, timeout=180)
        if Path("/proc/net/tcp").exists():
            assert _listening(port) == {"0100007F"}, "the demo's service (admin routes) listens on loopback only"
        cfg = DemoConfig(clean_requests=60, images_per_request=4, after_promote_requests=40, adapter_epochs=2,
                         timeout_s=480, min_labels=int(DEMO_ENV["ADAPTSERVE_RETRAIN_MIN_LABELS"]))
        result = run_demo(client, source_model, cfg, lambda line: print(line), tmp_path)
        report, png = write_report(result, tmp_path / "out")
        kinds = [e.kind for e in result["timeline"].events]
        assert result["promoted"], (kinds, result["waiting_for"])
        assert (result["outcome"], result["waiting_for"]) == ("promoted", None)
        assert kinds.index("drift") < kinds.index("promote"), kinds  # the system acted on its own drift flag
        # Flagged by the second drift check after the window holds shifted images at the latest. A count of images
        # alone would measure the client's speed: the check runs every interval, however many images that is.
        interval, window = float(DEMO_ENV["ADAPTSERVE_DRIFT_INTERVAL_S"]), int(DEMO_ENV["ADAPTSERVE_DRIFT_WINDOW"])
        assert result["drift_after_images"] is not None and result["drift_after_s"] is not None, result
        rate = result["drift_after_images"] / max(result["drift_after_s"], 1e-3)
        assert result["drift_after_images"] > 0, result  # flagged on shifted images, not on the clean ones
        assert result["drift_after_s"] <= window / rate + 2 * interval + 1.0, result
        assert result["clean_acc"] > 0.9
        assert result["shifted_acc"] < result["clean_acc"] - 0.05  # the shift really hurt
        assert result["recovered_acc"] > result["shifted_acc"] + 0.05  # and retraining won most of it back
        jobs = client.get("/jobs", adapter="site-demo")["jobs"]
        assert jobs[0]["trigger"] == "drift" and jobs[0]["state"] == "succeeded", jobs
        assert report.stat().st_size > 10_000 and png.stat().st_size > 10_000
        assert html.escape('"outcome": "promoted"') in report.read_text()

        page = client.http.get("/dashboard")
        assert page.status_code == 200 and "site-demo" in page.text
        metrics = client.http.get("/metrics").text
        assert 'adaptserve_drift_flag{adapter="site-demo"}' in metrics
        if prom is not None:
            deadline, found = time.monotonic() + 30, []
            while time.monotonic() < deadline and not found:
                try:
                    found = _query(prom[1], 'adaptserve_drift_score{adapter="site-demo"}')
                except OSError:
                    pass
                time.sleep(1)
            assert found and float(found[0]["value"][1]) >= 0.0, "Prometheus never scraped the drift gauge"
    finally:
        os.killpg(service.pid, 15)
        try:
            service.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, 9)
        if prom is not None:
            prom[0].terminate()
            prom[0].wait(timeout=30)
    if PROMETHEUS is None:
        warnings.warn("prometheus is not installed (.ci/system-deps installs it): the scrape part did not run",
                      stacklevel=1)
