"""`adaptserve bench serve`: the prediction service under load, over loopback HTTP, against its baselines.

What one run does (every number comes from the same run on the same machine):
1. ceilings: the fp32 matmul peak of all cores and the ONNX engine alone (one single-threaded process per core
   for both, best of many short runs); before and after the service phases, the best kept (other load on the
   machine only lowers them).
   roofline = peak / the model's FLOPs per image (torch.utils.flop_counter.FlopCounterMode, which counts 2 FLOPs
   per multiply-add, as the peak does);
2. builds a random-init resnet18 base (10 classes, 224x224 preprocessing) and N random LoRA adapters in a temp
   ADAPTSERVE_HOME (`--url` skips this and the service start);
3. starts `bentoml serve` and drives it with K closed-loop clients (one JPEG per request, base64 in JSON):
   `single` (all traffic to one adapter), `multi` (round-robin over N adapters), `swap` (one adapter, its
   champion promoted between v1 and v2 every `--swap-every` seconds);
4. baseline: the same command served by torch eager peft, unmerged, batch 1 (ADAPTSERVE_ENGINE=torch,
   ADAPTSERVE_MAX_BATCH=1), same clients, workers and threads; and once more with the service's default
   deployment (1 worker, all cores), for reference.

Swap latency of one promote = from sending the promote request until the send time of the first request after
which every request for that adapter (answered by any worker) named the new version; `swap_p99_ms` is the
99th percentile over the promotes of the run. Progress goes to stderr, one JSON line to stdout last.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-admin-token"
console = Console(stderr=True)


# --- the service as a subprocess -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
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
        if self.cli:
            from service.serve import multiproc_dir

            return multiproc_dir(Path(self.env["ADAPTSERVE_HOME"]), self.port)
        return self.bentoml_home / "prometheus_multiproc_dir"

    def start(self) -> ServeProcess:
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
        import httpx

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
        import psutil  # a dependency of bentoml

        try:
            self._children |= {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.Error:
            pass

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server and every process under it."""
        import psutil

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
        import psutil

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
        import psutil

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


# --- requests and load ------------------------------------------------------------------------------------------


