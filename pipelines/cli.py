"""The `adaptserve` command line."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from models import paths
from models.strategies import AdaptConfig
from pipelines.train import TrainConfig

app = typer.Typer(
    help="adaptserve: transfer-learned image classifiers that stay accurate in production.", no_args_is_help=True
)
data_app = typer.Typer(help="Datasets: export the embedded digits, make shifted target domains.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()


def _help(cls: type, name: str) -> str:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return str(f.metadata.get("help", ""))


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


@app.command()
def catalog() -> None:
    """List the supported torchvision backbones."""
    from models.catalog import CATALOG

    table = Table("backbone", "weights", "feature dim", "stages", "input")
    for spec in CATALOG.values():
        table.add_row(
            spec.name, str(spec.default_weights), str(spec.feature_dim), str(len(spec.stages)), "224 (ImageNet)"
        )
    console.print(table)


@app.command()
def pretrain(
    out: Annotated[
        Path | None, typer.Option(help="where to store the model [default: $ADAPTSERVE_HOME/models/digits-resnet18]")
    ] = None,
    backbone: Annotated[str, typer.Option(help="catalog backbone to train from scratch")] = "resnet18",
    epochs: Annotated[int, typer.Option(help="training epochs")] = 6,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    force: Annotated[bool, typer.Option(help="rebuild even if the model exists")] = False,
) -> None:
    """Train the embedded source model on scikit-learn's bundled digits (no download)."""
    from pipelines.adapt import pretrain as run

    out = out or paths.default_model_dir()
    if (out / "model.json").exists() and not force:
        console.print(f"source model already at {out} (use --force to rebuild)")
        return
    with _progress() as progress:
        path, meta = run(
            out, backbone, TrainConfig(epochs=epochs, batch_size=32, patience=3, seed=seed), progress=progress
        )
    acc = meta["metrics"]["test"]["accuracy"]
    console.print(f"source model [bold]{path}[/bold]: test accuracy {acc:.3f} in {meta['fit']['seconds']:.1f}s")


def _target_data(data: Path | None, shift: str, severity: int, per_class: int, seed: int):
    from pipelines.compare import CompareConfig, default_target
    from pipelines.data import DataError, load_image_folder

    if data is None:
        return default_target(CompareConfig(shift=shift, severity=severity, per_class=per_class, seed=seed))
    try:
        target = load_image_folder(data, seed=seed)
    except DataError as err:
        _fail(str(err))
    if target.train.skipped:
        console.print(f"[yellow]skipped {len(target.train.skipped)} unreadable image(s)[/yellow]")
    return target, None


