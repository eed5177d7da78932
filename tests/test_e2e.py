"""The whole product against a real `bentoml serve`: the demo loop at small scale, scraped by a real Prometheus.

Clean traffic, then a degraded camera with feedback labels; the service's own drift monitor, the job runner's
drift policy, the gate and the hot swap do the rest. Prometheus (Debian's package; `.ci/system-deps` installs it)
scrapes /metrics on loopback and the drift gauge is read back through its query API.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import pytest

from pipelines.demo import DEMO_ENV, Client, DemoConfig, free_port, run_demo, start_service, wait_ready, write_report

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


def _query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())["data"]["result"]


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
        cfg = DemoConfig(clean_requests=60, images_per_request=4, after_promote_requests=40, adapter_epochs=2,
                         timeout_s=480)
        result = run_demo(client, source_model, cfg, lambda line: print(line), tmp_path)
        report, png = write_report(result, tmp_path / "out")
        kinds = [e.kind for e in result["timeline"].events]
        assert result["promoted"], kinds
        assert kinds.index("drift") < kinds.index("promote"), kinds  # the system acted on its own drift flag
        assert result["drift_after_images"] is not None and result["drift_after_images"] <= 400
        assert result["clean_acc"] > 0.9
        assert result["shifted_acc"] < result["clean_acc"] - 0.05  # the shift really hurt
        assert result["recovered_acc"] > result["shifted_acc"] + 0.05  # and retraining won most of it back
        jobs = client.get("/jobs", adapter="site-demo")["jobs"]
        assert jobs[0]["trigger"] == "drift" and jobs[0]["state"] == "succeeded", jobs
        assert report.stat().st_size > 10_000 and png.stat().st_size > 10_000

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