def make_jpegs(n: int, size: int, seed: int = 0) -> list[bytes]:
    """Photo-like test images: smooth colour fields with shapes and sensor noise, JPEG quality 90."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        field_ = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        draw = ImageDraw.Draw(field_)
        for _ in range(4):
            x0, y0 = rng.integers(0, size, 2)
            w, h = rng.integers(max(1, size // 8), max(2, size // 2), 2)
            draw.ellipse(
                (int(x0), int(y0), int(x0 + w), int(y0 + h)), fill=tuple(int(c) for c in rng.integers(0, 256, 3))
            )
        noisy = np.asarray(field_.filter(ImageFilter.GaussianBlur(1)), np.float32) + rng.normal(0, 6, (size, size, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def predict_bodies(images: list[bytes], adapters: list[str], per_request: int = 1) -> dict[str, list[bytes]]:
    """Ready-made JSON request bodies per adapter, so clients spend no CPU on encoding."""
    b64 = [base64.b64encode(im).decode() for im in images]
    bodies: dict[str, list[bytes]] = {}
    for name in adapters:
        bodies[name] = [
            json.dumps({"images": [b64[(i + j) % len(b64)] for j in range(per_request)], "adapter": name}).encode()
            for i in range(len(b64))
        ]
    return bodies


@dataclass
class Sample:
    """One request: send and receive times (time.monotonic), HTTP status (0 = transport error), served key."""

    sent: float
    received: float
    status: int
    adapter: str
    version: int | None = None
    images: int = 1


def _post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, int | None, int]:
    """(status, version named by the response, predictions) of one POST /predict; status 0 = transport error."""
    try:
        conn.request("POST", "/predict", body=body, headers={"content-type": "application/json"})
        r = conn.getresponse()
        raw = r.read()  # always drain the body, or the connection cannot carry the next request
        data = json.loads(raw) if r.status == 200 else {}
    except (OSError, http.client.HTTPException, ValueError):
        conn.close()
        return 0, None, 0
    return r.status, data.get("version"), len(data.get("predictions", ()))


def _client_loop(url: str, pick: Callable[[int], tuple[str, bytes]], stop: threading.Event, out: list[Sample]) -> None:
    """A closed-loop client on a keep-alive connection (http.client: the load generator shares the cores with the
    service, so it should cost little CPU). Reconnects every 32 requests, so load spreads over the workers."""
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    i = 0
    while not stop.is_set():
        conn = http.client.HTTPConnection(host, port, timeout=120.0)
        for _ in range(32):
            if stop.is_set():
                break
            adapter, body = pick(i)
            i += 1
            sent = time.monotonic()
            status, version, n = _post(conn, body)
            out.append(Sample(sent, time.monotonic(), status, adapter, version, n))
        conn.close()


def drive(
    url: str,
    bodies: dict[str, list[bytes]],
    clients: int,
    seconds: float,
    during: Callable[[threading.Event], None] | None = None,
) -> list[Sample]:
    """`clients` threads for `seconds`, requests round-robin over the adapters of `bodies`; `during` runs on a
    thread of its own meanwhile (the swap phase's promote loop) and should return once the event is set."""
    names = sorted(bodies)
    stop = threading.Event()
    results: list[list[Sample]] = [[] for _ in range(clients)]

    def picker(c: int) -> Callable[[int], tuple[str, bytes]]:
        def pick(i: int) -> tuple[str, bytes]:
            name = names[(c + i) % len(names)]
            return name, bodies[name][(c * 7 + i) % len(bodies[name])]

        return pick

    threads = [
        threading.Thread(target=_client_loop, args=(url, picker(c), stop, results[c]), daemon=True)
        for c in range(clients)
    ]
    if during is not None:
        threads.append(threading.Thread(target=during, args=(stop,), daemon=True))
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join(150)
    return sorted((s for r in results for s in r), key=lambda s: s.sent)


@dataclass
class PhaseStats:
    throughput_img_s: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    requests: int
    server_cpu_ms_per_img: float | None = None
    client_cpu_ms_per_img: float | None = None


def phase_stats(samples: list[Sample], start: float, end: float) -> PhaseStats:
    """Images answered per second within [start, end]; latency percentiles of requests sent within it.
    Errors count every failed request of the phase, warm-up included."""
    ok = [s for s in samples if s.status == 200]
    done = sum(s.images for s in ok if start <= s.received <= end)
    lat = [1000 * (s.received - s.sent) for s in ok if start <= s.sent <= end]
    errors = sum(s.status != 200 for s in samples)
    return PhaseStats(done / (end - start), percentile(lat, 50), percentile(lat, 99), errors, len(lat))


def run_phase(
    url: str,
    bodies: dict[str, list[bytes]],
    clients: int,
    seconds: float,
    warmup: float,
    during=None,
    server_cpu: Callable[[], float] | None = None,
) -> tuple[PhaseStats, list[Sample], float]:
    """Load for warmup + seconds; stats of the last `seconds`. CPU per image (server processes, and this client
    process) is measured over the whole phase, warm-up included."""
    t0, cpu0, client0 = time.monotonic(), server_cpu() if server_cpu else None, time.process_time()
    samples = drive(url, bodies, clients, warmup + seconds, during)
    start = t0 + warmup
    stats = phase_stats(samples, start, start + seconds)
    images = sum(s.images for s in samples if s.status == 200) or 1
    stats.client_cpu_ms_per_img = round(1000 * (time.process_time() - client0) / images, 2)
    if server_cpu is not None:
        stats.server_cpu_ms_per_img = round(1000 * (server_cpu() - cpu0) / images, 2)
    return stats, samples, start


# --- hot swap under load ---------------------------------------------------------------------------------------


@dataclass
class Promote:
    sent: float
    returned: float
    version: int
    ok: bool


def swap_latencies(samples: list[Sample], promotes: list[Promote], adapter: str) -> tuple[list[float], int]:
    """(latency in ms per completed swap, swaps that did not complete before the next promote or the end).

    A swap's latency runs from sending its promote to the send time of the first request after which every
    request for `adapter` sent before the next promote named the new version.
    """
    mine = [s for s in samples if s.adapter == adapter and s.status == 200]
    latencies, incomplete = [], 0
    for i, p in enumerate(promotes):
        until = promotes[i + 1].sent if i + 1 < len(promotes) else float("inf")
        window = [s for s in mine if p.sent <= s.sent < until]
        stale = [j for j, s in enumerate(window) if s.version != p.version]
        first_new = stale[-1] + 1 if stale else 0
        if first_new >= len(window):
            incomplete += 1
            continue
        latencies.append(1000 * (window[first_new].sent - p.sent))
    return latencies, incomplete


def promote(url: str, adapter: str, version: int, token: str) -> bool:
    """POST /adapters/promote; True when the service answered 200."""
    import httpx

    try:
        r = httpx.post(
            f"{url}/adapters/promote",
            json={"name": adapter, "version": version},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60.0,
        )
    except httpx.HTTPError:
        return False
    return r.status_code == 200


def promote_loop(url: str, adapter: str, every: float, seconds: float, out: list[Promote], token: str):
    """Promote v2, v1, v2, ... every `every` seconds; the last promote still gets `every` seconds of traffic
    before the phase ends, so no swap is judged on a cut-short window."""

    def loop(stop: threading.Event) -> None:
        deadline = time.monotonic() + seconds
        while not stop.wait(every) and time.monotonic() + every <= deadline:
            version = 2 if len(out) % 2 == 0 else 1
            sent = time.monotonic()
            ok = promote(url, adapter, version, token)
            out.append(Promote(sent, time.monotonic(), version, ok))

    return loop


def swap_phase(url: str, bodies, clients: int, seconds: float, adapter: str, every: float, token: str) -> dict:
    """Load on `adapter` while its champion flips between v1 and v2; ends on v1 again. Runs for at least three
    promote intervals."""
    seconds = max(seconds, 3 * every)
    promotes: list[Promote] = []
    loop = promote_loop(url, adapter, every, seconds, promotes, token)
    stats, samples, _ = run_phase(url, bodies, clients, seconds, 0.0, loop)
    latencies, incomplete = swap_latencies(samples, promotes, adapter)
    wrong = sum(s.status == 200 and s.version not in (1, 2) for s in samples)
    reset_ok = promote(url, adapter, 1, token)
    return {
        "swaps": len(promotes),
        "swap_ms": [round(x, 1) for x in latencies],
        "swap_p99_ms": percentile(latencies, 99),
        "swap_errors": stats.errors + wrong + incomplete + sum(not p.ok for p in promotes) + (not reset_ok),
        "swap_incomplete": incomplete,
        "promote_p99_ms": percentile([1000 * (p.returned - p.sent) for p in promotes], 99),
        "swap_phase_img_s": stats.throughput_img_s,
        "swap_phase_requests": len(samples),
    }


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


# --- roofline ---------------------------------------------------------------------------------------------------


_MATMUL = """
import sys, time
import numpy as np
n, seconds = int(sys.argv[1]), float(sys.argv[2])
a, b = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
a @ b
best, deadline = 0.0, time.perf_counter() + seconds
while time.perf_counter() < deadline:
    t = time.perf_counter()
    a @ b
    best = max(best, 2 * n**3 / (time.perf_counter() - t))
print(best / 1e9)
"""
_ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def matmul_peak_gflops(n: int = 512, seconds: float = 2.0) -> float:
    """fp32 matmul peak of all cores: one single-threaded process per core multiplying n x n float32 matrices
    (numpy's BLAS, 2 n^3 FLOPs per product) at the same time, each keeping its best product; their sum. Separate
    processes rather than one multi-threaded matmul: a thread pool's barriers turn any other load on the machine
    into idle cores, while the best of many short products by independent processes finds the moments the cores
    were free. (torch's single-threaded sgemm reaches the same figure on this machine; numpy starts faster.)"""
    env = {**os.environ, **_ONE_THREAD}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MATMUL, str(n), str(seconds)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(os.cpu_count() or 1)
    ]
    return sum(float(p.communicate(timeout=120)[0]) for p in procs)


