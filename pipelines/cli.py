"""The `adaptserve` command line: the one entry point above every layer.

Commands that train, evaluate and serve live here; the adapter registry's are in pipelines/adapters_cli.py, jobs
and schedules in pipelines/jobs_cli.py, and what they all share (plain help text, defaults from config
dataclasses and settings, the base model) in pipelines/cli_support.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markdown import Markdown
from rich.table import Table

from models import paths, settings
from models.metadata import ModelMeta
from models.strategies import AdaptConfig
from pipelines.adapters_cli import adapters_app
from pipelines.cli_support import (
    base_model,
    build_default_model,
    console,
    fail,
    field_default,
    field_help,
    load_settings,
    make_app,
    progress,
    setting_help,
)
from pipelines.train import TrainConfig

app = make_app("adaptserve: transfer-learned image classifiers that stay accurate in production.")
data_app = make_app("Datasets: export the embedded digits, make shifted target domains.")
app.add_typer(data_app, name="data")
app.add_typer(adapters_app, name="adapters")
WEIGHTS_CHOICES = "imagenet (torchvision's pre-trained weights), none (random init) or a local .safetensors file"


@app.command()
def catalog() -> None:
    """List the supported torchvision backbones (`adaptserve train --backbone NAME`)."""
    from models.catalog import CATALOG  # torchvision's model builders

    table = Table("backbone", "weights", "feature dim", "stages", "input")
    for column in table.columns:
        column.overflow = "fold"  # a narrow terminal wraps a cell; it never cuts one short with an ellipsis
    for spec in CATALOG.values():
        crop = spec.imagenet_preprocessing().crop_size
        table.add_row(
            spec.name, spec.default_weights.name, str(spec.feature_dim), str(len(spec.stages)), f"{crop} (ImageNet)"
        )
    console.print(table)
    console.print(
        "weights: what `train --backbone NAME --weights imagenet` loads, a member of the backbone's torchvision "
        "weights enum (e.g. ResNet50_Weights.IMAGENET1K_V2)",
        highlight=False,
    )


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
    out = out or paths.default_model_dir()
    if (out / "model.json").exists() and not force:
        console.print(f"source model already at {out} (use --force to rebuild)")
        return
    path, meta = build_default_model(out, backbone, epochs, seed)
    acc = meta.scores("test")["accuracy"]
    console.print(f"source model [bold]{path}[/bold]: test accuracy {acc:.3f} in {meta.fit['seconds']:.1f}s")


def _target_data(data: Path | None, shift: str, severity: int, per_class: int, seed: int):
    # loaded by this command only: every other command starts without it
    from pipelines.compare import CompareConfig, default_target
    from pipelines.data import DataError, load_image_folder

    if data is None:
        return default_target(CompareConfig(shift=shift, severity=severity, per_class=per_class, seed=seed))
    try:
        target = load_image_folder(data, seed=seed)
    except DataError as err:
        fail(str(err))
    if target.train.skipped:
        console.print(f"[yellow]skipped {len(target.train.skipped)} unreadable image(s)[/yellow]")
    return target, None


def _backbone_base(backbone: str, weights: str, classes: list[str], seed: int) -> Path:
    """The base model dir of a torchvision backbone for `classes` under $ADAPTSERVE_HOME/models, built if missing."""
    from models.catalog import CATALOG, WeightsUnavailableError, get_spec  # torchvision
    from models.pretrained import LOCAL_SUFFIXES, base_name, pretrained_base

    if backbone not in CATALOG:
        fail(f"--backbone {backbone!r}: choose one of {', '.join(CATALOG)} (`adaptserve catalog`)")
    members = [w.name for w in get_spec(backbone).weights_enum]
    if weights not in ("imagenet", "none", *members) and Path(weights).suffix not in LOCAL_SUFFIXES:
        fail(f"--weights {weights!r}: choose {WEIGHTS_CHOICES} (or one of {', '.join(members)})")
    try:
        path = pretrained_base(paths.models_dir() / base_name(backbone, weights, classes), backbone, weights, classes,
                               seed)
    except WeightsUnavailableError as err:
        fail(str(err))
    console.print(f"base model {path}: register its adapters with --base {path}, serve them with "
                  f"ADAPTSERVE_BASE_MODEL={path}", highlight=False, soft_wrap=True)
    return path


def _t(name: str) -> Any:
    """An option mirroring TrainConfig.`name`: its help from the field (pair it with `field_default`)."""
    return typer.Option(help=field_help(TrainConfig, name))


def _a(name: str) -> Any:
    """An option mirroring AdaptConfig.`name`."""
    return typer.Option(help=field_help(AdaptConfig, name))


@app.command()
def train(
    strategy: Annotated[str, _a("strategy")] = field_default(AdaptConfig, "strategy"),
    data: Annotated[
        Path | None, typer.Option(help="target ImageFolder (train/val/test or one folder) [default: shifted digits]")
    ] = None,
    base: Annotated[
        Path | None, typer.Option(help="source model dir [default: $ADAPTSERVE_BASE_MODEL, else the embedded digits "
                                  "model]")
    ] = None,
    backbone: Annotated[
        str | None,
        typer.Option(help="instead of --base: a torchvision backbone from `adaptserve catalog`, saved once per "
                     "class set as a base model under $ADAPTSERVE_HOME/models/<backbone>-<weights>-<classes digest>"),
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help=f"with --backbone: {WEIGHTS_CHOICES} [default: imagenet]")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="output dir [default: $ADAPTSERVE_HOME/runs/<strategy>-<time>]")
    ] = None,
    shift: Annotated[str, typer.Option(help="default target only: shift name")] = "gaussian_noise",
    severity: Annotated[int, typer.Option(help="default target only: severity 1..5")] = 5,
    per_class: Annotated[int, typer.Option(help="default target only: labelled images per class")] = 5,
    epochs: Annotated[int, _t("epochs")] = field_default(TrainConfig, "epochs"),
    batch_size: Annotated[int, _t("batch_size")] = field_default(TrainConfig, "batch_size"),
    optimizer: Annotated[str, _t("optimizer")] = field_default(TrainConfig, "optimizer"),
    schedule: Annotated[str, _t("schedule")] = field_default(TrainConfig, "schedule"),
    patience: Annotated[int, _t("patience")] = field_default(TrainConfig, "patience"),
    label_smoothing: Annotated[float, _t("label_smoothing")] = field_default(TrainConfig, "label_smoothing"),
    augment: Annotated[
        str, typer.Option(help="preset (none, light, standard) or list of crop,rotate,flip,jitter")
    ] = "light",
    lr_head: Annotated[float, _a("lr_head")] = field_default(AdaptConfig, "lr_head"),
    lr_backbone_max: Annotated[float, _a("lr_backbone_max")] = field_default(AdaptConfig, "lr_backbone_max"),
    lr_backbone_min: Annotated[float, _a("lr_backbone_min")] = field_default(AdaptConfig, "lr_backbone_min"),
    freeze_stages: Annotated[int, _a("freeze_stages")] = field_default(AdaptConfig, "freeze_stages"),
    full_unfreeze_epochs: Annotated[int, _a("full_unfreeze_epochs")] = field_default(
        AdaptConfig, "full_unfreeze_epochs"
    ),
    unfreeze_every: Annotated[int, _a("unfreeze_every")] = field_default(AdaptConfig, "unfreeze_every"),
    lora_r: Annotated[int, _a("lora_r")] = field_default(AdaptConfig, "lora_r"),
    lora_alpha: Annotated[int, _a("lora_alpha")] = field_default(AdaptConfig, "lora_alpha"),
    lora_targets: Annotated[str, _a("lora_targets")] = field_default(AdaptConfig, "lora_targets"),
    lora_lr: Annotated[float, _a("lora_lr")] = field_default(AdaptConfig, "lora_lr"),
    head_dropout: Annotated[float, _a("head_dropout")] = field_default(AdaptConfig, "head_dropout"),
    seed: Annotated[int, _t("seed")] = field_default(TrainConfig, "seed"),
    device: Annotated[str, _t("device")] = field_default(TrainConfig, "device"),
) -> None:
    """Adapt a source model to a target domain with one strategy; save the artifact, metrics and confusion matrix.

    The JSON summary printed last names the run dir (`out`), which `adaptserve adapters register` takes."""
    from pipelines.adapt import adapt_model  # torch and peft

    if backbone and base:
        fail("give --base (adapt an existing base model) or --backbone (build one from torchvision), not both")
    if weights is not None and not backbone:
        fail("--weights goes with --backbone: the weights of the torchvision backbone to build the base from")
    try:
        adapt_cfg = AdaptConfig(
            strategy=strategy, lr_head=lr_head, lr_backbone_max=lr_backbone_max, lr_backbone_min=lr_backbone_min,
            freeze_stages=freeze_stages, full_unfreeze_epochs=full_unfreeze_epochs, unfreeze_every=unfreeze_every,
            lora_r=lora_r, lora_alpha=lora_alpha, lora_targets=lora_targets, lora_lr=lora_lr,
            head_dropout=head_dropout,
        )
        train_cfg = TrainConfig(
            epochs=epochs, batch_size=batch_size, optimizer=optimizer, schedule=schedule, patience=patience,
            label_smoothing=label_smoothing, seed=seed, device=device,
        )
    except ValueError as err:
        fail(str(err))
    target, source = _target_data(data, shift, severity, per_class, seed)
    if backbone:
        base = _backbone_base(backbone, weights or "imagenet", target.classes, seed)
    else:
        base = base_model(base)
    out = out or paths.home() / "runs" / f"{strategy}-{time.strftime('%Y%m%d-%H%M%S')}"
    with progress() as bar:
        result = adapt_model(base, target, out, adapt_cfg, train_cfg, source, augment=augment, progress=bar)
    console.print_json(json.dumps(result.summary()))


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="model dir (model.json) or adapter dir (metadata.json)")],
    data: Annotated[
        Path | None, typer.Option(help="ImageFolder to evaluate on [default: the digits test split]")
    ] = None,
    base: Annotated[
        Path | None,
        typer.Option(help="base model dir, for an adapter [default: $ADAPTSERVE_BASE_MODEL, else embedded model]"),
    ] = None,
    split: Annotated[str, typer.Option(help="train, val or test")] = "test",
    confusion: Annotated[Path | None, typer.Option(help="write the confusion matrix PNG here")] = None,
) -> None:
    """Accuracy, macro precision/recall/F1 and per-class report of a model or adapter on a dataset."""
    from pipelines.adapt import load_for_inference  # torch and peft
    from pipelines.data import DataError, digits_splits, load_image_folder
    from pipelines.evaluate import evaluate as run
    from pipelines.evaluate import save_confusion_png

    net, meta, prep = load_for_inference(model, base or load_settings().base_model or paths.default_model_dir())
    try:
        splits = load_image_folder(data) if data else digits_splits(32)
    except DataError as err:
        fail(str(err))
    dataset = getattr(splits, split).with_transform(prep.eval_transform())
    if tuple(splits.classes) != meta.classes:
        fail(f"data classes {splits.classes} differ from the model's {list(meta.classes)}")
    metrics = run(net, dataset, splits.classes)
    if confusion:
        save_confusion_png(metrics, splits.classes, confusion)
    console.print_json(json.dumps({**metrics.summary(), "per_class": metrics.per_class}))


@app.command()
def compare(
    out: Annotated[Path, typer.Option(help="where compare.md / compare.json go")] = Path("benchmarks/results"),
    base: Annotated[
        Path | None, typer.Option(help="source model dir [default: $ADAPTSERVE_BASE_MODEL, else embedded model]")
    ] = None,
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
    # loaded by this command only: every other command starts without it
    from pipelines.compare import CompareConfig, check_expectations, run_compare, write_report

    cfg = CompareConfig(
        shift=shift,
        severity=severity,
        per_class=per_class,
        epochs=epochs,
        seed=seed,
        strategies=tuple(s.strip() for s in strategies.split(",")),
    )
    base = base_model(base)
    with progress() as bar:
        rows = run_compare(base, paths.home() / "compare", cfg, progress=bar)
    md, js = write_report(rows, cfg, out, ModelMeta.read(base).model_id)
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
    """Write the embedded digits source domain as ImageFolder train/val/test (OUT/<split>/<class>/<index>.png)."""
    # loaded by this command only: every other command starts without it
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
    # loaded by this command only: every other command starts without it
    from pipelines.data import SPLITS, DataError, scan_class_folder, write_image_folder
    from pipelines.shifts import shift_set

    try:
        parts = [s for s in SPLITS if (src / s).is_dir()] or [""]
        sets = {p: shift_set(scan_class_folder(src / p), shift, severity, seed + k) for k, p in enumerate(parts)}
    except (DataError, ValueError) as err:
        fail(str(err))
    write_image_folder(sets, dst)
    console.print(f"wrote {sum(len(s) for s in sets.values())} images shifted by {shift}@{severity} to {dst}")


def _announce_tokens(home: Path, cfg: settings.Settings) -> None:
    """Without any configured token, create `<home>/tokens` (admin + labeller, mode 0600) and print them once."""
    # loaded by this command only: every other command starts without it
    from service.auth import ENV_TOKENS, generate_tokens, tokens_file_path

    path = tokens_file_path(home)
    fields = [name.removeprefix(settings.PREFIX).lower() for names in ENV_TOKENS.values() for name in names]
    if any(getattr(cfg, field) for field in fields):
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
    workers: Annotated[int | None, typer.Option(min=1, help=setting_help("workers"))] = None,
    engine: Annotated[str | None, typer.Option(help=setting_help("engine"))] = None,
) -> None:
    """Start the prediction service (builds the embedded default model first if missing)."""
    # loaded by this command only: every other command starts without it
    import signal
    import subprocess
    import sys

    cfg = load_settings()
    engine = engine or cfg.engine
    if engine not in settings.ENGINES:
        fail(f"--engine {engine!r}: choose one of {', '.join(settings.ENGINES)}")
    base = base_model()
    env = dict(
        os.environ,
        ADAPTSERVE_HOME=str(paths.home().absolute()),
        ADAPTSERVE_BASE_MODEL=str(base.absolute()),
        ADAPTSERVE_ENGINE=engine,
        ADAPTSERVE_WORKERS=str(workers or cfg.workers),
    )
    _announce_tokens(paths.home(), cfg)
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
    token: Annotated[
        str | None, typer.Option(help="admin token of --url [default: $ADAPTSERVE_ADMIN_TOKEN]")
    ] = None,
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
    # loaded by this command only: every other command starts without it
    from benchmarks.demo import DemoConfig
    from benchmarks.demo import demo as run

    token = token or load_settings().admin_token or None
    if url and not token:
        fail("--url needs the service's admin token (--token or ADAPTSERVE_ADMIN_TOKEN) to register the adapter")
    cfg = DemoConfig(shift=shift, severity=severity, feedback_fraction=feedback, clean_requests=clean_requests,
                     timeout_s=timeout)
    result = run(url, token, base_model(), cfg, out, say=console.print, host=host, port=port)
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


from pipelines.labels_cli import data_add, data_conflicts, labels_app  # noqa: E402


def _add_bench_commands() -> None:
    """`adaptserve bench ...` from benchmarks/, which a source checkout has and the Bento does not ship: in a
    Bento (or any install without it) the CLI has every other command and no `bench`."""
    try:
        # the CLI is the one entry point above every layer, benchmarks included (lint-imports allows this one)
        from benchmarks import drift as bench_drift
        from benchmarks import retrain as bench_retrain
        from benchmarks import serve as bench_serve
    except ModuleNotFoundError as err:
        if err.name != "benchmarks":
            raise
        return
    bench_app = make_app("Benchmarks: results in benchmarks/results/, one JSON line last.")
    app.add_typer(bench_app, name="bench")
    bench_app.command("serve")(bench_serve.command)
    bench_app.command("drift")(bench_drift.command)
    bench_app.command("retrain")(bench_retrain.command)


_add_bench_commands()
app.add_typer(labels_app, name="labels")
data_app.command("add")(data_add)
data_app.command("conflicts")(data_conflicts)


bento_app = make_app("Package the service as a Bento (BentoML's deployable unit).")
app.add_typer(bento_app, name="bento")


def import_base_to_bentoml(base: Path) -> str:
    """Copy the base model dir into BentoML's model store as adaptserve-base (a new version only if it changed)."""
    # loaded by this command only: every other command starts without it
    import shutil

    # loaded by this command only: every other command starts without it
    import bentoml

    # loaded by this command only: every other command starts without it
    from service.config import BENTO_MODEL

    meta = ModelMeta.read(base)
    try:
        latest = bentoml.models.get(f"{BENTO_MODEL}:latest")
        if latest.info.metadata.get("sha256") == meta.sha256:
            return str(latest.tag)
    except bentoml.exceptions.NotFound:
        pass
    with bentoml.models.create(BENTO_MODEL, metadata={"sha256": meta.sha256, "source": str(base)}) as m:
        shutil.copytree(base, m.path, dirs_exist_ok=True)
    return str(m.tag)


@bento_app.command("build")
def bento_build() -> None:
    """Import the base model into BentoML's model store and run `bentoml build` (bentofile.yaml)."""
    # loaded by this command only: every other command starts without it
    import subprocess
    import sys

    tag = import_base_to_bentoml(base_model())
    console.print(f"base model in BentoML's store: {tag}")
    root = Path(__file__).resolve().parent.parent
    raise typer.Exit(subprocess.call([sys.executable, "-m", "bentoml", "build", "-f", "bentofile.yaml"], cwd=root))


if __name__ == "__main__":
    app()
