"""The drift monitor: capture off the hot path, checks against the version's reference, history, gauges, reports,
one scheduled checker per adapter. The history and scheduling tests run on SQLite and PostgreSQL; the others on the
embedded SQLite default (tests/test_monitor_db.py has the stores' own tests on both)."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY
from sqlalchemy.engine import make_url
from state_backend import carry_registry

from models import migrations, settings
from models.artifacts import load_model
from models.export import session
from models.registry import open_registry
from models.state import close_all
from monitoring.capture import keep_sample
from monitoring.config import MonitorConfig
from monitoring.errors import NoReferenceError, NotEnoughRecordsError, UnknownAdapterError
from monitoring.history import DriftHistory
from monitoring.image_stats import batch_image_stats
from monitoring.monitor import DriftMonitor

RESULT_KEYS = {"adapter", "version", "drift", "score", "threshold", "p_value", "window_size", "checked_at", "features",
               "report", "mean_confidence", "estimated_accuracy", "accuracy_estimate"}


@pytest.fixture(scope="module")
def traffic(_service_home_template: Path, source_model: Path) -> dict[str, Any]:
    """Clean (digits test split) and noisy (gaussian_noise@5) requests with site-a v1's ONNX outputs."""
    import torch

    from pipelines.data import digits_splits
    from pipelines.shifts import shift_set

    test = digits_splits(32).test
    transform = load_model(source_model)[1].preprocessing.eval_transform()
    sess = session(open_registry(_service_home_template).path("site-a", 1) / "model.onnx")
    out = {}
    for name, images in (("clean", test.images[:200]), ("noisy", shift_set(test, "gaussian_noise", 5).images[:200])):
        logits, emb = sess.run(None, {"input": torch.stack([transform(im) for im in images]).numpy()})
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        out[name] = (list(images), z / z.sum(axis=1, keepdims=True), emb)
    return out


@pytest.fixture(autouse=True)
def _close_databases() -> Iterator[None]:
    yield
    close_all()  # this test's engines (a PostgreSQL database per test) give their connections back


