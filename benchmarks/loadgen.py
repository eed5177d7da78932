"""The load generator: closed-loop HTTP clients posting ready-made JPEG requests, and what their samples say.

The clients share the cores with the service they measure, so they are built to cost little CPU: request bodies
are encoded before the clock starts and each client is a plain `http.client` keep-alive connection on a thread.
Invariant: a `Sample` is one request; throughput counts images answered inside a window, latency the requests
sent inside it, errors every failed request of the phase.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def make_jpegs(n: int, size: int, seed: int = 0) -> list[bytes]:
    """Photo-like test images: smooth colour fields with shapes and sensor noise, JPEG quality 90."""
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
    during: Callable[[threading.Event], None] | None = None,
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


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None
