"""The dashboard's page template, CSS and JavaScript: packaged files that the rendered page inlines exactly."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path
from string import Template

import pytest
import yaml
from pathspec import PathSpec

from monitoring.dashboard import example_data, render_dashboard

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ("dashboard.css", "dashboard.html", "dashboard.js")
STYLE_RE = re.compile(r"<style>(.*?)</style>", re.S)
INLINE_SCRIPT_RE = re.compile(r"<script>(.*?)</script>", re.S)


def packaged(name: str) -> str:
    return resources.files("monitoring").joinpath("static").joinpath(name).read_text(encoding="utf-8")


def test_the_static_folder_holds_exactly_the_three_assets() -> None:
    static = resources.files("monitoring").joinpath("static")
    assert sorted(item.name for item in static.iterdir() if item.is_file()) == list(ASSETS)


@pytest.mark.parametrize(("name", "start", "end"), [
    ("dashboard.css", ":root{--bg:#f5f6f8;", "margin-right:8px}\n"),
    ("dashboard.html", "<!DOCTYPE html>\n", "</body></html>\n"),
    ("dashboard.js", '(() => {\n"use strict";\n', "})();\n"),
], ids=["css", "html", "js"])
def test_asset_is_found_through_importlib_resources(name: str, start: str, end: str) -> None:
    text = packaged(name)
    assert text.startswith(start) and text.endswith(end) and "\r" not in text


def test_template_has_exactly_the_placeholders_render_fills() -> None:
    template = Template(packaged("dashboard.html"))
    assert template.is_valid()
    assert sorted(set(template.get_identifiers())) == [
        "config", "csp", "css", "data", "js", "meta_refresh", "noscript", "title"]


def test_page_inlines_the_packaged_css_and_js_and_the_csp_allows_that_script() -> None:
    page = render_dashboard(example_data(n_checks=3))
    assert STYLE_RE.findall(page) == ["\n" + packaged("dashboard.css")]
    assert INLINE_SCRIPT_RE.findall(page) == ["\n" + packaged("dashboard.js")]
    digest = base64.b64encode(hashlib.sha256(("\n" + packaged("dashboard.js")).encode()).digest()).decode()
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page).group(1)
    assert f"script-src 'sha256-{digest}';" in csp


def test_dollar_signs_in_the_data_are_not_taken_for_placeholders() -> None:
    name = "$title ${js} $$ $"
    page = render_dashboard({"adapters": [{"name": name}]}, title="costs $5")
    data = re.search(r'<script type="application/json" id="dashboard-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(data) == {"adapters": [{"name": name}]}
    assert f"<td>{name}</td>" in page and "<title>costs $5</title>" in page


# BentoML 1.4 matches include/exclude with pathspec's "gitwildmatch", which pathspec 1.x calls deprecated
@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")
def test_bentofile_ships_every_packaged_asset() -> None:
    config = yaml.safe_load((ROOT / "bentofile.yaml").read_text(encoding="utf-8"))
    include = PathSpec.from_lines("gitwildmatch", config["include"])
    exclude = PathSpec.from_lines("gitwildmatch", config.get("exclude") or [])
    for name in ASSETS:
        path = f"monitoring/static/{name}"
        assert include.match_file(path) and not exclude.match_file(path), path


def test_a_wheel_ships_the_assets_and_renders_the_same_page_from_the_zip(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")  # the build backend, used in place (--no-build-isolation: no network)
    pytest.importorskip("pip")
    src = tmp_path / "src"
    shutil.copytree(ROOT / "monitoring", src / "monitoring", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", str(src), "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("adaptserve-*.whl")
    assert {f"monitoring/static/{name}" for name in ASSETS} <= set(zipfile.ZipFile(wheel).namelist())
    # -S: no site-packages (no editable install of this checkout); the module is imported from inside the zip
    code = ("import sys, monitoring.dashboard as d; assert d.__file__.startswith(sys.argv[1]), d.__file__; "
            "sys.stdout.write(d.render_dashboard(d.example_data(n_checks=3)))")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    run = subprocess.run([sys.executable, "-S", "-c", code, str(wheel)], cwd=tmp_path, capture_output=True,
                         text=True, encoding="utf-8", env={**env, "PYTHONPATH": str(wheel)}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == render_dashboard(example_data(n_checks=3))
