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

With `--database URL --artifacts URL` (PostgreSQL + S3, say) every server of the run keeps its state there, and a
swap phase across two replicas is added (benchmarks/scaleout.py); the results are written as serve-scaleout.md /
.json, beside the embedded default's serve.md / .json.

Swap latency of one promote = from sending the promote request until the send time of the first request after
which every request for that adapter (answered by any worker) named the new version; `swap_p99_ms` is the
99th percentile over the promotes of the run. Progress goes to stderr, one JSON line to stdout last.

Where each part lives: the service process in benchmarks/serve_process.py, the clients in benchmarks/loadgen.py,
the swap phase in benchmarks/hotswap.py, the ceilings in benchmarks/ceilings.py, the random base and adapters in
benchmarks/fixture.py, serve.md / serve.json in benchmarks/serve_report.py. This module runs the phases in order
and turns their numbers into the result row.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

from benchmarks.ceilings import engine_img_s, matmul_peak_gflops, model_gflops
from benchmarks.fixture import build_base, build_home
from benchmarks.hotswap import swap_phase
from benchmarks.loadgen import PhaseStats, make_jpegs, predict_bodies, run_phase
from benchmarks.machine import machine_info
from benchmarks.output import RESULTS
from benchmarks.scaleout import check_database, environ, measure_cross_replica, shared_env
from benchmarks.serve_process import ServeProcess
from benchmarks.serve_report import write_results
from models import settings
from models.db import redact
from models.settings import ENGINES
from models.strategies import LORA_TARGETS

TOKEN = "bench-admin-token"
console = Console(stderr=True)


# --- the run ----------------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """One run of `adaptserve bench serve`; its defaults are the full run's (QUICK holds the --quick ones)."""

    clients: int = field(default=8, metadata={"help": "concurrent closed-loop clients"})
    seconds: float = field(default=30.0, metadata={"help": "measured seconds per phase"})
    adapters: int = field(default=16, metadata={"help": "adapters the multi phase spreads traffic over"})
    engine: str = field(default="onnx-int8", metadata={"help": "engine under test (onnx-int8, onnx or torch)"})
    size: int = field(default=224, metadata={"help": "input side of the random-init resnet18"})
    workers: int = field(default=2, metadata={"help": "BentoML worker processes (ADAPTSERVE_WORKERS)"})
    threads: int = field(default=1, metadata={"help": "engine threads per worker (ADAPTSERVE_THREADS; 0 = all)"})
    per_request: int = field(default=1, metadata={"help": "JPEG images per request"})
    swap_every: float = field(default=3.0, metadata={"help": "seconds between promotes in the swap phase"})
    notify: bool = field(default=True, metadata={"help": "workers learn of a promote by notification "
                                                 "(ADAPTSERVE_NOTIFY; off: by their poll only)"})
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
    database: str | None = field(default=None, metadata={
        "help": "state database of every server the run starts (ADAPTSERVE_DATABASE_URL, e.g. "
                "postgresql+psycopg://...); must hold no adapter; with --artifacts"})
    artifacts: str | None = field(default=None, metadata={
        "help": "artifact store of every server the run starts (ADAPTSERVE_ARTIFACTS_URL, e.g. s3://BUCKET/PREFIX "
                "with the AWS_* variables); with --database"})


def _env(**values: object) -> dict[str, str]:
    """ADAPTSERVE_* variables from setting names (models/settings.py), so a misspelt one fails here, loudly."""
    return {settings.env_name(name): str(value) for name, value in values.items()}


def service_env(cfg: BenchConfig, home: Path, base: Path) -> dict[str, str]:
    """The settings of the service under test; the baselines change only what they name."""
    return _env(
        home=home,
        base_model=base,
        admin_token=cfg.token,
        engine=cfg.engine,
        workers=cfg.workers,
        threads=cfg.threads,
        max_images=max(32, cfg.per_request),
        # the retrain job runner is a process of its own that serves no prediction: not part of this measurement
        job_runner=0,
        notify=int(cfg.notify),
        # a random-init model has no accuracy to lose; int8 is measured anyway (top-1 agreement with fp32, in the
        # results) and would be refused on a real model beyond the default 1 point (service/engine.py)
        int8_max_drop=1,
    ) | shared_env(cfg.database, cfg.artifacts)


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
    out: dict[str, Any] = {"single": asdict(single), "multi": asdict(multi), "active_adapters": len(names)}
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
    """One phase's numbers as a progress line."""
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
    base_env = {**env, **_env(engine="torch", max_batch=1)}
    return measure_single(cfg, base_env, workdir, adapter, f"baseline: torch eager peft (unmerged), batch 1{label}")


