"""The library stays free of Hydra, OmegaConf and W&B (STYLE.md): checked in a fresh interpreter."""

import ast
import pkgutil
import subprocess
import sys

from conftest import ROOT

import stem


def loaded_after_importing(modules: list[str], packages: tuple[str, ...]) -> list[str]:
    """The modules of `packages` in sys.modules after importing `modules` in a fresh interpreter."""
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted(k for k in sys.modules if k.split('.')[0] in {packages!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return ast.literal_eval(out.stdout.strip())


def test_importing_every_stem_module_loads_no_hydra_omegaconf_or_wandb():
    """Every module outside stem.app (the Hydra application, the one package allowed to import them)."""
    every = sorted(m.name for m in pkgutil.walk_packages(stem.__path__, "stem."))
    modules = [m for m in every if m != "stem.app" and not m.startswith("stem.app.")]
    assert "stem.diffusion.models" in modules and "stem.metrics.reconstruction" in modules and "stem.app.job" in every
    assert loaded_after_importing(modules, ("hydra", "omegaconf", "wandb")) == []


def test_the_public_api_resolves_and_import_stem_stays_cheap():
    """Every name of `stem.__all__` is importable from `stem` (the README's snippet uses them), and `import stem`
    alone imports no torch (each name is imported on first use)."""
    code = ("import sys, stem\n"
            "print('torch' in sys.modules)\n"
            "missing = [n for n in stem.__all__ if getattr(stem, n, None) is None]\n"
            "print(missing, stem.STEMInversion.__module__, stem.load_video.__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["False", "[] stem.inversion.methods stem.data.video"]


def test_importing_every_module_even_the_apps_loads_no_flask():
    """The web stack is the optional extra `stem[app]`: importing any module, the web apps' included, loads
    neither Flask nor Werkzeug (they are imported when an app starts, which then names the extra in one line if
    they are missing). Catches: a module-level `import flask` that would break `import stem.app...` (and `run.py`)
    on the core install."""
    every = sorted(m.name for m in pkgutil.walk_packages(stem.__path__, "stem."))
    assert "stem.app.study_server" in every
    assert loaded_after_importing(every, ("flask", "werkzeug")) == []