@app.command()
def train(
    strategy: Annotated[str, typer.Option(help=_help(AdaptConfig, "strategy"))] = "lora",
    data: Annotated[
        Path | None, typer.Option(help="target ImageFolder (train/val/test or one folder) [default: shifted digits]")
    ] = None,
    base: Annotated[Path | None, typer.Option(help="source model dir [default: the embedded digits model]")] = None,
    out: Annotated[
        Path | None, typer.Option(help="output dir [default: $ADAPTSERVE_HOME/runs/<strategy>-<time>]")
    ] = None,
    shift: Annotated[str, typer.Option(help="default target only: shift name")] = "gaussian_noise",
    severity: Annotated[int, typer.Option(help="default target only: severity 1..5")] = 5,
    per_class: Annotated[int, typer.Option(help="default target only: labelled images per class")] = 5,
    epochs: Annotated[int, typer.Option(help=_help(TrainConfig, "epochs"))] = 15,
    batch_size: Annotated[int, typer.Option(help=_help(TrainConfig, "batch_size"))] = 32,
    optimizer: Annotated[str, typer.Option(help=_help(TrainConfig, "optimizer"))] = "adamw",
    schedule: Annotated[str, typer.Option(help=_help(TrainConfig, "schedule"))] = "cosine",
    patience: Annotated[int, typer.Option(help=_help(TrainConfig, "patience"))] = 4,
    label_smoothing: Annotated[float, typer.Option(help=_help(TrainConfig, "label_smoothing"))] = 0.0,
    augment: Annotated[
        str, typer.Option(help="preset (none, light, standard) or list of crop,rotate,flip,jitter")
    ] = "light",
    lr_head: Annotated[float, typer.Option(help=_help(AdaptConfig, "lr_head"))] = 1e-3,
    lr_backbone_max: Annotated[float, typer.Option(help=_help(AdaptConfig, "lr_backbone_max"))] = 1e-4,
    lr_backbone_min: Annotated[float, typer.Option(help=_help(AdaptConfig, "lr_backbone_min"))] = 1e-5,
    freeze_stages: Annotated[int, typer.Option(help=_help(AdaptConfig, "freeze_stages"))] = 2,
    full_unfreeze_epochs: Annotated[int, typer.Option(help=_help(AdaptConfig, "full_unfreeze_epochs"))] = 0,
    unfreeze_every: Annotated[int, typer.Option(help=_help(AdaptConfig, "unfreeze_every"))] = 1,
    lora_r: Annotated[int, typer.Option(help=_help(AdaptConfig, "lora_r"))] = 8,
    lora_alpha: Annotated[int, typer.Option(help=_help(AdaptConfig, "lora_alpha"))] = 16,
    lora_targets: Annotated[str, typer.Option(help=_help(AdaptConfig, "lora_targets"))] = "all",
    lora_lr: Annotated[float, typer.Option(help=_help(AdaptConfig, "lora_lr"))] = 5e-3,
    head_dropout: Annotated[float, typer.Option(help="dropout before the new head's linear layer")] = 0.0,
    seed: Annotated[int, typer.Option(help=_help(TrainConfig, "seed"))] = 0,
    device: Annotated[str, typer.Option(help=_help(TrainConfig, "device"))] = "auto",
) -> None:
    """Adapt a source model to a target domain with one strategy; save the artifact, metrics and confusion matrix."""
    from pipelines.adapt import adapt_model

    try:
        adapt_cfg = AdaptConfig(
            strategy=strategy,
            lr_head=lr_head,
            lr_backbone_max=lr_backbone_max,
            lr_backbone_min=lr_backbone_min,
            freeze_stages=freeze_stages,
            full_unfreeze_epochs=full_unfreeze_epochs,
            unfreeze_every=unfreeze_every,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            lora_targets=lora_targets,
            lora_lr=lora_lr,
            head_dropout=head_dropout,
        )
        train_cfg = TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            optimizer=optimizer,
            schedule=schedule,
            patience=patience,
            label_smoothing=label_smoothing,
            seed=seed,
            device=device,
        )
    except ValueError as err:
        _fail(str(err))
    base = base or _ensure_default_model()
    target, source = _target_data(data, shift, severity, per_class, seed)
    out = out or paths.home() / "runs" / f"{strategy}-{time.strftime('%Y%m%d-%H%M%S')}"
    with _progress() as progress:
        result = adapt_model(base, target, out, adapt_cfg, train_cfg, source, augment=augment, progress=progress)
    console.print_json(json.dumps(result.summary()))


def _ensure_default_model() -> Path:
    path = paths.default_model_dir()
    if not (path / "model.json").exists():
        console.print(f"embedded source model missing: building it at {path} (about a minute)")
        pretrain(out=path, backbone="resnet18", epochs=6, seed=0, force=False)
    return path


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="model dir (model.json) or adapter dir (metadata.json)")],
    data: Annotated[
        Path | None, typer.Option(help="ImageFolder to evaluate on [default: the digits test split]")
    ] = None,
    base: Annotated[Path | None, typer.Option(help="base model dir, for an adapter [default: embedded model]")] = None,
    split: Annotated[str, typer.Option(help="train, val or test")] = "test",
    confusion: Annotated[Path | None, typer.Option(help="write the confusion matrix PNG here")] = None,
) -> None:
    """Accuracy, macro precision/recall/F1 and per-class report of a model or adapter on a dataset."""
    from pipelines.adapt import load_for_inference
    from pipelines.data import DataError, digits_splits, load_image_folder
    from pipelines.evaluate import evaluate as run
    from pipelines.evaluate import save_confusion_png

    net, meta, prep = load_for_inference(model, base or paths.default_model_dir())
    try:
        splits = load_image_folder(data) if data else digits_splits(32)
    except DataError as err:
        _fail(str(err))
    dataset = getattr(splits, split).with_transform(prep.eval_transform())
    if splits.classes != meta["classes"]:
        _fail(f"data classes {splits.classes} differ from the model's {meta['classes']}")
    metrics = run(net, dataset, splits.classes)
    if confusion:
        save_confusion_png(metrics, splits.classes, confusion)
    console.print_json(json.dumps({**metrics.summary(), "per_class": metrics.per_class}))