def discover(url: str) -> tuple[list[str], str | None]:
    """Adapters served by a running service, and one with two versions or more for the swap phase."""
    listed = httpx.get(f"{url}/adapters", timeout=30.0).json()["adapters"]
    names = sorted(a["name"] for a in listed if a["champion"] is not None)
    swappable = [a["name"] for a in listed if {1, 2} <= {v["version"] for v in a["versions"]}]
    return names, (swappable[0] if swappable else None)


def measure_ceilings(base: Path, cache: Path, seconds: float, int8: bool) -> tuple[float, float, float | None]:
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
    samples = [measure_ceilings(base, workdir / "onnx-cache", min(5.0, cfg.seconds / 2), int8)]
    if cfg.url:
        names, swap_adapter = discover(cfg.url)
        measured, baseline = measure_service(cfg.url, cfg, names[: cfg.adapters], swap_adapter), None
        measured["registered_adapters"] = len(names)
    else:
        measured, baseline = measure_started(cfg, base, workdir, int8)
    if cfg.seconds >= 10:  # a short run (--quick) keeps its first measurement
        console.log("ceilings again")
        samples.append(measure_ceilings(base, workdir / "onnx-cache", min(5.0, cfg.seconds / 2), int8))
    measured["ceilings"] = {
        "peak_gflops": [round(p, 1) for p, _, _ in samples],
        "engine_img_s": [round(e, 2) for _, e, _ in samples],
        "int8_engine_img_s": [round(q, 2) for _, _, q in samples if q is not None] or None,
    }
    peak, engine = max(p for p, _, _ in samples), max(e for _, e, _ in samples)
    if int8:
        measured["int8_engine_img_s"] = max(q for _, _, q in samples if q is not None)
    return summarize(cfg, measured, baseline, peak, flops, engine, load_before)


def measure_started(cfg: BenchConfig, base: Path, workdir: Path, int8: bool) -> tuple[dict[str, Any], dict | None]:
    """(phases, baseline) against services this run starts: adapters published in a fresh home, the service under
    test through every phase, then the fp32 engine, the baseline and the baseline with the service's defaults,
    each in a server of its own (one phase each, on the first adapter)."""
    home = workdir / "home"
    with console.status("publishing adapters") as status:
        with environ(shared_env(cfg.database, cfg.artifacts)):  # published where the servers look for them
            register_s: list[float] = []
            names = build_home(home, base, cfg.adapters, cfg.targets, lambda n: status.update(f"published {n}"),
                               int8=int8, seconds=register_s)
    env = service_env(cfg, home, base)
    console.log(f"starting bentoml serve ({cfg.engine}, {cfg.workers} workers x {cfg.threads} threads)")
    with ServeProcess(env, workdir / "serve", settle=cfg.seconds >= 10) as server:
        measured = measure_service(server.url, cfg, names, names[0], server.cpu_seconds)
        measured["register_s"] = [round(t, 2) for t in register_s]  # n adapters, then a second version
        measured["registered_adapters"] = len(names)
        measured["precision"] = served_precision(server.url, names[0])
        if cfg.database:
            measured["swap_cross_replica"] = measure_cross_replica(cfg, env, workdir, server.url, names[0], console)
    if int8 and cfg.fp32:
        fp32_env = {**env, **_env(engine="onnx")}
        measured["fp32"] = measure_single(cfg, fp32_env, workdir / "serve-fp32", names[0], "fp32 onnx engine")
    baseline = measure_baseline(cfg, env, workdir / "serve-baseline", names[0]) if cfg.baseline else None
    if cfg.default_baseline:
        defaults = {**env, **_env(workers=1, threads=0)}
        label = ", service defaults (1 worker, all cores)"
        measured["baseline_defaults"] = measure_baseline(cfg, defaults, workdir / "serve-b2", names[0], label)
    return measured, baseline


def served_precision(url: str, adapter: str) -> dict | None:
    """What the service says serves `adapter` (GET /adapters: precision and the int8 measurement)."""
    listed = httpx.get(f"{url}/adapters", timeout=30.0).json()["adapters"]
    return next((a.get("precision") for a in listed if a["name"] == adapter), None)


