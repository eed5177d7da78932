"""The one settings schema: env parsing, messages naming the variable, and the README table generated from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from models import settings
from models.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_when_nothing_is_set() -> None:
    s = settings.load({})
    assert s.engine == "onnx" and s.drift_window == 500 and s.monitor is True and s.base_model is None
    assert s.model_dump() == {name: settings.default(name) for name in Settings.model_fields}


def test_empty_variables_keep_the_default() -> None:
    assert settings.load({"ADAPTSERVE_DRIFT_WINDOW": " ", "ADAPTSERVE_MONITOR": ""}).drift_window == 500


def test_values_are_parsed_by_type() -> None:
    s = settings.load({"ADAPTSERVE_DRIFT_WINDOW": "200", "ADAPTSERVE_MONITOR": "0", "ADAPTSERVE_POLL_S": "0.5",
                       "ADAPTSERVE_MAX_PIXELS": "40_000_000", "ADAPTSERVE_HOME": "/srv/a", "OTHER": "x"})
    assert (s.drift_window, s.monitor, s.poll_s, s.max_pixels, s.home) == (200, False, 0.5, 40_000_000, Path("/srv/a"))


def test_os_environ_is_the_default_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTSERVE_MAX_BATCH", "7")
    assert settings.load().max_batch == 7


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ADAPTSERVE_DRIFT_WINDOW": "abc"}, "ADAPTSERVE_DRIFT_WINDOW='abc' is not an integer (default 500)"),
        ({"ADAPTSERVE_MAX_BATCH": "1.5"}, "ADAPTSERVE_MAX_BATCH='1.5' is not an integer (default 32)"),
        ({"ADAPTSERVE_POLL_S": "soon"}, "ADAPTSERVE_POLL_S='soon' is not a number (default 0.25)"),
        ({"ADAPTSERVE_POLL_S": "0"}, "ADAPTSERVE_POLL_S='0' must be > 0.0 (default 0.25)"),
        ({"ADAPTSERVE_MONITOR": "maybe"}, "ADAPTSERVE_MONITOR='maybe' is not 1 or 0 (default 1)"),
        ({"ADAPTSERVE_DRIFT_ALPHA": "1"}, "ADAPTSERVE_DRIFT_ALPHA='1' must be < 1.0 (default 0.01)"),
        ({"ADAPTSERVE_MAX_BODY_BYTES": "10"}, "ADAPTSERVE_MAX_BODY_BYTES='10' must be >= 1024 (default 67108864)"),
        ({"ADAPTSERVE_ENGINE": "gpu"},
         "ADAPTSERVE_ENGINE='gpu' must be one of onnx, onnx-int8 or torch (default onnx)"),
        ({"ADAPTSERVE_ENGINE": "gpu", "ADAPTSERVE_THREADS": "-1"},
         "ADAPTSERVE_ENGINE='gpu' must be one of onnx, onnx-int8 or torch (default onnx); "
         "ADAPTSERVE_THREADS='-1' must be >= 0 (default 0)"),
    ],
    ids=["int", "int-from-float", "float", "gt", "bool", "lt", "ge", "choice", "two-at-once"],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as err:
        settings.load(env)
    assert str(err.value) == message


def test_bad_os_environ_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTSERVE_THREADS", "lots")
    with pytest.raises(SettingsError, match=r"^ADAPTSERVE_THREADS='lots' is not an integer \(default 0\)$"):
        settings.load()


def test_every_setting_has_help_section_and_env_name() -> None:
    rows = settings.reference_rows()
    assert len(rows) == len(Settings.model_fields)
    for section, variable, _shown, _bounds, text in rows:
        assert section in settings.SECTIONS.values() and variable.startswith("ADAPTSERVE_") and len(text) > 10


def test_lookup_helpers() -> None:
    assert settings.env_name("drift_window") == "ADAPTSERVE_DRIFT_WINDOW"
    assert settings.default("drift_window") == 500
    assert settings.help_text("drift_window").endswith("[env ADAPTSERVE_DRIFT_WINDOW]")
    with pytest.raises(KeyError):
        settings.default("no_such_knob")


def test_readme_table_is_current() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme == settings.replace_block(readme), (
        "README.md's configuration table is stale: run `python -m models.settings --write README.md`")


def test_readme_block_lists_every_variable_once() -> None:
    block = settings.readme_table()
    for name in Settings.model_fields:
        assert block.count(f"`{settings.env_name(name)}`") == 1


def test_stale_block_is_detected() -> None:
    stale = f"intro\n{settings.README_BEGIN}\n| `ADAPTSERVE_GONE` | 1 | | removed |\n{settings.README_END}\nrest\n"
    fixed = settings.replace_block(stale)
    assert fixed != stale and "ADAPTSERVE_GONE" not in fixed
    assert fixed.startswith("intro\n") and fixed.endswith("rest\n")


# Variables that are not settings: test and fault-injection hooks, and prefixes of settings families.
NOT_SETTINGS = {"ADAPTSERVE_REGISTRY_CRASH_AT", "ADAPTSERVE_COPY_CRASH_AFTER_BATCHES", "ADAPTSERVE_TEST_SOURCE_MODEL",
                "ADAPTSERVE_ARCHIVE_", "ADAPTSERVE_"}


def test_every_variable_the_code_names_is_a_setting() -> None:
    """A message or doc naming ADAPTSERVE_X for a knob that does not exist (a typo, a removed setting) fails here."""
    known = {settings.env_name(name) for name in Settings.model_fields} | NOT_SETTINGS
    named: dict[str, str] = {}
    for package in ("models", "pipelines", "monitoring", "service", "benchmarks"):
        for path in (ROOT / package).rglob("*.py"):
            for var in re.findall(r"ADAPTSERVE_[A-Z0-9_]*", path.read_text()):
                named.setdefault(var, str(path.relative_to(ROOT)))
    unknown = {var: where for var, where in named.items() if var not in known and not var.endswith("_")}
    assert unknown == {}


def test_a_given_mapping_ignores_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTSERVE_DRIFT_WINDOW", "abc")
    monkeypatch.setenv("ADAPTSERVE_MAX_BATCH", "7")
    s = settings.load({"ADAPTSERVE_THREADS": "3"})
    assert (s.drift_window, s.max_batch, s.threads) == (500, 32, 3) and isinstance(s, Settings)
