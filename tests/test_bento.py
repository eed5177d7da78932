"""`adaptserve bento build`: a Bento that carries the code and the base model (BentoML's export format)."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bento_build_packs_code_and_base_model(source_model: Path, tmp_path: Path) -> None:
    env = dict(os.environ, BENTOML_HOME=str(tmp_path / "bentoml"), ADAPTSERVE_BASE_MODEL=str(source_model))
    cli = [sys.executable, "-m", "pipelines.cli"]
    build = subprocess.run([*cli, "bento", "build"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    assert "Successfully built Bento" in build.stdout + build.stderr
    out = tmp_path / "adaptserve.bento"
    bentoml = [sys.executable, "-m", "bentoml"]
    export = subprocess.run([*bentoml, "export", "adaptserve:latest", str(out)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert export.returncode == 0, export.stderr
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert any(n.endswith("src/service/app.py") for n in names)
    weights = [n for n in names if n.startswith("./models/adaptserve-base/") and n.endswith("model.safetensors")]
    assert len(weights) == 1, names[:20]
    assert any(n.endswith("samples/holdout.npz") for n in names)  # the gates' source holdout travels with it
    # building again with an unchanged base model reuses the stored model instead of adding a copy
    again = subprocess.run([*cli, "bento", "build"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    listed = subprocess.run([*bentoml, "models", "list", "-o", "json"], env=env, capture_output=True, text=True)
    assert listed.stdout.count("adaptserve-base") == 1, listed.stdout


def test_bentofile_packages_are_the_project_dependencies() -> None:
    """One source of truth: the Bento installs exactly what pyproject.toml depends on (plus the HTTP client)."""
    import tomllib

    import yaml

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bento = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert sorted(bento["python"]["packages"]) == sorted([*deps, "httpx>=0.27"])


def test_bentofile_includes_every_packaged_file() -> None:
    """Every file the library ships (modules, migrations, templates) matches one of the Bento's include patterns."""
    import fnmatch

    import yaml

    patterns = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["include"]
    shipped = [p.relative_to(ROOT).as_posix() for pkg in ("service", "models", "pipelines", "monitoring")
               for p in (ROOT / pkg).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    missing = [f for f in shipped if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert missing == []