def _round(value: float | None, digits: int = 2) -> float | None:
    """`value` rounded; None (not measured) stays None."""
    return None if value is None else round(value, digits)


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b to 3 digits; None when either was not measured (or b is 0)."""
    return round(a / b, 3) if a is not None and b else None


def summarize(
    cfg: BenchConfig,
    measured: dict,
    baseline: dict | None,
    peak: float,
    flops: float,
    engine: float,
    load_before: tuple,
) -> dict[str, Any]:
    """The result row: headline numbers and ratios first, then the phases, config, machine, date and command.
    A number the run did not measure is None, and so is every ratio built on it."""
    return {
        **_numbers(cfg, measured, baseline, peak, flops, engine),
        "phases": {**measured, "baseline": baseline},
        "config": asdict(cfg),
        "machine": {**machine_info(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": _command_line(),
    }


def _numbers(
    cfg: BenchConfig, measured: dict, baseline: dict | None, peak: float, flops: float, engine: float
) -> dict[str, Any]:
    """The headline numbers, rounded, and every ratio between two numbers of the same run."""
    single, multi, swap = measured["single"], measured["multi"], measured.get("swap") or {}
    cross = measured.get("swap_cross_replica") or {}
    img_s, roofline = single["throughput_img_s"], peak / flops
    baseline_img_s = baseline["throughput_img_s"] if baseline else None
    defaults_img_s = (measured.get("baseline_defaults") or {}).get("throughput_img_s")
    int8_alone = measured.get("int8_engine_img_s")
    fp32_img_s = (measured.get("fp32") or {}).get("throughput_img_s")
    precision = measured.get("precision") or {}
    # the engine alone runs one 1-thread session per core, each busy all the time: its CPU per image is
    # cores / its img/s; what the server spends beyond that goes to HTTP, decode, capture, metrics, hops
    engine_cpu_ms = 1000 * (os.cpu_count() or 1) / (int8_alone or engine)
    server_cpu_ms = single.get("server_cpu_ms_per_img")
    nonengine_cpu_ms = server_cpu_ms - engine_cpu_ms if server_cpu_ms is not None else None
    register_s = sorted(measured.get("register_s") or [])
    return {
        "throughput_img_s": round(img_s, 2),
        "p50_ms": single["p50_ms"],
        "p99_ms": single["p99_ms"],
        "p99_vs_p50": _ratio(single["p99_ms"], single["p50_ms"]),
        "errors": single["errors"] + multi["errors"],
        "baseline_img_s": _round(baseline_img_s),
        "roofline_img_s": round(roofline, 2),
        "throughput_vs_baseline": _ratio(img_s, baseline_img_s),
        "throughput_vs_roofline": _ratio(img_s, roofline),
        "baseline_defaults_img_s": _round(defaults_img_s),
        "throughput_vs_baseline_defaults": _ratio(img_s, defaults_img_s),
        "multi_adapter_img_s": round(multi["throughput_img_s"], 2),
        "multi_adapter_ratio": _ratio(multi["throughput_img_s"], img_s),
        "swap_errors": swap.get("swap_errors"),
        "swap_p99_ms": swap.get("swap_p99_ms"),
        "swap_cross_replica_p99_ms": cross.get("swap_p99_ms"),
        "swap_cross_replica_after_promote_p99_ms": cross.get("swap_after_promote_p99_ms"),
        "swap_cross_replica_errors": cross.get("swap_errors"),
        "database": redact(cfg.database) if cfg.database else "embedded sqlite",
        "artifacts": cfg.artifacts or "local directory",
        "engine": cfg.engine,
        "served_precision": precision.get("precision"),
        "int8_agreement": (precision.get("int8") or {}).get("agreement"),
        "fp32_throughput_img_s": _round(fp32_img_s),
        "throughput_vs_fp32": _ratio(img_s, fp32_img_s),
        "engine_alone_img_s": round(engine, 2),
        "int8_engine_alone_img_s": _round(int8_alone),
        "throughput_vs_engine": _ratio(img_s, int8_alone or engine),  # the bare engine the service runs
        "peak_gflops": round(peak, 1),
        "model_gflops": round(flops, 3),
        "engine_cpu_ms": round(engine_cpu_ms, 2),
        "nonengine_cpu_ms": _round(nonengine_cpu_ms),
        "nonengine_vs_engine_cpu": _ratio(nonengine_cpu_ms, engine_cpu_ms),
        "client_cpu_ms": _round(single.get("client_cpu_ms_per_img")),
        "active_adapters": measured.get("active_adapters"),
        "registered_adapters": measured.get("registered_adapters"),
        "register_s": register_s[len(register_s) // 2] if register_s else None,  # median publish, this run
        "register_max_s": register_s[-1] if register_s else None,
        # not measured yet (issue 14): every loaded version is a whole merged model; cold loads are not timed
        "cold_load_p99_ms": None,
        "loaded_version_mb": None,
    }


def _command_line() -> str:
    """This run's command as the user typed it (`adaptserve ...` or `python -m benchmarks.serve ...`)."""
    prog = Path(sys.argv[0]).name
    args = sys.argv[1:]
    if prog == "adaptserve":
        return shlex.join(["adaptserve", *args])
    return shlex.join(["python", "-m", "benchmarks.serve", *args])


