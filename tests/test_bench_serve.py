"""`adaptserve bench serve`: the arithmetic of its metrics, and a quick end-to-end run of the real thing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.hotswap import Promote, swap_latencies
from benchmarks.loadgen import Sample, make_jpegs, phase_stats, predict_bodies
from benchmarks.output import NOTES
from benchmarks.serve import BenchConfig, summarize
from benchmarks.serve_process import ROOT, ServeProcess
from benchmarks.serve_report import markdown, write_results


def _samples(rows: list[tuple[float, int]], adapter: str = "a") -> list[Sample]:
    """(send time, version) rows; each answered 0.05 s later with 200."""
    return [Sample(sent, sent + 0.05, 200, adapter, version) for sent, version in rows]


@pytest.mark.parametrize(
    "rows, promotes, want_ms, want_incomplete",
    [
        # v1 until 1.3, v2 from 1.4: the swap sent at 1.0 took 400 ms
        ([(0.9, 1), (1.1, 1), (1.3, 1), (1.4, 2), (1.5, 2)], [(1.0, 2)], [400.0], 0),
        # a stale answer after a new one (the slower worker) moves the switch point past it
        ([(1.1, 2), (1.2, 1), (1.3, 2), (1.6, 2)], [(1.0, 2)], [300.0], 0),
        # already switched at the first request after the promote
        ([(1.05, 2), (1.2, 2)], [(1.0, 2)], [50.0], 0),
        # never switched before the next promote, then the second swap completes
        ([(1.1, 1), (1.9, 1), (2.2, 2), (3.1, 1)], [(1.0, 2), (2.0, 2), (3.0, 1)], [200.0, 100.0], 1),
        # no request at all after the promote: nothing shows that it happened
        ([(0.5, 1)], [(1.0, 2)], [], 1),
    ],
    ids=["simple", "stale-worker", "immediate", "incomplete", "no-traffic"],
)
def test_swap_latency_runs_to_the_first_request_after_which_all_name_the_new_version(
    rows: list, promotes: list, want_ms: list[float], want_incomplete: int
) -> None:
    ps = [Promote(sent, sent + 0.01, version, True) for sent, version in promotes]
    latencies, incomplete = swap_latencies(_samples(rows), ps, "a")
    assert latencies == pytest.approx(want_ms)
    assert incomplete == want_incomplete


def test_swap_latency_after_the_promote_answered_starts_at_its_answer() -> None:
    samples = _samples([(1.1, 1), (1.5, 1), (1.6, 2), (1.7, 2)])
    promote = Promote(1.0, 1.4, 2, True)  # the promoted replica checked and loaded the version for 400 ms
    assert swap_latencies(samples, [promote], "a")[0] == pytest.approx([600.0])
    assert swap_latencies(samples, [promote], "a", since="returned")[0] == pytest.approx([200.0])
    early = _samples([(1.1, 1), (1.3, 2), (1.5, 2)])  # served before the promote's answer reached its sender
    assert swap_latencies(early, [promote], "a", since="returned") == ([0.0], 0)


def test_swap_latency_ignores_other_adapters_and_failed_requests() -> None:
    samples = _samples([(1.1, 2), (1.2, 2)]) + _samples([(1.3, 1)], adapter="b")
    samples.append(Sample(1.4, 1.5, 503, "a", None))
    latencies, incomplete = swap_latencies(samples, [Promote(1.0, 1.01, 2, True)], "a")
    assert (latencies, incomplete) == (pytest.approx([100.0]), 0)


def test_phase_stats_count_images_answered_in_the_window() -> None:
    samples = [Sample(t, t + 0.1, 200, "a", 1, images=2) for t in (0.0, 0.5, 1.0, 1.5, 2.0)]
    samples.append(Sample(1.0, 1.2, 0, "a"))
    stats = phase_stats(samples, start=0.5, end=2.0)
    # answered at 0.6, 1.1, 1.6 inside [0.5, 2.0]: 3 requests x 2 images in 1.5 s; the failure counts as an error
    assert stats.throughput_img_s == pytest.approx(4.0)
    assert stats.p50_ms == pytest.approx(100.0)
    assert (stats.errors, stats.requests) == (1, 4)


def test_request_bodies_carry_jpegs_for_each_adapter() -> None:
    from service.decode import decode_images

    images = make_jpegs(3, 64)
    assert all(im[:3] == b"\xff\xd8\xff" for im in images)  # JPEG magic
    bodies = predict_bodies(images, ["x", "y"], per_request=2)
    body = json.loads(bodies["y"][1])
    assert body["adapter"] == "y" and len(bodies["x"]) == 3
    assert [im.size for im in decode_images(body["images"])] == [(64, 64), (64, 64)]


def _stats(img_s: float, cpu_ms: float) -> dict:
    return {
        "throughput_img_s": img_s,
        "p50_ms": 100.0,
        "p99_ms": 200.0,
        "errors": 0,
        "requests": 90,
        "server_cpu_ms_per_img": cpu_ms,
        "client_cpu_ms_per_img": 1.0,
    }


def _result() -> dict:
    measured = {
        "single": _stats(30.0, 60.0),
        "multi": _stats(24.0, 66.0),
        "swap": {"swaps": 3, "swap_errors": 0, "swap_p99_ms": 700.0, "promote_p99_ms": 650.0},
        "ceilings": {"peak_gflops": [170.0, 180.0], "engine_img_s": [45.0, 48.0]},
    }
    return summarize(BenchConfig(), measured, _stats(10.0, 120.0), 180.0, 3.6, 48.0, (0.1, 0.1, 0.1))


def test_summary_ratios_and_target_checks() -> None:
    r = _result()
    assert (r["roofline_img_s"], r["throughput_vs_roofline"]) == (50.0, 0.6)
    assert (r["throughput_vs_baseline"], r["multi_adapter_ratio"], r["throughput_vs_engine"]) == (3.0, 0.8, 0.625)
    md = markdown(r)
    assert "- [ ] throughput >= 5x the torch eager batch-1 baseline: 3.0" in md
    assert "- [x] throughput >= 40% of the fp32 roofline: 0.6" in md
    assert "- [x] multi-adapter throughput >= 0.7x single-adapter: 0.8" in md
    assert "the throughput ratio cannot exceed 2.0x" in md  # 120 / 60 CPU ms per image
    # the engine alone: 48 img/s over the cores, so cores x 1000 / 48 ms of CPU per image; the rest is the server's
    engine_ms = 1000 * (os.cpu_count() or 1) / 48.0
    assert r["engine_cpu_ms"] == round(engine_ms, 2) and r["nonengine_cpu_ms"] == round(60.0 - engine_ms, 2)
    assert r["client_cpu_ms"] == 1.0 and r["p99_vs_p50"] == 2.0
    assert r["register_s"] is None and r["cold_load_p99_ms"] is None  # not measured: None, never a made-up 0
    ceiling = "server CPU outside the engine <= 25% of the engine's, per image (issue 14)"
    assert f"- [{'x' if 60.0 - engine_ms <= 0.25 * engine_ms else ' '}] {ceiling}" in md


def test_a_rerun_keeps_the_hand_written_notes(tmp_path: Path) -> None:
    write_results(_result(), tmp_path)
    md = tmp_path / "serve.md"
    md.write_text(md.read_text() + NOTES + "\nwhy the baseline target is out of reach\n")
    write_results({**_result(), "throughput_img_s": 31.0}, tmp_path)
    text = md.read_text()
    assert "| throughput, 1 adapter (img/s) | 31.0 |" in text
    assert text.count(NOTES) == 1 and text.endswith("why the baseline target is out of reach\n")
    assert json.loads((tmp_path / "serve.json").read_text())["throughput_img_s"] == 31.0


KEYS = {
    "throughput_img_s",
    "p50_ms",
    "p99_ms",
    "errors",
    "baseline_img_s",
    "roofline_img_s",
    "multi_adapter_ratio",
    "swap_errors",
    "swap_p99_ms",
    "throughput_vs_baseline",
    "throughput_vs_roofline",
    "active_adapters",
    "registered_adapters",
    "nonengine_cpu_ms",
    "client_cpu_ms",
    "cold_load_p99_ms",
    "loaded_version_mb",
    "register_s",
}


@pytest.mark.slow
def test_quick_bench_prints_one_json_line_with_every_metric(tmp_path: Path) -> None:
    """Three servers (onnx-int8, fp32 onnx, the torch batch-1 baseline) on random 32x32 resnet18s, 2 s a phase."""
    env = {**os.environ, "ADAPTSERVE_HOME": str(tmp_path / "unused-home")}
    cmd = [sys.executable, "-m", "benchmarks.serve", "--quick", "--out-dir", str(tmp_path / "out")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert KEYS <= set(result), KEYS - set(result)
    assert result["errors"] == 0 and result["swap_errors"] == 0
    assert result["throughput_img_s"] > 0 and result["baseline_img_s"] > 0 and result["roofline_img_s"] > 0
    assert result["swap_p99_ms"] is not None
    assert (result["engine"], result["served_precision"]) == ("onnx-int8", "int8")
    assert 0 <= result["int8_agreement"] <= 1 and result["fp32_throughput_img_s"] > 0
    assert result["int8_engine_alone_img_s"] > 0 and result["engine_alone_img_s"] > 0
    assert (result["registered_adapters"], result["active_adapters"]) == (2, 2)  # --quick: 2 adapters
    assert 0 < result["register_s"] <= result["register_max_s"] and result["client_cpu_ms"] > 0
    assert result["nonengine_cpu_ms"] is not None and result["engine_cpu_ms"] > 0
    saved = json.loads((tmp_path / "out" / "serve.json").read_text())
    assert saved["throughput_img_s"] == result["throughput_img_s"]
    assert "| throughput / baseline |" in (tmp_path / "out" / "serve.md").read_text()


@pytest.mark.slow
def test_quick_bench_on_postgresql_and_s3_measures_swaps_across_replicas(
    tmp_path: Path, postgres_url: str, s3_url: str
) -> None:
    """--database / --artifacts: every server on a real PostgreSQL and moto's S3 (AWS_* from the environment), a
    second replica promoting while the first serves; results as serve-scaleout, beside serve's. The fp32 and
    baseline servers are the other test's: they read nothing from the database or the bucket."""
    env = {**os.environ, "ADAPTSERVE_HOME": str(tmp_path / "unused-home")}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.serve", "--quick", "--no-baseline", "--no-fp32", "--out-dir", str(out),
           "--database", postgres_url, "--artifacts", s3_url]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["errors"] == 0 and result["swap_errors"] == 0 and result["swap_cross_replica_errors"] == 0
    assert result["swap_cross_replica_p99_ms"] is not None
    assert result["swap_cross_replica_after_promote_p99_ms"] < 1000, "every worker of the first within a second"
    assert result["database"].startswith("postgresql+psycopg://") and result["artifacts"] == s3_url
    assert result["fp32_throughput_img_s"] is None and result["baseline_img_s"] is None  # not measured: None
    assert sorted(p.name for p in out.iterdir()) == ["serve-scaleout.json", "serve-scaleout.md"]
    assert "| swap across replicas" in (out / "serve-scaleout.md").read_text()

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    refusal = " ".join(again.stderr.split())  # rich wraps the line
    assert again.returncode == 2 and "holds 2 adapter(s)" in refusal, "a database with adapters is refused"


