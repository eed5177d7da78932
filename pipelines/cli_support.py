"""What every `adaptserve` command shares: how its help reads, how it fails, where option defaults come from, and
which base model it works on.

Invariants:
- Help text is printed as written: no rich markup, so `[default: ...]`, `[a-z0-9]` and `{0,63}` survive, and a
  boolean flag reads `--x / --no-x` with no value placeholder (typer's rich panels print `<bool>` beside every
  flag, `--help` too).
- An option that mirrors a config dataclass field takes its default and help from that field (`field_default`,
  `field_help`); one that mirrors a setting names the ADAPTSERVE_* variable (`setting_help`) and reads its value
  from `models.settings.load()` when the command runs, never from os.environ directly.
- Without --base, a command works on ADAPTSERVE_BASE_MODEL, else the embedded default model (built if missing).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from models import paths, settings

console = Console()
# click wraps help at 80 columns unless told otherwise; wider terminals get up to the project's line length
_CONTEXT = {"max_content_width": 119}


def make_app(help: str) -> typer.Typer:
    """A command group whose help is plain text (see the module docstring) and that shows its help when called
    bare. Only the root's markup mode counts for the whole tree; sub-groups use it too for `python -m` entry."""
    return typer.Typer(help=help, no_args_is_help=True, rich_markup_mode=None, context_settings=_CONTEXT)


def fail(message: str) -> NoReturn:
    """Print `error: <message>` (verbatim: a message may hold brackets) and exit 2."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)  # a path in it stays on one line
    raise typer.Exit(2)


def _field(cls: type, name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(cls)}[name]


def field_default(cls: type, name: str) -> Any:
    """The declared default of dataclass field `name` (a CLI option's default: one source of truth)."""
    return _field(cls, name).default


def field_help(cls: type, name: str) -> str:
    return str(_field(cls, name).metadata.get("help", ""))


def setting_help(field: str) -> str:
    """Help of an option that mirrors a setting: the setting's help, its variable and its declared default."""
    description = settings.Settings.model_fields[field].description
    return f"{description} [default: ${settings.env_name(field)}, else {settings.default(field)}]"


def load_settings() -> settings.Settings:
    """`settings.load()`, or exit 2 with the message naming the variable that holds a refused value."""
    try:
        return settings.load()
    except settings.SettingsError as err:
        fail(str(err))


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def base_model(given: Path | None = None) -> Path:
    """`given`, else ADAPTSERVE_BASE_MODEL, else the embedded default model (built first if missing)."""
    return given or load_settings().base_model or default_model()


def default_model() -> Path:
    """The embedded default source model under ADAPTSERVE_HOME, built (about a minute) if it is missing."""
    path = paths.default_model_dir()
    if not (path / "model.json").exists():
        console.print(f"embedded source model missing: building it at {path} (about a minute)")
        build_default_model(path, "resnet18", epochs=6, seed=0)
    return path


def build_default_model(out: Path, backbone: str, epochs: int, seed: int) -> tuple[Path, dict[str, Any]]:
    """Train the embedded source model on scikit-learn's digits, with a progress bar."""
    from pipelines.adapt import pretrain  # torch: only commands that train pay for importing it
    from pipelines.train import TrainConfig

    with progress() as bar:
        return pretrain(out, backbone, TrainConfig(epochs=epochs, batch_size=32, patience=3, seed=seed), progress=bar)
