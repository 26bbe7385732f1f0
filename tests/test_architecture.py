"""The package layers of stem/ hold (import-linter's `lint-imports`, configured in pyproject.toml), an upward
import or an import cycle breaks them, and docs/ARCHITECTURE.md names exactly the packages stem/ has."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess:
    if not LINT_IMPORTS.is_file():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(root / "pyproject.toml")], cwd=root,
                          env=env, capture_output=True, text=True, timeout=120)


def test_the_layers_and_acyclic_contracts_are_kept():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 kept, 0 broken" in out.stdout


def _lint_with(tmp_path: Path, module: str, addition: str) -> str:
    """lint-imports on a copy of stem/ where `module` (a path under stem/) ends with `addition`: its output,
    after checking that it failed."""
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "stem", root / "stem", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root)
    path = root / "stem" / module
    path.write_text(path.read_text() + addition)
    out = _lint(root)
    assert out.returncode == 1, out.stdout[-3000:]
    return out.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    """The E-step's module importing the run cache (inversion -> runs): refused with the offending line."""
    out = _lint_with(tmp_path, "inversion/em.py", "\nfrom stem.runs.cache import content_key  # noqa: E402,F401\n")
    assert "stem.inversion is not allowed to import stem.runs" in out
    assert "stem.inversion.em -> stem.runs.cache" in out


def test_two_modules_importing_each_other_break_the_acyclic_contract(tmp_path):
    """tables uses plots and display; display importing tables back is a cycle, even inside a function."""
    back = "\n\ndef _back():\n    from stem.reporting.tables import to_csv\n"
    out = _lint_with(tmp_path, "reporting/display.py", back)
    assert "No cycles are allowed in stem.reporting" in out


def _packages_in_doc() -> set[str]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    return set(re.findall(r"^\s*(?:[-|]\s*)?`?stem/(\w+)/`?", text, re.M))


def test_architecture_doc_names_every_package_and_no_other():
    on_disk = {p.parent.name for p in (ROOT / "stem").glob("*/__init__.py")}
    assert on_disk and _packages_in_doc() == on_disk


def test_stem_root_holds_no_module_but_init():
    assert sorted(p.name for p in (ROOT / "stem").glob("*.py")) == ["__init__.py"]


def test_readme_links_the_architecture_doc():
    assert "docs/ARCHITECTURE.md" in (ROOT / "README.md").read_text()


def _doc_texts() -> dict[str, str]:
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "configs").rglob("*.yaml"))]
    return {str(p.relative_to(ROOT)): p.read_text() for p in paths}


def test_module_paths_named_in_the_docs_exist():
    """Every `python -m stem....` command and every stem/....py file the README, docs/ and config comments name
    exists under that name. Catches: a doc still naming a module's old home after a move."""
    import importlib.util

    missing = []
    for name, text in _doc_texts().items():
        for module in re.findall(r"python -m (stem(?:\.\w+)+)", text):
            if importlib.util.find_spec(module) is None:
                missing.append((name, module))
        for path in re.findall(r"(?<![\w/])(stem/[\w/]+\.py)\b", text):
            if not (ROOT / path).is_file():
                missing.append((name, path))
    assert not missing, missing