def model_gflops(base_dir: Path) -> float:
    """FLOPs per image of the base model at its crop size (a merged adapter has the same graph)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models.artifacts import load_model

    model, meta = load_model(base_dir)
    size = int(meta["preprocessing"]["crop_size"])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


_ENGINE = """
import sys, time
import numpy as np
import onnxruntime as ort
path, size, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
# service.engine.open_session(path, threads=1), without importing torch for it
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
options.intra_op_num_threads = 1
options.add_session_config_entry("session.intra_op.allow_spinning", "0")
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
session.run(None, {"input": x})
best, deadline = float("inf"), time.perf_counter() + seconds
while time.perf_counter() < deadline:
    t = time.perf_counter()
    session.run(None, {"input": x})
    best = min(best, time.perf_counter() - t)
print(1.0 / best)
"""


def engine_img_s(base_dir: Path, cache: Path, seconds: float, precision: str = "fp32") -> float:
    """The ONNX engine alone, the ceiling of the service: one single-threaded session per core (as the benchmark
    deploys it) in as many processes, all at once, each keeping its fastest single-image run; the sum of their
    images per second. Measured like the matmul peak, so that other load on the machine does not lower it."""
    from models.artifacts import load_model
    from service.engine import BASE, OnnxEngine

    model, meta = load_model(base_dir)
    # exports (and verifies) the base model's ONNX file; int8: quantizes and measures it too
    engine = OnnxEngine(model, meta, cache, threads=1, precision=precision, base_dir=base_dir, int8_max_drop=1.0)
    pattern = f"{BASE[0]}-v{BASE[1]}" + ("-*.int8.onnx" if precision == "int8" else ".onnx")
    path = next(Path(cache).rglob(pattern))
    size = str(meta["preprocessing"]["crop_size"])
    del engine
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ENGINE, str(path), size, str(seconds)],
            env={**os.environ, **_ONE_THREAD},
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(os.cpu_count() or 1)
    ]
    return sum(float(p.communicate(timeout=300)[0]) for p in procs)


# --- fixture: a base and its adapters --------------------------------------------------------------------------


def build_base(out: Path, size: int, seed: int = 0) -> Path:
    """A random-init resnet18 with 10 classes and ImageNet-style preprocessing at `size` (224: resize 256)."""
    import torch

    from models.artifacts import save_model
    from models.classifier import build_classifier
    from models.preprocessing import Preprocessing

    torch.manual_seed(seed)
    prep = Preprocessing() if size == 224 else Preprocessing.for_size(size)
    meta = {
        "name": out.name,
        "classes": [str(i) for i in range(10)],
        "preprocessing": prep.to_dict(),
        "head_dropout": 0.0,
        "strategy": "random-init",
        "config": {"benchmark": True, "seed": seed},
        "metrics": {},
        "data_fingerprint": None,
        "parent": None,
    }
    save_model(build_classifier("resnet18", 10).eval(), meta, out)
    write_samples(out)
    return out


def write_samples(base_dir: Path, n: int = 64) -> None:
    """Labelled samples for the int8 engine to calibrate on and be measured with: photo-like images of the kind
    the clients send (other seeds), labelled by the fp32 model itself. A random-init model has no accuracy of its
    own: against these labels fp32 scores 100% and int8 scores its top-1 agreement with fp32. `n` is kept small:
    every published adapter computes its drift reference and its int8 measurement from them (~8 s each at 224)."""
    import torch
    from PIL import Image

    from models.artifacts import load_model, preprocessing_of
    from models.samples import sample_path, save_samples

    model, meta = load_model(base_dir)
    size, transform = int(meta["preprocessing"]["crop_size"]), preprocessing_of(meta).eval_transform()
    for kind, seed in (("reference", 101), ("holdout", 202)):
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in make_jpegs(n, size, seed=seed)]
        with torch.inference_mode():
            labels = model(torch.stack([transform(im) for im in images])).argmax(1).tolist()
        save_samples(sample_path(base_dir, kind), images, labels, meta["classes"])


def adapter_names(n: int) -> list[str]:
    return [f"site-{i:02d}" for i in range(n)]


def build_home(
    home: Path, base: Path, n: int, targets: str, tick: Callable[[str], None], int8: bool = False
) -> list[str]:
    """`n` adapters with one promoted version each, plus a second version of the first (for the swap phase);
    `int8`: published with their int8 models, as a service running onnx-int8 publishes them."""
    from models.registry import open_registry
    from pipelines.release import make_random_adapter, publish

    logging.getLogger("monitoring.reference").setLevel(logging.ERROR)  # random adapters have no reference samples
    registry = open_registry(home)
    names = adapter_names(n)
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        for i, (name, promote) in enumerate([(nm, True) for nm in names] + [(names[0], False)]):
            src = make_random_adapter(base, Path(tmp) / f"{i}", seed=i + 1, targets=targets)
            publish(registry, name, src, base, promote=promote, int8=int8)
            tick(name)
    return names


# --- the run ----------------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    clients: int = field(default=8, metadata={"help": "concurrent closed-loop clients"})
    seconds: float = field(default=30.0, metadata={"help": "measured seconds per phase"})
    adapters: int = field(default=16, metadata={"help": "adapters the multi phase spreads traffic over"})
    engine: str = field(default="onnx-int8", metadata={"help": "engine under test (onnx-int8, onnx or torch)"})
    size: int = field(default=224, metadata={"help": "input side of the random-init resnet18"})
    workers: int = field(default=2, metadata={"help": "BentoML worker processes (ADAPTSERVE_WORKERS)"})
    threads: int = field(default=1, metadata={"help": "engine threads per worker (ADAPTSERVE_THREADS; 0 = all)"})
    per_request: int = field(default=1, metadata={"help": "JPEG images per request"})
    swap_every: float = field(default=3.0, metadata={"help": "seconds between promotes in the swap phase"})
    targets: str = field(default="all", metadata={"help": "LoRA target policy of the adapters (head/late/half/all)"})
    warmup: float = field(default=3.0, metadata={"help": "unmeasured seconds of load before each phase"})
    url: str | None = field(default=None, metadata={"help": "drive a running service instead of starting one"})
    token: str = field(default=TOKEN, metadata={"help": "admin token (for the promotes of the swap phase)"})
    baseline: bool = field(default=True, metadata={"help": "also measure the torch eager batch-1 baseline"})
    default_baseline: bool = field(
        default=True,
        metadata={"help": "also measure that baseline with the service's default 1 worker x all-core threads"},
    )
    fp32: bool = field(default=True, metadata={"help": "with --engine onnx-int8, also measure the fp32 onnx engine"})


def service_env(cfg: BenchConfig, home: Path, base: Path) -> dict[str, str]:
    return {
        "ADAPTSERVE_HOME": str(home),
        "ADAPTSERVE_BASE_MODEL": str(base),
        "ADAPTSERVE_ADMIN_TOKEN": cfg.token,
        "ADAPTSERVE_ENGINE": cfg.engine,
        "ADAPTSERVE_WORKERS": str(cfg.workers),
        "ADAPTSERVE_THREADS": str(cfg.threads),
        "ADAPTSERVE_MAX_IMAGES": str(max(32, cfg.per_request)),
        # the retrain job runner is a process of its own that serves no prediction: not part of this measurement
        "ADAPTSERVE_JOB_RUNNER": "0",
        # a random-init model has no accuracy to lose; int8 is measured anyway (top-1 agreement with fp32, in the
        # results) and would be refused on a real model beyond the default 1 point (service/engine.py)
        "ADAPTSERVE_INT8_MAX_DROP": "1",
    }


def measure_service(
    url: str, cfg: BenchConfig, names: list[str], swap_adapter: str | None, cpu: Callable[[], float] | None = None
) -> dict[str, Any]:
    """single, multi and swap phases against one running service."""
    images = make_jpegs(8, cfg.size)
    single_bodies = predict_bodies(images, names[:1], cfg.per_request)
    console.log(f"single: {cfg.clients} clients x {cfg.seconds:g} s on {names[0]}")
    single, _, _ = run_phase(url, single_bodies, cfg.clients, cfg.seconds, cfg.warmup, server_cpu=cpu)
    console.log(_line(single))
    console.log(f"multi: {len(names)} adapters round-robin")
    multi_bodies = predict_bodies(images, names, cfg.per_request)
    multi, _, _ = run_phase(url, multi_bodies, cfg.clients, cfg.seconds, cfg.warmup, server_cpu=cpu)
    console.log(_line(multi))
    out: dict[str, Any] = {"single": asdict(single), "multi": asdict(multi)}
    if swap_adapter is not None:
        console.log(f"swap: {swap_adapter} promoted v1 <-> v2 every {cfg.swap_every:g} s under load")
        bodies = predict_bodies(images, [swap_adapter], cfg.per_request)
        out["swap"] = swap_phase(url, bodies, cfg.clients, cfg.seconds, swap_adapter, cfg.swap_every, cfg.token)
        console.log(
            f"  {out['swap']['swaps']} swaps, swap p99 {out['swap']['swap_p99_ms']} ms, "
            f"errors {out['swap']['swap_errors']}"
        )
    return out


def _line(stats: PhaseStats) -> str:
    return (
        f"  {stats.throughput_img_s:.2f} img/s, p50 {stats.p50_ms} ms, p99 {stats.p99_ms} ms, "
        f"{stats.requests} requests, {stats.errors} errors; CPU ms/image: server {stats.server_cpu_ms_per_img}, "
        f"clients {stats.client_cpu_ms_per_img}"
    )


def measure_single(cfg: BenchConfig, env: dict[str, str], workdir: Path, adapter: str, title: str) -> dict[str, Any]:
    """One service started with `env`, driven on one adapter for one phase."""
    console.log(title)
    with ServeProcess(env, workdir, settle=cfg.seconds >= 10) as server:
        bodies = predict_bodies(make_jpegs(8, cfg.size), [adapter], cfg.per_request)
        stats, _, _ = run_phase(
            server.url, bodies, cfg.clients, cfg.seconds, cfg.warmup, server_cpu=server.cpu_seconds
        )
    console.log(_line(stats))
    return asdict(stats)


def measure_baseline(
    cfg: BenchConfig, env: dict[str, str], workdir: Path, adapter: str, label: str = ""
) -> dict[str, Any]:
    """The same HTTP path served by torch eager peft, unmerged, one request per forward pass."""
    base_env = {**env, "ADAPTSERVE_ENGINE": "torch", "ADAPTSERVE_MAX_BATCH": "1"}
    return measure_single(cfg, base_env, workdir, adapter, f"baseline: torch eager peft (unmerged), batch 1{label}")


def discover(url: str) -> tuple[list[str], str | None]:
    """Adapters served by a running service, and one with two versions or more for the swap phase."""
    import httpx

    listed = httpx.get(f"{url}/adapters", timeout=30.0).json()["adapters"]
    names = sorted(a["name"] for a in listed if a["champion"] is not None)
    swappable = [a["name"] for a in listed if {1, 2} <= {v["version"] for v in a["versions"]}]
    return names, (swappable[0] if swappable else None)


def ceilings(base: Path, cache: Path, seconds: float, int8: bool) -> tuple[float, float, float | None]:
    """(fp32 matmul peak GFLOP/s, fp32 ONNX engine alone img/s, int8 engine alone img/s or None), measured now."""
    peak = matmul_peak_gflops(seconds=min(2.0, seconds))
    engine = engine_img_s(base, cache, seconds)
    low = engine_img_s(base, cache, seconds, "int8") if int8 else None
    console.log(
        f"  matmul peak {peak:.0f} GFLOP/s; ONNX engine alone {engine:.1f} img/s fp32"
        + (f", {low:.1f} img/s int8" if low else "")
    )
    return peak, engine, low


def run_bench(cfg: BenchConfig, workdir: Path) -> dict[str, Any]:
    """Ceilings are measured before and after the service phases and the best of the two is used: other work on
    the machine only ever lowers them."""
    load_before = os.getloadavg()
    base = build_base(workdir / "base" / f"bench-resnet18-{cfg.size}", cfg.size)
    flops = model_gflops(base)
    console.log(f"ceilings ({flops:.2f} GFLOP per image)")
    int8 = cfg.engine == "onnx-int8"
    samples = [ceilings(base, workdir / "onnx-cache", min(5.0, cfg.seconds / 2), int8)]
    baseline = None
    if cfg.url:
        names, swap_adapter = discover(cfg.url)
        measured = measure_service(cfg.url, cfg, names[: cfg.adapters], swap_adapter)
    else:
        home = workdir / "home"
        with console.status("publishing adapters") as status:
            names = build_home(
                home, base, cfg.adapters, cfg.targets, lambda n: status.update(f"published {n}"), int8=int8
            )
        env = service_env(cfg, home, base)
        console.log(f"starting bentoml serve ({cfg.engine}, {cfg.workers} workers x {cfg.threads} threads)")
        with ServeProcess(env, workdir / "serve", settle=cfg.seconds >= 10) as server:
            measured = measure_service(server.url, cfg, names, names[0], server.cpu_seconds)
            measured["precision"] = served_precision(server.url, names[0])
        if int8 and cfg.fp32:
            fp32_env = {**env, "ADAPTSERVE_ENGINE": "onnx"}
            measured["fp32"] = measure_single(cfg, fp32_env, workdir / "serve-fp32", names[0], "fp32 onnx engine")
        if cfg.baseline:
            baseline = measure_baseline(cfg, env, workdir / "serve-baseline", names[0])
        if cfg.default_baseline:
            defaults = {**env, "ADAPTSERVE_WORKERS": "1", "ADAPTSERVE_THREADS": "0"}
            label = ", service defaults (1 worker, all cores)"
            measured["baseline_defaults"] = measure_baseline(cfg, defaults, workdir / "serve-b2", names[0], label)
    if cfg.seconds >= 10:  # a short run (--quick) keeps its first measurement
        console.log("ceilings again")
        samples.append(ceilings(base, workdir / "onnx-cache", min(5.0, cfg.seconds / 2), int8))
    measured["ceilings"] = {
        "peak_gflops": [round(p, 1) for p, _, _ in samples],
        "engine_img_s": [round(e, 2) for _, e, _ in samples],
        "int8_engine_img_s": [round(q, 2) for _, _, q in samples if q is not None] or None,
    }
    peak, engine = max(p for p, _, _ in samples), max(e for _, e, _ in samples)
    if int8:
        measured["int8_engine_img_s"] = max(q for _, _, q in samples if q is not None)
    return summarize(cfg, measured, baseline, peak, flops, engine, load_before)


def served_precision(url: str, adapter: str) -> dict | None:
    """What the service says serves `adapter` (GET /adapters: precision and the int8 measurement)."""
    import httpx

    listed = httpx.get(f"{url}/adapters", timeout=30.0).json()["adapters"]
    return next((a.get("precision") for a in listed if a["name"] == adapter), None)


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def machine_info() -> dict[str, Any]:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import version

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "bentoml": version("bentoml"),
    }


def summarize(
    cfg: BenchConfig,
    measured: dict,
    baseline: dict | None,
    peak: float,
    flops: float,
    engine: float,
    load_before: tuple,
) -> dict[str, Any]:
    single, multi, swap = measured["single"], measured["multi"], measured.get("swap") or {}
    roofline = peak / flops
    baseline_img_s = baseline["throughput_img_s"] if baseline else None
    int8_alone = measured.get("int8_engine_img_s")
    under_test = int8_alone or engine  # the bare engine the service runs
    fp32_img_s = (measured.get("fp32") or {}).get("throughput_img_s")
    precision = measured.get("precision") or {}
    result = {
        "throughput_img_s": round(single["throughput_img_s"], 2),
        "p50_ms": single["p50_ms"],
        "p99_ms": single["p99_ms"],
        "errors": single["errors"] + multi["errors"],
        "baseline_img_s": _round(baseline_img_s),
        "roofline_img_s": round(roofline, 2),
        "throughput_vs_baseline": _ratio(single["throughput_img_s"], baseline_img_s),
        "throughput_vs_roofline": _ratio(single["throughput_img_s"], roofline),
        "baseline_defaults_img_s": _round((measured.get("baseline_defaults") or {}).get("throughput_img_s")),
        "throughput_vs_baseline_defaults": _ratio(
            single["throughput_img_s"], (measured.get("baseline_defaults") or {}).get("throughput_img_s")
        ),
        "multi_adapter_img_s": round(multi["throughput_img_s"], 2),
        "multi_adapter_ratio": _ratio(multi["throughput_img_s"], single["throughput_img_s"]),
        "swap_errors": swap.get("swap_errors"),
        "swap_p99_ms": swap.get("swap_p99_ms"),
        "engine": cfg.engine,
        "served_precision": precision.get("precision"),
        "int8_agreement": (precision.get("int8") or {}).get("agreement"),
        "fp32_throughput_img_s": _round(fp32_img_s),
        "throughput_vs_fp32": _ratio(single["throughput_img_s"], fp32_img_s),
        "engine_alone_img_s": round(engine, 2),
        "int8_engine_alone_img_s": _round(int8_alone),
        "throughput_vs_engine": _ratio(single["throughput_img_s"], under_test),
        "peak_gflops": round(peak, 1),
        "model_gflops": round(flops, 3),
        "phases": {**measured, "baseline": baseline},
        "config": asdict(cfg),
        "machine": {**machine_info(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": _command_line(),
    }
    return result


def _command_line() -> str:
    import shlex

    prog = Path(sys.argv[0]).name
    args = sys.argv[1:]
    if prog == "adaptserve":
        return shlex.join(["adaptserve", *args])
    return shlex.join(["python", "-m", "benchmarks.serve", *args])


TARGETS = [
    ("throughput >= 5x the torch eager batch-1 baseline", "throughput_vs_baseline", 5.0),
    ("throughput >= 40% of the fp32 roofline", "throughput_vs_roofline", 0.4),
    ("multi-adapter throughput >= 0.7x single-adapter", "multi_adapter_ratio", 0.7),
]


def target_lines(r: dict[str, Any]) -> list[str]:
    lines = []
    for text, key, floor in TARGETS:
        value = r.get(key)
        mark = "x" if value is not None and value >= floor else " "
        lines.append(f"- [{mark}] {text}: {value if value is not None else 'not measured'}")
    mark = "x" if r.get("swap_errors") == 0 else " "
    lines.append(
        f"- [{mark}] no failed request or stale response across hot swaps: swap_errors = {r.get('swap_errors')}"
    )
    return lines


def _rows(r: dict[str, Any]) -> list[tuple[str, Any]]:
    cfg, phases = r["config"], r["phases"]
    single, base, swap = phases["single"], phases.get("baseline") or {}, phases.get("swap") or {}
    return [
        ("throughput, 1 adapter (img/s)", r["throughput_img_s"]),
        ("latency p50 / p99 (ms)", f"{r['p50_ms']} / {r['p99_ms']}"),
        (f"throughput, {cfg['adapters']} adapters round-robin (img/s)", r["multi_adapter_img_s"]),
        ("multi_adapter_ratio", r["multi_adapter_ratio"]),
        ("served precision of the measured adapter", _precision(r)),
        ("fp32 onnx engine, 1 adapter, same setup (img/s)", r.get("fp32_throughput_img_s")),
        ("throughput / fp32 onnx engine", r.get("throughput_vs_fp32")),
        ("baseline: torch eager peft unmerged, batch 1 (img/s)", r["baseline_img_s"]),
        ("baseline latency p50 / p99 (ms)", f"{base.get('p50_ms')} / {base.get('p99_ms')}"),
        ("throughput / baseline", r["throughput_vs_baseline"]),
        ("baseline with the service defaults, 1 worker x all cores (img/s)", r.get("baseline_defaults_img_s")),
        ("throughput / that baseline", r.get("throughput_vs_baseline_defaults")),
        (f"roofline: {r['peak_gflops']} GFLOP/s / {r['model_gflops']} GFLOP per image (img/s)", r["roofline_img_s"]),
        ("throughput / roofline", r["throughput_vs_roofline"]),
        (
            "ONNX engine alone, fp32 / int8: one 1-thread session per core, best single-image run (img/s)",
            f"{r['engine_alone_img_s']} / {r.get('int8_engine_alone_img_s')}",
        ),
        ("throughput / engine alone", r["throughput_vs_engine"]),
        (
            "server CPU ms per image: service / baseline",
            f"{single.get('server_cpu_ms_per_img')} / {base.get('server_cpu_ms_per_img')}",
        ),
        ("hot swaps under load: count / swap_errors", f"{swap.get('swaps')} / {r['swap_errors']}"),
        ("swap_p99_ms (promote p99 ms)", f"{r['swap_p99_ms']} ({swap.get('promote_p99_ms')})"),
        ("errors (single + multi phases)", r["errors"]),
    ]


def _precision(r: dict[str, Any]) -> str:
    if r.get("served_precision") is None:
        return "n/a"
    agreement = r.get("int8_agreement")
    extra = f" (int8 top-1 agreement with fp32: {100 * agreement:.1f}%)" if agreement is not None else ""
    return f"{r['served_precision']}{extra}"


def reading(r: dict[str, Any]) -> list[str]:
    """Plain-language lines derived from the numbers: what bounds the throughput and the ratios."""
    m, phases = r["machine"], r["phases"]
    lines = []
    busy = max(m["loadavg_before"][0], m["loadavg_after"][0])
    if busy > 0.5 * (m["cores"] or 1):
        lines.append(
            f"- The machine was busy around the run (1-min load up to {busy:.1f} on {m['cores']} cores): every "
            "absolute number is lower than on an idle machine; ratios measured in the same run hold better."
        )
    svc = phases["single"].get("server_cpu_ms_per_img")
    base = (phases.get("baseline") or {}).get("server_cpu_ms_per_img")
    if svc and base:
        lines.append(
            f"- CPU per image across the server's processes: {svc} ms with the `{r.get('engine', 'onnx')}` engine, "
            f"{base} ms with torch eager at batch 1. On a CPU-bound machine the throughput ratio cannot exceed "
            f"{base / svc:.1f}x, whatever the batching."
        )
        alone = r.get("int8_engine_alone_img_s") or r.get("engine_alone_img_s")
        cores = m.get("cores") or 1
        if alone:
            lines.append(
                f"- 5x the baseline needs at most {base / 5:.1f} CPU ms per image for everything the service does; "
                f"the bare engine alone costs {1000 * cores / alone:.1f} ms ({alone} img/s on {cores} cores), "
                f"so no serving overhead at all would reach {base * alone / (1000 * cores):.1f}x."
            )
    if r.get("throughput_vs_engine"):
        lines.append(
            f"- The service delivers {100 * r['throughput_vs_engine']:.0f}% of the bare engine's best "
            "throughput; the rest goes to HTTP, JSON/base64, JPEG decode, preprocessing, prediction capture, "
            "the feedback input cache, the load generator (same cores) and other work on the machine."
        )
    if r.get("multi_adapter_ratio"):
        lines.append(
            f"- Spreading traffic over {r['config']['adapters']} adapters keeps "
            f"{100 * r['multi_adapter_ratio']:.0f}% of the single-adapter throughput: a mixed batch runs "
            "each adapter version's rows through that version's own ONNX session (service/engine.py), and "
            "on CPU an image costs about the same at batch 1 as at batch 8."
        )
    if r.get("throughput_vs_roofline") and r["throughput_vs_roofline"] > 1:
        why = (
            "int8 arithmetic is not bound by the fp32 peak"
            if r.get("served_precision") == "int8"
            else "the measured peak (numpy's fp32 matmul) is below what ONNX Runtime's convolutions sustain"
        )
        lines.append(f"- Above 100% of the fp32 roofline: {why}.")
    return lines


def markdown(r: dict[str, Any]) -> str:
    cfg, m = r["config"], r["machine"]
    table = "\n".join(f"| {k} | {v} |" for k, v in _rows(r))
    return f"""# Serving benchmark