@pytest.fixture
def backend(db_url: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """sqlite: ADAPTSERVE_DATABASE_URL unset (the embedded <home>/state.db); postgresql: a fresh database at head,
    holding the service home's registry."""
    if make_url(db_url).get_backend_name() == "postgresql":
        migrations.upgrade(db_url)
        monkeypatch.setenv("ADAPTSERVE_DATABASE_URL", db_url)
    if "service_home" in request.fixturenames:
        carry_registry(request.getfixturevalue("service_home"))
    return db_url


def _cfg(**overrides: Any) -> MonitorConfig:
    return MonitorConfig(**{"interval_s": 0, "window": 200, "min_records": 100, "report_every": 0, **overrides})


def _monitor(home: Path, base: Path, **overrides: Any) -> DriftMonitor:
    return DriftMonitor(home, open_registry(home), base, _cfg(**overrides))


def _send(monitor: DriftMonitor, traffic: dict[str, Any], kind: str, n: int = 200, adapter: str = "site-a",
          version: int = 1, per_request: int = 8, replica: str = "") -> None:
    """Record n predictions as the runtime does: one record() per request of `per_request` images; `replica`
    prefixes the ids (each replica serves its own requests)."""
    images, probs, emb = traffic[kind]
    for start in range(0, n, per_request):
        end = min(start + per_request, n)
        ids = [f"{replica}{kind}-{adapter}-{version}-{i}" for i in range(start, end)]
        monitor.record(adapter, version, ids, images[start:end], probs[start:end], emb[start:end])


def _sample(name: str, labels: dict[str, str]) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_clean_traffic_passes_noisy_traffic_alarms(service_home: Path, source_model: Path, traffic: dict) -> None:
    with _monitor(service_home, source_model) as monitor:
        _send(monitor, traffic, "clean")
        assert monitor.flush()
        clean = monitor.check("site-a")
        assert set(clean) == RESULT_KEYS
        assert (clean["adapter"], clean["version"], clean["window_size"], clean["drift"]) == ("site-a", 1, 200, False)
        assert clean["p_value"] > 0.01 and clean["score"] < clean["threshold"] == pytest.approx(2.0)
        assert clean["report"] is None and 0.1 < clean["mean_confidence"] <= 1.0
        _send(monitor, traffic, "noisy")
        assert monitor.flush()
        noisy = monitor.check("site-a")
        assert noisy["drift"] is True and noisy["score"] >= noisy["threshold"]
        assert noisy["features"]["embedding"]["moved"] is True
        assert monitor.latest("site-a") == noisy  # the estimate too: stored with the check
        estimate = noisy["accuracy_estimate"]
        assert noisy["estimated_accuracy"] == estimate["estimated_accuracy"] <= estimate["class_bound"]
        assert 0.0 <= noisy["estimated_accuracy"] <= 1.0 and estimate["calibration_sets"] == 36
        assert estimate["mean_confidence"] == pytest.approx(noisy["mean_confidence"], abs=1e-4)
        assert [c["drift"] for c in monitor.history("site-a")] == [False, True]


def test_history_survives_a_new_monitor_and_reads_without_one(service_home: Path, source_model: Path,
                                                              traffic: dict, backend: str) -> None:
    with _monitor(service_home, source_model) as monitor:
        _send(monitor, traffic, "noisy")
        monitor.flush()
        first, second = monitor.check("site-a"), monitor.check("site-a")
    with _monitor(service_home, source_model) as reopened:
        assert reopened.history("site-a") == [first, second]  # oldest first
        assert reopened.history("site-a", limit=1) == [second]
        assert reopened.adapters() == ["site-a"]
        from monitoring import metrics

        metrics.DRIFT_SCORE.labels(adapter="site-a").set(-1.0)  # e.g. a fresh worker process
        reopened.start()  # exports the latest stored check
        assert _sample("adaptserve_drift_score", {"adapter": "site-a"}) == pytest.approx(second["score"])
    reader = DriftHistory(service_home)  # what the retrain job runner uses: no registry, no torch
    assert reader.latest("site-a") == second and reader.latest("site-b") is None
    reader.close()


def test_too_few_records_and_unknown_adapters_are_clear_errors(service_home: Path, source_model: Path,
                                                               traffic: dict) -> None:
    with _monitor(service_home, source_model) as monitor:
        _send(monitor, traffic, "clean", n=30)
        monitor.flush()
        with pytest.raises(NotEnoughRecordsError) as err:
            monitor.check("site-a")
        assert err.value.status == 409
        assert str(err.value) == ("adapter 'site-a' version 1 has 30 captured records; a drift check needs at least "
                                  "100 (ADAPTSERVE_DRIFT_MIN_RECORDS). Send more traffic and retry.")
        with pytest.raises(UnknownAdapterError, match="nope") as unknown:
            monitor.check("nope")
        assert unknown.value.status == 404
        with pytest.raises(UnknownAdapterError):
            monitor.check("site-a", version=9)
        assert monitor.latest("site-a") is None  # failed checks leave no history


def test_records_of_other_versions_do_not_count(service_home: Path, source_model: Path, traffic: dict) -> None:
    with _monitor(service_home, source_model) as monitor:
        _send(monitor, traffic, "clean", version=2)  # v2 traffic while v1 is champion
        monitor.flush()
        with pytest.raises(NotEnoughRecordsError, match="version 1 has 0 captured records"):
            monitor.check("site-a")
        assert monitor.check("site-a", version=2)["version"] == 2


def test_a_version_without_reference_is_a_409(service_home: Path, source_model: Path, traffic: dict) -> None:
    (open_registry(service_home).path("site-b", 1) / "reference.npz").unlink()
    with _monitor(service_home, source_model) as monitor:
        _send(monitor, traffic, "clean", adapter="site-b")
        monitor.flush()
        with pytest.raises(NoReferenceError, match="has no drift reference .*`adaptserve adapters register`") as err:
            monitor.check("site-b")
        assert err.value.status == 409 and isinstance(err.value, NotEnoughRecordsError)


def test_base_traffic_is_checked_against_the_base_reference(service_home: Path, source_model: Path,
                                                            traffic: dict) -> None:
    with _monitor(service_home, source_model) as monitor:
        _send(monitor, traffic, "noisy", adapter="base", version=0)
        monitor.flush()
        result = monitor.check("base")
        assert (result["adapter"], result["version"], result["drift"]) == ("base", 0, True)
        assert len(list((service_home / "references").glob("*.npz"))) == 1  # computed once, cached under home


def test_gauges_follow_the_latest_check(service_home: Path, source_model: Path, traffic: dict) -> None:
    labels = {"adapter": "site-a", "result": "drift"}
    before = _sample("adaptserve_drift_checks_total", labels) or 0.0
    with _monitor(service_home, source_model) as monitor:
        _send(monitor, traffic, "noisy")
        monitor.flush()
        result = monitor.check("site-a")
    assert _sample("adaptserve_drift_flag", {"adapter": "site-a"}) == 1.0
    assert _sample("adaptserve_drift_score", {"adapter": "site-a"}) == pytest.approx(result["score"])
    assert _sample("adaptserve_mean_confidence", {"adapter": "site-a"}) == pytest.approx(result["mean_confidence"])
    assert _sample("adaptserve_estimated_accuracy", {"adapter": "site-a"}) == pytest.approx(
        result["estimated_accuracy"])
    assert _sample("adaptserve_drift_checks_total", labels) == before + 1


def test_every_nth_check_writes_a_report_in_the_background(service_home: Path, source_model: Path, traffic: dict,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from monitoring.reports import write_report

    calls: list[tuple[int, str]] = []

    def fake_report(reference, current, out_html, **kwargs):  # Evidently itself is tested in test_reports.py
        inspect.signature(write_report).bind(reference, current, out_html, **kwargs)  # the real call would fit
        assert kwargs["workspace_dir"] == service_home / "evidently"
        time.sleep(0.05)
        Path(out_html).parent.mkdir(parents=True, exist_ok=True)
        Path(out_html).write_text("<html></html>")
        calls.append((len(current), kwargs["project"]))
        return {}

    monkeypatch.setattr("monitoring.reports.write_report", fake_report)
    with _monitor(service_home, source_model, report_every=2, report_keep=1) as monitor:
        _send(monitor, traffic, "clean")
        monitor.flush()
        results = [monitor.check("site-a") for _ in range(4)]
        assert all(r["report"] is None for r in results)  # not on the caller's path
        assert monitor.flush()
        assert calls == [(200, "site-a"), (200, "site-a")]
        reports = [c["report"] for c in monitor.history("site-a")]
        assert reports[0] is None and reports[2] is None and reports[1] and reports[3]
        assert monitor.report_path("site-a") == Path(reports[3])
        assert list((service_home / "reports" / "site-a").glob("*.html")) == [Path(reports[3])]  # report_keep=1
        forced = monitor.check("site-a", write_report=True)  # on demand: written now, path returned
        assert forced["report"] and Path(forced["report"]).is_file() and len(calls) == 3
        assert monitor.check("site-a", write_report=False)["report"] is None and len(calls) == 3


def test_sampling_is_deterministic_by_prediction_id(service_home: Path, source_model: Path, traffic: dict) -> None:
    with _monitor(service_home, source_model, sample=0.5) as monitor:
        _send(monitor, traffic, "clean")
        monitor.flush()
        expected = sum(keep_sample(f"clean-site-a-1-{i}", 0.5) for i in range(200))
        assert 60 < expected < 140 and monitor.store.count("site-a") == expected


def test_record_never_blocks_and_counts_what_it_drops(service_home: Path, source_model: Path, traffic: dict) -> None:
    images, probs, emb = traffic["clean"]
    with _monitor(service_home, source_model, queue_size=1) as monitor:
        inside, release = threading.Event(), threading.Event()
        real = monitor._submit

        def stalled(batch):  # a stalled disk: the capture thread is stuck on the first batch
            inside.set()
            release.wait(10)
            real(batch)

        monitor._submit = stalled
        monitor.record("site-a", 1, ["a"], images[:1], probs[:1], emb[:1])
        assert inside.wait(10)
        start = time.perf_counter()
        for i in range(4):  # one fits the queue, three are dropped
            monitor.record("site-a", 1, [f"b{i}"], images[:1], probs[:1], emb[:1])
        assert time.perf_counter() - start < 0.5
        assert monitor.dropped == 3
        release.set()
        assert monitor.flush() and monitor.store.count("site-a") == 2


def test_record_costs_microseconds(service_home: Path, source_model: Path, traffic: dict) -> None:
    images, probs, emb = traffic["clean"]
    with _monitor(service_home, source_model) as monitor:
        monitor.record("site-a", 1, ["warm"], images[:1], probs[:1], emb[:1])
        start = time.perf_counter()
        for i in range(500):
            monitor.record("site-a", 1, [f"r{i}"], images[i % 200 : i % 200 + 1], probs[:1], emb[:1])
        per_call = (time.perf_counter() - start) / 500
        assert per_call < 200e-6  # typically ~2 us; generous for a loaded CI machine
        assert monitor.flush() and monitor.store.count("site-a") == 501


def test_summary_of_the_current_window(service_home: Path, source_model: Path, traffic: dict) -> None:
    with _monitor(service_home, source_model) as monitor:
        _send(monitor, traffic, "clean", n=120)
        _send(monitor, traffic, "clean", n=40, version=2)
        monitor.flush()
        summary = monitor.summary("site-a")
    assert summary["window_size"] == 160 and summary["versions"] == {"1": 120, "2": 40}
    assert sum(summary["class_counts"].values()) == 160 and set(summary["class_counts"]) <= set("0123456789")
    assert sum(summary["confidence_histogram"]["counts"]) == 160
    assert summary["confidence_histogram"]["edges"][0] == 0.0 and summary["confidence_histogram"]["edges"][-1] == 1.0
    assert summary["latest_check"] is None and 0.0 < summary["mean_confidence"] <= 1.0


def test_captured_image_stats_are_each_images_own(service_home: Path, source_model: Path, traffic: dict) -> None:
    """The capture thread computes statistics stacked over many requests; each record holds its own image's."""
    images = traffic["noisy"][0][:64] + traffic["clean"][0][:64]
    singles = np.stack([batch_image_stats([im])[0] for im in images])
    np.testing.assert_allclose(batch_image_stats(images), singles, rtol=1e-5, atol=1e-7)
    with _monitor(service_home, source_model) as monitor:
        _send(monitor, traffic, "noisy", n=64)
        _send(monitor, traffic, "clean", n=64)
        assert monitor.flush()
        stored = {r.prediction_id: r.stats for r in monitor.store.window_records("site-a", 128)}
    ids = [f"noisy-site-a-1-{i}" for i in range(64)] + [f"clean-site-a-1-{i}" for i in range(64)]
    np.testing.assert_allclose(np.stack([stored[i] for i in ids]), singles, rtol=1e-5, atol=1e-7)


def _wait(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_one_leader_runs_scheduled_checks(service_home: Path, source_model: Path, traffic: dict, backend: str) -> None:
    first = _monitor(service_home, source_model, interval_s=0.1)
    second = _monitor(service_home, source_model, interval_s=0.1)
    try:
        _send(first, traffic, "clean", n=120)
        first.flush()
        first.start()
        assert _wait(lambda: first.scheduled_checks == 1)
        second.start()
        time.sleep(0.6)  # several ticks for both
        assert first.is_leader and not second.is_leader and second.scheduled_checks == 0
        assert first.scheduled_checks == 1  # no new records since: the same window is not checked again
        _send(first, traffic, "noisy", n=40)
        first.flush()
        assert _wait(lambda: first.scheduled_checks == 2)
        first.close()  # gives its lease back: the other worker takes over
        assert _wait(lambda: second.is_leader and second.scheduled_checks == 1)
        assert len(second.history("site-a")) == 3
    finally:
        first.close()
        second.close()


@pytest.fixture
def shared_url(db_url: str, monkeypatch: pytest.MonkeyPatch, service_home: Path) -> str:
    """One database for every home of the test, as replicas have: ADAPTSERVE_DATABASE_URL names a shared SQLite
    file or a PostgreSQL database at head, holding the service home's registry (every copy of it has the same)."""
    if make_url(db_url).get_backend_name() == "postgresql":
        migrations.upgrade(db_url)
    monkeypatch.setenv("ADAPTSERVE_DATABASE_URL", db_url)
    carry_registry(service_home)
    return db_url


@pytest.fixture
def second_home(_service_home_template: Path, tmp_path: Path) -> Path:
    """Another replica's state dir: the same adapters, its own registry and files."""
    import shutil

    return Path(shutil.copytree(_service_home_template, tmp_path / "svc2"))


def test_replicas_on_one_database_check_all_their_traffic(service_home: Path, second_home: Path,
                                                          source_model: Path, traffic: dict, shared_url: str) -> None:
    with _monitor(service_home, source_model) as one, _monitor(second_home, source_model) as two:
        _send(one, traffic, "clean", n=120, replica="r1-")
        _send(two, traffic, "clean", n=80, replica="r2-")
        assert one.flush() and two.flush()
        result = one.check("site-a")
        assert (result["window_size"], one.store.count("site-a"), two.store.count("site-a")) == (200, 200, 200)
        assert two.history("site-a") == [result] and two.latest("site-a") == result and two.adapters() == ["site-a"]


def test_replicas_scheduling_one_adapter_run_one_check_per_interval(service_home: Path, second_home: Path,
                                                                   source_model: Path, traffic: dict,
                                                                   shared_url: str) -> None:
    with (_monitor(service_home, source_model, interval_s=10) as one,
          _monitor(second_home, source_model, interval_s=10) as two):
        _send(one, traffic, "clean", n=120, replica="r1-")
        assert one.flush()
        t0 = time.time()
        assert len(one.run_scheduled(t0)) == 1 and two.run_scheduled(t0) == []
        _send(two, traffic, "noisy", n=80, replica="r2-")  # new records: due at the next interval, not before
        assert two.flush()
        assert one.run_scheduled(t0 + 5) == [] and two.run_scheduled(t0 + 5) == []
        assert two.run_scheduled(t0 + 10) == []  # the holder is alive: it keeps the adapter
        [again] = one.run_scheduled(t0 + 10)
        assert again["window_size"] == 200 and again["drift"] is True  # the other replica's noisy traffic is in it
        assert one.is_leader and not two.is_leader and (one.scheduled_checks, two.scheduled_checks) == (2, 0)

        one.leases.release()  # e.g. shutting down: from the next interval on, either may win it
        _send(two, traffic, "noisy", n=40, replica="r3-")
        assert two.flush()
        results: list[list[dict[str, Any]]] = []
        start = threading.Barrier(2)

        def tick(monitor: DriftMonitor) -> None:
            start.wait()
            results.append(monitor.run_scheduled(t0 + 20))

        threads = [threading.Thread(target=tick, args=(m,)) for m in (one, two)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(len(r) for r in results) == [0, 1] and len(two.history("site-a")) == 3


def test_a_report_written_by_one_replica_is_served_by_another(service_home: Path, second_home: Path,
                                                              source_model: Path, traffic: dict, shared_url: str,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """GET /drift/report through any replica: the replica that wrote a check's report uploaded it to the shared
    artifact store; another one fetches it, verified, into its own home. A damaged object is never served."""
    shared = service_home / "artifacts"  # the template's registry objects are there: every replica's store
    monkeypatch.setenv("ADAPTSERVE_ARTIFACTS_URL", str(shared))

    def fake_report(reference, current, out_html, **kwargs):  # Evidently itself is tested in test_reports.py
        Path(out_html).parent.mkdir(parents=True, exist_ok=True)
        Path(out_html).write_text(f"<html>{len(current)} records, {kwargs['metadata']['check_id']}</html>")
        return {}

    monkeypatch.setattr("monitoring.reports.write_report", fake_report)
    with _monitor(service_home, source_model) as one, _monitor(second_home, source_model) as two:
        assert two.report_path("site-a") is None
        _send(one, traffic, "clean", n=120, replica="r1-")
        assert one.flush()
        written = Path(one.check("site-a", write_report=True)["report"])
        served = two.report_path("site-a")
        assert served == second_home / "reports" / "site-a" / written.name
        assert served.read_text() == written.read_text() == "<html>120 records, 1</html>"

        served.unlink()  # gone from the second home; its object damaged in the store
        (obj,) = [p for p in shared.rglob("*") if p.is_file() and p.read_bytes() == written.read_bytes()]
        obj.write_text("<html>tampered</html>")
        with caplog.at_level("ERROR", logger="monitoring.monitor"):
            assert two.report_path("site-a") is None
        assert "not fetched from the artifact store" in caplog.text and not served.exists()
        assert one.report_path("site-a") == written, "the writer serves its own copy"


def test_config_from_env_and_the_settings_behind_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTSERVE_DRIFT_INTERVAL_S", "0")
    monkeypatch.setenv("ADAPTSERVE_DRIFT_WINDOW", "300")
    monkeypatch.setenv("ADAPTSERVE_CAPTURE_SAMPLE", "0.25")
    cfg = MonitorConfig.from_env()
    assert (cfg.interval_s, cfg.window, cfg.sample, cfg.alpha, cfg.report_every) == (0.0, 300, 0.25, 0.01, 10)
    assert MonitorConfig.from_env({"ADAPTSERVE_DRIFT_WINDOW": "400"}).window == 400  # an explicit environ
    monkeypatch.setenv("ADAPTSERVE_DRIFT_WINDOW", "lots")
    with pytest.raises(ValueError, match="ADAPTSERVE_DRIFT_WINDOW='lots' is not an integer"):
        MonitorConfig.from_env()
    with pytest.raises(ValueError, match=r"ADAPTSERVE_DRIFT_WINDOW \(50\) must be >= ADAPTSERVE_DRIFT_MIN_RECORDS "
                                         r"\(100\); raise ADAPTSERVE_DRIFT_WINDOW or lower"):
        MonitorConfig(window=50)
    # every knob is a documented setting whose declared default is the config's (the README table comes from it)
    rows = {variable: (shown, text) for _, variable, shown, _, text in settings.reference_rows()}
    assert rows["ADAPTSERVE_DRIFT_INTERVAL_S"][0] == "30.0" and rows["ADAPTSERVE_REPORT_EVERY"][0] == "10"
    assert {"ADAPTSERVE_DRIFT_ALPHA", "ADAPTSERVE_CAPTURE_MAX_PER_ADAPTER", "ADAPTSERVE_CAPTURE_RETENTION_S",
            "ADAPTSERVE_DRIFT_WINDOW", "ADAPTSERVE_CAPTURE_SAMPLE", "ADAPTSERVE_CAPTURE_QUEUE"} <= set(rows)
    defaults = MonitorConfig()
    for f in dataclasses.fields(MonitorConfig):
        name = f.metadata["setting"]
        assert getattr(defaults, f.name) == settings.default(name), f.name
        assert rows[settings.env_name(name)][1], f"{name} has no help"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"min_records": 5, "window": 5}, "ADAPTSERVE_DRIFT_MIN_RECORDS must be at least 10, got 5"),
        ({"window": 600, "max_per_adapter": 500},
         "ADAPTSERVE_CAPTURE_MAX_PER_ADAPTER (500) must be >= ADAPTSERVE_DRIFT_WINDOW (600), or the window can never "
         "fill."),
        ({"alpha": 1.0}, "ADAPTSERVE_DRIFT_ALPHA must be between 0 and 1 (exclusive), got 1.0"),
        ({"interval_s": -1.0}, "ADAPTSERVE_DRIFT_INTERVAL_S must be >= 0 (0 disables scheduled checks), got -1.0."),
        ({"queue_size": 0}, "ADAPTSERVE_CAPTURE_QUEUE must be at least 1, got 0."),
    ],
    ids=["min-records", "window-cannot-fill", "alpha", "interval", "queue"],
)
def test_config_errors_name_the_variables(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        MonitorConfig(**overrides)
    assert message in str(err.value)


def test_importing_the_monitor_loads_neither_torch_nor_prometheus() -> None:
    code = ("import sys, monitoring.monitor; "
            "print(sorted(m for m in ('torch', 'prometheus_client') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"


def test_bench_quick_run_prints_the_json_line_and_writes_results(source_model: Path, tmp_path: Path) -> None:
    import json

    import typer
    from typer.testing import CliRunner

    from benchmarks.drift import command

    app = typer.Typer()
    app.command("drift")(command)
    result = CliRunner().invoke(app, ["--model", str(source_model), "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"false_alarm_rate", "detection_delay", "check_ms", "evidently_ms", "capture_overhead"} <= set(line)
    assert line["clean_checks"] == 2 * 7 and 0.0 <= line["false_alarm_rate"] <= 1.0  # 2 quick trials, 7 checks each
    delay = line["detection_delay"]["gaussian_noise"]["3"]
    assert delay is not None and 0 < delay <= 200 and line["check_ms"] > 0 and line["evidently_ms"] is None
    assert line["command"] == f"adaptserve bench drift --model {source_model} --out {tmp_path} --quick"
    assert json.loads((tmp_path / "drift.json").read_text())["check_ms"] == line["check_ms"]
    assert f"| gaussian_noise | {delay} |" in (tmp_path / "drift.md").read_text()
    # the estimate against the truth: clean and gaussian_noise@3 of the validation split, each with its numbers
    assert line["estimated_acc_cases"] == 2 and 0.0 <= line["estimated_acc_mae"] <= 1.0
    case = line["estimated_accuracy"]["gaussian_noise"]["3"]
    assert abs(case["estimated"] - case["true"]) <= line["estimated_acc_max_error"] + 1e-9
    assert "## Estimated accuracy (no labels)" in (tmp_path / "drift.md").read_text()