def test_database_and_artifacts_go_together_and_not_with_url() -> None:
    for extra in (["--database", "sqlite:////tmp/x.db"], ["--artifacts", "s3://b/p"],
                  ["--url", "http://127.0.0.1:9", "--database", "sqlite:////tmp/x.db", "--artifacts", "/tmp/a"]):
        done = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--quick", *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (extra, done.stderr[-2000:])
        assert "--database" in done.stderr and "Traceback" not in done.stderr


def test_worker_pids_skips_children_that_exited_unreaped(tmp_path: Path) -> None:
    """A zombie under the server (e.g. a second job runner that found runner.lock taken) is not a worker, and
    asking for its command line must not fail the caller."""
    import psutil

    server = ServeProcess({}, tmp_path)
    # the shell starts a child that exits at once, then becomes `sleep`, which never reaps it: a zombie
    server.proc = subprocess.Popen(["sh", "-c", "sleep 0 & exec sleep 30"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            kids = psutil.Process(server.proc.pid).children()
            if kids and all(k.status() == psutil.STATUS_ZOMBIE for k in kids):
                break
            time.sleep(0.05)
        assert kids and kids[0].status() == psutil.STATUS_ZOMBIE
        assert server.worker_pids() == []
    finally:
        server.proc.kill()
        server.proc.wait()