Produced by `{r["command"]}` on {r["date"]}.

Machine: {m["cpu"]}, {m["cores"]} cores, {m["platform"]}; torch {m["torch"]}, onnxruntime {m["onnxruntime"]},
bentoml {m["bentoml"]}. Load average (1/5/15 min) before: {_load(m["loadavg_before"])}, after:
{_load(m["loadavg_after"])} (other work on the machine lowers every number here).

Setup: `bentoml serve` with engine `{cfg["engine"]}`, {cfg["workers"]} workers x {cfg["threads"]} engine threads;
a random-init resnet18 (10 classes) at {cfg["size"]}x{cfg["size"]}; LoRA adapters with target policy
`{cfg["targets"]}`; {cfg["clients"]} closed-loop clients over loopback HTTP, {cfg["per_request"]} JPEG
({cfg["size"]}x{cfg["size"]}, base64 in JSON) per request; {cfg["seconds"]:g} s measured per phase after
{cfg["warmup"]:g} s of warm-up. The baseline runs the same command with `ADAPTSERVE_ENGINE=torch
ADAPTSERVE_MAX_BATCH=1` and nothing else changed (same workers and threads); the fp32 row with
`ADAPTSERVE_ENGINE=onnx`. The retrain job runner is off (`ADAPTSERVE_JOB_RUNNER=0`: a process of its own that
answers no prediction). `onnx-int8` calibrates on photo-like images of the kind the clients send, labelled by
the fp32 model itself; a random-init model has no accuracy to keep, so the run allows any drop
(`ADAPTSERVE_INT8_MAX_DROP=1`) and shows the top-1 agreement instead (on this project's trained digits model
int8 keeps accuracy: models/quantize.py, tests/test_quantize.py).

