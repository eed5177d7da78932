"""Every command in README.md runs as written (issue 12).

The README's fenced ```bash / ```sh / ```console blocks (and `curl` lines in any fenced block) are parsed into
commands. Each one is either run, in README order, against a real `adaptserve serve` this test starts on a free
loopback port with a fresh ADAPTSERVE_HOME, or listed in SKIPPED with the reason CI cannot run it. A command in
neither fails the test, and so does a SKIPPED entry the README no longer holds: new commands cannot rot.

What a reader brings is brought here too: `.venv/bin/adaptserve` (a script running this checkout's CLI), the
images and the ImageFolder the README names (READER_FILES), and `<time>`-style placeholders, resolved as a reader
would: the newest path matching the glob. `localhost:3000` becomes the test service's port and `curl` fails on
an HTTP status >= 400 (`--fail-with-body`), so every command must exit 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL_FENCES = ("bash", "sh", "shell", "console")
PLACEHOLDER = re.compile(r"<[a-z]+>")
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=(\$\([^()]*\)|\S*)$")  # NAME=value or NAME=$(command): no program runs

SKIPPED = {
    "make serve": "the service itself (`make install`, `adaptserve pretrain`, `adaptserve serve`): this test starts "
    "the same `adaptserve serve` for the commands below",
    "make test": "the test suite itself, this test included",
    ".venv/bin/adaptserve demo": "starts its own service and runs the whole loop for minutes; tests/test_e2e.py "
    "runs it at small scale",
    ".venv/bin/adaptserve retrain --adapter site-a --wait": "needs a labelled stream (ADAPTSERVE_RETRAIN_MIN_TRAIN_"
    "LABELS training and ADAPTSERVE_RETRAIN_MIN_HOLDOUT_LABELS trusted holdout labels) and a minute of training: "
    "tests/test_retrain.py and tests/test_e2e.py run retrain jobs, tests/test_jobs_cli.py this command",
    ".venv/bin/adaptserve train --strategy lora --data path/to/imagefolder --backbone resnet50 --weights imagenet":
    "downloads ResNet-50's ImageNet weights (~100 MB) and trains at 224 px; tests/test_cli.py runs --backbone with "
    "a local checkpoint and checks the offline error",
    ".venv/bin/adaptserve adapters register site-y .adaptserve/runs/lora-<time> --base "
    ".adaptserve/models/resnet50-imagenet-<digest>": "registers the run of the ResNet-50 command above",
    "ADAPTSERVE_BASE_MODEL=.adaptserve/models/resnet50-imagenet-<digest> .venv/bin/adaptserve serve --port 3001":
    "a second service, on the ResNet-50 base above",
    ".venv/bin/adaptserve bento build": "packages a Bento for minutes; tests/test_bento.py runs it",
    "bentoml containerize adaptserve:latest": "needs Docker",
    "docker run -p 3000:3000 -v /srv/adaptserve:/home/bentoml/adaptserve -e ADAPTSERVE_ADMIN_TOKEN=... -e "
    "ADAPTSERVE_LABELLER_TOKENS=... adaptserve:<tag>": "needs Docker and the image above",
}
READER_FILES = {
    "digit.png": "a digit image",
    "digit.jpg": "the same as JPEG",
    "path/to/imagefolder": "an ImageFolder with the embedded model's classes: digits 0-9 under Gaussian noise, "
    "8 per class",
}


@dataclass(frozen=True)
class Command:
    text: str  # continuation lines joined, trailing comment dropped, whitespace collapsed
    block: int  # which fenced block: a variable assigned in a block is set for its later commands
    line: int  # where it starts in the README


def strip_comment(line: str) -> str:
    """`line` without its shell comment: from a `#` outside quotes that starts a word."""
    quote, escaped = "", False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[Command]:
    """The shell commands of a Markdown text, in order (see the module docstring for which lines count)."""
    commands: list[Command] = []
    fence, block, pending, start = None, -1, "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip().lower()
            block += fence is not None
            continue
        if fence is None or not (pending or _is_command(fence, stripped)):
            continue
        line = strip_comment(stripped[2:] if fence == "console" and not pending else stripped)
        if not line:
            continue
        start = start if pending else number
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        commands.append(Command(" ".join((pending + line).split()), block, start))
        pending = ""
    return commands


def _is_command(fence: str, line: str) -> bool:
    if fence == "console":
        return line.startswith("$ ")
    return fence in SHELL_FENCES or line.startswith("curl ")


@pytest.mark.parametrize(
    ("markdown", "expected"),
    [
        ("```bash\nmake serve   # builds it\n```", [("make serve", 0, 2)]),
        ("```sh\n# a comment\n\na b \\\n   c  # why\n```", [("a b c", 0, 4)]),
        ("```console\n$ adaptserve jobs list\nno jobs\n```", [("adaptserve jobs list", 0, 2)]),
        ("```\noutput\ncurl -s x:1/y\n```\n```bash\nX='#1' # x\n```", [("curl -s x:1/y", 0, 3), ("X='#1'", 1, 6)]),
        ("curl outside a fence\n```python\nprint(1)\n```", []),
        ('```bash\ncurl -d "{\\"a\\": \\"#\\"}" h\n```', [('curl -d "{\\"a\\": \\"#\\"}" h', 0, 2)]),
    ],
    ids=["comment", "continuation", "console-prompt", "curl-in-output-block", "not-shell", "escaped-quotes"],
)
def test_readme_commands_are_parsed_like_a_shell_reads_them(markdown: str, expected: list[tuple]) -> None:
    assert readme_commands(markdown) == [Command(*e) for e in expected]


def test_every_skipped_command_and_reader_file_is_still_in_the_readme() -> None:
    """A stale SKIPPED entry would let a renamed command go unchecked; the reasons must say something."""
    text = README.read_text()
    written = {c.text for c in readme_commands(text)}
    assert sorted(set(SKIPPED) - written) == []
    assert all(len(reason) > 10 for reason in SKIPPED.values())
    assert [name for name in READER_FILES if name not in text] == []


def test_every_command_to_run_uses_only_placeholders_a_reader_can_resolve() -> None:
    runs = [c for c in readme_commands(README.read_text()) if c.text not in SKIPPED]
    assert runs, "the README has no command CI runs"
    unresolvable = [c.text for c in runs for token in c.text.split() if PLACEHOLDER.search(token) and "/" not in token]
    assert unresolvable == [], "a <placeholder> the test can glob is a path; anything else belongs in SKIPPED"


# --------------------------------------------------------------------------------------------- running them


def _write_reader_files(cwd: Path) -> None:
    """What the README expects its reader to have: the adaptserve script of the venv, images, an ImageFolder."""
    from pipelines.data import DataSplits, digits_splits, per_class_subset, write_image_folder
    from pipelines.shifts import shift_set

    script = cwd / ".venv" / "bin" / "adaptserve"
    script.parent.mkdir(parents=True)
    script.write_text(f'#!/bin/sh\nexec {sys.executable} -m pipelines.cli "$@"\n')
    script.chmod(0o755)
    digits: DataSplits = digits_splits(32)
    digits.test.images[0].save(cwd / "digit.png")
    digits.test.images[0].save(cwd / "digit.jpg")
    folder = shift_set(per_class_subset(digits.test, 8, seed=0), "gaussian_noise", 3, 0)
    write_image_folder({"": folder}, cwd / "path" / "to" / "imagefolder")


def _resolve(command: str, cwd: Path, port: int) -> str:
    """The command a reader types: this service's port, and each `<placeholder>` path as the newest match."""
    command = re.sub(r"\b(localhost|127\.0\.0\.1):3000\b", f"127.0.0.1:{port}", command)
    words = []
    for word in command.split(" "):
        if PLACEHOLDER.search(word):
            matches = sorted(cwd.glob(PLACEHOLDER.sub("*", word)), key=lambda p: p.stat().st_mtime)
            assert matches, f"nothing matches {word} in {cwd} for: {command}"
            word = str(matches[-1].relative_to(cwd))
        words.append(word)
    return " ".join(words)