# --- the command -------------------------------------------------------------------------------------------------

QUICK = {"clients": 2, "seconds": 2.0, "adapters": 2, "size": 32, "swap_every": 1.0, "warmup": 0.5, "workers": 1}


def _help(name: str) -> str:
    """The --help text of the option for BenchConfig field `name`: its help, default and --quick value."""
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
    notify: Annotated[bool, typer.Option(help=_help("notify"), show_default=False)] = True,
    targets: Annotated[str, typer.Option(help=_help("targets"), show_default=False)] = "all",
    warmup: Annotated[float | None, typer.Option(help=_help("warmup"), show_default=False)] = None,
    token: Annotated[str | None, typer.Option(help="admin token of --url (default: $ADAPTSERVE_ADMIN_TOKEN)")] = None,
    baseline: Annotated[bool, typer.Option(help=_help("baseline"), show_default=False)] = True,
    fp32: Annotated[bool, typer.Option(help=_help("fp32"), show_default=False)] = True,
    default_baseline: Annotated[
        bool | None, typer.Option(help=f"{_help('default_baseline')[:-1]}; --quick: off)", show_default=False)
    ] = None,
    database: Annotated[str | None, typer.Option(help=_help("database"), show_default=False)] = None,
    artifacts: Annotated[str | None, typer.Option(help=_help("artifacts"), show_default=False)] = None,
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
        notify=notify,
        targets=targets,
        url=url,
        token=token or settings.load().admin_token or TOKEN,
        baseline=baseline,
        fp32=fp32,
        default_baseline=(not quick) if default_baseline is None else default_baseline,
        database=database,
        artifacts=artifacts,
    )
    _check(cfg)
    if cfg.database:
        check_database(cfg.database, console)
    # a plain SIGTERM would skip the `with` blocks that stop the servers this run started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="adaptserve-bench-") as tmp:
        result = run_bench(cfg, Path(tmp))
    out = out_dir if out_dir is not None else (None if quick else RESULTS)
    if out is not None:
        name = "serve-scaleout" if cfg.database else "serve"
        write_results(result, out, name)
        console.log(f"wrote {out / f'{name}.md'} and {out / f'{name}.json'}")
    keep = {k: v for k, v in result.items() if k not in ("phases", "config", "machine", "command")}
    print(json.dumps(keep), flush=True)


def _check(cfg: BenchConfig) -> None:
    """Exit 2 with every problem of `cfg` named by its option, before anything is built or started."""
    problems = []
    if cfg.engine not in ENGINES:
        problems.append(f"--engine {cfg.engine!r}: choose one of {', '.join(ENGINES)}")
    if cfg.targets not in LORA_TARGETS:
        problems.append(f"--targets {cfg.targets!r}: choose one of {', '.join(LORA_TARGETS)}")
    if min(cfg.clients, cfg.adapters, cfg.workers, cfg.per_request) < 1 or cfg.seconds <= 0 or cfg.size < 8:
        problems.append(
            "--clients, --adapters, --workers, --images-per-request must be >= 1, --seconds > 0, --size >= 8"
        )
    if (cfg.database is None) != (cfg.artifacts is None):
        problems.append("--database and --artifacts go together: replicas on one database share one artifact store")
    if cfg.url and cfg.database:
        problems.append("--url drives a running service: its own settings name its stores (no --database/--artifacts)")
    if problems:
        console.print("[red]error:[/red] " + "; ".join(problems))
        raise typer.Exit(2)


if __name__ == "__main__":
    typer.run(command)