| metric | value |
|---|---:|
{table}

## Targets

{chr(10).join(target_lines(r))}

## Reading it

{chr(10).join(reading(r))}

## Definitions

- throughput: images answered with 200 per second of the measured window, all traffic on one adapter; p50/p99:
  request latency (send to response) seen by the clients.
- baseline: the same HTTP path and clients, served by `ADAPTSERVE_ENGINE=torch ADAPTSERVE_MAX_BATCH=1`
  (peft, adapter unmerged, one request per forward pass), measured in the same run.
- roofline: fp32 matmul peak of all cores divided by the model's FLOPs per image from `FlopCounterMode`
  (2 FLOPs per multiply-add; a merged adapter adds none). Peak: one single-threaded process per core, all at
  once, each keeping its best 512x512 float32 product (numpy BLAS, 2n^3 FLOPs) over 2 s; their sum. Best-of
  short products is what makes it robust to other load; if two vCPUs share a physical core it overstates the
  peak, which only makes the roofline target harder. Engine alone: the same way, one single-threaded ONNX
  session per core, fastest single-image run. Both are measured before and after the service phases
  ({_samples(r)}); the best is used.
- multi_adapter_ratio: throughput with requests round-robin over {cfg["adapters"]} adapters / with one adapter.
- swap phase: at least {cfg["seconds"]:g} s of load on one adapter while its champion is promoted v1 <-> v2 every
  {cfg["swap_every"]:g} s. Swap latency of one promote: from sending the promote request to the send time of
  the first request after which every request for that adapter (whichever worker answered) named the new
  version; swap_p99_ms is the 99th percentile over the promotes (with few promotes, about the slowest one; the
  first promote of v2 is a cold load). swap_errors: failed requests + responses naming neither version +
  promotes that failed + swaps that had not completed by the next promote.
