"""`adaptserve data add` and `adaptserve data conflicts`: a labelled folder into the label store, and the labels that
contradict each other (registered by pipelines/cli.py under `adaptserve data`); `adaptserve labels requests`: which
captured predictions to label next."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from models import paths
from models.metadata import ArtifactError, ModelMeta
from pipelines.cli_support import console, make_app
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


labels_app = make_app("Labels: which captured predictions to label next.")


@labels_app.command("requests")
def labels_requests(
    adapter: Annotated[str, typer.Option(help="adapter whose captured predictions to choose from")],
    n: Annotated[int, typer.Option("-n", "--n", min=1, max=500, help="how many to request")] = 20,
    out: Annotated[
        Path | None, typer.Option(help="write each requested image to OUT/<id>.png, to look at while labelling")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the answer of GET /labels/requests (no images)")
    ] = False,
) -> None:
    """The N captured predictions of ADAPTER most worth a label: smallest margin first, then k-center greedy over
    the embeddings, so they differ from each other and from what is labelled. The same list as
    GET /labels/requests; label one with POST /feedback {"id": ID, "label": CLASS}."""
    # the service owns the input cache; this command reads it (lint-imports allows this one, as for `db copy`)
    from service.inputs import InputCache
    from service.label_requests import label_requests

    answer = label_requests(InputCache.from_env(paths.home()), adapter, n, images=out is not None)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for r in answer["requests"]:
            (out / f"{r['id']}.png").write_bytes(base64.b64decode(r.pop("image")))
    if as_json:
        print(json.dumps(answer))
        return
    table = Table("#", "prediction id", "predicted", "confidence", "margin", "version", "age")
    now = time.time()
    for i, r in enumerate(answer["requests"], 1):
        table.add_row(str(i), r["id"], r["predicted"], f"{r['confidence']:.3f}", f"{r['margin']:.3f}",
                      f"v{r['version']}", f"{now - r['created_at']:.0f} s")
    console.print(table)
    console.print(f"{adapter}: {len(answer['requests'])} of {answer['candidates']} unlabelled candidate(s); "
                  f"{answer['labelled']} captured prediction(s) already labelled. {answer.get('note', '')}")
    if answer["requests"]:
        where = f" (images in {out})" if out is not None else ""
        console.print(f"label one{where}: POST /feedback {{\"id\": \"{answer['requests'][0]['id']}\", "
                      "\"label\": \"<class>\"}")
