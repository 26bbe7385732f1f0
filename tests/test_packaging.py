"""The project as a package: a wheel built here (from a copy of the checkout), installed non-editable into a
folder of its own, runs `stem-run` from outside the repository with the packaged configs; the wheel holds the
library, run.py, every config and the LICENSE, and `imageio` is a test-only requirement;
LICENSE and CITATION.cff agree with pyproject.toml and the README's BibTeX. Each test names the bug it catches."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

TOP_LEVEL_IGNORED = {".git", ".venv", "outputs", "multirun", "wandb", "data", "build", "dist", ".pytest_cache",
                     ".ruff_cache"}  # run outputs, clips, environments: not part of a build


def _ignored(folder: str, names: list) -> set:
    skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    return skip | (TOP_LEVEL_IGNORED & set(names) if Path(folder) == ROOT else set())


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel path, site folder): the checkout copied (with a machine-local config planted in configs/local/),
    built with `pip wheel`, installed with `pip install --target` (no network, no dependencies: the test's
    interpreter has them)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_ignored)
    (src / "configs" / "local" / "default.yaml").write_text("# @package _global_\nseed: 7   # machine-local\n")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _call([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "wheel"), str(src)], tmp)
    (wheel,) = (tmp / "wheel").glob("stem-*.whl")
    _call([*pip, "install", "--no-deps", "--no-index", "--target", str(tmp / "site"), str(wheel)], tmp)
    return wheel, tmp / "site"


def _call(cmd: list, cwd: Path) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_wheel_holds_the_library_entry_point_configs_and_license(installed):
    """Catches: a subpackage of stem/ missing from pyproject's `packages`, configs/ not packaged (or a config group
    left out: the `**` glob), run.py not installed, the machine-local configs/local/default.yaml
    shipped, no `stem-run` or `stem-demo` entry point, no LICENSE in the wheel, `imageio` back among the install
    requirements."""
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
        entry_points = z.read(f"{info}/entry_points.txt").decode()
        metadata = z.read(f"{info}/METADATA").decode()
    library = {f"stem/{p.relative_to(ROOT / 'stem').as_posix()}" for p in (ROOT / "stem").rglob("*.py")}
    configs = {f"stem_configs/{p.relative_to(ROOT / 'configs').as_posix()}" for p in (ROOT / "configs").rglob("*.yaml")
               if p.parent.name != "local"}
    assert len(configs) > 50 and "stem_configs/hydra/launcher/slurm.yaml" in configs
    missing = (library | configs | {"run.py", "stem_configs/__init__.py"}) - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert not [n for n in names if n.startswith("stem_configs/local/")]
    assert re.search(r"^stem-run = run:main$", entry_points, re.M)
    assert re.search(r"^stem-demo = stem.app.demo_server:main$", entry_points, re.M)
    assert f"{info}/licenses/LICENSE" in names
    requires = re.findall(r"^Requires-Dist: (.+)$", metadata, re.M)
    imageio = [r for r in requires if re.match(r"imageio\b(?!-)", r)]
    assert imageio and all('extra == "dev"' in r for r in imageio), imageio
    assert any(r.startswith("imageio-ffmpeg") and "extra" not in r for r in requires)
    flask = [r for r in requires if re.match(r"flask\b", r, re.I)]
    assert flask and all('extra == "app"' in r for r in flask), flask   # the core install stays without a web stack
    selenium = [r for r in requires if re.match(r"selenium\b", r)]
    assert selenium and all('extra == "dev"' in r for r in selenium), selenium


@pytest.mark.parametrize("module", ["imageio", "selenium"])
def test_dev_only_packages_are_imported_by_tests_only(module):
    """`imageio` (not imageio-ffmpeg) and `selenium` sit in the dev extra because only tests import them. Catches:
    library code, run.py or a script starting to import one while the package does not require it."""
    pattern = re.compile(rf"^\s*(import {module}\b(?!_)|from {module}\b(?!_))", re.M)
    code = [*(ROOT / "stem").rglob("*.py"), ROOT / "run.py", *(ROOT / "scripts").glob("*.py")]
    assert not [p for p in code if pattern.search(p.read_text())]
    assert [p for p in (ROOT / "tests").rglob("*.py") if pattern.search(p.read_text())]  # the reason it is in dev


def test_flask_is_imported_only_by_stem_app():
    """Flask (the `app` extra) is imported by the web apps in stem/app/ only, and only inside a function there
    (so that `stem.app` modules import without the extra and the apps print one line naming it). Catches: a
    library module, run.py or a script importing Flask (the core install would break), a module-level import
    in stem/app."""
    pattern = re.compile(r"^(\s*)(import (flask|werkzeug)\b|from (flask|werkzeug)\b)", re.M)
    outside = [*(p for p in (ROOT / "stem").rglob("*.py") if "app" not in p.relative_to(ROOT / "stem").parts[:1]),
               ROOT / "run.py", *(ROOT / "scripts").glob("*.py")]
    assert not [p for p in outside if pattern.search(p.read_text())]
    inside = {p: pattern.findall(p.read_text()) for p in (ROOT / "stem" / "app").rglob("*.py")}
    assert [p for p, hits in inside.items() if hits], "no web app imports Flask"   # the reason it is in app
    assert not [p for p, hits in inside.items() for indent, *_ in hits if not indent], "a module-level Flask import"


def test_installed_stem_run_works_outside_the_repository(installed, tmp_path):
    """The generated `stem-run` script, from a folder outside the checkout, with only the installed copy on the
    path: a one-job sweep on the tiny setting writes its run directory (metrics.json) and the sweep table (the
    installed `stem.app.callbacks.SweepTableCallback`). Catches: run.py reading a relative `configs` (Hydra then
    looks for a package `configs`), pkg://stem_configs not found (no __init__.py), configs not packaged, `_target_`s
    that resolve only in the checkout, the checkout's configs used instead of the installed ones."""
    _, site = installed
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
    env.pop("WANDB_MODE", None)
    env.pop("STEM_DATA_ROOT", None)
    where = subprocess.run([sys.executable, "-c", "import importlib.util as u; print('\\n'.join(u.find_spec(m).origin "
                            "for m in ('stem', 'run', 'stem.app.callbacks', 'stem_configs')))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert all(Path(p).is_relative_to(site) for p in where.stdout.split()), where.stdout
    script = site / "bin" / "stem-run"
    sweep = tmp_path / "sweep"  # explicit: a bare `-m` needs the sweep-dir fix in stem/app/callbacks.py
    proc = subprocess.run([str(script), "-m", "debug=fast", "progress=false", "device=cpu", "data.n_frames=2",
                           "data.width=64", "data.height=64", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "outputs" / "cache").is_dir()  # paths resolve under the folder it runs from
    assert (sweep / "0" / "metrics.json").is_file() and (sweep / "debug.md").is_file()
    hydra_cfg = yaml.safe_load((sweep / "0" / ".hydra" / "hydra.yaml").read_text())["hydra"]
    sources = {s["provider"]: (s["schema"], s["path"]) for s in hydra_cfg["runtime"]["config_sources"]}
    assert sources["main"] == ("pkg", "stem_configs")


def test_the_installed_demo_composes_the_installed_configs(installed, tmp_path):
    """`stem-demo` composes its jobs with Hydra's compose API (`stem.app.configs.compose_run`): installed, outside
    the checkout, that is the packaged `pkg://stem_configs`. Catches: the compose API pointed at a configs/ folder
    that only a checkout has (initialize_config_dir on a missing folder)."""
    _, site = installed
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("STEM_DATA_ROOT", None)
    code = ("import stem.app.configs as c; cfg = c.compose_run(['data=wolf']); "
            "main = [s for s in cfg.hydra.runtime.config_sources if s.provider == 'main']; "
            "print(c.__file__, c.CONFIG_PATH, cfg.data.name, *[f'{s.schema}://{s.path}' for s in main])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    origin, path, name, source = proc.stdout.split()
    assert Path(origin).is_relative_to(site) and path == source == "pkg://stem_configs" and name == "wolf", proc.stdout


def test_run_py_in_a_checkout_reads_its_own_configs():
    """`python run.py` in the repository keeps reading configs/ beside run.py (what every other test relies on).
    Catches: the packaged configs (or another checkout's, through an editable install) taking precedence."""
    import run

    assert Path(run.CONFIG_PATH) == ROOT / "configs"


# --- LICENSE and CITATION.cff -----------------------------------------------------------------------------------

def _readme_bibtex() -> dict:
    """Fields of the one BibTeX entry in README.md (`key = {value}` lines)."""
    (entry,) = re.findall(r"```bibtex\n(@\w+\{.*?\n\})\n```", (ROOT / "README.md").read_text(), re.S)
    return dict(re.findall(r"^\s*(\w+)\s*=\s*\{(.*)\},?\s*$", entry, re.M))


def test_license_is_mit_everywhere():
    """Catches: pyproject's license and the LICENSE file (or CITATION.cff) disagreeing, LICENSE not packaged."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert pyproject["license"] == "MIT" and pyproject["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "Copyright (c) 2026 the stem authors" in text
    assert "Permission is hereby granted, free of charge, to any person obtaining a copy" in text
    assert yaml.safe_load((ROOT / "CITATION.cff").read_text())["license"] == "MIT"


def test_citation_cff_cites_the_repository_and_the_readme_paper():
    """CITATION.cff is CFF 1.2.0 (its required keys) for this software, with the README's BibTeX as
    preferred-citation. Catches: an author dropped, misspelled or out of order, another title, year or pages
    than the README's, given and family names swapped, a required key missing."""
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert {"cff-version", "message", "title", "authors"} <= set(cff) and cff["message"].strip()
    assert all("name" in a or "family-names" in a for a in cff["authors"])
    paper, bib = cff["preferred-citation"], _readme_bibtex()
    assert paper["type"] == "conference-paper"
    assert paper["title"] == bib["title"]
    authors = [tuple(s.strip() for s in a.split(",")) for a in bib["author"].split(" and ")]
    assert [(a["family-names"], a["given-names"]) for a in paper["authors"]] == authors and len(authors) == 7
    assert paper["year"] == int(bib["year"]) and f"{paper['start']}--{paper['end']}" == bib["pages"]
    assert paper["collection-title"] == bib["booktitle"]
