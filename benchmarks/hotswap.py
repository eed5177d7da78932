"""Hot swap under load: promotes of one adapter (v1 <-> v2) while clients keep asking it, and how long each took.

Swap latency of one promote = from sending the promote request until the send time of the first request after
which every request for that adapter (answered by any worker) named the new version. A swap that never gets
there before the next promote (or the end of the phase) counts as incomplete, and as a swap error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from benchmarks.loadgen import Sample, percentile, run_phase


@dataclass
class Promote:
    """One POST /adapters/promote: send and return times (time.monotonic), the version asked for, answered 200."""

    sent: float
    returned: float
    version: int
    ok: bool


def swap_latencies(
    samples: list[Sample], promotes: list[Promote], adapter: str, since: str = "sent"
) -> tuple[list[float], int]:
    """(latency in ms per completed swap, swaps that did not complete before the next promote or the end).

    A swap's latency runs from sending its promote to the send time of the first request after which every
    request for `adapter` sent before the next promote named the new version. since="returned" measures from the
    promote's answer instead (the registry had committed it; 0 when that request was sent before the answer came):
    the agreement between workers, without the time the promoted replica took to check and load the version.
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
        start = p.returned if since == "returned" else p.sent
        latencies.append(max(0.0, 1000 * (window[first_new].sent - start)))
    return latencies, incomplete


def promote(url: str, adapter: str, version: int, token: str) -> bool:
    """POST /adapters/promote; True when the service answered 200."""
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


def promote_loop(
    url: str, adapter: str, every: float, seconds: float, out: list[Promote], token: str
) -> Callable[[threading.Event], None]:
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


def swap_phase(
    url: str, bodies: dict[str, list[bytes]], clients: int, seconds: float, adapter: str, every: float, token: str,
    promote_url: str | None = None,
) -> dict[str, Any]:
    """Load on `adapter` while its champion flips between v1 and v2; ends on v1 again. Runs for at least three
    promote intervals. `promote_url`: promote through that service (another replica on the same database) while
    the load goes to `url`; default `url` itself."""
    seconds = max(seconds, 3 * every)
    promotes: list[Promote] = []
    promote_url = promote_url or url
    loop = promote_loop(promote_url, adapter, every, seconds, promotes, token)
    stats, samples, _ = run_phase(url, bodies, clients, seconds, 0.0, loop)
    latencies, incomplete = swap_latencies(samples, promotes, adapter)
    after, _ = swap_latencies(samples, promotes, adapter, since="returned")
    wrong = sum(s.status == 200 and s.version not in (1, 2) for s in samples)
    reset_ok = promote(promote_url, adapter, 1, token)
    return {
        "swaps": len(promotes),
        "swap_ms": [round(x, 1) for x in latencies],
        "swap_p99_ms": percentile(latencies, 99),
        "swap_after_promote_ms": [round(x, 1) for x in after],
        "swap_after_promote_p99_ms": percentile(after, 99),
        "swap_errors": stats.errors + wrong + incomplete + sum(not p.ok for p in promotes) + (not reset_ok),
        "swap_incomplete": incomplete,
        "promote_p99_ms": percentile([1000 * (p.returned - p.sent) for p in promotes], 99),
        "swap_phase_img_s": stats.throughput_img_s,
        "swap_phase_requests": len(samples),
    }
