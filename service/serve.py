"""`python -m service.serve --host H --port P`: `bentoml serve service.app:AdaptServe` with this service's own
Prometheus multiprocess directory.

BentoML keeps every service's multiprocess files in `$BENTOML_HOME/prometheus_multiproc_dir` and empties it at
each start, so two services on one machine would read each other's series and wipe each other's counters. Here
the directory is `$ADAPTSERVE_HOME/run/prometheus-<port>`: one per service (a home serves one port at a time),
emptied by its own start only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models import paths, settings


def multiproc_dir(home: Path, port: int) -> Path:
    return Path(home) / "run" / f"prometheus-{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=3000, help="HTTP port (default: 3000)")
    args = parser.parse_args(argv)
    try:  # validated before BentoML starts workers: one clear line instead of a traceback per worker
        settings.load()
    except settings.SettingsError as err:
        print(f"adaptserve: {err}", file=sys.stderr)
        return 2

    # heavy: BentoML's CLI and container, only once the settings are known to be good
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml_cli.cli import cli

    BentoMLContainer.prometheus_multiproc_dir.set(str(multiproc_dir(paths.home().absolute(), args.port)))
    serve = ["serve", "service.app:AdaptServe", "--host", args.host, "--port", str(args.port)]
    return cli.main(serve, prog_name="bentoml", standalone_mode=False) or 0


if __name__ == "__main__":
    sys.exit(main())
