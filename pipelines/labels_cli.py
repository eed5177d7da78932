"""`adaptserve data add` and `adaptserve data conflicts`: a labelled folder into the label store, and the labels that
contradict each other. Registered by pipelines/cli.py under `adaptserve data`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from models import paths
from models.metadata import ArtifactError, ModelMeta
from pipelines.data import DataError
from pipelines.labels import LabelError, LabelStore, shorten


def data_add(
    folder: Annotated[
        Path, typer.Argument(help="ImageFolder: DIR/<class>/<image>, or DIR/{train,val,test}/<class>/<image>")
    ],
    adapter: Annotated[str, typer.Option(help="adapter the labels are for (need not be registered yet)")],
    base: Annotated[
        Path | None, typer.Option(help="base model dir, whose classes are the valid labels [default: embedded model]")
    ] = None,
) -> None:
    """Import a labelled ImageFolder into ADAPTER's label store as trusted labels (what `retrain` trains and gates on).

    Without train/val/test folders every image is split train/holdout by hashing; with them, train stays train
    and val/test become holdout: the trusted holdout the retrain gate checks a challenger on. Unreadable images
    are skipped and counted."""
    console = Console()
    base = base or paths.default_model_dir()
    try:
        classes = list(ModelMeta.read(base).classes)
        report = LabelStore(paths.home()).import_folder(adapter, folder, classes)
    except (ArtifactError, DataError, LabelError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    console.print(
        f"{adapter}: {report.added} new, {report.updated} relabelled example(s) from {folder} "
        f"({', '.join(f'{k}: {v}' for k, v in report.per_split.items())})"
    )
    if report.conflicts:
        console.print(
            f"[yellow]{report.conflicts} example(s) kept another label[/yellow] (an equal or higher trust label was "
            "stored before; see LabelStore.conflicts)"
        )
    if report.skipped:
        skipped = shorten(report.skipped)
        console.print(f"[yellow]skipped {len(report.skipped)} unreadable file(s):[/yellow] {skipped}")


def data_conflicts(
    adapter: Annotated[str, typer.Option(help="adapter whose labels to show")],
    all_: Annotated[bool, typer.Option("--all", help="also the resolved ones (outranked, replaced, settled)")] = False,
    limit: Annotated[int, typer.Option(min=1, help="newest rows shown")] = 50,
) -> None:
    """Labels that contradict an earlier label of the same image: kept aside, never a silent overwrite.

    A pending conflict (two labels of the same trust) leaves the image out of training and the gate's holdout
    until a higher-trust label (`adaptserve data add`, an admin token) settles it."""
    store = LabelStore(paths.home())
    rows = store.conflicts(adapter, unresolved_only=not all_, limit=limit)
    table = Table("at", "image", "kept", "offered", "by", "resolution")
    for c in rows:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(c["at"]))
        table.add_row(at, c["label_id"][:12], f"{c['kept_label']} ({c['kept_trust']})",
                      f"{c['offered_label']} ({c['trust']})", str(c["sender"]), c["resolution"])
    Console().print(table)
    s = store.summary(adapter)
    Console().print(f"{adapter}: {s['conflicts']} pending conflict(s), {s['contradictions']} contradiction(s) in all; "
                    f"labels by trust: {s['per_trust']}; trusted holdout: {s['trusted_holdout']}")