def _run(command: str, prelude: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    # curl as the README writes it (-s) exits 0 on a 404: make an HTTP error an error
    script = "\n".join(["set -eo pipefail", 'curl() { command curl --fail-with-body "$@"; }', *prelude, command])
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture
def reader(tmp_path: Path, source_model: Path) -> Iterator[tuple[Path, dict[str, str], int]]:
    """(working dir, environment, port) of a reader whose `adaptserve serve` runs on a fresh .adaptserve."""
    from benchmarks.serve import ServeProcess

    cwd = tmp_path / "reader"
    cwd.mkdir()
    _write_reader_files(cwd)
    env = {
        "ADAPTSERVE_HOME": str(cwd / ".adaptserve"),
        "ADAPTSERVE_BASE_MODEL": str(source_model),  # the embedded model, without building it again
        "ADAPTSERVE_THREADS": "1",
        "ADAPTSERVE_JOB_RUNNER": "0",  # no command run here needs one (retrain --wait is skipped)
        "ADAPTSERVE_DRIFT_INTERVAL_S": "0",
    }
    server = ServeProcess(env, tmp_path / "serve", cli=True).start()
    try:
        server.wait_ready(timeout=300)
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        yield cwd, {**os.environ, **env, "PYTHONPATH": pythonpath, "COLUMNS": "200"}, server.port
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_every_readme_command_runs_as_written(reader: tuple[Path, dict[str, str], int]) -> None:
    cwd, env, port = reader
    failures, ran = [], []
    preludes: dict[int, list[str]] = {}
    for command in readme_commands(README.read_text()):
        if command.text in SKIPPED:
            continue
        resolved = _resolve(command.text, cwd, port)
        done = _run(resolved, preludes.get(command.block, []), cwd, env)
        ran.append(command.text)
        if done.returncode != 0:
            failures.append(f"README.md:{command.line}: {resolved}\nexit {done.returncode}\n"
                            f"{(done.stdout + done.stderr)[-3000:]}")
        elif ASSIGNMENT.match(command.text):
            preludes.setdefault(command.block, []).append(resolved)
        time.sleep(0.5)  # a registry change reaches the service's workers within ADAPTSERVE_POLL_S (0.25 s)
    assert failures == [], "\n\n".join(failures)
    assert len(ran) >= 8, ran
