"""`adaptserve demo`: the whole loop against a live service, from clean traffic to a recovered adapter.

A site adapter is trained on clean digits and registered; clean traffic flows; then the site's camera degrades
(a shift) and a fraction of predictions get feedback labels. Nothing else is driven by the demo: the service's
drift monitor flags the shift, the job runner's drift policy starts a retrain job, the gate promotes the
challenger and every worker hot-swaps it. The demo watches, prints a timeline, and writes demo-report.html and
a PNG chart (accuracy and drift score over the images served, with drift / job / promotion markers).

The shifted traffic goes on until the story has an outcome: a response from a new version (then
`after_promote_requests` more requests measure the recovery), or a job of the adapter ending rejected or failed (the
gate kept the champion: stop). The only other end is the time limit, and the result then says what was still missing.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import os
import secrets
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from benchmarks.serve_process import ROOT, free_port
from models.strategies import AdaptConfig
from pipelines.adapt import adapt_model
from pipelines.data import DataSplits, digits_splits, per_class_subset
from pipelines.shifts import shift_set
from pipelines.train import TrainConfig

# The service settings the demo starts its own service with: a drift check every few seconds over a short
# window, and a drift-triggered retrain as soon as enough labels arrived. A production service keeps the slower
# defaults (see the README's configuration reference).
DEMO_ENV = {
    "ADAPTSERVE_DRIFT_INTERVAL_S": "3",
    "ADAPTSERVE_DRIFT_WINDOW": "150",
    "ADAPTSERVE_REPORT_EVERY": "0",
    "ADAPTSERVE_RETRAIN_MIN_LABELS": "120",
    "ADAPTSERVE_RETRAIN_COOLDOWN_S": "600",
    # gaussian noise at severity 3 costs the digits model 5-10 points: start the job at 3, not the default 5
    "ADAPTSERVE_RETRAIN_MIN_DROP": "3",
}


OUTCOMES = ("promoted", "rejected", "failed", "timeout")
REQUEST_BATCH = 8  # labels the demo's labeller asks for at once (GET /labels/requests?n=)


@dataclass
class Event:
    image: int  # images served before it (the chart's x axis)
    at: float
    kind: str  # drift | job | promote | rejected | failed | timeout | phase
    text: str


@dataclass
class Timeline:
    correct: list[int] = field(default_factory=list)  # 1/0 per image, in request order
    versions: list[int] = field(default_factory=list)
    phase: list[str] = field(default_factory=list)
    drift: list[tuple[int, float]] = field(default_factory=list)  # (images served, score)
    events: list[Event] = field(default_factory=list)
    start: float = field(default_factory=time.monotonic)

    def add(self, kind: str, text: str, say: Callable[[str], None]) -> None:
        e = Event(len(self.correct), time.monotonic() - self.start, kind, text)
        self.events.append(e)
        say(f"[{e.at:6.1f}s] image {e.image:5d}  {kind:8s} {text}")

    def accuracy(self, phase: str, since: int = 0) -> float | None:
        pairs = enumerate(zip(self.correct, self.phase, strict=True))
        picked = [c for i, (c, p) in pairs if p == phase and i >= since]
        return float(np.mean(picked)) if picked else None


class Client:
    """The demo's HTTP client. It plays the operator: `token` (an admin token) goes with register and with every
    /feedback post, so its labels are trusted ones."""

    def __init__(self, url: str, token: str | None, timeout: float = 60.0) -> None:
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}

    def get(self, path: str, admin: bool = False, **params: Any) -> Any:
        r = self.http.get(path, params=params, headers=self.auth if admin else {})
        return r.json() if r.status_code == 200 else None

    def post(self, path: str, body: dict, admin: bool = False) -> Any:
        r = self.http.post(path, json=body, headers=self.auth if admin else {})
        if r.status_code >= 400:
            raise RuntimeError(f"POST {path} -> {r.status_code}: {r.text[:300]}")
        return r.json()

    def register(self, name: str, adapter_dir: Path) -> dict:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(adapter_dir, arcname="adapter")
        r = self.http.post(
            "/adapters/register",
            params={"name": name, "promote": "true"},
            files={"archive": ("adapter.tar.gz", buf.getvalue())},
            headers=self.auth,
        )
        if r.status_code != 200:
            raise RuntimeError(f"register {name} -> {r.status_code}: {r.text[:300]}")
        return r.json()


def png_b64(image: Image.Image) -> str:
    """`image` as a base64 PNG, the way a client puts it in a JSON request."""
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def local_url(host: str, port: int) -> str:
    """Where a client on this machine reaches a service bound to `host` (a wildcard address means loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def start_service(
    home: Path, base: Path, port: int, token: str, extra_env: dict[str, str], host: str = "127.0.0.1"
) -> subprocess.Popen:
    """The service on `host`:`port` (loopback by default: its admin token is the demo's), with its metrics in its own
    state directory (service/serve.py), so the demo never touches another service's."""
    env = dict(os.environ, ADAPTSERVE_HOME=str(home), ADAPTSERVE_BASE_MODEL=str(base), ADAPTSERVE_ADMIN_TOKEN=token)
    env.update(extra_env)
    cmd = [sys.executable, "-m", "service.serve", "--host", host, "--port", str(port)]
    log = open(home / "demo-service.log", "ab")  # noqa: SIM115 - the child process owns it
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(client: Client, proc: subprocess.Popen | None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the service exited with code {proc.returncode}; see demo-service.log")
        try:
            if client.http.get("/readyz").status_code == 200:
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the service was not ready within {timeout:.0f} s")


def train_site_adapter(base: Path, out: Path, epochs: int, seed: int) -> Path:
    """The site's first adapter: LoRA on a little clean digits data (its reference images come with it)."""
    d = digits_splits(32)
    target = DataSplits(per_class_subset(d.train, 30, seed), d.val, d.test)
    train_cfg = TrainConfig(epochs=epochs, batch_size=64, seed=seed, patience=5)  # the demo's recipe, not train's
    adapt_model(base, target, out, AdaptConfig(strategy="lora"), train_cfg)
    return out


@dataclass
class DemoConfig:
    adapter: str = "site-demo"
    shift: str = "gaussian_noise"
    severity: int = 3
    clean_requests: int = 200
    after_promote_requests: int = 250  # after the promotion, to measure the recovery (not bounded by timeout_s)
    images_per_request: int = 2
    feedback_fraction: float = 0.5
    adapter_epochs: int = 3
    seed: int = 0
    timeout_s: float = 420.0  # the shifted traffic's limit: waiting for drift, labels, the job and the promotion
    min_labels: int | None = None  # the service's ADAPTSERVE_RETRAIN_MIN_LABELS if known (to say what is missing)


def _stream(client: Client, tl: Timeline, cfg: DemoConfig, images, labels, phase: str, state: dict) -> None:
    """One /predict request; after the shift, labels for `feedback_fraction` of the images served, on the
    predictions the service asks labels for (GET /labels/requests, as a labeller would work); note version changes
    as promotions."""
    body = {"images": [png_b64(im) for im in images], "adapter": cfg.adapter}
    r = client.post("/predict", body)
    truth = state.setdefault("truth", {})  # what the site's labeller would answer, by prediction id
    for p, y in zip(r["predictions"], labels, strict=True):
        tl.correct.append(int(p["label"] == str(y)))
        tl.versions.append(r["version"])
        tl.phase.append(phase)
        truth[p["id"]] = str(y)
    if phase == "shifted":
        state["budget"] = state.get("budget", 0.0) + cfg.feedback_fraction * len(images)
        if state["budget"] >= REQUEST_BATCH:
            _label_requested(client, cfg, state)
    if state.get("version") not in (None, r["version"]) and "promoted_at" not in state:
        state["promoted_at"] = len(tl.correct)
        state["outcome"] = "promoted"
        tl.add("promote", f"responses now come from v{r['version']} (was v{state['version']})", state["say"])
    state["version"] = r["version"]


def _label_requested(client: Client, cfg: DemoConfig, state: dict) -> None:
    """Label what GET /labels/requests asks for, up to the budget the images served so far allow."""
    asked = client.get("/labels/requests", admin=True, adapter=cfg.adapter, n=int(state["budget"]), images="false")
    for req in (asked or {}).get("requests", []):
        label = state["truth"].get(req["id"])
        if label is None:
            continue
        sent = client.post("/feedback", {"id": req["id"], "label": label}, admin=True)
        state["labels"] += 1
        state["budget"] -= 1
        state["label_count"] = sent.get("labels", state["labels"])  # what the service holds for the adapter


def _watch(client: Client, tl: Timeline, cfg: DemoConfig, state: dict) -> None:
    """Poll the drift status and the jobs: the demo only observes what the system decides."""
    drift = client.get("/drift", adapter=cfg.adapter)
    state["last_drift"] = drift or state.get("last_drift")
    if drift and drift.get("checked_at") != state.get("checked_at"):
        state["checked_at"] = drift["checked_at"]
        tl.drift.append((len(tl.correct), float(drift["score"])))
        if drift["drift"] and not state.get("drifting"):
            moved = [k for k, v in (drift.get("features") or {}).items() if v.get("moved")]
            tl.add("drift", f"score {drift['score']:.1f} >= {drift['threshold']:.1f}; moved: {', '.join(moved)}",
                   state["say"])
        state["drifting"] = bool(drift["drift"])
    jobs = [j for j in _jobs(client, cfg) if j["id"] not in state["old_jobs"]]  # newest first
    for job in reversed(jobs):
        if state["jobs"].get(job["id"]) != job["state"]:
            state["jobs"][job["id"]] = job["state"]
            kind = {"rejected": "rejected", "failed": "failed"}.get(job["state"], "job")
            text = " ".join(filter(None, [f"job {job['id'][:8]} ({job['trigger']}) {job['state']}",
                                          _numbers(job.get("result") or {})]))
            why = f": {job['error']}" if job["state"] == "failed" and job.get("error") else ""
            tl.add(kind, text + why, state["say"])
            if kind != "job" and state.get("outcome") is None:
                state["outcome"] = kind  # the gate (or the job) kept the champion: the story ends here
    state["job"] = jobs[0] if jobs else None


def _jobs(client: Client, cfg: DemoConfig) -> list[dict]:
    return (client.get("/jobs", adapter=cfg.adapter) or {}).get("jobs", [])


def _waiting_for(cfg: DemoConfig, state: dict) -> str:
    """What the loop still lacked when time ran out, in the order the system needs it."""
    job, drift = state.get("job"), state.get("last_drift")
    if job is not None and job["state"] in ("queued", "running"):
        message = f": {job['message']}" if job.get("message") else ""
        return f"waiting for job {job['id'][:8]} ({job['state']}, {job['progress']:.0%}{message})"
    if job is not None and job["state"] == "succeeded":
        return f"waiting for a response from the version job {job['id'][:8]} promoted (it succeeded)"
    if drift is None:
        return f"waiting for the first drift check of {cfg.adapter!r}"
    if not drift.get("drift"):
        return (f"waiting for the drift check to flag the shift (last score {float(drift['score']):.1f} < "
                f"{float(drift['threshold']):.1f})")
    have = state.get("label_count", state["labels"])
    if cfg.min_labels is not None and have < cfg.min_labels:
        return f"waiting for {cfg.min_labels} labels (have {have})"
    est = drift.get("estimated_accuracy")
    told = f"estimated accuracy {est:.1%}, " if isinstance(est, int | float) else ""
    return (f"waiting for the job runner's drift policy to start a job (drift flagged, {told}{have} labels; the "
            "accuracy lost must reach ADAPTSERVE_RETRAIN_MIN_DROP; is a job runner running, or is a drift job of this "
            "adapter within the cooldown?)")


def _numbers(result: dict) -> str:
    nums = result.get("numbers") or {}
    keys = ("champion_target_acc", "challenger_target_acc", "champion_source_acc", "challenger_source_acc")
    parts = [f"{k.replace('_acc', '')}={nums[k]:.3f}" for k in keys if isinstance(nums.get(k), (int, float))]
    return ("(" + ", ".join(parts) + ")") if parts else ""


def new_state(client: Client, cfg: DemoConfig, say: Callable[[str], None]) -> dict[str, Any]:
    """What the demo tracks while it streams; jobs the adapter already had (a --url service) are not this story."""
    old_jobs = {j["id"] for j in _jobs(client, cfg)}
    return {"rng": np.random.default_rng(cfg.seed), "labels": 0, "jobs": {}, "old_jobs": old_jobs, "say": say}


def run_demo(client: Client, base: Path, cfg: DemoConfig, say: Callable[[str], None], work: Path) -> dict:
    tl, state = Timeline(), new_state(client, cfg, say)
    tl.add("phase", f"training site adapter {cfg.adapter!r} on clean digits", say)
    adapter_dir = train_site_adapter(base, work / "site-adapter", cfg.adapter_epochs, cfg.seed)
    reg = client.register(cfg.adapter, adapter_dir)
    tl.add("phase", f"registered {cfg.adapter} v{reg['result']['version']} as champion", say)

    d = digits_splits(32)
    clean = d.test  # clean traffic: the source test split
    pool = shift_set(d.train, cfg.shift, cfg.severity, seed=cfg.seed)  # the degraded camera's stream
    n = cfg.images_per_request
    tl.add("phase", f"clean traffic: {cfg.clean_requests} requests", say)
    for i in range(cfg.clean_requests):
        idx = [(i * n + j) % len(clean) for j in range(n)]
        _stream(client, tl, cfg, [clean.images[k] for k in idx], [clean.labels[k] for k in idx], "clean", state)
        if i % 10 == 9:
            _watch(client, tl, cfg, state)
    onset = len(tl.correct)
    tl.add("phase", f"camera degrades: {cfg.shift} severity {cfg.severity}; "
                    f"labels for {cfg.feedback_fraction:.0%} of the images served, on the predictions "
                    "GET /labels/requests asks for", say)
    shifted_phase(client, tl, cfg, pool, state)
    return summarize(tl, cfg, onset, state)


def shifted_phase(client: Client, tl: Timeline, cfg: DemoConfig, pool, state: dict) -> None:
    """Degraded traffic until an outcome: promoted (then `after_promote_requests` more, however long they take),
    rejected or failed (stop at once), or the time limit (say what was missing). No request cap: how many requests
    the drift check and the labels need varies from run to run, the time limit is what the user set."""
    deadline, n = time.monotonic() + cfg.timeout_s, cfg.images_per_request
    for i in itertools.count():
        idx = [(i * n + j) % len(pool) for j in range(n)]
        _stream(client, tl, cfg, [pool.images[k] for k in idx], [pool.labels[k] for k in idx], "shifted", state)
        if i % 10 == 9:
            _watch(client, tl, cfg, state)
        if state.get("outcome") == "promoted":
            if len(tl.correct) - state["promoted_at"] >= cfg.after_promote_requests * n:
                break
        elif state.get("outcome") is not None:
            break
        elif time.monotonic() >= deadline:
            _watch(client, tl, cfg, state)  # a job may have ended since the last look
            if state.get("outcome") is None:
                state["outcome"], state["waiting_for"] = "timeout", _waiting_for(cfg, state)
                tl.add("timeout", f"no outcome within {cfg.timeout_s:.0f} s: {state['waiting_for']}", state["say"])
            break
    _watch(client, tl, cfg, state)
    if state["outcome"] in ("rejected", "failed"):
        state["say"](f"the {state['outcome']} job kept champion v{state['version']}: the demo stops here")


def summarize(tl: Timeline, cfg: DemoConfig, onset: int, state: dict) -> dict:
    promoted_at = state.get("promoted_at")
    clean = tl.accuracy("clean")
    shifted = float(np.mean(tl.correct[onset:promoted_at])) if promoted_at and promoted_at > onset else (
        tl.accuracy("shifted"))
    recovered = tl.accuracy("shifted", since=promoted_at) if promoted_at else None
    first = {k: next((e.image - onset for e in tl.events if e.kind == k and e.image >= onset), None)
             for k in ("drift", "job", "promote")}
    onset_at = next((e.at for e in tl.events if e.kind == "phase" and e.image >= onset), None)
    drift_at = next((e.at for e in tl.events if e.kind == "drift" and e.image >= onset), None)
    lost = (clean or 0) - (shifted or 0)
    return {
        "adapter": cfg.adapter,
        "shift": f"{cfg.shift}@{cfg.severity}",
        "clean_acc": clean,
        "shifted_acc": shifted,
        "recovered_acc": recovered,
        "recovered_fraction": ((recovered - shifted) / lost) if recovered is not None and lost > 0 else None,
        "labels_sent": state["labels"],
        "drift_after_images": first["drift"],
        "drift_after_s": drift_at - onset_at if drift_at is not None and onset_at is not None else None,
        "job_after_images": first["job"],
        "promoted_after_images": first["promote"],
        "promoted": promoted_at is not None,
        "outcome": state.get("outcome") or "timeout",
        "waiting_for": state.get("waiting_for"),
        "seconds": round(time.monotonic() - tl.start, 1),
        "timeline": tl,
    }


def write_report(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """demo-report.html (self-contained: the chart is embedded) and demo-chart.png."""
    import matplotlib  # heavy, and only for the chart

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl: Timeline = result["timeline"]
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    c = np.asarray(tl.correct, dtype=float)
    w = 50
    if len(c) >= w:
        rolling = np.convolve(c, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w - 1, len(c)), rolling, color="tab:blue", label=f"accuracy (rolling {w} images)")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("images served")
    ax.set_ylabel("accuracy")
    if tl.drift:
        ax2 = ax.twinx()
        xs, ys = zip(*tl.drift, strict=True)
        ax2.plot(xs, ys, color="tab:orange", marker=".", label="drift score (-log10 p)")
        ax2.set_ylabel("drift score")
    colours = {"drift": "tab:red", "job": "tab:purple", "promote": "tab:green", "rejected": "black",
               "failed": "black", "timeout": "black", "phase": "grey"}
    for e in tl.events:
        if e.kind != "phase" or "degrades" in e.text:
            ax.axvline(e.image, color=colours.get(e.kind, "grey"), linestyle="--", linewidth=1)
            ax.text(e.image, 1.02, e.kind if e.kind != "phase" else "shift", rotation=90, fontsize=8,
                    va="bottom", color=colours.get(e.kind, "grey"))
    ax.legend(loc="lower left")
    ax.set_title(f"adaptserve demo: {result['adapter']} under {result['shift']}")
    fig.tight_layout()
    png = out_dir / "demo-chart.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    rows = "".join(
        f"<tr><td>{e.at:.1f}</td><td>{e.image}</td><td>{html.escape(e.kind)}</td><td>{html.escape(e.text)}</td></tr>"
        for e in tl.events
    )
    numbers = {k: v for k, v in result.items() if k != "timeline"}
    chart = base64.b64encode(png.read_bytes()).decode()
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>adaptserve demo</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}td,th{{padding:2px 10px;text-align:left}}
tr:nth-child(even){{background:#f4f4f4}}pre{{background:#f4f4f4;padding:1em}}</style></head><body>
<h1>adaptserve demo</h1>
<img alt="accuracy and drift score over the images served" src="data:image/png;base64,{chart}">
<h2>Numbers</h2><pre>{html.escape(json.dumps(numbers, indent=2))}</pre>
<h2>Timeline</h2><table><tr><th>seconds</th><th>image</th><th>event</th><th>what</th></tr>{rows}</table>
</body></html>"""
    report = out_dir / "demo-report.html"
    report.write_text(page)
    return report, png


def demo(
    url: str | None,
    token: str | None,
    base: Path,
    cfg: DemoConfig,
    out_dir: Path,
    say: Callable[[str], None] = print,
    home: Path | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
) -> dict:
    """Run the demo against `url`, or start a service of its own (in `home`, default a temp dir; on `host`:`port`,
    default loopback and a free port) and stop it."""
    proc = None
    with tempfile.TemporaryDirectory(prefix="adaptserve-demo-") as tmp:
        if url is None:
            home = home or Path(tmp) / "home"
            home.mkdir(parents=True, exist_ok=True)
            token = token or secrets.token_urlsafe(16)
            port = port or free_port()
            url = local_url(host, port)
            say(f"starting a service on {url} (bound to {host}; state in {home})")
            proc = start_service(home, base, port, token, DEMO_ENV, host=host)
            if cfg.min_labels is None:
                cfg = replace(cfg, min_labels=int(DEMO_ENV["ADAPTSERVE_RETRAIN_MIN_LABELS"]))
        client = Client(url, token)
        try:
            wait_ready(client, proc)
            say(f"dashboard: {url}/dashboard")
            result = run_demo(client, base, cfg, say, Path(tmp))
        finally:
            if proc is not None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
        report, png = write_report(result, out_dir)
    result.update(report=str(report), chart=str(png))
    return result
