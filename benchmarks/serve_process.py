"""`bentoml serve` (or `adaptserve serve`) as a subprocess that benches and tests start, drive and stop.

Invariant: `stop()` leaves no process behind: SIGTERM to the server's process group, then SIGKILL for whatever
it started (workers included, remembered as they appear) that still runs after the timeout.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil  # a dependency of bentoml

from models import settings
from service.serve import multiproc_dir

ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` now (another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServeProcess:
    """`bentoml serve service.app:AdaptServe` in its own process group, with a private BENTOML_HOME.

    A private BENTOML_HOME matters: `bentoml serve` empties `$BENTOML_HOME/prometheus_multiproc_dir` when it
    starts, so two servers sharing one would wipe each other's metrics.
    """

    def __init__(
        self, env: dict[str, str], workdir: Path, port: int | None = None, settle: bool = True, cli: bool = False
    ) -> None:
        self.settle = settle  # `with` waits for start-up work (helper processes' imports) to end before returning
        self.cli = cli  # run `adaptserve serve` (what users run) instead of `bentoml serve`
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(workdir)
        self.bentoml_home = self.workdir / "bentoml"
        self.log_path = self.workdir / "serve.log"
        self.env = {**os.environ, "BENTOML_HOME": str(self.bentoml_home), "BENTOML_DO_NOT_TRACK": "True", **env}
        self.proc: subprocess.Popen | None = None
        self._children: set[int] = set()
        self.killed: list[int] = []

    @property
    def multiproc_dir(self) -> Path:
        if self.cli:  # the server runs in ROOT: a relative ADAPTSERVE_HOME is relative to it
            return multiproc_dir(ROOT / settings.load(self.env).home, self.port)
        return self.bentoml_home / "prometheus_multiproc_dir"

    def start(self) -> ServeProcess:
        """Start the server (its output goes to serve.log) and return at once; `wait_ready` waits for it."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.cli:
            cmd = [sys.executable, "-m", "pipelines.cli", "serve", "--port", str(self.port), "--host", "127.0.0.1"]
        else:
            cmd = [sys.executable, "-m", "bentoml", "serve", "service.app:AdaptServe", "--port", str(self.port)]
            cmd += ["--host", "127.0.0.1"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Until GET /readyz answers 200; raises with the server log's tail if it exits or takes too long."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    self._remember_children()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"bentoml serve not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def _remember_children(self) -> None:
        # circus starts each worker in its own session: remember them to make sure none outlives stop()
        try:
            self._children |= {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.Error:
            pass

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server and every process under it."""
        total = 0.0
        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.Error:
            return total
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def wait_idle(self, timeout: float = 60.0, busy: float = 0.1) -> float:
        """Until the server's processes use less than `busy` of a core over a second (start-up work such as
        imports in helper processes is over), at most `timeout` seconds; returns the seconds waited."""
        start = time.monotonic()
        last = self.cpu_seconds()
        while time.monotonic() - start < timeout:
            time.sleep(1.0)
            now = self.cpu_seconds()
            if now - last < busy:
                break
            last = now
        return time.monotonic() - start

    def worker_pids(self) -> list[int]:
        """The BentoML workers. Other children come and go: e.g. a second job runner, started by the other worker
        in the same instant, exits at once (runner.lock is taken) and is a zombie until its worker reaps it."""
        self._remember_children()
        pids = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "_bentoml_impl.worker.service" in " ".join(child.cmdline()):
                    pids.append(child.pid)
            except psutil.Error:  # exited, or a zombie: not a worker
                pass
        return sorted(pids)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to the process group: BentoML stops its workers, they stop what they started. Whatever still
        runs `timeout` seconds later is SIGKILLed and listed in `self.killed`. Returns the server's exit code."""
        if self.proc is None:
            return None
        self._remember_children()
        deadline = time.monotonic() + timeout
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        while self.alive_children() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.killed = self.alive_children()
        for pid in self.killed:
            _kill_if_alive(pid)
        return self.proc.returncode

    def alive_children(self) -> list[int]:
        """Processes this server started (workers included) that still run."""
        alive = []
        for pid in sorted(self._children):
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        return alive

    def __enter__(self) -> ServeProcess:
        self.start()
        try:
            self.wait_ready()
            if self.settle:
                self.wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _kill_if_alive(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