- server CPU ms per image: user + system CPU of every server process during a phase / images answered.
"""


def _samples(r: dict[str, Any]) -> str:
    c = r["phases"].get("ceilings") or {}
    return f"peak GFLOP/s {c.get('peak_gflops')}, engine img/s {c.get('engine_img_s')}"


def _load(values: Any) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


NOTES = "\n## Notes (written by hand, kept across runs)\n"


def write_results(r: dict[str, Any], out_dir: Path) -> None:
    """serve.json and serve.md; a hand-written NOTES section at the end of an existing serve.md is kept."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serve.json").write_text(json.dumps(r, indent=2, default=str) + "\n")
    md = out_dir / "serve.md"
    old = md.read_text() if md.exists() else ""
    kept = old[old.index(NOTES) :] if NOTES in old else ""
    md.write_text(markdown(r) + kept)


# --- the command -------------------------------------------------------------------------------------------------

QUICK = {"clients": 2, "seconds": 2.0, "adapters": 2, "size": 32, "swap_every": 1.0, "warmup": 0.5, "workers": 1}


def _help(name: str) -> str:
    from dataclasses import fields

    f = {f.name: f for f in fields(BenchConfig)}[name]
    default = QUICK.get(name)
    quick = f"; --quick: {default:g}" if isinstance(default, int | float) else ""
    return f"{f.metadata['help']} (default: {f.default}{quick})"


