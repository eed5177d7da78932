"""Fake retrain functions for the job tests, and a job runner process to kill -9.

The fakes have the signature of pipelines.retrain.retrain and act by adapter name, so one runner can show every
outcome: ``ok-*`` promoted, ``rej-*`` rejected, ``bad-*`` raises, ``die-*`` SIGKILLs its own job process, ``slow-*``
starts publishing (a half-written adapter in a registry staging dir) and then hangs until killed, ``nap-*`` takes
NAP_S seconds, then is promoted.

Usage: python jobs_crash_helper.py HOME [--adapters A,B,...]   (runs JobRunner(HOME, job_fn=fake_retrain) in the
foreground; adapters come from the registry at HOME unless given; the state database and the lease are the
ADAPTSERVE_* settings of the environment)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.runner import JobRunner  # noqa: E402 - needs the sys.path entry above

SLOW_STARTED = "slow-job-started"  # marker file under HOME: the slow fake is mid-publish
NAP_S = 1.0


@dataclass
class FakeResult:
    status: str
    adapter: str

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "adapter": self.adapter, "version": 2}


def fake_retrain(
    home: Path, adapter: str, *, base_dir: Path | None = None, progress: Callable[[float, str], None] | None = None
) -> FakeResult:
    report = progress or (lambda fraction, message: None)
    report(0.25, "loading labelled data")
    report(0.75, "training")
    if adapter.startswith("bad-"):
        raise RuntimeError(f"training diverged for {adapter}")
    if adapter.startswith("die-"):
        os.kill(os.getpid(), signal.SIGKILL)
    if adapter.startswith("slow-"):
        _hang_mid_publish(Path(home))
    if adapter.startswith("nap-"):
        time.sleep(NAP_S)
    print(f"fake retrain of {adapter} done (base_dir={base_dir})", flush=True)
    return FakeResult("rejected" if adapter.startswith("rej-") else "promoted", adapter)


def _hang_mid_publish(home: Path) -> None:
    """Stage half an adapter the way the registry does (flocked staging dir), then wait to be killed."""
    from models.staging import staging_dir

    with staging_dir(home / "tmp") as stage:
        (stage / "adapter_config.json").write_text('{"peft_type": "LORA"}')
        (home / SLOW_STARTED).write_text(str(os.getpid()))
        time.sleep(120)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("home", type=Path)
    parser.add_argument("--adapters", default=None, help="comma-separated adapter names instead of the registry's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    known = None if args.adapters is None else args.adapters.split(",")
    # by name: run as a script this module is __main__, which the job process could not import
    runner = JobRunner(args.home, poll_s=0.05, job_fn="jobs_crash_helper:fake_retrain", policy_interval_s=None,
                       known_adapters=known)
    runner.run_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
