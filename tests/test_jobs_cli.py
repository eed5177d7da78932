"""`adaptserve retrain --wait` (issue 12): it follows the adapter's manual job already queued instead of exiting 2
(behind a running job it queues its own, issue 15), and a job that ends prints the gate's reason (a rejection's
numbers).

The job is driven by hand through the JobStore from a thread (claim, then finish), the way a runner would: what is
tested is what the command reads and prints, not the runner (tests/test_jobs.py runs the real one).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from models.registry import Registry
from pipelines.cli import app
from pipelines.jobs import Job, JobStore

REJECTED = (
    "rejected: target holdout 91.0% vs champion 92.0% (-1.0 points, needs >= +1 and > 0); source holdout 99.4% "
    "vs champion 99.7% (-0.3 points, may lose at most 1)"
)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """ok-a registered (version 1 the champion) in the home conftest points ADAPTSERVE_HOME at; no torch needed."""
    from safetensors.numpy import save_file

    home = tmp_path / "home"
    registry = Registry(home)
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (src / "metadata.json").write_text(json.dumps({"classes": ["0", "1"]}))
    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(src / "adapter_model.safetensors"))
    registry.promote("ok-a", registry.register("ok-a", src).version)
    return home


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, " ".join(result.output.split())


@pytest.fixture
def runner_thread(home: Path) -> Iterator[Callable[..., None]]:
    """Start a thread that claims the adapter's job once there is one, then ends it as told."""
    threads: list[threading.Thread] = []

    def start(state: str, result: dict[str, Any] | None = None, error: str | None = None, claim: bool = True) -> None:
        def run() -> None:
            store = JobStore(home)
            deadline = time.monotonic() + 30
            try:
                while not store.list(adapter="ok-a") and time.monotonic() < deadline:
                    time.sleep(0.02)
                if claim:
                    store.claim_next(os.getpid())
                time.sleep(0.3)  # the command is following it by now
                [job] = store.list(adapter="ok-a")
                store.finish(job.id, state, result=result, error=error)
            finally:  # whatever went wrong, end the job: the command under test must not follow it forever
                for job in store.list(adapter="ok-a"):
                    store.finish(job.id, "failed", error="the test's runner thread ended early")

        threads.append(threading.Thread(target=run, daemon=True))
        threads[-1].start()

    yield start
    for thread in threads:
        thread.join(30)


def _running_job(home: Path) -> Job:
    store = JobStore(home)
    store.submit("ok-a", "drift", "drift flagged")
    job = store.claim_next(os.getpid())
    assert job is not None and job.state == "running"
    return job


def test_wait_follows_the_manual_job_already_queued(home: Path, runner_thread: Callable[..., None]) -> None:
    job = JobStore(home).submit("ok-a", "manual", "by hand")
    runner_thread("succeeded", {"status": "promoted", "reason": "promoted v2: target holdout 95.0%"}, claim=False)
    code, out = cli("retrain", "--adapter", "ok-a", "--wait", "--poll", "0.05")
    assert code == 0, out
    assert out.startswith(f"ok-a already has a queued retrain job {job.id}: following it")
    assert f"job {job.id} succeeded: challenger promoted promoted v2: target holdout 95.0%" in out
    assert [j.id for j in JobStore(home).list()] == [job.id], "no second job"


def test_a_manual_retrain_while_the_policys_job_runs_is_queued_behind_it(home: Path) -> None:
    running = _running_job(home)
    code, out = cli("retrain", "--adapter", "ok-a")
    assert code == 0, out
    queued = JobStore(home).list(state="queued")[0]
    assert f"queued retrain job {queued.id} for ok-a: queued behind running job {running.id}" in out
    code, out = cli("retrain", "--adapter", "ok-a")  # a second manual request: the queued one will do
    assert code == 2 and out.startswith(f"error: adapter 'ok-a' already has a queued retrain job {queued.id}"), out


def test_a_rejected_job_prints_the_gates_reason(home: Path, runner_thread: Callable[..., None]) -> None:
    runner_thread("rejected", {"status": "rejected", "reason": REJECTED, "version": None})
    code, out = cli("retrain", "--adapter", "ok-a", "--wait", "--poll", "0.05")
    [job] = JobStore(home).list()
    assert code == 3, out
    assert out.startswith(f"queued retrain job {job.id} for ok-a")
    assert out.endswith(f"job {job.id} rejected: challenger rejected; champion kept {REJECTED}")


def test_a_failed_job_prints_its_error(home: Path, runner_thread: Callable[..., None]) -> None:
    runner_thread("failed", error="RuntimeError: training diverged for ok-a")
    code, out = cli("retrain", "--adapter", "ok-a", "--wait", "--poll", "0.05")
    [job] = JobStore(home).list()
    assert code == 1 and out.endswith(f"job {job.id} failed: RuntimeError: training diverged for ok-a"), out