@app.command()
def compare(
    out: Annotated[Path, typer.Option(help="where compare.md / compare.json go")] = Path("benchmarks/results"),
    base: Annotated[Path | None, typer.Option(help="source model dir [default: embedded digits model]")] = None,
    shift: Annotated[str, typer.Option(help="target domain shift")] = "gaussian_noise",
    severity: Annotated[int, typer.Option(help="shift severity 1..5")] = 5,
    per_class: Annotated[int, typer.Option(help="labelled target images per class")] = 5,
    epochs: Annotated[int, typer.Option(help="max epochs per strategy")] = 15,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    strategies: Annotated[str, typer.Option(help="comma list of strategies")] = ",".join(
        ["feature-extraction", "finetune", "gradual-unfreeze", "lora", "scratch"]
    ),
) -> None:
    """Run every strategy on the same source model and target data; write compare.md and compare.json."""
    from models.artifacts import model_id, read_json
    from pipelines.compare import CompareConfig, check_expectations, run_compare, write_report

    cfg = CompareConfig(
        shift=shift,
        severity=severity,
        per_class=per_class,
        epochs=epochs,
        seed=seed,
        strategies=tuple(s.strip() for s in strategies.split(",")),
    )
    base = base or _ensure_default_model()
    with _progress() as progress:
        rows = run_compare(base, paths.home() / "compare", cfg, progress=progress)
    md, js = write_report(rows, cfg, out, model_id(read_json(base / "model.json")))
    console.print(Markdown(md.read_text()))
    failed = [c for c in check_expectations(rows) if not c["ok"]]
    console.print(
        f"wrote {md} and {js}" + (f"; [yellow]{len(failed)} expectation(s) failed[/yellow]" if failed else "")
    )


@data_app.command("export-digits")
def export_digits(
    out: Annotated[Path, typer.Argument(help="destination ImageFolder root")],
    size: Annotated[int, typer.Option(help="image side, px")] = 32,
) -> None:
    """Write the embedded digits source domain as ImageFolder train/val/test."""
    from pipelines.data import digits_splits, write_image_folder

    write_image_folder(digits_splits(size), out)
    console.print(f"wrote digits to {out}")