def command(
    clients: Annotated[int | None, typer.Option(help=_help("clients"), show_default=False)] = None,
    seconds: Annotated[float | None, typer.Option(help=_help("seconds"), show_default=False)] = None,
    url: Annotated[str | None, typer.Option(help=_help("url"))] = None,
    adapters: Annotated[int | None, typer.Option(help=_help("adapters"), show_default=False)] = None,
    engine: Annotated[str, typer.Option(help=_help("engine"), show_default=False)] = "onnx-int8",
    out_dir: Annotated[
        Path | None,
        typer.Option(help="where serve.md / serve.json go (default: benchmarks/results; --quick: nowhere)"),
    ] = None,
    quick: Annotated[bool, typer.Option(help="a short run at 32x32 (smoke test); writes nothing by default")] = False,
    size: Annotated[int | None, typer.Option(help=_help("size"), show_default=False)] = None,
    workers: Annotated[int | None, typer.Option(help=_help("workers"), show_default=False)] = None,
    threads: Annotated[int, typer.Option(help=_help("threads"), show_default=False)] = 1,
    images_per_request: Annotated[int, typer.Option(help=_help("per_request"), show_default=False)] = 1,
    swap_every: Annotated[float | None, typer.Option(help=_help("swap_every"), show_default=False)] = None,
    targets: Annotated[str, typer.Option(help=_help("targets"), show_default=False)] = "all",
    warmup: Annotated[float | None, typer.Option(help=_help("warmup"), show_default=False)] = None,
    token: Annotated[str | None, typer.Option(help="admin token of --url (default: $ADAPTSERVE_ADMIN_TOKEN)")] = None,
    baseline: Annotated[bool, typer.Option(help=_help("baseline"), show_default=False)] = True,
    default_baseline: Annotated[
        bool | None, typer.Option(help=f"{_help('default_baseline')[:-1]}; --quick: off)", show_default=False)
    ] = None,
) -> None:
    """Throughput, latency, multi-adapter and hot-swap behaviour of the service under load, vs its baselines."""
    given = {
        "clients": clients,
        "seconds": seconds,
        "adapters": adapters,
        "size": size,
        "swap_every": swap_every,
        "warmup": warmup,
        "workers": workers,
    }
    chosen = {k: v if v is not None else (QUICK[k] if quick else getattr(BenchConfig, k)) for k, v in given.items()}
    cfg = BenchConfig(
        **chosen,
        engine=engine,
        threads=threads,
        per_request=images_per_request,
        targets=targets,
        url=url,
        token=token or os.environ.get("ADAPTSERVE_ADMIN_TOKEN") or TOKEN,
        baseline=baseline,
        default_baseline=(not quick) if default_baseline is None else default_baseline,
    )
    _check(cfg)
    # a plain SIGTERM would skip the `with` blocks that stop the servers this run started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="adaptserve-bench-") as tmp:
        result = run_bench(cfg, Path(tmp))
    out = out_dir if out_dir is not None else (None if quick else ROOT / "benchmarks" / "results")
    if out is not None:
        write_results(result, out)
        console.log(f"wrote {out / 'serve.md'} and {out / 'serve.json'}")
    keep = {k: v for k, v in result.items() if k not in ("phases", "config", "machine", "command")}
    print(json.dumps(keep), flush=True)


def _check(cfg: BenchConfig) -> None:
    from models.strategies import LORA_TARGETS

    problems = []
    from service.config import ENGINES

    if cfg.engine not in ENGINES:
        problems.append(f"--engine {cfg.engine!r}: choose one of {', '.join(ENGINES)}")
    if cfg.targets not in LORA_TARGETS:
        problems.append(f"--targets {cfg.targets!r}: choose one of {', '.join(LORA_TARGETS)}")
    if min(cfg.clients, cfg.adapters, cfg.workers, cfg.per_request) < 1 or cfg.seconds <= 0 or cfg.size < 8:
        problems.append(
            "--clients, --adapters, --workers, --images-per-request must be >= 1, --seconds > 0, --size >= 8"
        )
    if problems:
        console.print("[red]error:[/red] " + "; ".join(problems))
        raise typer.Exit(2)


if __name__ == "__main__":
    typer.run(command)