@data_app.command("make-shift")
def make_shift(
    src: Annotated[Path, typer.Argument(help="source ImageFolder (with or without train/val/test)")],
    dst: Annotated[Path, typer.Argument(help="destination ImageFolder")],
    shift: Annotated[
        str, typer.Option(help="gaussian_noise, defocus_blur, contrast, brightness, rotation, invert")
    ] = "gaussian_noise",
    severity: Annotated[int, typer.Option(help="1..5")] = 3,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """Write a shifted copy of an ImageFolder (ImageNet-C style corruption)."""
    from pipelines.data import SPLITS, DataError, scan_class_folder, write_image_folder
    from pipelines.shifts import shift_set

    try:
        parts = [s for s in SPLITS if (src / s).is_dir()] or [""]
        sets = {p: shift_set(scan_class_folder(src / p), shift, severity, seed + k) for k, p in enumerate(parts)}
    except (DataError, ValueError) as err:
        _fail(str(err))
    write_image_folder(sets, dst)
    console.print(f"wrote {sum(len(s) for s in sets.values())} images shifted by {shift}@{severity} to {dst}")


def _announce_tokens(home: Path) -> None:
    """Without any configured token, create `<home>/tokens` (admin + labeller, mode 0600) and print them once."""
    from service.auth import ENV_TOKENS, generate_tokens, tokens_file_path

    path = tokens_file_path(home)
    if any(os.environ.get(v) for names in ENV_TOKENS.values() for v in names):
        console.print("tokens: from the environment" + (f" and {path}" if path.is_file() else ""))
    elif path.is_file():
        console.print(f"tokens: {path} (roles and tokens, one per line)")
    else:
        tokens = generate_tokens(path)
        console.print(f"generated tokens in {path} (kept across restarts; edit the file to rotate):")
        for role, token in tokens.items():
            console.print(f"  {role:9s} [bold]{token}[/bold]")


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="HTTP port")] = 3000,
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    workers: Annotated[int, typer.Option(help="BentoML worker processes (all share the registry)")] = 1,
    engine: Annotated[
        str | None, typer.Option(help="onnx, onnx-int8 or torch (default: ADAPTSERVE_ENGINE, else onnx)")
    ] = None,
) -> None:
    """Start the prediction service (builds the embedded default model first if missing)."""
    import signal
    import subprocess
    import sys

    from service.config import ENGINES

    engine = engine or os.environ.get("ADAPTSERVE_ENGINE") or "onnx"
    if engine not in ENGINES:
        _fail(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    base = Path(os.environ.get("ADAPTSERVE_BASE_MODEL") or _ensure_default_model())
    env = dict(
        os.environ,
        ADAPTSERVE_HOME=str(paths.home().absolute()),
        ADAPTSERVE_BASE_MODEL=str(base.absolute()),
        ADAPTSERVE_ENGINE=engine,
        ADAPTSERVE_WORKERS=str(workers),
    )
    _announce_tokens(paths.home())
    url = f"http://{host}:{port}"
    console.print(
        f"predict   POST {url}/predict\ndashboard GET  {url}/dashboard\nmetrics   GET  {url}/metrics\n"
        f"adapters  GET  {url}/adapters\ndocs      {url}/docs\nstate     {paths.home()}"
    )
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "service.serve", "--host", host, "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=root, env=env)
    # `kill <this pid>` must stop the server too (it stops the job runner it started on its way down)
    signal.signal(signal.SIGTERM, lambda sig, _frame: proc.send_signal(sig))
    signal.signal(signal.SIGINT, lambda sig, _frame: proc.send_signal(sig))
    raise typer.Exit(proc.wait())


@app.command()
def demo(
    url: Annotated[str | None, typer.Option(help="a running service; default: start one in a temp state dir")] = None,
    token: Annotated[str | None, typer.Option(envvar="ADAPTSERVE_ADMIN_TOKEN", help="admin token of --url")] = None,
    shift: Annotated[str, typer.Option(help="how the site's camera degrades")] = "gaussian_noise",
    severity: Annotated[int, typer.Option(min=1, max=5, help="shift severity 1-5")] = 3,
    feedback: Annotated[float, typer.Option(min=0.0, max=1.0, help="fraction of predictions labelled")] = 0.5,
    clean_requests: Annotated[int, typer.Option(help="requests of clean traffic first")] = 200,
    out: Annotated[Path, typer.Option(help="where demo-report.html and demo-chart.png go")] = Path("."),
    timeout: Annotated[
        float, typer.Option(help="longest wait, in seconds, for the promotion or the gate's rejection")
    ] = 420.0,
    host: Annotated[str, typer.Option(help="bind address of the demo's own service")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="port of the demo's own service [default: a free one]")] = None,
) -> None:
    """The whole loop: clean traffic, a degrading camera, drift, a retrain job, promotion, recovery.

    Exit status: 0 promoted, 3 the gate rejected the challenger, 1 the job failed or the time limit was reached
    (the output says what it was still waiting for)."""
    from benchmarks.demo import DemoConfig
    from benchmarks.demo import demo as run

    if url and not token:
        _fail("--url needs the service's admin token (--token or ADAPTSERVE_ADMIN_TOKEN) to register the adapter")
    base = Path(os.environ.get("ADAPTSERVE_BASE_MODEL") or _ensure_default_model())
    cfg = DemoConfig(shift=shift, severity=severity, feedback_fraction=feedback, clean_requests=clean_requests,
                     timeout_s=timeout)
    result = run(url, token, base, cfg, out, say=console.print, host=host, port=port)
    result.pop("timeline")
    if result.get("waiting_for"):
        console.print(f"[yellow]time limit reached ({timeout:g} s):[/yellow] {result['waiting_for']}")
    console.print(f"outcome: {result['outcome']}  report: {result['report']}  chart: {result['chart']}")
    print(json.dumps(result))
    raise typer.Exit({"promoted": 0, "rejected": 3}.get(result["outcome"], 1))


from pipelines.jobs_cli import jobs_app, retrain_command, schedules_app  # noqa: E402 - light: no torch at import

app.add_typer(jobs_app, name="jobs")
app.add_typer(schedules_app, name="schedules")
from pipelines.db_cli import app as db_app  # noqa: E402 - light: no torch at import

app.add_typer(db_app, name="db")
app.command("retrain")(retrain_command)


from benchmarks import drift as bench_drift  # noqa: E402 - the CLI is the one entry point above every layer
from benchmarks import retrain as bench_retrain  # noqa: E402
from benchmarks import serve as bench_serve  # noqa: E402
from pipelines.labels_cli import data_add, data_conflicts  # noqa: E402

bench_app = typer.Typer(help="Benchmarks: results in benchmarks/results/, one JSON line last.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
bench_app.command("serve")(bench_serve.command)
bench_app.command("drift")(bench_drift.command)
bench_app.command("retrain")(bench_retrain.command)
data_app.command("add")(data_add)
data_app.command("conflicts")(data_conflicts)


bento_app = typer.Typer(help="Package the service as a Bento (BentoML's deployable unit).", no_args_is_help=True)
app.add_typer(bento_app, name="bento")


def import_base_to_bentoml(base: Path) -> str:
    """Copy the base model dir into BentoML's model store as adaptserve-base (a new version only if it changed)."""
    import shutil

    import bentoml

    from models.artifacts import read_json
    from service.config import BENTO_MODEL

    meta = read_json(base / "model.json")
    try:
        latest = bentoml.models.get(f"{BENTO_MODEL}:latest")
        if latest.info.metadata.get("sha256") == meta.get("sha256"):
            return str(latest.tag)
    except bentoml.exceptions.NotFound:
        pass
    with bentoml.models.create(BENTO_MODEL, metadata={"sha256": meta.get("sha256"), "source": str(base)}) as m:
        shutil.copytree(base, m.path, dirs_exist_ok=True)
    return str(m.tag)


@bento_app.command("build")
def bento_build() -> None:
    """Import the base model into BentoML's model store and run `bentoml build` (bentofile.yaml)."""
    import subprocess
    import sys

    base = Path(os.environ.get("ADAPTSERVE_BASE_MODEL") or _ensure_default_model())
    tag = import_base_to_bentoml(base)
    console.print(f"base model in BentoML's store: {tag}")
    root = Path(__file__).resolve().parent.parent
    raise typer.Exit(subprocess.call([sys.executable, "-m", "bentoml", "build", "-f", "bentofile.yaml"], cwd=root))


adapters_app = typer.Typer(
    help="The adapter registry: list, register, promote, rollback, delete.", no_args_is_help=True
)
app.add_typer(adapters_app, name="adapters")


def _registry():
    from models.registry import open_registry

    return open_registry(paths.home())


@adapters_app.command("list")
def adapters_list() -> None:
    """Every adapter with its versions and champion."""
    table = Table("adapter", "version", "champion", "created", "target acc")
    for info in _registry().list_adapters():
        for v in info.versions:
            acc = ((v.metadata.get("metrics") or {}).get("target_test") or {}).get("accuracy")
            table.add_row(
                info.name,
                str(v.version),
                "*" if v.is_champion else "",
                str(v.created_at),
                "" if acc is None else f"{acc:.3f}",
            )
    console.print(table)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM handler: leave through SystemExit(128 + 15), so `with` and `finally` blocks clean up (the default
    action ends the process on the spot and leaves its staging dir to the next sweep)."""
    raise SystemExit(128 + signum)


@adapters_app.command("register")
def adapters_register(
    name: Annotated[str, typer.Argument(help="adapter name: [a-z0-9][a-z0-9-_]{0,63}")],
    src: Annotated[
        Path, typer.Argument(help="PEFT adapter dir (adapter_config.json, adapter_model.safetensors, metadata.json)")
    ],
    base: Annotated[Path | None, typer.Option(help="base model dir [default: embedded model]")] = None,
    promote: Annotated[bool, typer.Option(help="make it the champion right away")] = False,
) -> None:
    """Check an adapter against the base, build its verified ONNX model, and register it as a new version."""
    import signal

    from models.artifacts import ArtifactError
    from models.registry import RegistryError
    from pipelines.release import publish

    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        v = publish(_registry(), name, src, base or _ensure_default_model(), promote)
    except (ArtifactError, RegistryError, ValueError) as err:
        _fail(str(err))
    finally:
        signal.signal(signal.SIGTERM, previous)
    console.print(f"registered {name} v{v.version}" + (" (champion)" if v.is_champion else ""))


@adapters_app.command("promote")
def adapters_promote(name: str, version: int) -> None:
    """Make VERSION the champion of NAME (running services swap it in within a second)."""
    from models.registry import RegistryError

    try:
        _registry().promote(name, version)
    except RegistryError as err:
        _fail(str(err))
    console.print(f"{name}: champion is now v{version}")


@adapters_app.command("rollback")
def adapters_rollback(name: str) -> None:
    """Make the previous champion of NAME the champion again."""
    from models.registry import RegistryError

    try:
        v = _registry().rollback(name)
    except RegistryError as err:
        _fail(str(err))
    console.print(f"{name}: rolled back to v{v.version}")


@adapters_app.command("delete")
def adapters_delete(name: str, version: int) -> None:
    """Delete a version (never the champion)."""
    from models.registry import RegistryError

    try:
        _registry().delete(name, version)
    except RegistryError as err:
        _fail(str(err))
    console.print(f"deleted {name} v{version}")


if __name__ == "__main__":
    app()
